"""The old provider of the migration test (issue 18): a real Dovecot 2.4 serving IMAPS only, with a certificate
from a test CA, run from the e2e root (an overlay of it, chrooted into; the cached root is never written) in a
network namespace of its own, linked to a booted guest by a veth pair. The guest reaches it as
``imap.old.example`` (a line in the guest's /etc/hosts) and trusts its CA only when told to (``--ca-file``).

Its mail is seeded and read with its own doveadm (``doveadm``), never through the import under test.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path

from tests.e2e import harness

OLD_HOST = "imap.old.example"
OLD_IPV4, GUEST_IPV4 = "198.18.0.2", "198.18.0.1"  # RFC 2544 benchmarking addresses, a /30 of their own
OLD_UID = 5001  # owns the old mailboxes (no passwd entry needed: the users file gives it)
CONF = "/etc/old/dovecot.conf"

CONFIG = f"""\
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
protocols = imap
listen = {OLD_IPV4}
base_dir = /run/dovecot-old
instance_name = dovecot-old
log_path = /var/log/dovecot-old.log
mail_driver = maildir
mail_path = ~/Maildir
first_valid_uid = {OLD_UID}
last_valid_uid = {OLD_UID}
passdb passwd-file {{
  passwd_file_path = /etc/old/users
}}
userdb passwd-file {{
  passwd_file_path = /etc/old/users
}}
ssl = required
ssl_server_cert_file = /etc/old/cert.pem
ssl_server_key_file = /etc/old/key.pem
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 993
    ssl = yes
  }}
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
"""


def _run(cmd: Sequence[str], input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), input=input, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def message(message_id: str, subject: str, sender: str = "someone@old.example") -> str:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, "user@old.example", subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = f"<{message_id}>"
    msg.set_content(f"{subject}\n")
    return msg.as_string()


class OldProvider:
    """Enter it once the guest runs; leaving it stops the old Dovecot and removes everything made here."""

    def __init__(self, guest: harness.BootedHost, accounts: dict[str, str]) -> None:
        self.guest = guest
        self.accounts = accounts  # login: password (no ':' in either: the passwd-file's separator)
        tag = guest.name[-6:]
        self.netns_name = f"old-{tag}"
        self.netns = f"/run/netns/{self.netns_name}"
        self._veth_guest = f"{tag}-og"
        self.dir = Path(tempfile.mkdtemp(prefix="oldimap-", dir=harness.CACHE))
        self.root = self.dir / "merged"
        self._mounted: list[Path] = []
        self._netns_made = False
        self.ca_pem = ""

    def __enter__(self) -> OldProvider:
        try:
            self._make_root()
            self._make_certificate()
            self._link()
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_root(self) -> None:
        upper, work = self.dir / "upper", self.dir / "work"
        for d in (upper, work, self.root):
            d.mkdir()
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={harness.ensure_rootfs()},upperdir={upper},workdir={work}", str(self.root)])
        self._mounted.append(self.root)
        _run(["mount", "-t", "proc", "proc", str(self.root / "proc")])
        self._mounted.append(self.root / "proc")
        _run(["mount", "--bind", "/dev", str(self.root / "dev")])
        self._mounted.append(self.root / "dev")
        etc = self.root / "etc/old"
        etc.mkdir()
        (etc / "dovecot.conf").write_text(CONFIG)
        users = "".join(f"{login}:{{PLAIN}}{password}:{OLD_UID}:{OLD_UID}::/srv/old/{n}::\n"
                        for n, (login, password) in enumerate(self.accounts.items()))
        (etc / "users").write_text(users)
        (self.root / "srv/old").mkdir(parents=True)
        shutil.chown(self.root / "srv/old", OLD_UID, OLD_UID)

    def _make_certificate(self) -> None:
        d, etc = self.dir, self.root / "etc/old"
        _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"),
              "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=Old Provider Test CA"])
        _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(etc / "key.pem"),
              "-out", str(d / "server.csr"), "-subj", f"/CN={OLD_HOST}"])
        (d / "ext.cnf").write_text(f"subjectAltName=DNS:{OLD_HOST}\n")
        _run(["openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
              "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(etc / "cert.pem"), "-days", "2",
              "-extfile", str(d / "ext.cnf")])
        self.ca_pem = (d / "ca.pem").read_text()

    def _link(self) -> None:
        guest_ns = self.guest.netns.rsplit("/", 1)[1]
        _run(["ip", "netns", "add", self.netns_name])
        self._netns_made = True
        old_end = f"{self.netns_name[-6:]}-o"
        _run(["ip", "-n", self.netns_name, "link", "set", "lo", "up"])
        _run(["ip", "link", "add", old_end, "netns", self.netns_name, "type", "veth",
              "peer", "name", self._veth_guest, "netns", guest_ns])
        _run(["ip", "-n", self.netns_name, "addr", "add", f"{OLD_IPV4}/30", "dev", old_end])
        _run(["ip", "-n", self.netns_name, "link", "set", old_end, "up"])
        _run(["ip", "-n", guest_ns, "addr", "add", f"{GUEST_IPV4}/30", "dev", self._veth_guest])
        _run(["ip", "-n", guest_ns, "link", "set", self._veth_guest, "up"])

    def _in_ns(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--net={self.netns}", "--", "chroot", str(self.root), *cmd]

    def _start(self, timeout: float = 30) -> None:
        # It forks into the background: no pipes for it to keep open.
        started = subprocess.run(self._in_ns("dovecot", "-c", CONF), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        if started.returncode:
            raise RuntimeError(f"the old provider's Dovecot did not start (exit {started.returncode}): {self.log()[-2000:]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listening = _run(["nsenter", f"--net={self.netns}", "--", "ss", "-Hltn"]).stdout
            if f"{OLD_IPV4}:993 " in listening:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the old provider's Dovecot is not listening: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self.root / "var/log/dovecot-old.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def doveadm(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """The old server's own doveadm (not over the network)."""
        return _run(self._in_ns("doveadm", "-c", CONF, *args), input=input)

    def save(self, login: str, folder: str, msg: str, flags: str = "") -> None:
        existing = self.doveadm("-f", "tab", "mailbox", "list", "-u", login).stdout.splitlines()[1:]
        if folder not in existing:
            self.doveadm("mailbox", "create", "-u", login, folder)
        self.doveadm("save", "-u", login, "-m", folder, input=msg)
        if flags:
            message_id = next(line.split(":", 1)[1].strip() for line in msg.splitlines()
                              if line.lower().startswith("message-id:"))
            self.doveadm("flags", "add", "-u", login, flags, "mailbox", folder, "header", "Message-ID", message_id)

    def close(self) -> None:
        pid_file = self.root / "run/dovecot-old/master.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 15
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            except ProcessLookupError:
                pass
        if self._netns_made:
            subprocess.run(["ip", "netns", "delete", self.netns_name], capture_output=True, timeout=30)
            self._netns_made = False
        for path in reversed(self._mounted):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
        self._mounted = []
        shutil.rmtree(self.dir, ignore_errors=True)


def fetch_state(output: str) -> list[tuple[str, str, frozenset[str]]]:
    """(folder, Message-ID, flags without \\Recent) of every message, sorted (duplicates stay), from
    `doveadm -f tab fetch 'mailbox hdr.message-id flags' all`."""
    rows: list[tuple[str, str, frozenset[str]]] = []
    lines = output.splitlines()
    assert lines and lines[0] == "mailbox\thdr.message-id\tflags", output[:300]
    for line in lines[1:]:
        folder, message_id, flags = line.split("\t")
        rows.append((folder, message_id, frozenset(flags.split()) - {"\\Recent"}))
    return sorted(rows, key=lambda r: (r[0], r[1], sorted(r[2])))
