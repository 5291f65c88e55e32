"""The cost of a delivery as a mailbox fills, by storage format (issue 13, docs/benchmarks.md run 17).

Dovecot 2.4 from the e2e root (Debian 13's packages), run in a chroot over an overlay of it, LMTP over a unix
socket, the quota root of orgmail's own templates (files/dovecot/mail-storage.conf.j2 and quota-warning.conf.j2:
its 80 % and 95 % warnings) with a 10 GB limit, so that every delivery must know the mailbox's size. Two
instances side by side take the same deliveries, in turns: orgmail's storage as rendered (sdbox) and the same
with Maildir (orgmail before run 17; the peers). Each round delivers `per_round` messages of 2 KB, spread over
`mailboxes` mailboxes (one by default: a user who keeps their mail); the figure is the CPU time of each instance's Dovecot processes per delivery (utime + stime, with
finished children), against the messages the mailboxes then hold. Figures only: never pass or fail.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import jinja2

from bench.common import log

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


def deliver(socket: str, count: int, first: int, mailboxes: int) -> None:
    for n in range(first, first + count):
        with smtplib.LMTP(socket) as lmtp:
            lmtp.sendmail("sender@elsewhere.example", [f"u{n % mailboxes}@bench.example"], MESSAGE.format(n=n))


def measure(per_round: int = 2000, rounds: int = 10, mailboxes: int = 1) -> dict[str, Any]:
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
    masters: dict[str, int] = {}
    try:
        storage = orgmail_storage()
        for name in VARIANTS:
            (root / f"etc/dovecot/bench-{name}.conf").write_text(config(name, storage))
            for d in (f"var/lib/bench-{name}", f"srv/bench-{name}"):
                (root / d).mkdir(parents=True)
            shutil.chown(root / f"srv/bench-{name}", "nobody", "nogroup")
            subprocess.run(["chroot", str(root), "dovecot", "-c", f"/etc/dovecot/bench-{name}.conf"], check=True)
        for name in VARIANTS:
            pid = root / f"run/bench-{name}/master.pid"
            deadline = time.monotonic() + 30
            while not pid.exists() or not (root / f"run/bench-{name}/lmtp-in").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bench/storage: Dovecot ({name}) did not start: "
                                       f"{(root / f'var/log/bench-{name}.log').read_text()[-2000:]}")
                time.sleep(0.1)
            masters[name] = int(pid.read_text())
        for name in VARIANTS:  # the mailboxes made, untimed
            deliver(str(root / f"run/bench-{name}/lmtp-in"), mailboxes, 0, mailboxes)
        out: dict[str, Any] = {"per_round": per_round, "mailboxes": mailboxes, "message_bytes": len(MESSAGE),
                               "rounds": []}
        held = 1
        for r in range(rounds):
            row: dict[str, Any] = {}
            for name in VARIANTS if r % 2 == 0 else reversed(list(VARIANTS)):
                before = cpu_ms(masters[name])
                deliver(str(root / f"run/bench-{name}/lmtp-in"), per_round, mailboxes + r * per_round, mailboxes)
                row[name] = round((cpu_ms(masters[name]) - before) / per_round, 2)
            held += per_round // mailboxes
            row["messages_per_mailbox"] = held
            row["maildir_over_sdbox"] = round(row["maildir"] / row["sdbox"], 2) if row["sdbox"] else None
            out["rounds"].append(row)
            log(f"storage: round {r + 1}/{rounds}: {held} messages a mailbox; CPU per delivery "
                f"sdbox {row['sdbox']} ms, maildir {row['maildir']} ms")
        return out
    finally:
        for name in masters:
            subprocess.run(["chroot", str(root), "doveadm", "-c", f"/etc/dovecot/bench-{name}.conf", "stop"],
                           capture_output=True)
        time.sleep(1)
        subprocess.run(["umount", "-l", str(root)], check=False)
        shutil.rmtree(work, ignore_errors=True)
