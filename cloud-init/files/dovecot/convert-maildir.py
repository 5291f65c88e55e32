#!/usr/bin/python3
"""orgmail-convert-maildir: bring every mailbox still kept as a Maildir (orgmail before sdbox) into sdbox.

Dovecot reads mail from ~/mail (sdbox) only; a mailbox's ~/Maildir from an older orgmail (a replaced host's
volume, a restored snapshot) would look empty until converted. For each one, one mailbox at a time:
`doveadm sync` copies it into the mailbox as it is now, with its UIDs, UIDVALIDITY, flags and keywords (IMAP and
POP3 clients download nothing again) and beside any mail that arrived since; then every message of every folder
of the Maildir must be found by its GUID in the mailbox, and only then is the Maildir removed. A mailbox that
fails keeps its Maildir and the next run tries again. Run by orgmail-mail-format.service after Dovecot starts.
"""

import os
import re
import shutil
import subprocess
import sys

VMAIL = "/srv/mail/vmail"
ADDRESS = re.compile(r"[a-z0-9_+-]+(\.[a-z0-9_+-]+)*@[a-z0-9-]+(\.[a-z0-9-]+)+")


def doveadm(*args: str, maildir: str | None = None) -> str:
    """doveadm's output; with `maildir`, run against that Maildir instead of the user's mailbox."""
    where = ["-o", "mail_driver=maildir", "-o", f"mail_path={maildir}"] if maildir else []
    proc = subprocess.run(["doveadm", *where, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"doveadm {' '.join(args[:2])}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def guids(address: str, maildir: str | None = None) -> dict[str, set[str]]:
    """Every folder's message GUIDs (a Maildir's are its files' base names, which sdbox keeps)."""
    out: dict[str, set[str]] = {}
    folders = doveadm("mailbox", "list", "-u", address, maildir=maildir).splitlines()
    for folder in filter(None, folders):
        fetched = doveadm("-f", "flow", "fetch", "-u", address, "guid", "mailbox", folder, "all", maildir=maildir)
        out[folder] = {line.removeprefix("guid=").strip() for line in fetched.splitlines() if line.strip()}
    return out


def size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def convert(address: str, maildir: str) -> str:
    """Convert one mailbox; what happened, in a line. Raises RuntimeError when the Maildir must stay."""
    if subprocess.run(["doveadm", "user", address], capture_output=True).returncode:
        return f"{address}: not a mailbox of this host, its Maildir kept"
    needed = size(maildir)
    if shutil.disk_usage(maildir).free < needed * 1.1:
        raise RuntimeError(f"{address}: {needed} bytes to copy, not enough free space on the mail volume")
    doveadm("sync", "-1", "-R", "-u", address, f"maildir:{maildir}")
    source, converted = guids(address, maildir), guids(address)
    missing = {f: len(g - converted.get(f, set())) for f, g in source.items() if g - converted.get(f, set())}
    if missing:
        raise RuntimeError(f"{address}: messages not found after the copy, Maildir kept: {missing}")
    shutil.rmtree(maildir)
    return f"{address}: {sum(len(g) for g in source.values())} messages in {len(source)} folders converted"


def main() -> int:
    failed = 0
    for domain in sorted(os.listdir(VMAIL)) if os.path.isdir(VMAIL) else []:
        for local in sorted(os.listdir(f"{VMAIL}/{domain}")):
            maildir = f"{VMAIL}/{domain}/{local}/Maildir"
            address = f"{local}@{domain}"
            if not os.path.isdir(maildir):
                continue
            if not ADDRESS.fullmatch(address):
                print(f"orgmail-convert-maildir: {address!r}: not a mailbox address, skipped", file=sys.stderr)
                continue
            try:
                print(f"orgmail-convert-maildir: {convert(address, maildir)}", flush=True)
            except RuntimeError as e:
                failed += 1
                print(f"orgmail-convert-maildir: {e}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
