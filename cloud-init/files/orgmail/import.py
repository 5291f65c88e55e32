#!/usr/bin/python3
"""orgmail-import: copy users' mail from their old IMAP server into their orgmail mailboxes (issue 18).

  orgmail-import --host NAME [--port N] [--tls imaps|starttls] [--ca-file FILE] [--list-prefix PREFIX]
                 [--check] [--progress SECONDS] USERS.csv|-

USERS.csv (or standard input for "-") has a header line naming its columns, each once:
  address   the orgmail mailbox (a mailbox on this host, shared ones too: /etc/dovecot/orgmail-users)
  login     the user's login on the old server (empty: the address)
  password  the user's password there
The file holds passwords: it must be a regular file owned by root and readable by nobody else
(chmod 600). Passwords never appear on a command line (ps shows those): each user's login and
password go to files in a private directory under /run (mode 0700, removed afterwards), which the
run's Dovecot configuration reads (`imapc_password = <FILE`).

For each user it runs Dovecot's one-way sync from the old server (`doveadm sync -1 -R -u ADDRESS
imapc:`, with Dovecot's imapc storage reaching the old server over TLS): every folder, message, flag
and keyword is copied, and a re-run copies only what is new or changed there since. Mail already in
the orgmail mailbox stays, and messages or flags changed here are not overwritten. The old server's
certificate is always verified (Dovecot's ssl_client_require_valid_cert) against the system CAs, or
against --ca-file only.

Quota: Dovecot does not enforce quota on a sync's saves, so orgmail-import checks it itself: a user
whose old mailbox is bigger than their orgmail quota is not imported at all (raise the quota in the
stack first); a user whose mailbox ends over quota after the import (mail already here plus the old
mail) is reported as a failure, and new mail to them is then refused (452) until there is room.

--check logs in as every user and shows their old folders, messages and size, copying nothing.
Bad input ends with one line per problem on standard error and exit code 2, before anything is
copied; a server that cannot be reached ends with exit code 1 before anything is copied; a run where
any user failed exits 1; otherwise 0.
"""

