#!/usr/bin/python3
"""orgmail-cache-flush: on a cluster edge or shard, a mailbox changed in the directory (blocked, a new password,
moved, removed, added) leaves this host's Dovecot auth cache within seconds, not after its 5-minute TTL.

The directory logs every change to a mailbox in `mailbox_changes` (directory.sql: one row per change, the
address, or `*` when a shard's address changed and every route may be stale). orgmail-cache-flush.timer runs
this every 15 s: it reads the rows after the last one it handled (its position in STATE), flushes those users
(`doveadm auth cache flush ADDRESS...`; the whole cache for `*` or more than FLUSH_ALL_OVER addresses), then
moves its position on. Without a position (a new host) or when the directory's newest row is older than it
(a directory made anew), it flushes the whole cache once. Rows a host never saw are harmless: the cache forgets
everything after its TTL anyway.

It logs in as the host's own directory login, from the Dovecot file orgmail-bootstrap wrote from SSM
(/etc/dovecot/orgmail-directory.conf), TLS required, through libpq (orgmail_pq). A directory that does not
answer leaves the position as it was (exit 1; the timer tries again). Its lines carry their syslog level
(`<5>` notice, `<3>` error) for the journal: the unit logs nothing below notice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

sys.path[:0] = ["/usr/local/lib/orgmail", os.path.dirname(os.path.realpath(__file__))]
from orgmail_pq import conninfo, fetch  # noqa: E402

LOGIN = "/etc/dovecot/orgmail-directory.conf"
STATE = "/var/lib/orgmail/cache-flush.position"
FLUSH_ALL_OVER = 500
BATCH = 100
ADDRESS_RE = re.compile(r"[a-z0-9._+-]+@[a-z0-9.-]+|\*")


def login_settings(text: str) -> dict[str, str]:
    """The directory login in Dovecot's `pgsql HOST { parameters { key = value ... } }` block."""
    host = re.search(r"^pgsql (\S+) \{$", text, re.M)
    settings = {"hosts": host[1]} if host else {}
    for key, value in re.findall(r"^\s*(dbname|user|password) = (\S+)$", text, re.M):
        settings[key] = value
    missing = [k for k in ("hosts", "user", "password", "dbname") if not settings.get(k)]
    if missing:
        raise ValueError(f"{LOGIN}: no {', '.join(missing)}")
    return settings


def query(position: int | None) -> str:
    """The changes after `position`, and always the newest row (to see a directory made anew)."""
    after = -1 if position is None else int(position)
    return (f"SELECT id, address FROM mailbox_changes WHERE id > {after} "
            "OR id = (SELECT max(id) FROM mailbox_changes) ORDER BY id")


def plan(position: int | None, rows: list[tuple[str, ...]]) -> tuple[list[str] | None, int | None]:
    """(the addresses to flush, None for the whole cache; the new position). Rows as `query` returns them."""
    ids = [int(row[0]) for row in rows]
    newest = max(ids) if ids else None
    if position is None or (newest is not None and newest < position):
        return None, newest if newest is not None else 0
    addresses = sorted({row[1] for row in rows if int(row[0]) > position})
    bad = [a for a in addresses if not ADDRESS_RE.fullmatch(a)]
    if bad:
        raise ValueError(f"the directory answered a malformed address {bad[0][:100]!r}")
    if "*" in addresses or len(addresses) > FLUSH_ALL_OVER:
        return None, newest
    return addresses, newest if newest is not None else position


def flush(addresses: list[str] | None) -> None:
    if addresses is None:
        subprocess.run(["doveadm", "auth", "cache", "flush"], check=True, capture_output=True, text=True)
        return
    for i in range(0, len(addresses), BATCH):
        subprocess.run(["doveadm", "auth", "cache", "flush", *addresses[i:i + BATCH]], check=True,
                       capture_output=True, text=True)


def read_position(path: str = STATE) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def save_position(position: int, path: str = STATE) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.new", "w") as f:
        f.write(f"{position}\n")
    os.replace(f"{path}.new", path)


def main(login: str = LOGIN, state: str = STATE) -> int:
    position = read_position(state)
    try:
        with open(login) as f:
            info = conninfo(login_settings(f.read()), "orgmail-cache-flush")
        addresses, new_position = plan(position, fetch(info, query(position)))
        if addresses != []:
            flush(addresses)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"<3>orgmail-cache-flush: {e}; position {position} kept", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"<3>orgmail-cache-flush: doveadm failed: {(e.stderr or '').strip()[-300:]}; position {position} kept",
              file=sys.stderr)
        return 1
    if new_position is not None and new_position != position:
        save_position(new_position, state)
    if addresses is None:
        print(f"<5>orgmail-cache-flush: whole auth cache flushed (position {position} -> {new_position})")
    elif addresses:
        print(f"<5>orgmail-cache-flush: flushed {', '.join(addresses[:20])}{' ...' if len(addresses) > 20 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
