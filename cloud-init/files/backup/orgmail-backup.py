#!/usr/bin/python3
"""orgmail-backup: nightly restic backup of mail, keys and config to the stack's S3 bucket.

Initialises the repository if missing, backs up, forgets and prunes by the retention from SSM
(backup.env, written by orgmail-sync), checks 5% of the data weekly, and records the time and
result of the last backup and check in /var/lib/orgmail/backup-status.json ("ok" or "error").
`orgmail-backup env` prints the restic environment (for orgmail-restore and manual restic use).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

STATUS = Path("/var/lib/orgmail/backup-status.json")
PATHS = ["/etc/postfix", "/etc/dovecot", "/etc/rspamd", "/etc/orgmail", "/etc/letsencrypt",
         "/srv/mail", "/var/lib/rspamd", "/var/lib/redis"]
EXCLUDES = ["/srv/mail/lost+found", "/etc/orgmail/restic-password", "/etc/orgmail/cloudflare.ini",
            "/var/lib/rspamd/*.hs*"]  # hyperscan caches (~50 MB): rspamd rebuilds them
CHECK_EVERY = 7 * 86400


def read_env(path: str) -> dict:
    env = {}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value
    return env


def restic_env() -> dict:
    host = read_env("/etc/orgmail/host.env")
    if not host.get("BACKUP_BUCKET"):
        raise RuntimeError("no BACKUP_BUCKET in /etc/orgmail/host.env")
    # On EC2 restic takes the instance role's credentials from IMDS; in tests host.env has AWS_*.
    endpoint = host.get("AWS_ENDPOINT_URL") or f"https://s3.{host['REGION']}.amazonaws.com"
    env = {k: v for k, v in host.items() if k.startswith("AWS_")}
    env.update(ENDPOINT=endpoint, RESTIC_REPOSITORY=f"s3:{endpoint}/{host['BACKUP_BUCKET']}/restic",
               RESTIC_PASSWORD_FILE="/etc/orgmail/restic-password", AWS_DEFAULT_REGION=host["REGION"],
               RESTIC_CACHE_DIR="/var/cache/restic", HOSTNAME=host.get("HOSTNAME", ""))
    return env


def restic(env: dict, *args: str, timeout: float = 6 * 3600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["restic", *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode not in (0, 3):  # 3: some files could not be read; the snapshot is still made
        raise RuntimeError(f"restic {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return proc


def load_status() -> dict:
    try:
        return json.loads(STATUS.read_text())
    except (OSError, ValueError):
        return {}


def save_status(status: dict) -> None:
    STATUS.parent.mkdir(parents=True, exist_ok=True)
    tmp = STATUS.with_suffix(".new")
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    os.replace(tmp, STATUS)


def reachable(endpoint: str, attempts: int = 3) -> None:
    """Fail fast when S3 cannot be reached: restic itself retries for many minutes."""
    url = urlsplit(endpoint)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    for attempt in range(attempts):
        try:
            socket.create_connection(address, timeout=10).close()
            return
        except OSError as e:
            if attempt + 1 == attempts:
                raise RuntimeError(f"S3 endpoint {endpoint} unreachable: {e}") from e
            time.sleep(10)


def backup(env: dict) -> dict:
    reachable(env["ENDPOINT"])
    probe = subprocess.run(["restic", "cat", "config"], env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=300)
    if probe.returncode == 10:  # no repository yet
        restic(env, "init")
    elif probe.returncode != 0:
        raise RuntimeError(f"repository not reachable ({probe.returncode}): {probe.stderr.strip()[-400:]}")
    restic(env, "unlock")  # locks left by a killed run
    subprocess.run(["redis-cli", "save"], capture_output=True, timeout=300)  # consistent dump.rdb
    excludes = [f"--exclude={e}" for e in EXCLUDES]
    paths = [p for p in PATHS if Path(p).exists()]
    out = restic(env, "backup", "--json", "--tag", "orgmail", "--host", env["HOSTNAME"], *excludes, *paths)
    summary = next(m for m in map(json.loads, out.stdout.splitlines()) if m.get("message_type") == "summary")
    keep = read_env("/etc/orgmail/backup.env")
    restic(env, "forget", "--prune", "--tag", "orgmail", "--keep-daily", keep.get("KEEP_DAILY", "7"),
           "--keep-weekly", keep.get("KEEP_WEEKLY", "4"), "--keep-monthly", keep.get("KEEP_MONTHLY", "12"))
    return {k: summary[k] for k in ("snapshot_id", "data_added", "data_blobs", "files_new", "files_changed", "files_unmodified",
                                    "total_files_processed", "total_bytes_processed") if k in summary}


def main() -> int:
    args = sys.argv[1:]
    if args == ["env"]:
        print("".join(f"{k}={v}\n" for k, v in restic_env().items()), end="")
        return 0
    status = load_status()
    rc = 0
    started = time.time()
    try:
        env = restic_env()
        status["backup"] = {"time": int(started), "result": "ok", "seconds": 0, **backup(env)}
        status["backup"]["seconds"] = round(time.time() - started, 1)
        print(f"orgmail-backup: ok: {json.dumps(status['backup'])}")
    except Exception as e:  # any failure must show in the status file
        status["backup"] = {"time": int(started), "result": "error", "error": str(e)}
        print(f"orgmail-backup: error: {e}", file=sys.stderr)
        save_status(status)
        return 1
    if "--check" in args or time.time() - status.get("check", {}).get("time", 0) > CHECK_EVERY:
        started = time.time()
        try:
            restic(env, "check", "--read-data-subset=5%")
            status["check"] = {"time": int(started), "result": "ok", "seconds": round(time.time() - started, 1)}
        except Exception as e:
            status["check"] = {"time": int(started), "result": "error", "error": str(e)}
            print(f"orgmail-backup: check failed: {e}", file=sys.stderr)
            rc = 1
    save_status(status)
    return rc


if __name__ == "__main__":
    sys.exit(main())
