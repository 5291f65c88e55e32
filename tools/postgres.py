"""A throwaway PostgreSQL server from the machine's own binaries (Debian's postgresql package:
/usr/lib/postgresql/<version>/bin), on a unix socket in a temporary directory, no TCP, no fsync.

Used by tests/unit/test_directory.py (its session fixture) and bench/provision.py.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def server_binaries() -> Path | None:
    """The newest installed server's bin directory."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    return Path(max(found, key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)).parent


def unavailable() -> str | None:
    """Why no server can be started here, or None."""
    if server_binaries() is None:
        return "PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


@dataclass
class Server:
    socket_dir: Path
    user: str
    bindir: Path

    @property
    def version(self) -> str:
        return subprocess.run([str(self.bindir / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()

    def environment(self, dbname: str) -> dict[str, str]:
        """libpq's environment for a database of this server, as PGSERVICE would give it on a host."""
        return {"PGHOST": str(self.socket_dir), "PGUSER": self.user, "PGDATABASE": dbname}

    def connect(self, dbname: str = "postgres", **kw: Any) -> Any:
        """An explicit connection, whatever is in the libpq environment."""
        import psycopg
        saved = {k: os.environ.pop(k) for k in ("PGSERVICE", "PGSERVICEFILE") if k in os.environ}
        try:
            return psycopg.connect(host=str(self.socket_dir), user=kw.pop("user", self.user), dbname=dbname, **kw)
        finally:
            os.environ.update(saved)


@contextmanager
def throwaway() -> Iterator[Server]:
    """Start a server in a new temporary directory; stop it and remove everything afterwards.
    Check unavailable() first: here a missing server is an error."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    bindir = server_binaries()
    assert bindir is not None
    base = Path(tempfile.mkdtemp(prefix="orgmail-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    base.chmod(0o700)
    data, log = base / "data", base / "server.log"
    options = (f"-c listen_addresses='' -c unix_socket_directories='{base}' -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off")
    try:
        subprocess.run([*as_owner, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--locale=C"], check=True, capture_output=True)
        started = subprocess.run([*as_owner, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                                  "-o", options, "start"], capture_output=True, text=True)
        if started.returncode != 0:
            raise RuntimeError("PostgreSQL did not start: " + started.stdout + started.stderr
                               + (log.read_text() if log.exists() else ""))
        try:
            yield Server(base, "postgres", bindir)
        finally:
            subprocess.run([*as_owner, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
