#!/usr/bin/python3
"""orgmail-authflush: on a cluster edge or shard, flushes a mailbox from Dovecot's auth cache as soon as
the directory changes it, so that a block, a new password, a move or a removal counts at once rather than
after auth_cache_ttl.

The directory announces each change when it commits (directory.sql, orgmail_auth_changed: channel
orgmail_auth, the address, or '*' for every mailbox). This service listens as the host's own directory
login (from Dovecot's /etc/dovecot/orgmail-directory.conf) and runs `doveadm auth cache flush` for the
addresses, at once and again SETTLE seconds later: a lookup that read the directory just before the
commit may store its old answer after the first flush.

Whenever it (re)connects it flushes the whole cache: changes made while it was not listening were not
announced to it. While the directory cannot be reached it flushes nothing, so Dovecot can still answer
logins from its cache (and from expired entries) until the directory is back.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable

sys.path[:0] = ["/usr/local/lib/orgmail", os.path.dirname(os.path.realpath(__file__))]
from orgmail_libpq import Connection, conninfo  # noqa: E402

LOGIN = "/etc/dovecot/orgmail-directory.conf"
CHANNEL = "orgmail_auth"
# A second flush this long after a change, for lookups that were in flight when it committed.
SETTLE = 2.0
# More addresses than this at once (an import): the whole cache is flushed instead.
MOST_ADDRESSES = 100
# How long to wait for a notification before checking that the connection still stands.
IDLE = 60.0
RETRY_MAX = 30.0

HOST_RE = re.compile(r"pgsql ([a-z0-9]([a-z0-9.-]{0,250}[a-z0-9])?) \{")
SETTING_RE = re.compile(r"(dbname|user|password) = (\S+)")
ADDRESS_RE = re.compile(r"[a-z0-9][a-z0-9._+-]*@[a-z0-9][a-z0-9.-]*")

Flush = Callable[[list[str] | None], None]


def log(message: str) -> None:
    print(f"orgmail-authflush: {message}", file=sys.stderr, flush=True)


def login_info(text: str) -> str:
    """libpq's connection string from Dovecot's `pgsql HOST { parameters { ... } }` block, as
    orgmail-bootstrap writes it."""
    host = None
    settings: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if match := HOST_RE.fullmatch(line):
            host = match.group(1)
        elif match := SETTING_RE.fullmatch(line):
            settings[match.group(1)] = match.group(2)
    missing = [k for k in ("dbname", "user", "password") if k not in settings]
    if host is None or missing:
        raise ValueError(f"{LOGIN}: no {', '.join((['pgsql HOST'] if host is None else []) + missing)}")
    return conninfo(host, settings["user"], settings["password"], settings["dbname"], "orgmail-authflush")


def doveadm_flush(users: list[str] | None) -> None:
    """`doveadm auth cache flush` for these users, or for all (None)."""
    what = "all" if users is None else " ".join(users)
    try:
        result = subprocess.run(["doveadm", "auth", "cache", "flush", *(users or [])], capture_output=True,
                                text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"flush {what} failed: {e}")
        return
    if result.returncode != 0:
        # Dovecot not running: its cache is empty when it starts again.
        log(f"flush {what} failed: {' '.join((result.stderr or result.stdout).split())[:300]}")
    else:
        log(f"flushed {what}")


def addresses(payloads: list[str]) -> list[str] | None:
    """The addresses to flush; None for all ('*', too many, or anything that is not an address)."""
    wanted = sorted(set(payloads))
    if "*" in wanted or len(wanted) > MOST_ADDRESSES or not all(ADDRESS_RE.fullmatch(p) for p in wanted):
        return None
    return wanted


def listen(info: str, flush: Flush, keep_going: Callable[[], bool] = lambda: True,
           clock: Callable[[], float] = time.monotonic) -> None:
    """Connected: flush everything, then each change twice (at once, and SETTLE later). Returns when the
    connection fails (RuntimeError) or keep_going() turns false."""
    conn = Connection(info)
    try:
        conn.run(f"LISTEN {CHANNEL}")
        log("listening for the directory's changes")
        flush(None)
        pending: list[tuple[float, list[str] | None]] = []
        while keep_going():
            due = min((at for at, _ in pending), default=clock() + IDLE)
            sock = conn.socket()
            if sock < 0:
                raise RuntimeError(f"directory connection lost: {conn.error() or 'closed'}")
            readable, _, _ = select.select([sock], [], [], max(0.0, due - clock()))
            if not readable and not pending:
                conn.run("SELECT 1")  # idle for IDLE seconds: is the directory still there?
            payloads = [payload for channel, payload in conn.notifications() if channel == CHANNEL]
            if payloads:
                users = addresses(payloads)
                flush(users)
                pending.append((clock() + SETTLE, users))
            now = clock()
            for _, users in [p for p in pending if p[0] <= now]:
                flush(users)
            pending = [p for p in pending if p[0] > now]
    finally:
        conn.close()


def main(login: str = LOGIN, flush: Flush = doveadm_flush, sleep: Callable[[float], None] = time.sleep) -> int:
    try:
        with open(login) as f:
            info = login_info(f.read())
    except (OSError, ValueError) as e:
        log(f"cannot read the directory login: {e}")
        return 1
    delay = 1.0
    while True:
        started = time.monotonic()
        try:
            listen(info, flush)
        except RuntimeError as e:
            log(f"{e}; connecting again in {delay:g} s")
        if time.monotonic() - started > RETRY_MAX:
            delay = 1.0
        sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


if __name__ == "__main__":
    sys.exit(main())
