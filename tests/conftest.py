"""Shared by every test layer.

`make test` runs pytest on two workers (pytest-xdist, `--dist loadgroup`). Tests that share machine-wide
state run in one group each, on one worker, in file order: the booted hosts (network namespaces, loop
devices, session fixtures such as the internet in a box), the verifier's services on fixed loopback
ports, and the artefact validators (the cached Debian root). Everything else spreads over both workers,
so the other layers run beside the booted tests, which spend most of their time waiting on the guests.
"""

from __future__ import annotations

import pytest

GROUPS = {"e2e": "boot", "verify": "verify", "validate": "validate"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        layer = item.nodeid.split("/")[1] if item.nodeid.startswith("tests/") else ""
        if layer in GROUPS:
            item.add_marker(pytest.mark.xdist_group(GROUPS[layer]))
