#!/usr/bin/python3
"""orgmail-users: provision the ISP cluster's directory (issue 15). Users of that tier live in
PostgreSQL (directory.sql beside this file), never in Pulumi config.

  orgmail-users init                                 create or complete the schema (idempotent)
  orgmail-users domain add NAME | list | remove NAME
  orgmail-users shard add NAME HOST [--closed] | list | close NAME | open NAME
  orgmail-users add ADDRESS [--quota SIZE] [--shard NAME]
  orgmail-users add --csv FILE [--quota SIZE]        columns: address[,quota][,shard]
  orgmail-users import --dovecot-users FILE --postfix-domains FILE --postfix-mailboxes FILE
                       --postfix-aliases FILE [--quota SIZE] [--shard NAME] [--skip-existing] [--dry-run]
                                                     a single-host stack's users, hashes and quotas kept
  orgmail-users passwd ADDRESS [--hash HASH|-]
  orgmail-users alias add SOURCE TARGET... | remove SOURCE [TARGET...] | list [--domain NAME]
  orgmail-users quota ADDRESS SIZE
  orgmail-users block ADDRESS | unblock ADDRESS
  orgmail-users move ADDRESS SHARD [--doveadm-password-file FILE]
                                                     block, kick, copy (doveadm backup), switch, unblock
  orgmail-users list [--domain NAME]
  orgmail-users remove ADDRESS
  orgmail-users login edge|shard --ssm-path PATH [--region REGION] [--replace]
                                                     the role's directory login, stored in its SSM sub-path

It connects only the way libpq is told by the environment (PGSERVICE and ~/.pg_service.conf, PGHOST,
PGDATABASE, PGUSER, ~/.pgpass, PGSSLMODE...); it takes no password anywhere. A new mailbox, and
`passwd` without --hash, gets a generated password (24 letters and digits, from `secrets`), printed
once on standard output as "ADDRESS<TAB>PASSWORD" after the change is committed; only its {BLF-CRYPT}
hash is stored, and the mailbox must change it (password_must_change). Every input is checked whole
before anything is written: bad input ends with one line on standard error and exit code 2, a
directory that cannot be reached or used with exit code 1; either way nothing is written.
"""

import argparse
import base64
import csv
import ipaddress
import os
import re
import secrets
import socket
import string
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

PROG = "orgmail-users"
SCHEMA_VERSION = 1
SCHEMA_FILES = (Path(__file__).resolve().with_name("directory.sql"), Path("/usr/local/share/orgmail/directory.sql"))
LOCK = 4242015  # directory.sql's writer lock
BCRYPT_COST = 10  # as the single-host tiers' generated passwords (pulumi_random's bcrypt hash)
PASSWORD_LENGTH = 24
PASSWORD_ALPHABET = string.ascii_letters + string.digits
DEFAULT_QUOTA = "1G"
CSV_COLUMNS = ("address", "quota", "shard")
MAX_REPORTED = 20  # bad CSV or import lines shown before "... and N more"
# `move`: the shards' doveadm server (components/shard.py DOVEADM_PORT; tests/unit/test_directory.py keeps
# them equal) and the shards' shared secret, in the file orgmail-bootstrap writes on every shard.
DOVEADM_PORT = 24245
DOVEADM_PASSWORD_FILE = "/etc/dovecot/orgmail-doveadm.conf"
DOVEADM_TIMEOUT = 900.0  # seconds without a byte from a shard (dsync's own stall timeout is 600)
MOVE_LOCK = 4242016  # with the address's hash: a session lock, one move of a mailbox at a time
MOVE_SETTLE = 10.0  # seconds from the block to the final copy: a delivery or session begun before the block ends
MOVE_PASSES = 3  # copies until one finds the mailbox unchanged
# The single mailbox host's users file (orgmail-sync, sync.py): vmail's uid and gid, and the homes the
# directory's userdb gives too (components/directory.py MAIL_ROOT; tests/unit/test_directory.py keeps them equal).
VMAIL_UID = 5000
MAIL_ROOT = "/srv/mail/vmail"
QUOTA_FIELD = "userdb_quota_storage_size"
UNLIMITED_FIELD = "userdb_quota_ignore=yes"  # sync.py's, for a mailbox without a quota

