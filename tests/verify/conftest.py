"""Fixtures: the verify test stack, Knot serving its exported zones, TLS stubs for its hosts.

Without knotd the live tests skip with the reason; with CI=true they fail instead.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from components.dns_records import mta_sts_policy
from tests.verify import harness
from tools import verify


def _need_knot() -> None:
    why = harness.require("knotd", "knot") or harness.require("knotc", "knot")
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the live verify tests cannot run: {why}")
        pytest.skip(why)


@pytest.fixture(scope="session")
def stack() -> harness.Stack:
    return harness.build_stack()


@pytest.fixture(scope="session")
def outputs_file(stack: harness.Stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("outputs") / "outputs.json"
    path.write_text(json.dumps(stack.outputs, indent=2))
    return path


@pytest.fixture(scope="session")
def knot(stack: harness.Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Knot]:
    _need_knot()
    server = harness.Knot(tmp_path_factory.mktemp("knot"))
    server.start(stack.zones)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> harness.TestCA:
    return harness.TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def expected(outputs_file: Path) -> verify.Expected:
    return verify.load_expected(harness.STACK_FILE, json.loads(outputs_file.read_text()))


@pytest.fixture(scope="session")
def stubs(ca: harness.TestCA, expected: verify.Expected) -> Iterator[harness.Stubs]:
    s = harness.Stubs(ca, mta_sts_policy(expected.settings))
    yield s
    s.close()


@dataclass
class Bed:
    """One test's view: zones to edit, stubs to break, and a verifier run against both."""

    zones: dict[str, list[str]]
    knot: harness.Knot
    stubs: harness.Stubs
    expected: verify.Expected
    opts: verify.Options

    def run(self) -> list[verify.Check]:
        self.knot.serve(self.zones)
        return verify.run_checks(self.expected, self.opts)


@pytest.fixture
def bed(stack: harness.Stack, knot: harness.Knot, stubs: harness.Stubs, expected: verify.Expected,
        ca: harness.TestCA) -> Iterator[Bed]:
    opts = verify.Options(nameserver=harness.DNS_ADDR, ports=dict(harness.PORTS), https_port=harness.HTTPS_PORT,
                          ca_file=str(ca.ca_file), dnsbls=harness.DNSBL_ZONES, timeout=3.0)
    yield Bed(zones=copy.deepcopy(stack.zones), knot=knot, stubs=stubs, expected=expected, opts=opts)
    stubs.reset()
