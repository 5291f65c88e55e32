#!/usr/bin/python3
"""orgmail-senders: on a cluster edge, the map of rspamd's From: check (lua.local.d/orgmail_from.lua) from
the directory: `address login[,login...]` per line, who may send as each address, exactly as Postfix's
smtpd_sender_login_maps answers it (components/directory.py SENDER_LOGINS_EXPORT, one query for all).

It logs in as the edge's own directory login, read from Postfix's map file that orgmail-bootstrap wrote
from SSM, with TLS, the directory's certificate and name verified (as Postfix's PGSSLMODE=verify-full). It
talks to libpq (libpq5, which postfix-pgsql and dovecot-pgsql bring) through ctypes: no other package on the
edge.

Fail closed: a directory that cannot be read, or an answer that is empty or malformed, leaves the last
good map as it is (exit 1, the timer tries again); a map is replaced atomically (a new file renamed over
it) and only when it changed. With no map at all, the lua refuses authenticated mail with a 4xx.
"""

from __future__ import annotations

import os
import re
import sys

sys.path[:0] = ["/usr/local/lib/orgmail", os.path.dirname(os.path.realpath(__file__))]
from orgmail_libpq import conninfo as libpq_conninfo  # noqa: E402
from orgmail_libpq import fetch  # noqa: E402

LOGIN = "/etc/postfix/orgmail/pgsql/smtpd_sender_login_maps.cf"
QUERY = "/etc/orgmail/senders.sql"
MAP = "/etc/postfix/orgmail/senders"
MAP_GROUP = "_rspamd"

# The directory's checks (directory.sql) admit no other characters: anything else is refused whole.
ADDRESS = r"[a-z0-9._+-]+@[a-z0-9.-]+"
ROW_RE = re.compile(rf"({ADDRESS}) ({ADDRESS}(?:,{ADDRESS})*)")


def login_settings(text: str) -> dict[str, str]:
    """The `key = value` lines of a Postfix pgsql map file."""
    settings = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            settings[key.strip()] = value.strip()
    missing = [k for k in ("hosts", "user", "password", "dbname") if not settings.get(k)]
    if missing:
        raise ValueError(f"{LOGIN}: no {', '.join(missing)}")
    return settings


def conninfo(settings: dict[str, str]) -> str:
    """libpq's connection string for the map file's login (its first host)."""
    return libpq_conninfo(settings["hosts"].split()[0], settings["user"], settings["password"], settings["dbname"],
                          "orgmail-senders")


def render(rows: list[tuple[str, ...]]) -> str:
    """The map's text; an empty or malformed answer is refused (the last map stays)."""
    if not rows:
        raise ValueError("the directory answered no address: the last map is kept")
    lines = [" ".join(row) for row in rows]
    bad = [line for line in lines if not ROW_RE.fullmatch(line)]
    if bad:
        raise ValueError(f"the directory answered {len(bad)} malformed rows, the first {bad[0][:200]!r}: "
                         "the last map is kept")
    return "".join(f"{line}\n" for line in lines)


def write(path: str, text: str, group: int = -1) -> bool:
    """Replace `path` by `text` atomically (a new file in the same directory, renamed over it), only when
    it changed; True when it did."""
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        pass
    tmp = f"{path}.orgmail-new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchown(f.fileno(), -1, group)
            os.fchmod(f.fileno(), 0o640)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return True


def main(login: str = LOGIN, query: str = QUERY, target: str = MAP, group: str = MAP_GROUP) -> int:
    try:
        import grp

        with open(login) as f:
            info = conninfo(login_settings(f.read()))
        with open(query) as f:
            sql = f.read().strip()
        text = render(fetch(info, sql))
        changed = write(target, text, grp.getgrnam(group).gr_gid)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        print(f"orgmail-senders: {e}; {target} left as it was", file=sys.stderr)
        return 1
    count = text.count("\n")
    print(f"orgmail-senders: {target}: {count} addresses, {'written' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
