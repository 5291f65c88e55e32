"""The cost of a delivery as a mailbox fills, by storage format (issue 13, docs/benchmarks.md run 17).

Dovecot 2.4 from the e2e root (Debian 13's packages), run in a chroot over an overlay of it, LMTP over a unix
socket, the quota root of orgmail's own templates (files/dovecot/mail-storage.conf.j2 and quota-warning.conf.j2:
its 80 % and 95 % warnings) with a 10 GB limit, so that every delivery must know the mailbox's size. Two
instances side by side take the same deliveries, in turns: orgmail's storage as rendered (sdbox) and the same
with Maildir (orgmail before run 17; the peers). Each round delivers `per_round` messages of 2 KB, spread over
`mailboxes` mailboxes (one by default: a user who keeps their mail); the figure is the CPU time of each instance's Dovecot processes per delivery (utime + stime, with
finished children), against the messages the mailboxes then hold. Figures only: never pass or fail.

`measure_quota` (`--only quota`, docs/benchmarks.md run 18): one instance of orgmail's storage as rendered, three
users whose userdb fields are orgmail-sync's own (`dovecot_users`): a mailbox with a quota, an unlimited one as
orgmail-sync writes it (left out of the quota), and an unlimited one without that field (orgmail until run 18,
whose deliveries counted its folders for the warnings). Each has the four folders a client's first login makes;
rounds of deliveries to each in turn.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2

from bench.common import log
from tools import userfiles

MESSAGE = ("From: sender@elsewhere.example\r\nTo: user@bench.example\r\nSubject: storage benchmark\r\n"
           "Message-ID: <{n}@elsewhere.example>\r\n\r\n" + ("x" * 70 + "\r\n") * 28)
VARIANTS = {"sdbox": {}, "maildir": {"mail_driver = sdbox": "mail_driver = maildir",
                                     "mail_path = ~/mail": "mail_path = ~/Maildir"}}


def orgmail_storage() -> str:
    """orgmail's mail storage and quota root as the hosts get them, for a chroot without the vmail user."""
    from components.userdata import TEMPLATE_DIR
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), keep_trailing_newline=True)
    text = "".join(env.get_template(f"files/dovecot/{name}").render()
                   for name in ("mail-storage.conf.j2", "quota-warning.conf.j2"))
    for old, new in (("mail_uid = vmail", "mail_uid = 65534"), ("mail_gid = vmail", "mail_gid = 65534"),
                     ("first_valid_uid = 5000", "first_valid_uid = 1"), ("last_valid_uid = 5000", "last_valid_uid = 0"),
                     ("  user = vmail\n", "  user = nobody\n")):
        if old not in text:
            raise RuntimeError(f"bench/storage: {old!r} is no longer in orgmail's Dovecot templates")
        text = text.replace(old, new)
    return text


def config(name: str, storage: str) -> str:
    for old, new in VARIANTS[name].items():
        if old not in storage:
            raise RuntimeError(f"bench/storage: {old!r} is no longer in mail-storage.conf.j2")
        storage = storage.replace(old, new)
    return f"""dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
protocols = lmtp
base_dir = /run/bench-{name}
state_dir = /var/lib/bench-{name}
instance_name = bench-{name}
log_path = /var/log/bench-{name}.log
ssl = no
{storage}
mail_plugins {{
  quota = yes
}}
quota_storage_size = 10G
userdb static {{
  fields {{
    home = /srv/bench-{name}/%{{user}}
  }}
}}
passdb static {{
  password = unused
}}
service lmtp {{
  unix_listener lmtp-in {{
    mode = 0666
  }}
}}
"""


def cpu_ms(master: int) -> float:
    """CPU time of a Dovecot master and its children, finished ones included."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == master or int(stat[1]) == master:
            total += sum(int(x) for x in stat[11:15])
    return total * 1000 / os.sysconf("SC_CLK_TCK")


def deliver(socket: str, count: int, first: int, addresses: list[str]) -> None:
    """Messages first..first+count-1 over LMTP, one a connection, to the addresses in turn."""
    for n in range(first, first + count):
        with smtplib.LMTP(socket) as lmtp:
            lmtp.sendmail("sender@elsewhere.example", [addresses[n % len(addresses)]], MESSAGE.format(n=n))


def users(mailboxes: int) -> list[str]:
    return [f"u{k}@bench.example" for k in range(mailboxes)]


@contextlib.contextmanager
def chroot() -> Iterator[Path]:
    """An overlay of the e2e root to run Dovecot in; every Dovecot started in it is stopped afterwards."""
    if os.geteuid() != 0:
        raise RuntimeError("bench/storage needs root (a chroot and an overlay mount)")
    from tests.e2e import harness
    lower = harness.ensure_rootfs()
    work = Path(tempfile.mkdtemp(prefix="orgmail-bench-storage-"))
    root = work / "root"
    for d in ("upper", "work", "root"):
        (work / d).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}", str(root)], check=True)
    try:
        yield root
    finally:
        for conf in (root / "etc/dovecot").glob("bench-*.conf"):
            subprocess.run(["chroot", str(root), "doveadm", "-c", f"/etc/dovecot/{conf.name}", "stop"],
                           capture_output=True)
        time.sleep(1)
        subprocess.run(["umount", "-l", str(root)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def start(root: Path, name: str, text: str) -> int:
    """Dovecot with configuration `text` as bench-`name` in the chroot; its master's pid once LMTP listens."""
    (root / f"etc/dovecot/bench-{name}.conf").write_text(text)
    for d in (f"var/lib/bench-{name}", f"srv/bench-{name}"):
        (root / d).mkdir(parents=True)
    shutil.chown(root / f"srv/bench-{name}", "nobody", "nogroup")
    subprocess.run(["chroot", str(root), "dovecot", "-c", f"/etc/dovecot/bench-{name}.conf"], check=True)
    pid = root / f"run/bench-{name}/master.pid"
    deadline = time.monotonic() + 30
    while not pid.exists() or not (root / f"run/bench-{name}/lmtp-in").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench/storage: Dovecot ({name}) did not start: "
                               f"{(root / f'var/log/bench-{name}.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return int(pid.read_text())