import argparse
import csv
import io
import ipaddress
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROG = "orgmail-import"
DOVECOT_CONF = "/etc/dovecot/dovecot.conf"
USERS_FILE = "/etc/dovecot/orgmail-users"
RUN_DIR = "/run"
CSV_COLUMNS = ("address", "login", "password")
MAX_REPORTED = 20  # bad CSV lines shown before "... and N more"
DEFAULT_PORTS = {"imaps": 993, "starttls": 143}
CONNECT_TIMEOUT = 15

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_ADDRESS_RE = re.compile(rf"[a-z0-9](?:[a-z0-9._+-]{{0,62}}[a-z0-9])?@(?:{_LABEL}\.)+{_LABEL}")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PATH_RE = re.compile(r"/[A-Za-z0-9._+-]+(?:/[A-Za-z0-9._+-]+)*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VERSION_RE = re.compile(r"[0-9]+(?:\.[0-9]+){1,3}")


class UsageError(Exception):
    """Bad input: exit 2, nothing copied."""


class ServerError(Exception):
    """The old server cannot be used at all (unreachable, untrusted certificate): exit 1."""


@dataclass(frozen=True)
class ImportUser:
    address: str
    login: str
    password: str
    line: int


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    tls: str  # "imaps" or "starttls"
    ca_file: str | None = None
    list_prefix: str | None = None


# --- validation: whole strings, before anything is copied ----------------------------------------

def server_host(value: str) -> str:
    text = value.lower()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if len(text) > 253 or not _HOST_RE.fullmatch(text):
        raise UsageError(f"--host {value!r} must be the old server's name as its certificate names it, like "
                         "imap.old-provider.example (labels of a-z, 0-9 and inner '-'), or an IP address")
    return text


def server_port(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 1 <= int(value) <= 65535:
        raise UsageError(f"--port {value!r} must be a TCP port, 1-65535 (IMAPS is 993, IMAP with STARTTLS 143)")
    return int(value)


def ca_file(value: str) -> str:
    if not _PATH_RE.fullmatch(value):
        raise UsageError(f"--ca-file {value!r} must be an absolute path of letters, digits and . _ + - /")
    try:
        text = Path(value).read_text(encoding="ascii", errors="replace")
    except OSError as e:
        raise UsageError(f"--ca-file {value}: cannot read it ({e.strerror})") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise UsageError(f"--ca-file {value}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return value


def list_prefix(value: str) -> str:
    if not _PREFIX_RE.fullmatch(value):
        raise UsageError(f"--list-prefix {value!r} must be 1-64 letters, digits and . _ -, like INBOX")
    return value


def mailbox_address(value: str, where: str) -> str:
    text = value.strip().lower()
    if len(text) > 254 or not _ADDRESS_RE.fullmatch(text):
        raise UsageError(f"{where}: address {value!r} must be an orgmail mailbox like ann@example.org")
    return text


def old_login(value: str, where: str) -> str:
    text = value.strip()
    if not 1 <= len(text) <= 255 or _CONTROL_RE.search(text):
        raise UsageError(f"{where}: login must be 1-255 characters without control characters "
                         "(or empty: the address)")
    return text


def old_password(value: str, where: str) -> str:
    if not 1 <= len(value) <= 1024 or _CONTROL_RE.search(value):
        raise UsageError(f"{where}: password must be 1-1024 characters without control characters "
                         "(kept exactly, spaces too)")
    return value


def report(problems: list[str]) -> str:
    shown = problems[:MAX_REPORTED]
    if len(problems) > MAX_REPORTED:
        shown.append(f"... and {len(problems) - MAX_REPORTED} more")
    return "\n".join([*shown, "nothing was copied"])


def parse_users_csv(text: str, where: str) -> list[ImportUser]:
    """Every row of the users CSV, checked whole; every bad line reported at once (UsageError)."""
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as e:
        raise UsageError(f"{where}: not valid CSV ({e}); quote a cell holding commas or quotes like \"a,b\"") from None
    while rows and not any(cell.strip() for cell in rows[0]):
        rows.pop(0)
    columns = ",".join(CSV_COLUMNS)
    if not rows:
        raise UsageError(f"{where}: empty; the first line names the columns: {columns}")
    header = [h.strip().lower() for h in rows[0]]
    if sorted(header) != sorted(CSV_COLUMNS):
        raise UsageError(f"{where} line 1: must name the columns {columns}, each once, in any order; "
                         f"got {','.join(rows[0])!r}")
    users: list[ImportUser] = []
    problems: list[str] = []
    first_seen: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        line = f"{where} line {number}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.append(f"{line}: {len(row)} cells, the header has {len(header)} ({columns})")
            continue
        cells = dict(zip(header, row, strict=True))
        try:
            address = mailbox_address(cells["address"], line)
            login = old_login(cells["login"], line) if cells["login"].strip() else address
            password = old_password(cells["password"], line)
        except UsageError as e:
            problems.append(str(e))
            continue
        if address in first_seen:
            problems.append(f"{line}: {address} is also on line {first_seen[address]}")
            continue
        first_seen[address] = number
        users.append(ImportUser(address, login, password, number))
    if problems:
        raise UsageError(report(problems))
    if not users:
        raise UsageError(f"{where}: no users, only the header")
    return users


def check_private(path: str, st: os.stat_result) -> None:
    """The users CSV holds passwords: a regular file of root's that nobody else may read or change."""
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: not a regular file")
    if st.st_uid != 0 or st.st_mode & 0o077:
        raise UsageError(f"{path}: holds passwords, so it must be owned by root and readable by nobody else "
                         f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): "
                         f"chown root: {path} && chmod 600 {path}")


def read_users(path: str) -> list[ImportUser]:
    if path == "-":
        return parse_users_csv(sys.stdin.read(), "standard input")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise UsageError(f"{path}: cannot open it ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        check_private(path, os.fstat(f.fileno()))
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_users_csv(text, path)


def orgmail_mailboxes(users_file_text: str) -> set[str]:
    """The addresses in Dovecot's users file (orgmail-sync writes one line per mailbox with a password, and one
    per shared mailbox, which has none but takes mail and imports alike)."""
    return {line.split(":", 1)[0].lower() for line in users_file_text.splitlines() if ":" in line}


def unknown_mailboxes(users: list[ImportUser], known: set[str], where: str) -> list[str]:
    hint = ("mailboxes on this host: " + ", ".join(sorted(known)[:10])
            + (f" and {len(known) - 10} more" if len(known) > 10 else "")) if known else "this host has none yet"
    return [f"{where} line {u.line}: {u.address} is not a mailbox on this host ({hint}; a new mailbox needs "
            "its entry in the stack's mailboxes and passwordHashes, then pulumi up and a sync)"
            for u in users if u.address not in known]


# --- the run's Dovecot configuration -------------------------------------------------------------

def config_version(dovecot_conf_text: str) -> str:
    """The main configuration's dovecot_config_version (a -c configuration must begin with it)."""
    for line in dovecot_conf_text.splitlines():
        match = re.fullmatch(r"\s*dovecot_config_version\s*=\s*(\S+)\s*", line)
        if match and _VERSION_RE.fullmatch(match.group(1)):
            return match.group(1)
    raise UsageError(f"{DOVECOT_CONF}: no dovecot_config_version line; is this an orgmail mailbox host?")


def file_value(text: str) -> str:
    """A value for a `setting = <FILE` line: read exactly, then %{...} expanded, so `%{` is escaped as `%%{`."""
    return text.replace("%{", "%%{")


def imapc_config(version: str, server: Server, login_file: str, password_file: str) -> str:
    """The run's configuration: orgmail's Dovecot configuration plus the old server as imapc storage.
    Login and password are read from files (never a command line, never config syntax to escape)."""
    lines = [
        f"dovecot_config_version = {version}",
        f"!include {DOVECOT_CONF}",
        f"imapc_host = {server.host}",
        f"imapc_port = {server.port}",
        f"imapc_ssl = {server.tls}",
        f"imapc_user = <{login_file}",
        f"imapc_password = <{password_file}",
        # Verify the old server's certificate and name, always (the default, stated).
        "ssl_client_require_valid_cert = yes",
    ]
    if server.ca_file:
        lines.append(f"ssl_client_ca_file = {server.ca_file}")
    if server.list_prefix:
        lines.append(f'imapc_list_prefix = "{server.list_prefix}"')
    return "\n".join(lines) + "\n"


# --- doveadm's answers -----------------------------------------------------------------------------

def parse_status(tab_text: str) -> dict[str, tuple[int, int]]:
    """{folder: (messages, vsize)} from `doveadm -f tab mailbox status 'messages vsize' '*'`."""
    rows = [line.split("\t") for line in tab_text.splitlines() if line]
    if not rows or rows[0] != ["mailbox", "messages", "vsize"]:
        raise ValueError(f"unexpected mailbox status output: {tab_text[:200]!r}")
    return {r[0]: (int(r[1]), int(r[2])) for r in rows[1:] if len(r) == 3}


def parse_quota(tab_text: str) -> tuple[int, int | None]:
    """(bytes used, byte limit or None) of the STORAGE rows of `doveadm -f tab quota get` (KiB there)."""
    used, limit = 0, None
    for line in tab_text.splitlines()[1:]:
        cells = line.split("\t")
        if len(cells) >= 4 and cells[1] == "STORAGE":
            used = max(used, int(cells[2]) * 1024)
            if cells[3] not in ("-", "", "0"):
                limit = int(cells[3]) * 1024 if limit is None else min(limit, int(cells[3]) * 1024)
    return used, limit


# What doveadm's stderr says, and what the admin should do about it. Server problems stop the run.
FAILURES: tuple[tuple[str, str, bool], ...] = (
    (r"Authentication failed", "the old server refused this login and password: check the CSV line", False),
    (r"invalid SSL certificate|certificate verify failed|unable to get local issuer",
     "the old server's certificate is not trusted here (its CA is not in the system store): "
     "use --ca-file with its CA certificate, never switch verification off", True),
    (r"doesn't match expected host name",
     "the old server's certificate does not name --host: give the name its certificate carries", True),
    (r"dns_lookup\(.*\) failed", "--host does not resolve from this host", True),
    (r"connect\(.*\) failed", "cannot connect to --host and --port", True),
    (r"SSL handshake failed|SSL_connect|STARTTLS", "TLS with the old server failed: check --tls and --port", True),
)


def classify(stderr: str, returncode: int) -> tuple[str, bool]:
    """(what went wrong in the admin's words, whether it concerns the server rather than this user)."""
    for pattern, meaning, server_wide in FAILURES:
        if re.search(pattern, stderr):
            return meaning, server_wide
    errors = [line for line in stderr.splitlines() if "Error:" in line or "Fatal:" in line]
    detail = errors[0].split("Error:", 1)[-1].split("Fatal:", 1)[-1].strip() if errors else f"exit {returncode}"
    return f"doveadm failed ({detail})", False


def size_text(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


# --- running it ------------------------------------------------------------------------------------

def doveadm(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["doveadm", *args], capture_output=True, text=True, timeout=timeout)


def reach(server: Server) -> None:
    try:
        socket.create_connection((server.host, server.port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise ServerError(f"cannot reach {server.host}:{server.port} ({why}): check --host and --port "
                          f"(IMAPS is 993, STARTTLS 143) and that this host may connect there") from None


@dataclass
class Outcome:
    address: str
    ok: bool
    text: str
    copied: int = 0


def local_status(address: str) -> dict[str, tuple[int, int]]:
    res = doveadm(["-f", "tab", "mailbox", "status", "-u", address, "messages vsize", "*"])
    if res.returncode:
        raise RuntimeError(f"cannot read the orgmail mailbox: {classify(res.stderr, res.returncode)[0]}")
    return parse_status(res.stdout)


def quota(address: str) -> tuple[int, int | None]:
    res = doveadm(["-f", "tab", "quota", "get", "-u", address])
    if res.returncode:
        raise RuntimeError(f"cannot read the mailbox's quota: {classify(res.stderr, res.returncode)[0]}")
    return parse_quota(res.stdout)


def import_user(user: ImportUser, server: Server, version: str, check_only: bool, progress: float) -> Outcome:
    who = f"{user.address} (old login {user.login})"
    workdir = tempfile.mkdtemp(prefix="orgmail-import.", dir=RUN_DIR)  # mode 0700
    try:
        login_file, password_file = f"{workdir}/login", f"{workdir}/password"
        for path, value in ((login_file, user.login), (password_file, user.password)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(file_value(value))
        conf = f"{workdir}/dovecot.conf"
        Path(conf).write_text(imapc_config(version, server, login_file, password_file))
        old = doveadm(["-f", "tab", "-c", conf, "-o", "mail_driver=imapc", "-o", "mail_path=",
                       "mailbox", "status", "-u", user.address, "messages vsize", "*"])
        if old.returncode:
            meaning, server_wide = classify(old.stderr, old.returncode)
            if server_wide:
                raise ServerError(f"{server.host}:{server.port}: {meaning}")
            return Outcome(user.address, False, f"{who}: {meaning}; nothing copied")
        remote = parse_status(old.stdout)
        remote_messages = sum(m for m, _ in remote.values())
        remote_size = sum(s for _, s in remote.values())
        summary = f"{len(remote)} folders, {remote_messages} messages, {size_text(remote_size)} on the old server"
        used, limit = quota(user.address)
        if limit is not None and remote_size > limit:
            return Outcome(user.address, False,
                           f"{who}: {summary}, more than its quota of {size_text(limit)}: nothing copied; raise "
                           "its quota in the stack (mailboxes[].quota), pulumi up, wait for the sync, run again")
        if check_only:
            folders = ", ".join(f"{name} {m}" for name, (m, _) in sorted(remote.items()))
            return Outcome(user.address, True, f"{who}: login ok; {summary} ({folders})")
        before = local_status(user.address)
        print(f"{PROG}: {who}: copying {summary}", flush=True)
        with open(f"{workdir}/stderr", "w+", encoding="utf-8", errors="replace") as log, \
                subprocess.Popen(["doveadm", "-c", conf, "sync", "-1", "-R", "-u", user.address, "imapc:"],
                                 stdout=subprocess.DEVNULL, stderr=log) as proc:
            while True:
                try:
                    proc.wait(timeout=progress)
                    break
                except subprocess.TimeoutExpired:
                    now = sum(m for m, _ in local_status(user.address).values())
                    print(f"{PROG}: {user.address}: {now} messages here so far", flush=True)
            log.seek(0)
            stderr = log.read()
        after = local_status(user.address)
        copied = sum(after.get(f, (0, 0))[0] - before.get(f, (0, 0))[0] for f in after)
        new_folders = sorted(set(remote) - set(before))
        short = [f"{f} ({after.get(f, (0, 0))[0]} here, {m} there)" for f, (m, _) in sorted(remote.items())
                 if after.get(f, (0, 0))[0] < m]
        touched = [f for f in after if after[f][0] > before.get(f, (0, 0))[0]]
        done = f"{copied} messages copied into {len(touched)} folders ({len(new_folders)} new here)"
        if proc.returncode not in (0, 2):
            meaning, _ = classify(stderr, proc.returncode)
            return Outcome(user.address, False, f"{who}: {meaning}; {done} before it stopped; run again", copied)
        if short:
            return Outcome(user.address, False, f"{who}: {done}, but folders have fewer messages here than on "
                           f"the old server: {', '.join(short)}", copied)
        used, limit = quota(user.address)
        if limit is not None and used > limit:
            return Outcome(user.address, False,
                           f"{who}: {done}; the mailbox is now over its quota ({size_text(used)} of "
                           f"{size_text(limit)}): new mail to it is refused until there is room; raise its quota",
                           copied)
        again = "; the old mailbox changed during the copy: run again" if proc.returncode == 2 else ""
        return Outcome(user.address, True, f"{who}: {done}; {summary}, all here{again}", copied)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="Copy users' mail from their old IMAP server "
                                     "(re-run until cutover; a re-run copies only what is new).")
    parser.add_argument("users", metavar="USERS.csv", help="columns address,login,password (mode 0600); - for stdin")
    parser.add_argument("--host", required=True, help="the old IMAP server, as its certificate names it")
    parser.add_argument("--port", help="default: 993 with --tls imaps, 143 with starttls")
    parser.add_argument("--tls", choices=("imaps", "starttls"), default="imaps", help="default: imaps")
    parser.add_argument("--ca-file", help="trust only this CA (PEM) for the old server, e.g. a private CA")
    parser.add_argument("--list-prefix", help="copy only the folders under this prefix (e.g. INBOX on Courier)")
    parser.add_argument("--check", action="store_true", help="log in and list every user's old folders; copy nothing")
    parser.add_argument("--progress", type=float, default=30.0, help="seconds between progress lines (default 30)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise UsageError("run it as root (sudo orgmail-import ...): it writes into every user's mailbox")
        server = Server(server_host(args.host),
                        server_port(args.port) if args.port is not None else DEFAULT_PORTS[args.tls], args.tls,
                        ca_file(args.ca_file) if args.ca_file is not None else None,
                        list_prefix(args.list_prefix) if args.list_prefix is not None else None)
        if not args.progress > 0:
            raise UsageError(f"--progress {args.progress} must be more than 0 seconds")
        users = read_users(args.users)
        try:
            known = orgmail_mailboxes(Path(USERS_FILE).read_text())
        except OSError as e:
            raise UsageError(f"{USERS_FILE}: cannot read it ({e.strerror}); is this the orgmail mailbox host?") from None
        if problems := unknown_mailboxes(users, known, "standard input" if args.users == "-" else args.users):
            raise UsageError(report(problems))
        version = config_version(Path(DOVECOT_CONF).read_text())
        reach(server)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except ServerError as e:
        print(f"{PROG}: {e}; nothing copied", file=sys.stderr)
        return 1
    outcomes: list[Outcome] = []
    stopped = ""
    try:
        for user in users:
            try:
                outcome = import_user(user, server, version, args.check, args.progress)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                outcome = Outcome(user.address, False, f"{user.address}: {e}")
            print(f"{PROG}: {'ok' if outcome.ok else 'FAILED'}: {outcome.text}", flush=True)
            outcomes.append(outcome)
    except ServerError as e:
        stopped = f"{e}; stopped before {user.address}"
    except KeyboardInterrupt:
        stopped = f"interrupted during {user.address}; a re-run continues where this one stopped"
    if stopped:
        print(f"{PROG}: {stopped}", file=sys.stderr, flush=True)
    failed = [o.address for o in outcomes if not o.ok]
    verb = "checked" if args.check else f"{sum(o.copied for o in outcomes)} messages copied for"
    print(f"{PROG}: summary: {verb} {len(outcomes) - len(failed)} of {len(users)} users"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; not done: {len(users) - len(outcomes)}" if len(outcomes) < len(users) else ""), flush=True)
    return 1 if failed or stopped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