# The patterns of components/settings.py (tests/unit/test_directory.py keeps them equal), all used with
# fullmatch: `$` with match would also accept a final newline.
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_FQDN_RE = re.compile(rf"(?:{_LABEL}\.)+(?:[a-z]{{2,63}}|xn--[a-z0-9-]{{1,59}}(?<!-))")
_LOCAL_PART_RE = re.compile(r"[a-z0-9](?:[a-z0-9._+-]{0,62}[a-z0-9])?")
_QUOTA_RE = re.compile(r"([1-9][0-9]{0,5})([MGT])")
_HASH_RE = {
    "ARGON2ID": re.compile(r"\{ARGON2ID\}\$argon2id\$v=19\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"),
    "BLF-CRYPT": re.compile(r"\{BLF-CRYPT\}\$2[aby]\$(1[0-9]|0[89]|[23][0-9])\$[./A-Za-z0-9]{53}"),
    "SHA512-CRYPT": re.compile(r"\{SHA512-CRYPT\}\$6\$(rounds=\d+\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}"),
}
_SHARD_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")  # directory.sql shard_name_valid
_IDNA_CATEGORIES = ("Ll", "Lu", "Lo", "Lm", "Mn", "Mc", "Nd")
_SIZE_UNITS = {"M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}  # Dovecot's sizes count in powers of 1024


class UsageError(Exception):
    """Bad input (exit 2)."""


class Failure(Exception):
    """The directory cannot be reached or used (exit 1)."""


# --- validation: whole strings, before any connection ---------------------------------------------

def _a_label_problem(label: str) -> str | None:
    """Why an xn-- label is not the A-label of a valid internationalised label (components/settings.py)."""
    try:
        u_label = label[4:].encode("ascii").decode("punycode")
    except ValueError:
        return "not valid punycode"
    if u_label.isascii() or u_label.encode("punycode").decode("ascii") != label[4:]:
        return "not the punycode form of an internationalised label"
    if not unicodedata.is_normalized("NFC", u_label):
        return f"decodes to {u_label!r}, not in Unicode normal form NFC"
    for char in u_label:
        if char != "-" and (unicodedata.category(char) not in _IDNA_CATEGORIES
                            or unicodedata.normalize("NFKC", char).lower() != char):
            return f"decodes to {u_label!r}, whose U+{ord(char):04X} is not allowed in domain names"
    return None


def _folded(value: str, where: str, example: str) -> str:
    # ASCII only before folding: str.lower() maps some non-ASCII letters to ASCII (U+212A KELVIN SIGN to k).
    if not value.isascii():
        raise UsageError(f"{where}: {value!r} must be ASCII, like {example} (an internationalised domain in its xn-- form)")
    return value.lower()


def _idna_problem(name: str) -> str | None:
    for label in name.split("."):
        if label.startswith("xn--") and (why := _a_label_problem(label)):
            return f"{label} is not a valid IDNA A-label ({why}); use the xn-- form your registrar shows"
    return None


def domain_name(value: str, where: str) -> str:
    name = _folded(value, where, "example.org")
    if len(name) > 253 or not _FQDN_RE.fullmatch(name):
        raise UsageError(f"{where}: {value!r} must be a domain name like example.org "
                         "(labels of a-z, 0-9 and inner '-', at most 253 characters)")
    if problem := _idna_problem(name):
        raise UsageError(f"{where}: {problem}")
    return name


def address(value: str, where: str) -> str:
    text = _folded(value, where, "ann@example.org")
    local, at, domain = text.rpartition("@")
    if (not at or "@" in local or not _LOCAL_PART_RE.fullmatch(local) or len(text) > 254
            or len(domain) > 253 or not _FQDN_RE.fullmatch(domain)):
        raise UsageError(f"{where}: {value!r} must be an address like ann@example.org (local part 1-64 of "
                         "a-z, 0-9 and . _ + -, starting and ending with a letter or digit; at most 254 characters)")
    if problem := _idna_problem(domain):
        raise UsageError(f"{where}: {problem}")
    return text


def quota_bytes(value: str, where: str) -> int:
    match = _QUOTA_RE.fullmatch(value)
    if not match:
        raise UsageError(f"{where}: {value!r} must be a size like 500M, 2G or 1T")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def size_text(size: int) -> str:
    for unit in ("T", "G", "M"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


def shard_name(value: str, where: str) -> str:
    if not _SHARD_RE.fullmatch(value):
        raise UsageError(f"{where}: {value!r} must be a shard name of 1-32 of a-z, 0-9 and inner '-', like shard-1")
    return value


def shard_host(value: str, where: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise UsageError(f"{where}: {value!r} must be the shard's IPv4 or IPv6 address, like 10.0.1.10") from None
    if ip.is_unspecified or ip.is_multicast:
        raise UsageError(f"{where}: {value!r} must be one host's address, not an unspecified or multicast address")
    return str(ip)


def password_hash(value: str, where: str) -> str:
    scheme = value[1:value.find("}")] if value.startswith("{") else ""
    if scheme not in _HASH_RE or not _HASH_RE[scheme].fullmatch(value):
        raise UsageError(f"{where}: must be a Dovecot hash with scheme {', '.join(sorted(_HASH_RE))} "
                         "(e.g. from `doveadm pw -s BLF-CRYPT`); value not shown")
    return value


# --- passwords ------------------------------------------------------------------------------------

def new_password() -> str:
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


def blf_crypt(password: str) -> str:
    import bcrypt
    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode()


def new_passwords(count: int) -> list[tuple[str, str]]:
    """(password, hash) pairs; bcrypt releases the GIL, so the hashes are made on every CPU."""
    try:
        import bcrypt  # noqa: F401
    except ImportError:
        raise Failure("needs bcrypt (Debian: apt-get install python3-bcrypt); nothing was written") from None
    passwords = [new_password() for _ in range(count)]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(zip(passwords, pool.map(blf_crypt, passwords), strict=True))


# --- the directory ---------------------------------------------------------------------------------

def schema_text() -> str:
    for path in SCHEMA_FILES:
        if path.is_file():
            return path.read_text()
    raise Failure(f"the schema is missing: none of {', '.join(str(p) for p in SCHEMA_FILES)} exists")


def connect() -> Any:
    """A connection as libpq's environment and service file say; never a password of ours."""
    try:
        import psycopg
    except ImportError:
        raise Failure("needs psycopg 3 (Debian: apt-get install python3-psycopg python3-bcrypt)") from None
    options: dict[str, Any] = {"fallback_application_name": PROG}
    if "PGCONNECT_TIMEOUT" not in os.environ:
        options["connect_timeout"] = 10
    try:
        return psycopg.connect(**options)
    except psycopg.Error as e:
        raise Failure(f"cannot connect to the directory: {first_line(e)}") from None


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class Directory:
    """One transaction: committed when the command returns, rolled back on any error."""

    def __init__(self, conn: Any, write: bool) -> None:
        self.conn = conn
        self.cur = conn.cursor()
        if write:
            self.cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
        self.check_schema()

    def check_schema(self) -> None:
        self.cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
        if not self.one():
            raise Failure(f"the database has no orgmail directory; create it with `{PROG} init`")
        self.cur.execute("SELECT max(version) FROM schema_version")
        version = self.one()
        if version != SCHEMA_VERSION:
            raise Failure(f"the directory has schema version {version}, this {PROG} knows version {SCHEMA_VERSION}")

    def one(self, sql: str | None = None, params: Iterable[Any] = ()) -> Any:
        if sql is not None:
            self.cur.execute(sql, tuple(params))
        row = self.cur.fetchone()
        return None if row is None else row[0]

    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        self.cur.execute(sql, tuple(params))
        return list(self.cur.fetchall())

    def run(self, sql: str, params: Iterable[Any] = ()) -> int:
        self.cur.execute(sql, tuple(params))
        return int(self.cur.rowcount)

    # facts
    def has_domain(self, name: str) -> bool:
        return bool(self.one("SELECT count(*) FROM domains WHERE name = %s", (name,)))

    def mailbox(self, addr: str) -> tuple[Any, ...] | None:
        self.cur.execute("SELECT address, shard, quota_bytes, state FROM mailboxes WHERE address = %s", (addr,))
        return self.cur.fetchone()

    def is_alias(self, addr: str) -> bool:
        return bool(self.one("SELECT count(*) FROM aliases WHERE source = %s", (addr,)))

    def aliases_to(self, addr: str) -> list[str]:
        return [r[0] for r in self.rows("SELECT source FROM aliases WHERE target = %s ORDER BY source", (addr,))]

    def shard_loads(self) -> dict[str, tuple[str, int]]:
        """Every shard: (state, number of mailboxes)."""
        return {name: (state, count) for name, state, count in self.rows(
            "SELECT s.name, s.state, count(m.address) FROM shards s LEFT JOIN mailboxes m ON m.shard = s.name "
            "GROUP BY s.name, s.state ORDER BY s.name")}


def existing_mailbox(d: Directory, addr: str, where: str) -> tuple[Any, ...]:
    row = d.mailbox(addr)
    if row is None:
        hint = " (it is an alias: see `alias list`)" if d.is_alias(addr) else ""
        raise UsageError(f"{where}: no mailbox {addr}{hint}")
    return row


def hosted(d: Directory, addr: str, where: str) -> None:
    domain = addr.split("@")[1]
    if not d.has_domain(domain):
        raise UsageError(f"{where}: {domain} is not a hosted domain; add it first with `{PROG} domain add {domain}`")


def pick_shard(loads: dict[str, tuple[str, int]], wanted: str | None, where: str) -> str:
    if wanted is not None:
        if wanted not in loads:
            known = ", ".join(loads) or "none yet"
            raise UsageError(f"{where}: no shard {wanted} (shards: {known})")
        if loads[wanted][0] != "active":
            raise UsageError(f"{where}: shard {wanted} is {loads[wanted][0]} and takes no new mailboxes; "
                             f"pick an active one or `{PROG} shard open {wanted}`")
        return wanted
    active = [(count, name) for name, (state, count) in loads.items() if state == "active"]
    if not active:
        raise UsageError(f"{where}: no active shard to put the mailbox on; add one with `{PROG} shard add NAME HOST`")
    return min(active)[1]


# --- commands --------------------------------------------------------------------------------------

Out = Callable[[str], None]


def cmd_init(conn: Any, args: argparse.Namespace, out: Out) -> str:
    schema = schema_text()
    cur = conn.cursor()
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
    cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    row = cur.fetchone()
    if row and row[0]:
        cur.execute("SELECT max(version) FROM schema_version")
        version = cur.fetchone()[0]
        if version is not None and version > SCHEMA_VERSION:
            raise Failure(f"the directory has schema version {version}, newer than this {PROG}'s {SCHEMA_VERSION}")
    cur.execute(schema)
    return f"directory schema version {SCHEMA_VERSION} is in place"


def cmd_domain(conn: Any, args: argparse.Namespace, out: Out) -> str:
    if args.action == "list":
        d = Directory(conn, write=False)
        for name, boxes, aliases in d.rows(
                "SELECT d.name, (SELECT count(*) FROM mailboxes m WHERE m.domain = d.name), "
                "(SELECT count(DISTINCT source) FROM aliases a WHERE a.domain = d.name) FROM domains d ORDER BY d.name"):
            out(f"{name}\t{boxes} mailboxes\t{aliases} aliases")
        return ""
    name = domain_name(args.name, f"domain {args.action} NAME")
    d = Directory(conn, write=True)
    if args.action == "add":
        if d.has_domain(name):
            raise UsageError(f"domain add NAME: {name} is already hosted")
        d.run("INSERT INTO domains (name) VALUES (%s)", (name,))
        return f"added domain {name}"
    if not d.has_domain(name):
        raise UsageError(f"domain remove NAME: {name} is not hosted")
    boxes = d.one("SELECT count(*) FROM mailboxes WHERE domain = %s", (name,))
    aliases = d.one("SELECT count(DISTINCT source) FROM aliases WHERE domain = %s", (name,))
    if boxes or aliases:
        raise UsageError(f"domain remove NAME: {name} still has {boxes} mailboxes and {aliases} aliases; remove them first")
    d.run("DELETE FROM domains WHERE name = %s", (name,))
    return f"removed domain {name}"


def cmd_shard(conn: Any, args: argparse.Namespace, out: Out) -> str:
    if args.action == "list":
        d = Directory(conn, write=False)
        for name, host, state, count in d.rows(
                "SELECT s.name, host(s.host), s.state, count(m.address) FROM shards s "
                "LEFT JOIN mailboxes m ON m.shard = s.name GROUP BY s.name ORDER BY s.name"):
            out(f"{name}\t{host}\t{state}\t{count} mailboxes")
        return ""
    name = shard_name(args.name, f"shard {args.action} NAME")
    if args.action == "add":
        host = shard_host(args.host, "shard add HOST")
        d = Directory(conn, write=True)
        if d.one("SELECT count(*) FROM shards WHERE name = %s", (name,)):
            raise UsageError(f"shard add NAME: shard {name} already exists")
        other = d.one("SELECT name FROM shards WHERE host = %s::inet", (host,))
        if other:
            raise UsageError(f"shard add HOST: {host} is already shard {other}'s address")
        state = "closed" if args.closed else "active"
        d.run("INSERT INTO shards (name, host, state) VALUES (%s, %s::inet, %s)", (name, host, state))
        return f"added shard {name} at {host} ({state})"
    d = Directory(conn, write=True)
    state = "closed" if args.action == "close" else "active"
    if not d.run("UPDATE shards SET state = %s WHERE name = %s", (state, name)):
        raise UsageError(f"shard {args.action} NAME: no shard {name}")
    return f"shard {name} is {state}" + (" (serves its mailboxes, takes no new ones)" if state == "closed" else "")


# `login`: the database login each host role reads the directory as (a member of orgmail_reader), stored where
# the role's hosts read it at their first boot (components/cluster.py, cluster/bootstrap.sh.j2).
LOGIN_ROLES = ("edge", "shard")
LOGIN_PASSWORD_LENGTH = 32  # letters and digits: the bootstrap accepts 16-128 of them
_SSM_PATH_RE = re.compile(r"(/[A-Za-z0-9_.-]{1,128}){1,10}")


def login_name(role: str) -> str:
    return f"orgmail_{role}"


def ssm_put(name: str, value: str, region: str | None) -> None:
    """One SecureString parameter, through the aws CLI (the administrator's, which port forwarding needs anyway):
    the value in a request file only this user can read, removed at once, never on a command line."""
    import json
    import subprocess
    import tempfile

    request = json.dumps({"Name": name, "Value": value, "Type": "SecureString", "Overwrite": True})
    region_args = ["--region", region] if region else []
    try:
        with tempfile.TemporaryDirectory(prefix="orgmail-users-") as private:  # mode 0700
            path = Path(private, "request.json")
            path.touch(mode=0o600)
            path.write_text(request)
            done = subprocess.run(["aws", "ssm", "put-parameter", *region_args, "--cli-input-json", f"file://{path}",
                                   "--output", "json"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise Failure(f"login: cannot run the aws CLI ({e}); nothing was written to the directory") from None
    if done.returncode:
        raise Failure(f"login: SSM refused {name}: {first_line(done.stderr.strip() or 'no reason given')}; "
                      "nothing was written to the directory")


def ssm_has(name: str, region: str | None) -> bool:
    import subprocess

    region_args = ["--region", region] if region else []
    done = subprocess.run(["aws", "ssm", "get-parameter", *region_args, "--name", name, "--query", "Parameter.Name",
                           "--output", "text"], capture_output=True, text=True, timeout=120)
    if done.returncode and "ParameterNotFound" not in done.stderr:
        raise Failure(f"login: cannot ask SSM for {name}: {first_line(done.stderr.strip() or 'no reason given')}")
    return done.returncode == 0


def cmd_login(conn: Any, args: argparse.Namespace, out: Out) -> str:
    """The role's login: a new password, set as a SCRAM verifier (the password itself never reaches the server
    or its logs), stored in SSM, and committed only once SSM holds it. Refused where the role's hosts already
    have one, unless --replace (hosts booted before keep the old password until they are replaced)."""
    from psycopg import sql

    if not _SSM_PATH_RE.fullmatch(args.ssm_path or ""):
        raise UsageError(f"login --ssm-path: {args.ssm_path!r} is not an SSM path like /orgmail/<stack> "
                         "(the stack output ssmPath)")
    if args.region is not None and not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", args.region):
        raise UsageError(f"login --region: {args.region!r} is not an AWS region like eu-central-1")
    user_parameter = f"{args.ssm_path}/{args.role}/directory/user"
    password_parameter = f"{args.ssm_path}/{args.role}/directory/password"
    if not args.replace and ssm_has(password_parameter, args.region):
        raise UsageError(f"login {args.role}: {password_parameter} exists already (the {args.role}s have a login); "
                         "--replace sets a new one, which hosts booted before do not know until they are replaced")
    d = Directory(conn, write=True)
    name = login_name(args.role)
    password = "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(LOGIN_PASSWORD_LENGTH))
    verifier = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
    exists = d.one("SELECT count(*) FROM pg_roles WHERE rolname = %s", (name,))
    statement = "ALTER ROLE {} WITH LOGIN PASSWORD {}" if exists else "CREATE ROLE {} WITH LOGIN PASSWORD {}"
    d.cur.execute(sql.SQL(statement).format(sql.Identifier(name), sql.Literal(verifier)))
    d.cur.execute(sql.SQL("GRANT orgmail_reader TO {}").format(sql.Identifier(name)))
    ssm_put(user_parameter, name, args.region)
    ssm_put(password_parameter, password, args.region)
    return (f"{'new password for' if exists else 'created'} login {name} (orgmail_reader), stored in "
            f"{args.ssm_path}/{args.role}/directory/")


def cmd_add(conn: Any, args: argparse.Namespace, out: Out) -> str:
    if (args.address is None) == (args.csv is None):
        raise UsageError("add: give either ADDRESS or --csv FILE")
    default_quota = quota_bytes(args.quota, "add --quota")
    if args.csv is not None:
        if args.shard is not None:
            raise UsageError("add --shard: not with --csv (give a shard column instead)")
        wanted = read_csv(args.csv, default_quota)
    else:
        wanted = [(address(args.address, "add ADDRESS"), default_quota,
                   None if args.shard is None else shard_name(args.shard, "add --shard"), "add ADDRESS")]
    d = Directory(conn, write=True)
    problems = []
    addresses = [w[0] for w in wanted]
    domains = {a.split("@")[1] for a in addresses}
    missing = sorted(domains - {r[0] for r in d.rows("SELECT name FROM domains WHERE name = ANY(%s)", (list(domains),))})
    taken = dict(d.rows("SELECT address, 'a mailbox' FROM mailboxes WHERE address = ANY(%s) "
                        "UNION ALL SELECT DISTINCT source, 'an alias' FROM aliases WHERE source = ANY(%s)",
                        (addresses, addresses)))
    loads = d.shard_loads()
    placed: list[tuple[str, int, str]] = []
    for addr, quota, shard, line in wanted:
        domain = addr.split("@")[1]
        try:
            if domain in missing:
                raise UsageError(f"{line}: {domain} is not a hosted domain; add it first with `{PROG} domain add {domain}`")
            if addr in taken:
                raise UsageError(f"{line}: {addr} is already {taken[addr]}")
            chosen = pick_shard(loads, shard, line)
        except UsageError as e:
            problems.append(str(e))
            continue
        state, count = loads[chosen]
        loads[chosen] = (state, count + 1)
        placed.append((addr, quota, chosen))
    if problems:
        raise UsageError(report(problems))
    credentials = new_passwords(len(placed))
    d.cur.executemany(
        "INSERT INTO mailboxes (address, password, quota_bytes, shard, password_must_change) VALUES (%s, %s, %s, %s, true)",
        [(addr, hashed, quota, shard) for (addr, quota, shard), (_, hashed) in zip(placed, credentials, strict=True)])
    conn.commit()
    for (addr, _, _), (password, _) in zip(placed, credentials, strict=True):
        out(f"{addr}\t{password}")
    per_shard = {}
    for _, _, shard in placed:
        per_shard[shard] = per_shard.get(shard, 0) + 1
    spread = ", ".join(f"{s} {n}" for s, n in sorted(per_shard.items()))
    return (f"added {len(placed)} mailbox{'es' if len(placed) != 1 else ''} ({spread}); "
            f"{'each password is' if len(placed) != 1 else 'the password is'} shown once above")


def report(problems: list[str], nothing: str = "nothing was added") -> str:
    shown = problems[:MAX_REPORTED]
    if len(problems) > MAX_REPORTED:
        shown.append(f"... and {len(problems) - MAX_REPORTED} more; {nothing}")
    return "\n".join(shown)


def read_csv(path: str, default_quota: int) -> list[tuple[str, int, str | None, str]]:
    """(address, quota bytes, shard or None, where) for every row; every bad row reported, one line each."""
    where = f"add --csv {path}"
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: cannot read it as UTF-8 text: {e.strerror if isinstance(e, OSError) else e.reason}") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise UsageError(f"{where}: empty; the first line names the columns: address[,quota][,shard]")
    header = [h.strip().lower() for h in rows[0]]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if "address" not in header or unknown or len(set(header)) != len(header):
        raise UsageError(f"{where}: line 1 must name the columns, each once, from address (required), quota and shard; "
                         f"got {','.join(rows[0])!r}")
    found: list[tuple[str, int, str | None, str]] = []
    problems: list[str] = []
    first_seen: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        line = f"{where} line {number}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.append(f"{line}: {len(row)} cells, the header has {len(header)}")
            continue
        cells = dict(zip(header, (c.strip() for c in row), strict=True))
        try:
            addr = address(cells["address"], f"{line} address")
            quota = quota_bytes(cells["quota"], f"{line} quota") if cells.get("quota") else default_quota
            shard = shard_name(cells["shard"], f"{line} shard") if cells.get("shard") else None
        except UsageError as e:
            problems.append(str(e))
            continue
        if addr in first_seen:
            problems.append(f"{line}: {addr} is also on line {first_seen[addr]}")
            continue
        first_seen[addr] = number
        found.append((addr, quota, shard, line))
    if problems:
        raise UsageError(report(problems))
    if not found:
        raise UsageError(f"{where}: no mailboxes, only the header")
    return found


# --- import: a single-host stack's users -----------------------------------------------------------

# The files orgmail-sync writes on the single mailbox host, by the option that names each here.
IMPORT_FILES = {
    "dovecot_users": ("--dovecot-users", "/etc/dovecot/orgmail-users"),
    "postfix_domains": ("--postfix-domains", "/etc/postfix/orgmail/domains"),
    "postfix_mailboxes": ("--postfix-mailboxes", "/etc/postfix/orgmail/mailboxes"),
    "postfix_aliases": ("--postfix-aliases", "/etc/postfix/orgmail/aliases"),
}


def import_lines(path: str, option: str) -> list[tuple[str, str]]:
    """(where, text) of every line that is neither blank nor a comment, as Postfix and Dovecot skip them."""
    where = f"import {option} {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: cannot read it as UTF-8 text: {e.strerror if isinstance(e, OSError) else e.reason}") from None
    return [(f"{where} line {number}", line) for number, line in enumerate(text.split("\n"), start=1)
            if line.strip() and not line.lstrip().startswith("#")]


def once(key: str, where: str, seen: dict[str, str]) -> None:
    """Each key on one line only: Postfix and Dovecot would each take one of two, silently."""
    if key in seen:
        raise UsageError(f"{where}: {key} is also on line {seen[key].rsplit(' ', 1)[-1]}")
    seen[key] = where


def read_domains_file(path: str, problems: list[str]) -> dict[str, str]:
    """Postfix's virtual_mailbox_domains list: one domain name a line. {name: where}"""
    found: dict[str, str] = {}
    for where, line in import_lines(path, "--postfix-domains"):
        try:
            fields = line.split()
            if len(fields) != 1:
                raise UsageError(f"{where}: one domain name a line, got {len(fields)} words")
            once(domain_name(fields[0], where), where, found)
        except UsageError as e:
            problems.append(str(e))
    return found


def map_line(where: str, line: str) -> tuple[str, str]:
    """A texthash line as orgmail-sync writes it: KEY VALUE on one line."""
    if line[0].isspace():
        raise UsageError(f"{where}: starts with white space (a continuation line); give each entry on one line")
    key, *value = re.split(r"\s+", line.strip(), maxsplit=1)
    if not value:
        raise UsageError(f"{where}: must be KEY VALUE, got no value")
    return key, value[0]


def read_mailboxes_file(path: str, problems: list[str]) -> dict[str, str]:
    """Postfix's virtual_mailbox_maps: ADDRESS OK. {address: where}"""
    found: dict[str, str] = {}
    for where, line in import_lines(path, "--postfix-mailboxes"):
        try:
            key, value = map_line(where, line)
            if value != "OK":
                raise UsageError(f"{where}: the value must be OK, as orgmail-sync writes it, got {value!r}")
            once(address(key, where), where, found)
        except UsageError as e:
            problems.append(str(e))
    return found


def read_aliases_file(path: str, problems: list[str]) -> dict[str, tuple[list[str], str]]:
    """Postfix's virtual_alias_maps: SOURCE TARGET[,TARGET...]. {source: ([targets], where)}"""
    found: dict[str, tuple[list[str], str]] = {}
    seen: dict[str, str] = {}
    for where, line in import_lines(path, "--postfix-aliases"):
        try:
            key, value = map_line(where, line)
            source = address(key, f"{where} alias")
            targets: list[str] = []
            for raw in filter(None, re.split(r"[\s,]+", value)):
                target = address(raw, f"{where} target")
                if target in targets:
                    raise UsageError(f"{where}: target {target} is given twice")
                if target == source:
                    raise UsageError(f"{where}: {source} points to itself")
                targets.append(target)
            if not targets:
                raise UsageError(f"{where}: {source} has no target")
            once(source, where, seen)
        except UsageError as e:
            problems.append(str(e))
            continue
        found[source] = (targets, where)
    return found


def read_users_file(path: str, problems: list[str]) -> dict[str, tuple[str, int | None, str]]:
    """Dovecot's passwd-file as orgmail-sync writes it, one mailbox a line:
    ADDRESS:HASH:5000:5000::/srv/mail/vmail/DOMAIN/LOCAL::[userdb_quota_storage_size=SIZE|userdb_quota_ignore=yes]
    {address: (hash, quota bytes or None for none, where)}. A line is never shown: it holds a hash."""
    found: dict[str, tuple[str, int | None, str]] = {}
    seen: dict[str, str] = {}
    for where, line in import_lines(path, "--dovecot-users"):
        try:
            fields = line.split(":", 7)  # Dovecot: the extra fields are the rest of the line
            if len(fields) != 8:
                raise UsageError(f"{where}: {len(fields)} fields, a line of this file has 8 "
                                 "(address:hash:uid:gid::home::extra); the line is not shown, it holds a password hash")
            user, hashed, uid, gid, gecos, home, shell, extra = fields
            if "$" in user or "{" in user:  # a hash in the wrong field: never echo it
                raise UsageError(f"{where}: the first field must be an address like ann@example.org (not shown)")
            addr = address(user, where)
            hashed = password_hash(hashed, f"{where} {addr} hash")
            if (uid, gid) != (str(VMAIL_UID), str(VMAIL_UID)) or gecos or shell:
                raise UsageError(f"{where}: {addr} has uid:gid {uid}:{gid} and gecos and shell {gecos!r}, {shell!r}; "
                                 f"orgmail-sync writes {VMAIL_UID}:{VMAIL_UID} and empty fields")
            local, domain = addr.split("@")
            if home != f"{MAIL_ROOT}/{domain}/{local}":
                raise UsageError(f"{where}: {addr} has home {home!r}; the directory's shards keep it at "
                                 f"{MAIL_ROOT}/{domain}/{local}, as orgmail-sync writes it")
            quota = None
            items = extra.split()
            # None (older files) or UNLIMITED_FIELD: an unlimited mailbox; else exactly one QUOTA_FIELD=SIZE.
            if items and items != [UNLIMITED_FIELD]:
                name, _, value = items[0].partition("=")
                if name != QUOTA_FIELD or len(items) > 1:
                    raise UsageError(f"{where}: {addr} has the extra fields {extra!r}; orgmail-sync writes one of "
                                     f"{QUOTA_FIELD}=SIZE or {UNLIMITED_FIELD}")
                quota = quota_bytes(value, f"{where} {addr} {QUOTA_FIELD}")
            once(addr, where, seen)
        except UsageError as e:
            problems.append(str(e))
            continue
        found[addr] = (hashed, quota, where)
    return found


def alias_order(aliases: dict[str, tuple[list[str], str]], problems: list[str]) -> list[str]:
    """The sources, each after the aliases it points to (the directory wants a hosted target to exist
    first); a loop is reported once, at each of its lines."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(source: str, path: list[str]) -> None:
        if state.get(source) == "done":
            return
        if state.get(source) == "open":
            cycle = path[path.index(source):] + [source]
            for member in cycle[:-1]:
                problems.append(f"{aliases[member][1]}: alias loop {' -> '.join(cycle)}; "
                                "every alias must end in a mailbox or an outside address")
            return
        state[source] = "open"
        for target in aliases[source][0]:
            if target in aliases:
                visit(target, path + [source])
        state[source] = "done"
        order.append(source)

    for source in aliases:
        visit(source, [])
    return order


def cmd_import(conn: Any, args: argparse.Namespace, out: Out) -> str:
    given = {key: getattr(args, key) for key in IMPORT_FILES}
    missing = [f"{option} FILE (the old host's {path})" for key, (option, path) in IMPORT_FILES.items() if given[key] is None]
    if missing:
        raise UsageError(f"import: give {', '.join(missing)}: every file, so that nothing is left behind")
    default_quota = None if args.quota is None else quota_bytes(args.quota, "import --quota")
    wanted_shard = None if args.shard is None else shard_name(args.shard, "import --shard")
    problems: list[str] = []
    domains = read_domains_file(args.postfix_domains, problems)
    boxes = read_mailboxes_file(args.postfix_mailboxes, problems)
    users_ = read_users_file(args.dovecot_users, problems)
    aliases = read_aliases_file(args.postfix_aliases, problems)
    if problems:
        raise UsageError(report(problems, "nothing was imported"))
    # The files agree with each other.
    for addr, where in boxes.items():
        if addr not in users_:
            problems.append(f"{where}: {addr} has no line in {args.dovecot_users} (no password hash: it could not "
                            "log in on the old host); give it one there, or leave it out and `add` it afterwards")
    for addr, (_, _, where) in users_.items():
        if addr not in boxes:
            problems.append(f"{where}: {addr} is not in {args.postfix_mailboxes} (the old host took no mail for it)")
    for source, (_, where) in aliases.items():
        if source in boxes:
            problems.append(f"{where}: {source} is also a mailbox ({boxes[source]}); an address is either a mailbox or an alias")
    if problems:
        raise UsageError(report(problems, "nothing was imported"))

    d = Directory(conn, write=True)
    addresses = sorted({*boxes, *aliases, *(t for targets, _ in aliases.values() for t in targets)})
    involved = sorted({*domains, *(a.split("@")[1] for a in addresses)})
    held_domains = {r[0] for r in d.rows("SELECT name FROM domains WHERE name = ANY(%s)", (involved,))}
    held_boxes = {r[0] for r in d.rows("SELECT address FROM mailboxes WHERE address = ANY(%s)", (addresses,))}
    held_aliases = {r[0] for r in d.rows("SELECT DISTINCT source FROM aliases WHERE source = ANY(%s)", (addresses,))}
    forwarded = dict(d.rows("SELECT split_part(target, '@', 2), min(target) FROM aliases "
                            "WHERE split_part(target, '@', 2) = ANY(%s) GROUP BY 1", (sorted(domains),)))
    hosted = set(domains) | held_domains
    skip = "; --skip-existing imports the rest and leaves it as it is"
    skipped = {"domains": 0, "mailboxes": 0, "aliases": 0}
    new_domains = []
    for name, where in domains.items():
        if name in held_domains:
            if not args.skip_existing:
                problems.append(f"{where}: {name} is already hosted in the directory{skip}")
            skipped["domains"] += 1
        elif name in forwarded:
            problems.append(f"{where}: aliases in the directory forward to {name} ({forwarded[name]}), which would then be "
                            "a local address without a mailbox; remove those aliases first")
        else:
            new_domains.append(name)
    new_boxes = []
    for addr, where in boxes.items():
        domain = addr.split("@")[1]
        if domain not in hosted:
            problems.append(f"{where}: {domain} is in neither {args.postfix_domains} nor the directory")
        elif addr in held_aliases:
            problems.append(f"{where}: {addr} is an alias in the directory; an address is either a mailbox or an alias")
        elif addr in held_boxes:
            if not args.skip_existing:
                problems.append(f"{where}: {addr} is already a mailbox in the directory{skip}")
            skipped["mailboxes"] += 1
        else:
            new_boxes.append(addr)
    unlimited = [users_[addr][2].rsplit(" ", 1)[-1] for addr in new_boxes if users_[addr][1] is None]
    if unlimited and default_quota is None:
        problems.append(f"import --dovecot-users {args.dovecot_users}: {len(unlimited)} mailbox"
                        f"{'es have' if len(unlimited) != 1 else ' has'} no quota (unlimited on the old host; line"
                        f"{'s' if len(unlimited) != 1 else ''} {', '.join(unlimited[:10])}{', ...' if len(unlimited) > 10 else ''}); "
                        "every mailbox in the directory has one: give --quota SIZE for them")
    exists = set(boxes) | set(aliases) | held_boxes | held_aliases
    new_aliases = set()
    for source, (targets, where) in aliases.items():
        domain = source.split("@")[1]
        if domain not in hosted:
            problems.append(f"{where}: {domain} is in neither {args.postfix_domains} nor the directory")
        elif source in held_boxes:
            problems.append(f"{where}: {source} is a mailbox in the directory; an address is either a mailbox or an alias")
        elif source in held_aliases:
            if not args.skip_existing:
                problems.append(f"{where}: {source} is already an alias in the directory{skip}")
            skipped["aliases"] += 1
        else:
            new_aliases.add(source)
            for target in targets:
                if target.split("@")[1] in hosted and target not in exists:
                    problems.append(f"{where}: target {target} is in a hosted domain but is neither a mailbox nor an alias")
    order = alias_order({s: aliases[s] for s in aliases if s in new_aliases}, problems)
    loads = d.shard_loads()
    if new_boxes or wanted_shard:
        try:
            pick_shard(loads, wanted_shard, "import --shard" if wanted_shard else "import")
        except UsageError as e:
            problems.append(str(e))
    if problems:
        raise UsageError(report(problems, "nothing was imported"))

    rows = []
    for addr in new_boxes:
        hashed, quota, _ = users_[addr]
        shard = pick_shard(loads, wanted_shard, "import")
        state, count = loads[shard]
        loads[shard] = (state, count + 1)
        rows.append((addr, hashed, quota if quota is not None else default_quota, shard))
    d.cur.executemany("INSERT INTO domains (name) VALUES (%s)", [(n,) for n in new_domains])
    # The user's own password, kept: nothing to change (as `passwd --hash`).
    d.cur.executemany("INSERT INTO mailboxes (address, password, quota_bytes, shard, password_must_change) "
                      "VALUES (%s, %s, %s, %s, false)", rows)
    d.cur.executemany("INSERT INTO aliases (source, target) VALUES (%s, %s)",
                      [(s, t) for s in order for t in aliases[s][0]])
    per_shard: dict[str, int] = {}
    for *_, shard in rows:
        per_shard[shard] = per_shard.get(shard, 0) + 1
    spread = ", ".join(f"{s} {n}" for s, n in sorted(per_shard.items()))
    given_quota = sum(1 for addr in new_boxes if users_[addr][1] is None)
    summary = (f"{len(new_domains)} domain{'s' if len(new_domains) != 1 else ''}, "
               f"{len(rows)} mailbox{'es' if len(rows) != 1 else ''}{f' ({spread})' if spread else ''}, "
               f"{len(order)} alias{'es' if len(order) != 1 else ''}; password hashes and quotas kept"
               + (f", --quota {size_text(default_quota)} for {given_quota} without one" if given_quota and default_quota else ""))
    if any(skipped.values()):
        summary += "; left as they are in the directory: " + ", ".join(f"{n} {k}" for k, n in skipped.items() if n)
    if args.dry_run:
        conn.rollback()  # every check of the directory ran on the rows; none stays
        return f"dry run: would import {summary}; nothing was written"
    return f"imported {summary}"


def cmd_passwd(conn: Any, args: argparse.Namespace, out: Out) -> str:
    addr = address(args.address, "passwd ADDRESS")
    given = None
    if args.hash is not None:
        raw = sys.stdin.readline().rstrip("\n") if args.hash == "-" else args.hash
        given = password_hash(raw, "passwd --hash")
    d = Directory(conn, write=True)
    existing_mailbox(d, addr, "passwd ADDRESS")
    if given is not None:
        d.run("UPDATE mailboxes SET password = %s, password_must_change = false WHERE address = %s", (given, addr))
        return f"set the given hash for {addr}"
    [(password, hashed)] = new_passwords(1)
    d.run("UPDATE mailboxes SET password = %s, password_must_change = true WHERE address = %s", (hashed, addr))
    conn.commit()
    out(f"{addr}\t{password}")
    return f"new password for {addr}, shown once above"


def cmd_quota(conn: Any, args: argparse.Namespace, out: Out) -> str:
    addr = address(args.address, "quota ADDRESS")
    size = quota_bytes(args.size, "quota SIZE")
    d = Directory(conn, write=True)
    existing_mailbox(d, addr, "quota ADDRESS")
    d.run("UPDATE mailboxes SET quota_bytes = %s WHERE address = %s", (size, addr))
    return f"quota of {addr} is {size_text(size)}"


def cmd_block(conn: Any, args: argparse.Namespace, out: Out) -> str:
    addr = address(args.address, f"{args.command} ADDRESS")
    d = Directory(conn, write=True)
    existing_mailbox(d, addr, f"{args.command} ADDRESS")
    state = "blocked" if args.command == "block" else "active"
    d.run("UPDATE mailboxes SET state = %s WHERE address = %s", (state, addr))
    if state == "blocked":
        return f"{addr} is blocked: logins fail, its mail waits in the edges' queues (up to their queue lifetime)"
    return f"{addr} is active"


def cmd_list(conn: Any, args: argparse.Namespace, out: Out) -> str:
    domain = None if args.domain is None else domain_name(args.domain, "list --domain")
    d = Directory(conn, write=False)
    for addr, shard, quota, state, must_change in d.rows(
            "SELECT address, shard, quota_bytes, state, password_must_change FROM mailboxes "
            "WHERE %s::text IS NULL OR domain = %s ORDER BY address", (domain, domain)):
        out(f"{addr}\t{shard}\t{size_text(quota)}\t{state}" + ("\tmust-change-password" if must_change else ""))
    return ""


def cmd_remove(conn: Any, args: argparse.Namespace, out: Out) -> str:
    addr = address(args.address, "remove ADDRESS")
    d = Directory(conn, write=True)
    row = existing_mailbox(d, addr, "remove ADDRESS")
    pointing = d.aliases_to(addr)
    if pointing:
        raise UsageError(f"remove ADDRESS: {addr} is the target of alias {', '.join(pointing)}; "
                         f"remove that first (`{PROG} alias remove {pointing[0]} {addr}`)")
    d.run("DELETE FROM mailboxes WHERE address = %s", (addr,))
    return f"removed {addr} from the directory; its mail on shard {row[1]} is not deleted"


def cmd_alias(conn: Any, args: argparse.Namespace, out: Out) -> str:
    if args.action == "list":
        domain = None if args.domain is None else domain_name(args.domain, "alias list --domain")
        d = Directory(conn, write=False)
        for source, target in d.rows("SELECT source, target FROM aliases WHERE %s::text IS NULL OR domain = %s "
                                     "ORDER BY source, target", (domain, domain)):
            out(f"{source}\t{target}")
        return ""
    source = address(args.source, f"alias {args.action} SOURCE")
    targets = []
    for target in args.targets:
        t = address(target, f"alias {args.action} TARGET")
        if t in targets:
            raise UsageError(f"alias {args.action} TARGET: {t} is given twice")
        targets.append(t)
    d = Directory(conn, write=True)
    current = {r[0] for r in d.rows("SELECT target FROM aliases WHERE source = %s", (source,))}
    if args.action == "remove":
        if not current:
            raise UsageError(f"alias remove SOURCE: {source} is not an alias")
        gone = targets or sorted(current)
        for t in gone:
            if t not in current:
                raise UsageError(f"alias remove TARGET: {source} does not point to {t} (it points to {', '.join(sorted(current))})")
        d.cur.executemany("DELETE FROM aliases WHERE source = %s AND target = %s", [(source, t) for t in gone])
        return f"removed {source} -> {', '.join(gone)}"
    if not targets:
        raise UsageError("alias add TARGET: give at least one target address")
    hosted(d, source, "alias add SOURCE")
    if d.mailbox(source) is not None:
        raise UsageError(f"alias add SOURCE: {source} is a mailbox; an address is either a mailbox or an alias")
    for t in targets:
        if t == source:
            raise UsageError(f"alias add TARGET: {t} is the alias itself")
        if t in current:
            raise UsageError(f"alias add TARGET: {source} already points to {t}")
        if d.has_domain(t.split("@")[1]) and d.mailbox(t) is None and not d.is_alias(t):
            raise UsageError(f"alias add TARGET: {t} is in a hosted domain but is neither a mailbox nor an alias")
    d.cur.executemany("INSERT INTO aliases (source, target) VALUES (%s, %s)", [(source, t) for t in targets])
    return f"added {source} -> {', '.join(targets)}"


# --- moving a mailbox to another shard -------------------------------------------------------------

class DoveadmError(Exception):
    """A shard's doveadm server could not be reached or refused a command; `reason` is the protocol's
    (CHANGED, TEMPFAIL, NOUSER...), empty when there is none."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


def _tabescape(value: str) -> str:
    """Dovecot's str_tabescape: the protocol's fields are tab-separated."""
    return (value.replace("\x01", "\x011").replace("\t", "\x01t").replace("\r", "\x01r").replace("\n", "\x01n"))


class Doveadm:
    """A shard's doveadm server over TCP (Dovecot 2.4, src/doveadm/client-connection-tcp.c): the
    handshake "VERSION doveadm-server 1 0" (protocol 1.0: no multiplexing), PLAIN authentication as
    `doveadm` with doveadm_password, then one line "<flags> <user> <command> <args...>" (tab-separated)
    per command, answered by its output and "+" (success) or "-<REASON>" (a failure: TEMPFAIL, NOUSER,
    CHANGED...), each on a line of its own. Any doveadm command runs this way, not only mail commands:
    `kick` and `auth cache flush` too, executed by the shard itself."""

    def __init__(self, password: str, port: int = DOVEADM_PORT, timeout: float = DOVEADM_TIMEOUT) -> None:
        self.password, self.port, self.timeout = password, port, timeout

    def run(self, host: str, user: str, *args: str) -> str:
        """The command's output; DoveadmError if it fails (its reason: "CHANGED", "TEMPFAIL", ...)."""
        where = f"{host} port {self.port}"
        try:
            with socket.create_connection((host, self.port), timeout=30) as sock:
                sock.settimeout(self.timeout)
                stream = sock.makefile("rwb")
                stream.write(b"VERSION\tdoveadm-server\t1\t0\n")
                stream.flush()
                reply = stream.readline()
                if reply == b"-\n":
                    secret = base64.b64encode(b"\0doveadm\0" + self.password.encode()).decode()
                    stream.write(f"PLAIN\t{secret}\n".encode())
                    stream.flush()
                    reply = stream.readline()
                if reply != b"+\n":
                    raise DoveadmError(f"doveadm on {where} refused the login (doveadm_password differs?)")
                stream.write(("\t".join(_tabescape(f) for f in ("", user, *args)) + "\n").encode())
                stream.flush()
                output: list[bytes] = []
                while line := stream.readline():
                    if line == b"+\n":
                        return b"".join(output).decode(errors="replace").strip()
                    if re.fullmatch(rb"-[A-Z]*\n", line):
                        reason = line[1:].decode().strip()
                        raise DoveadmError(f"`doveadm {' '.join(args[:3])}` on {where} failed: {reason or 'error'} "
                                           "(that shard's Dovecot log says why)", reason)
                    output.append(line)
                raise DoveadmError(f"doveadm on {where} closed the connection during `doveadm {args[0]}`")
        except OSError as e:
            raise DoveadmError(f"cannot reach doveadm on {where}: {e.strerror or e}") from None


def doveadm_password(path: str, where: str) -> str:
    """The shards' doveadm_password from FILE (`doveadm_password = SECRET`, as orgmail-bootstrap writes it,
    or the bare secret). The value is never shown."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"{where}: cannot read {path} ({e.strerror}); give the file holding the shards' "
                         "doveadm_password (on a shard: /etc/dovecot/orgmail-doveadm.conf, readable by root)") from None
    value = text.strip()
    match = re.fullmatch(r"doveadm_password\s*=\s*(\S+)", value)
    if match:
        value = match.group(1)
    if not re.fullmatch(r"[A-Za-z0-9]{16,128}", value):
        raise UsageError(f"{where}: {path} must hold `doveadm_password = SECRET` or the secret alone, "
                         "16-128 letters and digits (the stack's doveadm-secret); value not shown")
    return value


def make_doveadm(args: argparse.Namespace) -> Any:
    """The seam the tests replace: anything with run(host, user, *args) -> output."""
    return Doveadm(doveadm_password(args.doveadm_password_file, "move --doveadm-password-file"))


def _note(line: str) -> None:
    print(f"{PROG}: move: {line}", file=sys.stderr, flush=True)


def cmd_move(conn: Any, args: argparse.Namespace, out: Out) -> str:
    """Block, flush and kick on the old shard, copy with `doveadm backup` (a pass at once, a final one
    after MOVE_SETTLE), compare the counts, switch the directory's shard, put the state back, flush again.
    The copy on the old shard is kept. docs/directory.md, "move", says why in this order."""
    addr = address(args.address, "move ADDRESS")
    target = shard_name(args.shard, "move SHARD")
    doveadm = make_doveadm(args)
    d = Directory(conn, write=True)
    _, source, _, state = existing_mailbox(d, addr, "move ADDRESS")
    shards = {name: (host, st) for name, host, st in d.rows("SELECT name, host(host), state FROM shards")}
    if target not in shards:
        raise UsageError(f"move SHARD: no shard {target} (shards: {', '.join(sorted(shards))})")
    if target == source:
        hint = f"; it is blocked: `{PROG} unblock {addr}` makes it active" if state == "blocked" else ""
        raise UsageError(f"move SHARD: {addr} is already on shard {target}{hint}")
    if shards[target][1] != "active":
        raise UsageError(f"move SHARD: shard {target} is {shards[target][1]} and takes no mailboxes; "
                         f"`{PROG} shard open {target}` first")
    if not d.one("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (MOVE_LOCK, addr)):
        raise UsageError(f"move ADDRESS: another move of {addr} is running")
    src, dst = shards[source][0], shards[target][0]
    keep_blocked = state == "blocked"  # blocked by an administrator before the move: it stays so

    d.run("UPDATE mailboxes SET state = 'blocked' WHERE address = %s", (addr,))
    conn.commit()  # also ends the writers' lock: other commands go on during the copy
    blocked_at = time.monotonic()
    _note(f"{addr} blocked: logins fail, its mail waits in the edges' queues")
    try:
        # A shard's auth cache may still hold the mailbox as active: flushed, a login or a delivery there
        # asks the directory again and is refused (blocked). Then the old shard ends its sessions.
        doveadm.run(src, addr, "auth", "cache", "flush", addr)
        doveadm.run(dst, addr, "auth", "cache", "flush", addr)
        doveadm.run(src, addr, "kick", addr)
        for attempt in range(1, MOVE_PASSES + 1):
            final = time.monotonic() - blocked_at >= MOVE_SETTLE
            try:
                # One-way, run by the old shard towards the new one: the new copy becomes exactly the old
                # one (a stale copy there, from an earlier stay of the mailbox, merges nothing back).
                doveadm.run(src, addr, "backup", "-f", f"tcp:{dst}:{DOVEADM_PORT}")
            except DoveadmError as e:
                if e.reason != "CHANGED" or attempt == MOVE_PASSES:
                    raise
                _note(f"copy {attempt} to {target}: the mailbox changed during it, copying again")
                continue
            if final:
                break
            _note(f"copy {attempt} to {target} done; a final one {MOVE_SETTLE:g} s after the block")
            time.sleep(max(0.0, MOVE_SETTLE - (time.monotonic() - blocked_at)))
        counts = {name: _message_count(doveadm.run(host, addr, "mailbox", "status", "-t", "messages", "*"), name)
                  for name, host in ((source, src), (target, dst))}
        if counts[source] != counts[target]:
            raise DoveadmError(f"after the copy shard {source} holds {counts[source]} messages, "
                               f"shard {target} {counts[target]}")
        _note(f"copied: {counts[target]} messages on both shards")
        if d.run("UPDATE mailboxes SET shard = %s WHERE address = %s AND shard = %s AND state = 'blocked'",
                 (target, addr, source)) != 1:
            raise DoveadmError(f"{addr} changed in the directory during the move (removed, or unblocked)")
    except (Exception, KeyboardInterrupt) as e:
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e) if isinstance(e, DoveadmError) \
            else f"the directory failed: {first_line(e)}"
        if not isinstance(e, (DoveadmError, KeyboardInterrupt, psycopg_error())):
            raise
        raise Failure(f"move {addr} to {target} failed: {why}. {_back_on_source(d, addr, source, target, keep_blocked)}") \
            from None
    try:
        conn.commit()
    except (Exception, KeyboardInterrupt) as e:
        # The switch's commit failed: committed or not, both shards hold the whole mailbox (the copy ran).
        raise Failure(f"move {addr} to {target}: the directory failed while switching ({first_line(e)}). {addr} is "
                      f"blocked, on shard {source} or {target} (`{PROG} list` tells which; both copies are complete): "
                      f"run `{PROG} move {addr} {target}` again, or `{PROG} unblock {addr}`") from None

    # Switched. Active again, then neither shard's cache may keep an old answer for the mailbox (while it was
    # blocked, a login's refusal was cached too). orgmail-authflush on every edge and shard flushes it as
    # well when the change commits; this flush does not wait for them.
    try:
        if not keep_blocked:
            d.run("UPDATE mailboxes SET state = 'active' WHERE address = %s", (addr,))
            conn.commit()
    except (Exception, KeyboardInterrupt) as e:
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"the directory failed ({first_line(e)})"
        raise Failure(f"{addr} is on shard {target} with all its mail, but still blocked: {why}; "
                      f"run `{PROG} unblock {addr}`") from None
    for name, host in ((source, src), (target, dst)):
        try:
            doveadm.run(host, addr, "auth", "cache", "flush", addr)
        except DoveadmError as e:
            _note(f"warning: {e} (shard {name}'s orgmail-authflush flushes {addr} too)")
    now = "blocked as before" if keep_blocked else "active"
    return f"moved {addr} from shard {source} to {target}, {now}; the old copy stays on {source}, unused"


def psycopg_error() -> type[Exception]:
    import psycopg
    return psycopg.Error


def _message_count(output: str, shard: str) -> int:
    """`doveadm mailbox status -t messages *`: the mailbox's messages in all its folders."""
    if not re.fullmatch(r"\d+", output.strip()):
        raise DoveadmError(f"shard {shard} answered the message count with {output[:80]!r}")
    return int(output)


def _back_on_source(d: Directory, addr: str, source: str, target: str, keep_blocked: bool) -> str:
    """After a failure before the switch: the mailbox is still on its shard, whose copy is whole, and gets
    its old state back."""
    again = f"run `{PROG} move {addr} {target}` again once that is fixed"
    try:
        d.conn.rollback()
        if keep_blocked:
            return f"{addr} stays on shard {source}, whose copy is complete, blocked as before; {again}"
        if d.run("UPDATE mailboxes SET state = 'active' WHERE address = %s AND shard = %s", (addr, source)) != 1:
            return f"{addr} is no longer on shard {source} as the move left it: see `{PROG} list`"
        d.conn.commit()
    except Exception as e:
        return (f"{addr} stays on shard {source}, whose copy is complete, but is still blocked (the directory "
                f"failed: {first_line(e)}): `{PROG} unblock {addr}`, or {again}")
    return f"{addr} is active again on shard {source}, whose copy is complete (the partial one on {target} is unused); {again}"


# --- command line ----------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 through main (no usage block)."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{where + ': ' if where else ''}{message} (see --help)")


def parser() -> Parser:
    p = Parser(prog=PROG, description="Provision the ISP cluster's directory (PostgreSQL, through libpq's environment).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("init", help="create or complete the directory schema (idempotent)")

    domain = sub.add_parser("domain", help="hosted domains").add_subparsers(dest="action", required=True)
    for action in ("add", "remove"):
        domain.add_parser(action).add_argument("name", metavar="NAME")
    domain.add_parser("list")

    shard = sub.add_parser("shard", help="mailbox shards").add_subparsers(dest="action", required=True)
    add_shard = shard.add_parser("add")
    add_shard.add_argument("name", metavar="NAME")
    add_shard.add_argument("host", metavar="HOST", help="the shard's IP address, as edges reach it")
    add_shard.add_argument("--closed", action="store_true", help="takes no new mailboxes yet")
    for action in ("close", "open"):
        shard.add_parser(action).add_argument("name", metavar="NAME")
    shard.add_parser("list")

    add = sub.add_parser("add", help="new mailboxes, with generated passwords printed once")
    add.add_argument("address", metavar="ADDRESS", nargs="?")
    add.add_argument("--csv", metavar="FILE", help="many mailboxes: a header line, columns address[,quota][,shard]")
    add.add_argument("--quota", metavar="SIZE", default=DEFAULT_QUOTA, help=f"like 500M, 2G, 1T (default {DEFAULT_QUOTA})")
    add.add_argument("--shard", metavar="NAME", help="default: the active shard with the fewest mailboxes")

    imp = sub.add_parser("import", help="a single-host stack's domains, mailboxes (hashes, quotas) and aliases")
    for key, (option, path) in IMPORT_FILES.items():
        imp.add_argument(option, dest=key, metavar="FILE", help=f"a copy of the old mailbox host's {path}")
    imp.add_argument("--quota", metavar="SIZE", help="for mailboxes the old host gave no quota (unlimited there)")
    imp.add_argument("--shard", metavar="NAME", help="every mailbox on this shard; default: as add, the least loaded")
    imp.add_argument("--skip-existing", action="store_true",
                     help="leave what the directory already holds as it is (default: refuse it)")
    imp.add_argument("--dry-run", action="store_true", help="every check, the directory's too, then nothing is written")

    passwd = sub.add_parser("passwd", help="a new generated password, or a prepared hash")
    passwd.add_argument("address", metavar="ADDRESS")
    passwd.add_argument("--hash", metavar="HASH", help="a Dovecot hash ({BLF-CRYPT}...); - reads it from standard input")

    alias = sub.add_parser("alias", help="aliases: source -> targets").add_subparsers(dest="action", required=True)
    alias_add = alias.add_parser("add")
    alias_add.add_argument("source", metavar="SOURCE")
    alias_add.add_argument("targets", metavar="TARGET", nargs="+")
    alias_remove = alias.add_parser("remove")
    alias_remove.add_argument("source", metavar="SOURCE")
    alias_remove.add_argument("targets", metavar="TARGET", nargs="*", help="default: every target")
    alias.add_parser("list").add_argument("--domain", metavar="NAME")

    quota = sub.add_parser("quota", help="set a mailbox's quota")
    quota.add_argument("address", metavar="ADDRESS")
    quota.add_argument("size", metavar="SIZE", help="like 500M, 2G, 1T")

    for name, text in (("block", "logins fail, deliveries wait"), ("unblock", "active again")):
        sub.add_parser(name, help=text).add_argument("address", metavar="ADDRESS")

    move = sub.add_parser("move", help="to another shard: block, kick, copy with doveadm, switch, unblock")
    move.add_argument("address", metavar="ADDRESS")
    move.add_argument("shard", metavar="SHARD")
    move.add_argument("--doveadm-password-file", metavar="FILE", default=DOVEADM_PASSWORD_FILE,
                      help=f"the shards' doveadm_password (default {DOVEADM_PASSWORD_FILE}, a shard's own)")

    login = sub.add_parser("login", help="a host role's directory login, into the role's SSM sub-path")
    login.add_argument("role", metavar="ROLE", choices=LOGIN_ROLES, help="edge or shard")
    login.add_argument("--ssm-path", metavar="PATH", required=True, help="the stack's SSM path (output ssmPath)")
    login.add_argument("--region", metavar="REGION", help="the stack's region (default: the aws CLI's)")
    login.add_argument("--replace", action="store_true", help="a new password where the role has one")

    sub.add_parser("list", help="mailboxes").add_argument("--domain", metavar="NAME")
    sub.add_parser("remove", help="a mailbox (its mail on the shard is not deleted)").add_argument("address", metavar="ADDRESS")
    return p


COMMANDS: dict[str, Callable[[Any, argparse.Namespace, Out], str]] = {
    "init": cmd_init, "domain": cmd_domain, "shard": cmd_shard, "add": cmd_add, "import": cmd_import,
    "passwd": cmd_passwd, "alias": cmd_alias, "quota": cmd_quota, "block": cmd_block, "unblock": cmd_block, "list": cmd_list,
    "remove": cmd_remove, "move": cmd_move, "login": cmd_login,
}


def main(argv: list[str]) -> int:
    def out(line: str) -> None:
        print(line, flush=True)

    command = "?"
    try:
        args = parser().parse_args(argv)
        command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
        conn = connect()
        try:
            message = COMMANDS[args.command](conn, args, out)
            conn.commit()
        finally:
            conn.close()  # without a commit, nothing is written
    except UsageError as e:
        for line in str(e).splitlines():
            print(f"{PROG}: {line}", file=sys.stderr)
        return 2
    except Failure as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # standard output closed while passwords were printed, after the commit
        print(f"{PROG}: {command}: cannot write the output ({e.strerror}); what was committed stays: "
              f"set the passwords that were not shown again with `{PROG} passwd`", file=sys.stderr)
        return 1
    except Exception as e:  # a refusal of the directory itself: one line, no traceback
        import psycopg
        if isinstance(e, psycopg.errors.IntegrityError):
            print(f"{PROG}: {command}: the directory refuses: {first_line(e)}; nothing was written", file=sys.stderr)
            return 2
        if isinstance(e, psycopg.Error):
            print(f"{PROG}: {command}: directory error: {first_line(e)}; nothing was written", file=sys.stderr)
            return 1
        raise
    if message:
        print(f"{PROG}: {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
