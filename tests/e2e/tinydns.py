"""Records for a booted guest's resolver in tests: every orgmail host runs unbound (issue 13, defect 2),
so a test's names go into it as local data and every lookup on the host (Postfix, rspamd) sees them.

`start_dns(guest, {"name.": {"A": [...], "TXT": [...]}})` adds them and returns the function that
removes them again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.e2e.harness import BootedHost

Records = dict[str, dict[str, list[str]]]


def start_dns(guest: BootedHost, records: Records) -> Callable[[], None]:
    """Make the guest's own resolver answer `records`; returns the function that undoes it."""
    status = guest.exec(["unbound-control", "status"])
    if status.returncode != 0:
        raise RuntimeError(f"the guest's unbound does not answer unbound-control: {status.stdout}{status.stderr}")
    rows = [f'{name} 60 IN {kind} "{v}"' if kind == "TXT" else f"{name} 60 IN {kind} {v}"
            for name, kinds in records.items() for kind, values in kinds.items() for v in values]
    for row in rows:
        guest.exec(["unbound-control", "local_data", row], check=True)

    def forget() -> None:
        guest.exec(["unbound-control", "local_data_remove", *records])
    return forget
