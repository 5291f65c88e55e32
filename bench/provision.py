"""(issue 15) Provisioning rate of the ISP cluster's directory: orgmail-users, run as a host runs it
(the script in a child process, libpq's environment), against a throwaway PostgreSQL started as
tests/unit/test_directory.py starts it (tools/postgres.py).

- `add --csv`: new users at the real bcrypt cost (orgmail-users' BCRYPT_COST, 10), each with a
  generated password: hashing is nearly all of it.
- `import`: a generated single-host stack's users files (tools/userfiles.py: the program's settings
  and host_config, then orgmail-sync's own writing), hashes kept: four bcrypt hashes made once.

Each run gets a new database. Figures and the machine's state only: never pass or fail.
"""

from __future__ import annotations

import csv
import os
import resource
import statistics
import subprocess
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.common import PYTHON, ROOT, log, summary
from tools import postgres, userfiles

SCRIPT = ROOT / "cloud-init/files/orgmail/users.py"
DOMAINS = 10
SHARDS = (("s1", "10.0.1.11"), ("s2", "10.0.2.12"))


def _users(server: postgres.Server, dbname: str, *args: str) -> tuple[float, float]:
    """orgmail-users ARGS against the database: (wall seconds, CPU seconds of the child); its standard
    output (passwords) is thrown away."""
    env = {**os.environ, **server.environment(dbname)}
    env.pop("PGSERVICE", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([PYTHON, str(SCRIPT), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"orgmail-users {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _fresh(server: postgres.Server, name: str, domains: bool) -> str:
    with server.connect(autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    _users(server, name, "init")
    for shard, host in SHARDS:
        _users(server, name, "shard", "add", shard, host)
    if domains:
        for k in range(DOMAINS):
            _users(server, name, "domain", "add", f"d{k}.example")
    return name


def _facts(server: postgres.Server) -> dict[str, Any]:
    return {"postgres": server.version, "bcrypt": version("bcrypt"), "psycopg": version("psycopg"),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def measure(add_users: int = 300, import_users: int = 5000, import_runs: int = 3) -> dict[str, Any]:
    reason = postgres.unavailable()
    if reason:
        raise RuntimeError(f"{reason}: apt-get install postgresql")
    import bcrypt
    passwords = [f"password {k}" for k in range(4)]
    hashes = ["{BLF-CRYPT}" + bcrypt.hashpw(p.encode(), bcrypt.gensalt(10)).decode() for p in passwords]
    with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp, postgres.throwaway() as server:
        result: dict[str, Any] = {"before": _facts(server)}
        rows = [["address"]] + [[f"user{i:05d}@d{i % DOMAINS}.example"] for i in range(add_users)]
        path = Path(tmp) / "add.csv"
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
        db = _fresh(server, "bench_add", domains=True)
        log(f"provision: add --csv {add_users} users at bcrypt cost 10")
        seconds, cpu = _users(server, db, "add", "--csv", str(path))
        result["add_csv"] = {"users": add_users, "bcrypt_cost": 10, "seconds": round(seconds, 2),
                             "cpu_seconds": round(cpu, 2), "users_per_s": round(add_users / seconds, 2)}
        log(f"provision: add --csv: {result['add_csv']}")

        texts = userfiles.from_stack(userfiles.generated_stack(import_users, hashes, DOMAINS))
        args = userfiles.write_files(texts, Path(tmp))
        times, cpus = [], []
        for run in range(import_runs):
            db = _fresh(server, f"bench_import{run}", domains=False)
            log(f"provision: import {import_users} users, run {run + 1}/{import_runs}")
            seconds, cpu = _users(server, db, "import", *args, "--quota", "1G")
            times.append(seconds)
            cpus.append(cpu)
        result["import"] = {"users": import_users, "aliases": len(texts["--postfix-aliases"].splitlines()),
                            "seconds": summary(times, 2), "cpu_seconds": round(statistics.median(cpus), 2),
                            "users_per_s": round(import_users / statistics.median(times))}
        log(f"provision: import: {result['import']}")
        result["after"] = _facts(server)
    return result
