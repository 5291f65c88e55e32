"""The edges' shared rspamd store (components/edge_cache.py): ElastiCache for Valkey in the Pulumi graph, the
edges' tunnel and rspamd configuration from the bootstrap, and the cases that must be refused. The booted proof
(greylisting across edges, impostor stores refused) is in tests/e2e/test_cluster.py."""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from components.edge import CACHE_TUNNEL, EDGE_FILES, EDGE_PACKAGES, EDGE_SERVICES, render_edge_files
from components.edge_cache import (
    CACHE_HOST_PARAMETER,
    CACHE_NODES,
    CACHE_TOKEN_PARAMETER,
    CACHE_TUNNEL_PORT,
    REPLICATION_GROUP_ID_MAX,
    replication_group_id,
)
from components.firewall import CACHE_PORT
from components.settings import load_settings
from components.tiers import ISP_CLUSTER
from tests.unit.conftest import raw_config
from tests.unit.test_cluster import PARAM, SG, cluster_raw, problems, run, subnets
from tests.unit.test_cluster_hosts import EDGE
from tools import deploy_checks as dc

GROUP = "aws:elasticache/replicationGroup:ReplicationGroup"
SUBNET_GROUP = "aws:elasticache/subnetGroup:SubnetGroup"


def test_the_store_is_multi_az_encrypted_private_and_reached_by_the_edges_alone() -> None:
    r = run()
    [group] = r.of_type(GROUP)
    i = group.inputs
    assert i["engine"] == "valkey" and i["nodeType"] == ISP_CLUSTER.cache_node_type
    assert i["numCacheClusters"] == CACHE_NODES >= 2
    assert i["automaticFailoverEnabled"] is True and i["multiAzEnabled"] is True
    assert i["transitEncryptionEnabled"] is True and i["atRestEncryptionEnabled"] is True
    assert i["port"] == CACHE_PORT and i["replicationGroupId"] == replication_group_id("isp")
    assert i["snapshotRetentionLimit"] > 0  # Bayes tokens are months of training
    # In the private subnets of every zone (no route out), as the directory.
    [subnet_group] = r.of_type(SUBNET_GROUP)
    assert sorted(subnet_group.inputs["subnetIds"]) == sorted(s.id for s in subnets("private"))
    assert i["subnetGroupName"] == subnet_group.inputs["name"]
    groups = {g.name.removeprefix("firewall-"): g.id for g in r.of_type(SG)}
    assert i["securityGroupIds"] == [groups["cache"]]


def test_the_edges_and_only_the_edges_hold_the_stores_token_and_name() -> None:
    r = run()
    [group] = r.of_type(GROUP)
    params = {p.inputs["name"]: p for p in r.of_type(PARAM)}
    token = params[f"/orgmail/isp/edge/{CACHE_TOKEN_PARAMETER}"]
    assert token.inputs["type"] == "SecureString"
    assert token.inputs["value"] == group.inputs["authToken"]
    # Letters and digits (no '/', '"' or '@', which ElastiCache refuses; nothing to quote in rspamd's config).
    generator = r.one("random:index/randomPassword:RandomPassword", "cluster-cache-auth-token").inputs
    assert generator["length"] == 64 and generator["special"] is False
    assert params[f"/orgmail/isp/edge/{CACHE_HOST_PARAMETER}"].inputs["type"] == "String"
    assert not [n for n in params if "cache" in n and not n.startswith("/orgmail/isp/edge/")]


def test_the_store_meets_elasticaches_published_constraints_and_the_check_catches_a_break() -> None:
    r = run()
    assert [p for p in dc.check_run(r) if p.type in (GROUP, SUBNET_GROUP)] == []
    [group] = r.of_type(GROUP)
    for change, path in (({"numCacheClusters": 1}, "numCacheClusters"), ({"automaticFailoverEnabled": False}, "multiAzEnabled"),
                         ({"transitEncryptionEnabled": False}, "authToken"), ({"authToken": "a/b" * 8}, "authToken"),
                         ({"replicationGroupId": "orgmail--x"}, "replicationGroupId"),
                         ({"snapshotWindow": "06:30-07:00"}, "snapshotWindow"),
                         ({"maintenanceWindow": "sun:00:30-sun:01:30"}, "snapshotWindow")):
        found = dc.check_resource(replace(group, raw_inputs={**group.raw_inputs, **change}))
        assert any(p.path == path for p in found), (change, found)


@pytest.mark.parametrize("namespace", ["isp", "a" * 60, "x" * 33, "Prod_Mail.Org-" + "e" * 30])
def test_the_replication_group_id_is_valid_for_any_stack_name(namespace: str) -> None:
    name = replication_group_id(namespace)
    assert len(name) <= REPLICATION_GROUP_ID_MAX and re.fullmatch(r"[a-z](?:-?[a-z0-9])*", name), name


def test_two_long_stack_names_never_share_a_replication_group() -> None:
    assert replication_group_id("a" * 50 + "1") != replication_group_id("a" * 50 + "2")