def measure(per_round: int = 2000, rounds: int = 10, mailboxes: int = 1) -> dict[str, Any]:
    with chroot() as root:
        storage = orgmail_storage()
        masters = {name: start(root, name, config(name, storage)) for name in VARIANTS}
        for name in VARIANTS:  # the mailboxes made, untimed
            deliver(str(root / f"run/bench-{name}/lmtp-in"), mailboxes, 0, users(mailboxes))
        out: dict[str, Any] = {"per_round": per_round, "mailboxes": mailboxes, "message_bytes": len(MESSAGE),
                               "rounds": []}
        held = 1
        for r in range(rounds):
            row: dict[str, Any] = {}
            for name in VARIANTS if r % 2 == 0 else reversed(list(VARIANTS)):
                before = cpu_ms(masters[name])
                deliver(str(root / f"run/bench-{name}/lmtp-in"), per_round, mailboxes + r * per_round, users(mailboxes))
                row[name] = round((cpu_ms(masters[name]) - before) / per_round, 2)
            held += per_round // mailboxes
            row["messages_per_mailbox"] = held
            row["maildir_over_sdbox"] = round(row["maildir"] / row["sdbox"], 2) if row["sdbox"] else None
            out["rounds"].append(row)
            log(f"storage: round {r + 1}/{rounds}: {held} messages a mailbox; CPU per delivery "
                f"sdbox {row['sdbox']} ms, maildir {row['maildir']} ms")
        return out


# measure_quota's users: (name, orgmail-sync's mailbox entry, whether orgmail-sync's userdb fields are used as
# written, or without the field that leaves an unlimited mailbox out of the quota: orgmail until run 18).
QUOTA_USERS: tuple[tuple[str, dict[str, str], bool], ...] = (
    ("quota", {"quota": "10G"}, True), ("unlimited", {}, True), ("counted", {}, False))
FOLDERS = ("Drafts", "Junk", "Sent", "Trash")  # mail-storage.conf.j2's auto = subscribe folders


def quota_users() -> str:
    """Dovecot's users file for QUOTA_USERS, each line's extra fields as orgmail-sync writes them (or without
    the unlimited mailbox's), with the chroot's uid and home."""
    sync = userfiles.sync_module()
    out = []
    for name, entry, as_written in QUOTA_USERS:
        users, _, _ = sync.dovecot_users([{"address": f"{name}@bench.example", **entry}],
                                         {f"{name}@bench.example": "{PLAIN}unused"})
        extra = users.rstrip("\n").split(":", 7)[7]
        if not as_written:
            if extra != sync.UNLIMITED_FIELD:
                raise RuntimeError(f"bench/storage: orgmail-sync writes {extra!r} for an unlimited mailbox")
            extra = ""
        out.append(f"{name}@bench.example::65534:65534::/srv/bench-quota/{name}::{extra}\n")
    return "".join(out)


def quota_config(storage: str) -> str:
    text = config("sdbox", storage).replace("bench-sdbox", "bench-quota").replace("quota_storage_size = 10G\n", "")
    static = "userdb static {\n  fields {\n    home = /srv/bench-quota/%{user}\n  }\n}\n"
    if static not in text:
        raise RuntimeError("bench/storage: the static userdb is no longer in config()")
    return text.replace(static, "userdb passwd-file {\n  passwd_file_path = /etc/dovecot/bench-quota-users\n}\n")


def measure_quota(per_round: int = 400, rounds: int = 6) -> dict[str, Any]:
    with chroot() as root:
        (root / "etc/dovecot/bench-quota-users").write_text(quota_users())
        master = start(root, "quota", quota_config(orgmail_storage()))
        socket = str(root / "run/bench-quota/lmtp-in")
        names = [name for name, _, _ in QUOTA_USERS]
        for name in names:  # each mailbox made, with a client's folders, untimed
            deliver(socket, 5, 0, [f"{name}@bench.example"])
            for folder in FOLDERS:
                subprocess.run(["chroot", str(root), "doveadm", "-c", "/etc/dovecot/bench-quota.conf", "mailbox",
                                "create", "-u", f"{name}@bench.example", folder], check=True, capture_output=True)
        out: dict[str, Any] = {"per_round": per_round, "folders": ["INBOX", *FOLDERS], "rounds": []}
        for r in range(rounds):
            row: dict[str, Any] = {"messages_per_mailbox": 5 + (r + 1) * per_round}
            for name in names if r % 2 == 0 else names[::-1]:
                before = cpu_ms(master)
                deliver(socket, per_round, 5 + r * per_round, [f"{name}@bench.example"])
                row[name] = round((cpu_ms(master) - before) / per_round, 2)
            out["rounds"].append(row)
            log(f"quota: round {r + 1}/{rounds}: " + ", ".join(f"{n} {row[n]} ms" for n in names))
        quota = subprocess.run(["chroot", str(root), "doveadm", "-c", "/etc/dovecot/bench-quota.conf", "-f", "tab",
                                "quota", "get", "-A"], capture_output=True, text=True, check=True).stdout
        # Proof the fields took effect: the unlimited mailbox has no quota rows, the other two have.
        out["quota_rows"] = sorted({line.split("\t")[0] for line in quota.splitlines()[1:] if line})
        return out
