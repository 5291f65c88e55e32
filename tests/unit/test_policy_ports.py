"""The policy pack (policy/, its own venv) cannot import the program: its table of the cluster's own ports is kept
equal to the program's here, so the pack neither refuses a port the cluster needs nor allows one it dropped."""

from __future__ import annotations

import ast
from pathlib import Path

from components.firewall import CACHE_PORT, DIRECTORY_PORT, SHARD_PORTS, ClusterFirewallArgs, cluster_rules
from components.userdata import MAIL_PORTS

POLICIES = Path(__file__).resolve().parents[2] / "policy" / "orgmail_policies.py"


def policy_constant(name: str) -> object:
    for node in ast.parse(POLICIES.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not in {POLICIES}")


def test_the_policy_packs_cluster_ports_are_the_ports_the_cluster_opens_between_its_groups() -> None:
    rules = cluster_rules(ClusterFirewallArgs(stack="s", vpc_id="vpc", lb_cidrs=("10.0.0.0/27",)))
    # The mail ports (a relay's 25 from the edges) are the pack's MAIL_PORTS, open from anywhere.
    between_groups = {r.port for r in rules if r.direction == "ingress" and r.peer_group} - set(MAIL_PORTS)
    assert between_groups == {*SHARD_PORTS, DIRECTORY_PORT, CACHE_PORT}
    assert set(policy_constant("CLUSTER_INTERNAL_PORTS")) == between_groups  # type: ignore[call-overload]