def test_cache_node_type_is_a_setting_checked_whole() -> None:
    assert load_settings(cluster_raw(cacheNodeType="cache.r7g.xlarge"), "isp").cluster.cache_node_type == "cache.r7g.xlarge"  # type: ignore[union-attr]
    for bad in ("m7g.large", "cache.m7g.large\n", "db.m6i.large", 7, "cache..large"):
        found = problems(cluster_raw(cacheNodeType=bad))
        assert any(p.startswith("orgmail:cluster.cacheNodeType: must be an ElastiCache node type") for p in found), (bad, found)
    assert load_settings(raw_config("isp"), "isp").cluster.cache_node_type == ISP_CLUSTER.cache_node_type  # type: ignore[union-attr]


# --- the edge: stunnel to the store, rspamd through it -----------------------------------------------------


def test_an_edge_runs_no_redis_of_its_own_and_starts_its_tunnel_before_rspamd() -> None:
    assert "redis-server" not in EDGE_PACKAGES and "stunnel4" in EDGE_PACKAGES
    assert EDGE_SERVICES.index(f"stunnel@{CACHE_TUNNEL}.service") < EDGE_SERVICES.index("rspamd.service")
    assert "redis-server.service" not in EDGE_SERVICES
    assert not [f for f in EDGE_FILES if f[1] == "/etc/rspamd/local.d/redis.conf"]  # written with the token at boot
    assert "/etc/rspamd/local.d/redis.conf" not in {f.path for f in render_edge_files(EDGE)}


def cache_fragment() -> str:
    """The edge bootstrap's lines that read the store's name and token and write the tunnel and rspamd's redis.conf."""
    text = {f.path: f.content for f in render_edge_files(EDGE)}["/usr/local/sbin/orgmail-bootstrap"]
    start = text.index(f"cache_host=$(param {CACHE_HOST_PARAMETER})")
    end = text.index("\n", text.index("| secret_file /etc/rspamd/local.d/redis.conf _rspamd")) + 1
    return text[start:end]


def run_fragment(tmp_path: Path, host: str, token: str) -> subprocess.CompletedProcess[str]:
    """The fragment in bash with SSM answering `host` and `token`, writing under tmp_path instead of /etc."""
    script = cache_fragment().replace("/etc/stunnel/", f"{tmp_path}/").replace(
        "secret_file /etc/rspamd/local.d/redis.conf _rspamd", f"secret_file {tmp_path}/redis.conf _rspamd")
    prelude = (
        "set -euo pipefail\n"
        'log() { echo "orgmail-bootstrap: $*"; }\n'
        f'param() {{ case $1 in {CACHE_HOST_PARAMETER}) printf "%s" "$HOST";; {CACHE_TOKEN_PARAMETER}) '
        'printf "%s" "$TOKEN";; esac; }\n'
        'secret_file() { cat >"$1"; }\n')
    return subprocess.run(["bash", "-c", prelude + script], capture_output=True, text=True, timeout=30,
                          env={"HOST": host, "TOKEN": token, "PATH": "/usr/bin:/bin"})


NAME = "master.orgmail-isp-edges.x1y2z3.eun1.cache.amazonaws.com"
TOKEN = "A" * 64


def test_the_tunnel_verifies_the_stores_certificate_and_name_and_follows_a_failover(tmp_path: Path) -> None:
    res = run_fragment(tmp_path, NAME, TOKEN)
    assert res.returncode == 0, res.stderr
    conf = (tmp_path / f"{CACHE_TUNNEL}.conf").read_text()
    lines = [line for line in conf.splitlines() if line and not line.startswith(";")]
    assert lines == ["foreground = yes", "syslog = no", "setuid = stunnel4", "setgid = stunnel4", "pid =", "[cache]",
                     "client = yes", f"accept = 127.0.0.1:{CACHE_TUNNEL_PORT}", f"connect = {NAME}:{CACHE_PORT}",
                     "delay = yes", "verifyChain = yes", f"checkHost = {NAME}",
                     "CAfile = /etc/ssl/certs/ca-certificates.crt", "sslVersionMin = TLSv1.2"]
    assert (tmp_path / "redis.conf").read_text() == f'servers = "127.0.0.1:{CACHE_TUNNEL_PORT}";\npassword = "{TOKEN}";\n'


@pytest.mark.parametrize(("host", "token"), [
    (f"{NAME}\nconnect = 203.0.113.9:6379", TOKEN),  # a second line would be a second setting
    ("", TOKEN),
    ("-" + NAME, TOKEN),
    (NAME.upper(), TOKEN),
    (NAME, 'short'),
    (NAME, 'A' * 40 + '";\nservers = "203.0.113.9'),  # would break out of rspamd's string
    (NAME, "A" * 129),
])
def test_a_malformed_store_name_or_token_stops_the_boot_and_writes_nothing(tmp_path: Path, host: str, token: str) -> None:
    res = run_fragment(tmp_path, host, token)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert f"shared store in SSM refused: {CACHE_HOST_PARAMETER} or {CACHE_TOKEN_PARAMETER} malformed" in res.stdout
    assert list(tmp_path.iterdir()) == []
