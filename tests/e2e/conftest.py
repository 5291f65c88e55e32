"""Session fixtures of the boot tests: the mailbox host on an internet in a box (tests/e2e/world.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e import harness, sink
from tests.e2e.overrides import MOTO_PORT, put_parameters
from tests.e2e.test_mailhost import Booted, booted_mailbox_host, plan_test_stack
from tests.e2e.world import PROVIDERS, TEST_DQS_KEY, VPC_RESOLVER_V4, World
from tests.verify.harness import TestCA
from tools.zonefile import zone_files

# Gmail's second domain, as a provider whose first MX has only an IPv6 address: a host that may
# deliver over IPv6 always tries it first, so defect 1 shows on every message, not on half of them.
GOOGLEMAIL, V6_FIRST_MX, V6_FIRST_IP = "googlemail.example", "alt1.gmail-smtp-in.l.google.example", "2001:db8:25::27"
# A provider that answers every recipient 451 (a throttling or busy receiver).
BUSY, BUSY_MX, BUSY_V4, BUSY_V6 = "busy.example", "mx.busy.example", "203.0.113.28", "2001:db8:25::28"


@dataclass
class Internet(Booted):
    """The dev stack's mailbox host, booted with the world attached (``probe``/``sh`` as for Booted)."""

    world: World


@pytest.fixture(scope="session")
def internet() -> Iterator[Internet]:
    """One boot for every internet test: the world is linked to the guest before it boots, so the
    host comes up on the network as an EC2 host does."""
    harness.require_e2e()
    stack = plan_test_stack()
    outputs = stack.run.outputs
    zones = zone_files(stack.settings, outputs["dnsRecords"], outputs["hostIps"], from_plan=False)
    with contextlib.ExitStack() as cleanup:
        worlds: list[World] = []

        def before_boot(guest: harness.BootedHost) -> None:
            put_parameters(guest, guest.start_moto(MOTO_PORT), stack.run, stack.settings.region, stack.host)
            worlds.append(cleanup.enter_context(World(guest, zones, outputs["hostIps"],
                                                      host_ipv4=outputs["hostIps"][stack.settings.mail_host],
                                                      dqs_keys=[TEST_DQS_KEY])))

        with booted_mailbox_host(stack, "internet", before_boot, {25, 465, 587, 993, 995, 11332}) as booted:
            yield Internet(booted.guest, booted.stack, booted.status, worlds[0])


@pytest.fixture(scope="session")
def sinks(internet: Internet) -> Iterator[sink.RunningSinks]:
    """The providers' MX hosts in the world (tests/e2e/sink.py), on IPv4 and IPv6, with STARTTLS (a
    test CA's certificate): Gmail's (refuses senders without reverse DNS), Microsoft's, and a busy one."""
    world = internet.world
    gmail, microsoft = PROVIDERS["gmail"], PROVIDERS["microsoft"]
    for ip in (V6_FIRST_IP, BUSY_V4, BUSY_V6):
        world.add_address(ip)
    world.set_records(GOOGLEMAIL, "MX", [f"5 {V6_FIRST_MX}.", f"10 {gmail.mx}."])
    world.set_records(V6_FIRST_MX, "AAAA", [V6_FIRST_IP])
    world.set_records(BUSY, "MX", [f"10 {BUSY_MX}."])
    world.set_records(BUSY_MX, "A", [BUSY_V4])
    world.set_records(BUSY_MX, "AAAA", [BUSY_V6])
    work = world.dir / "sinks"
    work.mkdir()
    pem = TestCA(work).issue([gmail.mx, V6_FIRST_MX, microsoft.mx, BUSY_MX])
    config = sink.SinkConfig(
        sinks=(sink.Sink("gmail", gmail.mx, (gmail.ipv4, gmail.ipv6, V6_FIRST_IP), "gmail"),
               sink.Sink("microsoft", microsoft.mx, (microsoft.ipv4, microsoft.ipv6), "accept"),
               sink.Sink("busy", BUSY_MX, (BUSY_V4, BUSY_V6), "tempfail")),
        log=str(work / "deliveries.jsonl"), nameserver=VPC_RESOLVER_V4, cert=str(pem.cert), key=str(pem.key))
    running = sink.start(config, work, prefix=["nsenter", f"--net={world.netns}", "--"])
    try:
        yield running
    finally:
        running.stop()
