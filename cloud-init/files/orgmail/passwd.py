#!/usr/bin/python3
"""orgmail-passwd: users change their own password in webmail.

Roundcube's password plugin (httpapi driver) posts here, one request per connection on 127.0.0.1:8026
(orgmail-passwd.socket, Accept=yes: stdin and stdout are the connection):

  POST /change   user, curpass, newpass   200 "ok", or 403/400 with the reason
  POST /initial  user, curpass            200 "initial" (still the password from the configuration,
                                          which mail clients are refused) or 200 "changed"

The current password is checked by Dovecot itself, through its auth socket, as webmail logs in (from
127.0.0.1): a wrong one is refused as any login is. The new password is hashed with bcrypt and kept
in /srv/mail/orgmail/passwords.json on the mail volume (so a new instance and a restore keep it),
with a fingerprint of the configured hash it replaces: orgmail-sync keeps the user's own password
until the configured one changes (the admin's reset). The users file is updated here at once, under
orgmail-sync's lock, and Dovecot's auth cache forgets the user.
"""

from __future__ import annotations

import base64
import datetime
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import unicodedata
import urllib.parse
from pathlib import Path

USERS = Path("/etc/dovecot/orgmail-users")
INITIAL = Path("/etc/dovecot/orgmail-initial")
STORE = Path("/srv/mail/orgmail/passwords.json")
LOCK = "/run/lock/orgmail-sync.lock"  # orgmail-sync's: one writer of the users file at a time
AUTH_SOCKET = "/run/dovecot/auth-client"
MIN_LENGTH = 12
MAX_BYTES = 72  # bcrypt uses the first 72 bytes only: a longer password would be silently cut
BCRYPT_COST = 10  # as the hashes Pulumi makes
MAX_REQUEST = 16384


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def fingerprint(configured_hash: str) -> str:
    """What the store keeps of the configured hash a user's own password replaced."""
    return hashlib.sha256(configured_hash.encode()).hexdigest()


def dovecot_auth(user: str, password: str) -> str:
    """Dovecot's answer to a webmail login with this password: ok, fail or expired."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(AUTH_SOCKET)
        f = s.makefile("rb")
        s.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
        while f.readline().rstrip(b"\n") != b"DONE":
            pass
        resp = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        s.sendall(f"AUTH\t1\tPLAIN\tservice=orgmail-passwd\tlip=127.0.0.1\trip=127.0.0.1\tsecured\tresp={resp}\n"
                  .encode())
        answer = f.readline().decode(errors="replace").rstrip("\n").split("\t")
    if answer[0] == "OK":
        return "ok"
    return "expired" if "code=pass_expired" in answer else "fail"


def password_problem(user: str, new: str, current: str) -> str | None:
    """Why the new password is refused, or None."""
    if any(unicodedata.category(c).startswith("C") for c in new):
        return "the new password holds a control character"
    if len(new) < MIN_LENGTH:
        return f"the new password must have at least {MIN_LENGTH} characters"
    if len(new.encode()) > MAX_BYTES:
        return f"the new password must fit in {MAX_BYTES} bytes (bcrypt ignores the rest)"
    if new == current:
        return "the new password is the current one"
    if user.split("@")[0].lower() in new.lower():
        return "the new password must not contain the user name"
    if len(set(new)) < 4:
        return "the new password repeats too few characters"
    return None


def read_store() -> dict:
    try:
        return json.loads(STORE.read_text())
    except FileNotFoundError:
        return {}


def write_atomic(path: Path, text: str, mode: int, gid: int = 0) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chown(tmp, 0, gid)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def change(user: str, current: str, new: str) -> None:
    problem = password_problem(user, new, current)
    if problem:
        raise Refused(400, problem)
    if dovecot_auth(user, current) != "ok":
        raise Refused(403, "the current password is wrong")
    import bcrypt  # python3-bcrypt, installed with webmail

    hashed = "{BLF-CRYPT}" + bcrypt.hashpw(new.encode(), bcrypt.gensalt(BCRYPT_COST)).decode()
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = USERS.read_text().splitlines(keepends=True)
        found = [i for i, line in enumerate(lines) if line.split(":", 1)[0] == user]
        if len(found) != 1 or not lines[found[0]].split(":")[1]:
            raise Refused(403, "no such login")
        fields = lines[found[0]].split(":")
        store = read_store()
        replaces = store.get(user, {}).get("replaces") or fingerprint(fields[1])
        store[user] = {"hash": hashed, "replaces": replaces,
                       "changed": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        STORE.parent.mkdir(mode=0o700, exist_ok=True)
        write_atomic(STORE, json.dumps(store, indent=1, sort_keys=True) + "\n", 0o600)
        fields[1] = hashed
        lines[found[0]] = ":".join(fields)
        users_stat = USERS.stat()
        write_atomic(USERS, "".join(lines), 0o640, users_stat.st_gid)
        if INITIAL.exists():
            rest = [u for u in INITIAL.read_text().splitlines() if u != user]
            write_atomic(INITIAL, "".join(f"{u}\n" for u in rest), 0o640, INITIAL.stat().st_gid)
    subprocess.run(["doveadm", "auth", "cache", "flush", user], check=False, capture_output=True, timeout=30)
    print(f"orgmail-passwd: {user} changed their password", file=sys.stderr)


def initial(user: str, current: str) -> str:
    if dovecot_auth(user, current) != "ok":
        raise Refused(403, "the current password is wrong")
    listed = INITIAL.exists() and user in INITIAL.read_text().splitlines()
    return "initial" if listed else "changed"


def handle(method: str, path: str, form: dict) -> str:
    if method != "POST":
        raise Refused(405, "POST only")
    user, current = form.get("user", ""), form.get("curpass", "")
    if not user or not current:
        raise Refused(400, "user and curpass are required")
    if path == "/change":
        change(user, current, form.get("newpass", ""))
        return "ok"
    if path == "/initial":
        return initial(user, current)
    raise Refused(404, "no such path")


def read_request(stream) -> tuple[str, str, dict]:
    request_line = stream.readline(MAX_REQUEST).decode("latin-1").split()
    if len(request_line) != 3:
        raise Refused(400, "bad request")
    length = 0
    while True:
        line = stream.readline(MAX_REQUEST).decode("latin-1").strip()
        if not line:
            break
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length > MAX_REQUEST:
        raise Refused(413, "too large")
    body = stream.read(length).decode()
    form = {k: v for k, v in urllib.parse.parse_qsl(body, keep_blank_values=True)}
    return request_line[0], request_line[1], form


def main() -> int:
    out = sys.stdout.buffer
    try:
        status, text = 200, handle(*read_request(sys.stdin.buffer))
    except Refused as e:
        status, text = e.status, str(e)
    except (ValueError, OSError, subprocess.SubprocessError) as e:
        status, text = 500, f"internal error: {e}"
        print(f"orgmail-passwd: {text}", file=sys.stderr)
    reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
              413: "Payload Too Large"}.get(status, "Internal Server Error")
    data = (text + "\n").encode()
    out.write(f"HTTP/1.0 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
              f"Connection: close\r\n\r\n".encode() + data)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
