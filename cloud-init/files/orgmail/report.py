#!/usr/bin/python3
"""orgmail-report: the weekly summary mail to the administrator (issue 18), as Mail-in-a-Box sends one:
what the mailbox host delivered, sent, bounced and refused in the last 7 days, who sent the most, what
waits in the queue, and how full the mailboxes and the mail volume are.

  orgmail-report [--days N] [--print]

Run weekly by orgmail-report.timer; --print writes the report to standard output instead of mailing
it to admin.email (ADMIN_EMAIL in /etc/orgmail/admin.env, written by orgmail-sync). It reads Postfix's
lines in the journal (journalctl -o json), `postqueue -j`, `doveadm mailbox status` and `quota get` and the volume's
df; a source that cannot be read is named in the report, never a reason to send nothing.
"""

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

ADMIN_ENV = "/etc/orgmail/admin.env"
MAIL_ROOT = "/srv/mail"
ADDRESS_RE = re.compile(r"[a-z0-9._+-]+@[a-z0-9-]+(\.[a-z0-9-]+)+")
# The Postfix programs whose lines count (master.cf's syslog_name for the submission ports).
IDENTIFIERS = ("postfix/lmtp", "postfix/smtp", "postfix/smtpd", "postfix/postscreen", "postfix/qmgr",
               "postfix/submission/smtpd", "postfix/submissions/smtpd")
STATUS_RE = re.compile(r"\bstatus=(sent|bounced|deferred)\b")
RELAY_RE = re.compile(r"\brelay=([^,\s]+)")
SASL_RE = re.compile(r"\bsasl_username=([^,\s]+)")
FROM_RE = re.compile(r"\bfrom=<([^>]*)>, size=")
REJECT_RE = re.compile(r"NOQUEUE: reject: \S+ from \S+: (\d{3} [0-9.]+ [^;]*)")
TOP = 5


@dataclass
class Week:
    delivered: int = 0  # into our mailboxes (LMTP)
    sent: int = 0  # to other servers (smtp)
    bounced: int = 0
    deferred: int = 0  # delivery attempts that failed for now
    refused: int = 0  # at the door: smtpd's and postscreen's rejections
    refusals: Counter = field(default_factory=Counter)
    logins: Counter = field(default_factory=Counter)  # messages submitted per login
    senders: Counter = field(default_factory=Counter)  # envelope senders of everything queued


def refusal_kind(text: str) -> str:
    """A rejection's reason without the client's own words: '554 5.7.1 Relay access denied'."""
    reason = re.sub(r"<[^>]*>: ", "", text)  # "<addr>: Recipient address rejected" -> the reason
    return reason.strip()[:80]


def tally(entries: list[tuple[str, str]]) -> Week:
    """(syslog identifier, message) pairs from the journal -> the week's counts."""
    week = Week()
    for ident, msg in entries:
        status = STATUS_RE.search(msg)
        if status:
            kind = status.group(1)
            if kind == "sent":
                relay = RELAY_RE.search(msg)
                if ident == "postfix/lmtp":
                    week.delivered += 1
                elif ident == "postfix/smtp" and not (relay and relay.group(1).startswith("127.0.0.1")):
                    week.sent += 1  # not the hop through the host's own SRS smtpd (forwarded mail)
            elif kind == "bounced":
                week.bounced += 1
            else:
                week.deferred += 1
            continue
        reject = REJECT_RE.search(msg)
        if reject and ident in ("postfix/smtpd", "postfix/postscreen", "postfix/submission/smtpd",
                                "postfix/submissions/smtpd"):
            week.refused += 1
            week.refusals[refusal_kind(reject.group(1))] += 1
            continue
        sasl = SASL_RE.search(msg)
        if sasl:
            week.logins[sasl.group(1).lower()] += 1
            continue
        sender = FROM_RE.search(msg) if ident == "postfix/qmgr" else None
        if sender and sender.group(1):
            week.senders[sender.group(1).lower()] += 1
    return week


