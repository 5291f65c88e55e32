"""Session fixtures of the boot tests: the mailbox host on an internet in a box (tests/e2e/world.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e import harness, sink
from tests.e2e.overrides import MOTO_PORT, put_parameters
from tests.e2e.test_mailhost import Booted, booted_mailbox_host, plan_test_stack
from tests.e2e.world import TEST_DQS_KEY, World, provider_sinks
from tools.zonefile import zone_files


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
    """The providers' MX hosts in the mailbox host's world (tests/e2e/world.py provider_sinks)."""
    with provider_sinks(internet.world) as running:
        yield running
