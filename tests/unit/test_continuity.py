"""Issue 13 defect 3: the hosts of a stack are never all down at once, neither by unattended-upgrades'
automatic reboots nor by a `pulumi up` that replaces them.

The mock engine shows what the program asks of Pulumi (each host's instance waits on the host
before it, through a bare depends_on, no input). What the engine then does with it (deletes and
creates in that order, and no cascade of delete-before-replace) is Pulumi's step generator, which
mocks do not run: see docs/acme.md, "Replacing and rebooting the hosts".
"""

from __future__ import annotations

import itertools
import json
import re

import pytest

from components.server import REBOOT_STAGGER_MINUTES, staggered_reboot_time
from components.settings import load_settings
from tests.unit.conftest import raw_config, run_stack
from tests.unit.test_rate_limits import sync_module
from tools.mockengine import MockRun

INSTANCE = "aws:ec2/instance:Instance"
ATTACHMENT = "aws:ec2/volumeAttachment:VolumeAttachment"


def reboot_time(run: MockRun, host: str) -> str:
    """The host's reboot time as orgmail-sync writes it from the config parameter (a day-2 setting)."""
    config = "".join(p.inputs["value"] for p in sorted(run.of_type("aws:ssm/parameter:Parameter"),
                                                        key=lambda p: p.inputs["name"])
                     if p.inputs["name"].rsplit("/part-", 1)[0].endswith("/config"))
    hostname = run.one(INSTANCE, f"{host}-instance").inputs["tags"]["Name"]
    text = sync_module().unattended_upgrades(False, json.loads(config)["upgrades"]["rebootTimes"][hostname])
    [time] = re.findall(r'Unattended-Upgrade::Automatic-Reboot-Time "([0-9:]+)";', text)
    return time


@pytest.mark.parametrize(("base", "index", "expected"), [
    ("04:30", 0, "04:30"), ("04:30", 1, "05:00"), ("04:30", 2, "05:30"), ("23:45", 1, "00:15"), ("00:00", 3, "01:30"),
])
def test_staggered_reboot_time(base: str, index: int, expected: str) -> None:
    assert staggered_reboot_time(base, index) == expected


@pytest.mark.parametrize(("stack", "hosts"), [("dev", ["mail"]), ("large", ["mail", "mx2"]),
                                              ("isp-single", ["mail", "mx2", "mx3"])])
def test_each_host_reboots_at_its_own_time(stack: str, hosts: list[str]) -> None:
    """The mailbox host at upgrades.rebootTime, each relay 30 minutes after the one before it: an MX
    always answers while another reboots."""
    run = run_stack(stack)
    base = load_settings(raw_config(stack), stack).upgrades.reboot_time
    assert reboot_time(run, "mail") == base
    assert [reboot_time(run, h) for h in hosts] == [staggered_reboot_time(base, i) for i in range(len(hosts))]
    assert len(set(reboot_time(run, h) for h in hosts)) == len(hosts)
    assert REBOOT_STAGGER_MINUTES >= 30  # an automatic reboot and the services' start take minutes


@pytest.mark.parametrize(("stack", "hosts"), [("large", ["mail", "mx2"]), ("isp-single", ["mail", "mx2", "mx3"])])
def test_hosts_are_made_and_replaced_one_after_another(stack: str, hosts: list[str]) -> None:
    """Each host's instance depends on the host before it having its instance and volume attached, so
    one `pulumi up` that replaces them all (a new bootstrap, a new image) replaces them in turn."""
    run = run_stack(stack)
    order = [r.urn for r in run.resources]
    first = run.one(INSTANCE, f"{hosts[0]}-instance")
    other_hosts = {r.urn for r in run.of_type(INSTANCE) + run.of_type(ATTACHMENT)} - {first.urn}
    assert not other_hosts & set(first.dependencies)  # the mailbox host waits for no other host
    for before, host in itertools.pairwise(hosts):
        inst = run.one(INSTANCE, f"{host}-instance")
        ready = run.one(ATTACHMENT, f"{before}-data-attachment")
        assert ready.inputs["instanceId"] == run.one(INSTANCE, f"{before}-instance").id
        assert ready.urn in inst.dependencies
        # A bare depends_on, not an input: replacing the host before it (delete-before-replace) must not
        # make Pulumi delete this one first as a dependent that would be replaced too.
        assert all(ready.urn not in deps for deps in inst.property_dependencies.values())
        # The program registers it only once the host before it is done (the SDK awaits that URN,
        # which the engine resolves when the attachment's step has finished).
        assert order.index(ready.urn) < order.index(inst.urn)