def journal(days: int) -> tuple[list[tuple[str, str]], str | None]:
    cmd = ["journalctl", "--since", f"-{days}d", "--no-pager", "-o", "json",
           "--output-fields=SYSLOG_IDENTIFIER,MESSAGE", *(a for i in IDENTIFIERS for a in ("-t", i))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return [], f"journal: journalctl exited {proc.returncode}: {proc.stderr.strip()[-200:]}"
    entries = []
    for line in proc.stdout.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row.get("MESSAGE"), str):
            entries.append((str(row.get("SYSLOG_IDENTIFIER", "")), row["MESSAGE"]))
    return entries, None


def queue() -> tuple[int, int, str | None]:
    """(messages waiting, of which deferred) from `postqueue -j`."""
    proc = subprocess.run(["postqueue", "-j"], capture_output=True, text=True)
    if proc.returncode != 0:
        return 0, 0, f"queue: postqueue exited {proc.returncode}"
    entries = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return len(entries), sum(e.get("queue_name") == "deferred" for e in entries), None


# Other users' shared mailboxes a user may see (sync.py's SHARED_PREFIX namespaces): not theirs, not counted.
SHARED_PREFIX = "Shared/"


def quotas() -> tuple[list[tuple[str, int, int | None]], str | None]:
    """(user, KiB used, KiB limit or None) for every mailbox, from Dovecot: the size from its folders (an
    unlimited mailbox is left out of Dovecot's quota, sync.py), the limit from the quota."""
    sizes = subprocess.run(["doveadm", "-f", "tab", "mailbox", "status", "-A", "vsize", "*"],
                           capture_output=True, text=True)
    if sizes.returncode != 0:
        return [], f"mailboxes: doveadm mailbox status exited {sizes.returncode}: {sizes.stderr.strip()[-200:]}"
    limits = subprocess.run(["doveadm", "-f", "tab", "quota", "get", "-A"], capture_output=True, text=True)
    if limits.returncode != 0:
        return [], f"mailboxes: doveadm quota get exited {limits.returncode}: {limits.stderr.strip()[-200:]}"
    return parse_quotas(sizes.stdout, limits.stdout), None


def tab_rows(text: str) -> list[dict[str, str]]:
    """doveadm's tab format: a header line, then a row per line."""
    rows = text.splitlines()
    head = rows[0].split("\t") if rows else []
    return [dict(zip(head, row.split("\t"), strict=False)) for row in rows[1:]]


def parse_quotas(sizes_text: str, quota_text: str) -> list[tuple[str, int, int | None]]:
    """`doveadm -f tab mailbox status -A vsize '*'` (bytes a folder) and `doveadm -f tab quota get -A` (KiB):
    (user, KiB used, KiB limit or None) for every user of the first, in its order."""
    limits = {c["Username"]: int(c["Limit"]) for c in tab_rows(quota_text)
              if c.get("Type") == "STORAGE" and c.get("Username") and c.get("Limit", "-").isdigit()}
    used: dict[str, int] = {}
    for c in tab_rows(sizes_text):
        user, folder, vsize = c.get("Username", ""), c.get("mailbox", ""), c.get("vsize", "")
        if user and vsize.isdigit() and not folder.startswith(SHARED_PREFIX):
            used[user] = used.get(user, 0) + int(vsize)
    return [(user, (total + 1023) // 1024, limits.get(user)) for user, total in used.items()]


def size(kib: int) -> str:
    for unit, scale in (("GiB", 1024 * 1024), ("MiB", 1024)):
        if kib >= scale:
            return f"{kib / scale:.1f} {unit}"
    return f"{kib} KiB"


def render(host: str, days: int, week: Week, waiting: int, deferred_now: int,
           boxes: list[tuple[str, int, int | None]], disk: tuple[int, int] | None, problems: list[str]) -> str:
    out = [f"Mail on {host}, the last {days} days", ""]
    out += [f"  delivered into mailboxes   {week.delivered}",
            f"  sent to other servers      {week.sent}",
            f"  bounced                    {week.bounced}",
            f"  refused at the door        {week.refused}",
            f"  delivery attempts deferred {week.deferred}",
            f"  in the queue now           {waiting} ({deferred_now} deferred)", ""]
    if week.refusals:
        out += ["Why mail was refused (most often first):"]
        out += [f"  {n:6}  {reason}" for reason, n in week.refusals.most_common(TOP)] + [""]
    if week.logins:
        out += ["Who sent the most (messages submitted per login):"]
        out += [f"  {n:6}  {login}" for login, n in week.logins.most_common(TOP)] + [""]
    if week.senders:
        out += ["Busiest envelope senders (everything queued, inbound and outbound):"]
        out += [f"  {n:6}  {sender}" for sender, n in week.senders.most_common(TOP)] + [""]
    if boxes:
        out += ["Largest mailboxes:"]
        for user, used, limit in sorted(boxes, key=lambda b: -b[1])[:TOP]:
            share = f" of {size(limit)} ({used * 100 // limit} %)" if limit else " (no quota)"
            out.append(f"  {size(used):>10}{share}  {user}")
        full = [u for u, used, limit in boxes if limit and used * 100 >= 95 * limit]
        if full:
            out.append(f"  at 95 % of the quota or more: {', '.join(sorted(full))}")
        out.append("")
    if disk:
        used, total = disk
        out += [f"Mail volume ({MAIL_ROOT}): {used * 100 // total} % used, {size(used // 1024)} of {size(total // 1024)}", ""]
    if problems:
        out += ["Not in this report (could not be read):"] + [f"  {p}" for p in problems] + [""]
    out.append("Sent by orgmail-report (orgmail-report.timer) on the mail host.")
    return "\n".join(out) + "\n"


def admin_email() -> str | None:
    try:
        with open(ADMIN_ENV, encoding="utf-8") as f:
            for line in f:
                if line.startswith("ADMIN_EMAIL="):
                    value = line.split("=", 1)[1].strip()
                    return value if ADDRESS_RE.fullmatch(value) else None
    except OSError:
        pass
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="orgmail-report", description="the weekly summary mail to admin.email")
    parser.add_argument("--days", type=int, default=7, choices=range(1, 32), metavar="N", help="1-31 (default 7)")
    parser.add_argument("--print", action="store_true", help="print the report instead of mailing it")
    args = parser.parse_args(argv[1:])
    host = socket.getfqdn()
    problems: list[str] = []
    entries, err = journal(args.days)
    problems += [err] if err else []
    waiting, deferred_now, err = queue()
    problems += [err] if err else []
    boxes, err = quotas()
    problems += [err] if err else []
    try:
        usage = shutil.disk_usage(MAIL_ROOT)
        disk: tuple[int, int] | None = (usage.used, usage.total)
    except OSError as e:
        disk, problems = None, [*problems, f"mail volume: {e.strerror}"]
    week = tally(entries)
    text = render(host, args.days, week, waiting, deferred_now, boxes, disk, problems)
    if args.print:
        sys.stdout.write(text)
        return 0
    to = admin_email()
    if to is None:
        print(f"orgmail-report: no valid ADMIN_EMAIL in {ADMIN_ENV}; nothing sent", file=sys.stderr)
        return 1
    msg = EmailMessage()
    msg["From"] = f"orgmail <root@{host}>"
    msg["To"] = to
    msg["Subject"] = (f"Weekly mail report for {host}: {week.delivered} delivered, {week.sent} sent, "
                      f"{week.refused} refused")
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=host)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(text)
    # Unfolded up to RFC 5322's 998: folding the long subject put its first word on a line of its own.
    body = msg.as_bytes(policy=msg.policy.clone(max_line_length=998))
    sent = subprocess.run(["/usr/sbin/sendmail", "-i", "-f", f"root@{host}", "--", to], input=body,
                          capture_output=True)
    if sent.returncode != 0:
        print(f"orgmail-report: sendmail exited {sent.returncode}: {sent.stderr.decode(errors='replace')[-300:]}",
              file=sys.stderr)
        return 1
    print(f"orgmail-report: sent to {to}: {week.delivered} delivered, {week.sent} sent, {week.refused} refused")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
