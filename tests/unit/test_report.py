"""orgmail-report, the weekly summary mail to the administrator (issue 18): the counts from Postfix's
journal lines, the mailboxes' use from Dovecot, and the report itself. Booted:
tests/e2e/test_mailhost.py::test_the_weekly_report_reaches_the_admin."""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
from typing import Any

import pytest

from components.userdata import HOST_FILES
from tests.unit.conftest import host_script
from tests.unit.test_userdata import MAILBOX, RELAY, files_of

LINES = [
    ("postfix/lmtp", "4F1: to=<ann@example.org>, relay=mail.example.org[private/dovecot-lmtp], delay=0.1, "
                     "dsn=2.0.0, status=sent (250 2.0.0 <ann@example.org> Saved)"),
    ("postfix/lmtp", "4F2: to=<bob@example.org>, relay=mail.example.org[private/dovecot-lmtp], status=sent (250 ok)"),
    ("postfix/smtp", "4F3: to=<x@gmail.example>, relay=mx.gmail.example[192.0.2.9]:25, status=sent (250 2.0.0 OK)"),
    # The hop of forwarded mail through the host's own SRS smtpd is no mail sent out.
    ("postfix/smtp", "4F4: to=<c@partner.example>, relay=127.0.0.1[127.0.0.1]:10027, status=sent (250 2.0.0 Ok)"),
    ("postfix/smtp", "4F5: to=<gone@x.example>, relay=mx.x.example[192.0.2.8]:25, status=bounced (550 5.1.1 no)"),
    ("postfix/smtp", "4F6: to=<slow@y.example>, relay=none, delay=30, status=deferred (connect timed out)"),
    ("postfix/smtpd", "NOQUEUE: reject: RCPT from unknown[198.51.100.7]: 550 5.1.1 <nobody@example.org>: Recipient "
                      "address rejected: User unknown in virtual mailbox table; from=<s@spam.example> "
                      "to=<nobody@example.org> proto=ESMTP helo=<x>"),
    ("postfix/smtpd", "NOQUEUE: reject: RCPT from unknown[198.51.100.8]: 550 5.1.1 <other@example.org>: Recipient "
                      "address rejected: User unknown in virtual mailbox table; from=<s@spam.example> "
                      "to=<other@example.org> proto=ESMTP helo=<x>"),
    ("postfix/postscreen", "NOQUEUE: reject: RCPT from [203.0.113.5]:4711: 550 5.7.1 Service unavailable; client "
                           "[203.0.113.5] blocked using zen.spamhaus.org; from=<a@b.example>, to=<ann@example.org>"),
    ("postfix/submission/smtpd", "4F7: client=unknown[10.0.0.5], sasl_method=PLAIN, sasl_username=Ann@example.org"),
    ("postfix/submission/smtpd", "4F8: client=unknown[10.0.0.5], sasl_method=PLAIN, sasl_username=ann@example.org"),
    ("postfix/submissions/smtpd", "4F9: client=unknown[10.0.0.6], sasl_method=PLAIN, sasl_username=bob@example.org"),
    ("postfix/qmgr", "4F7: from=<ann@example.org>, size=1234, nrcpt=1 (queue active)"),
    ("postfix/qmgr", "4FA: from=<>, size=2000, nrcpt=1 (queue active)"),  # a bounce: no sender to count
    ("postfix/qmgr", "4F3: removed"),
]


def test_the_weeks_counts() -> None:
    week = host_script("report.py").tally(LINES)
    assert (week.delivered, week.sent, week.bounced, week.deferred, week.refused) == (2, 1, 1, 1, 3)
    assert week.refusals.most_common(1) == [
        ("550 5.1.1 Recipient address rejected: User unknown in virtual mailbox table", 2)]
    assert week.logins == {"ann@example.org": 2, "bob@example.org": 1}
    assert week.senders == {"ann@example.org": 1}


def test_the_mailboxes_from_doveadm() -> None:
    # Sizes from the folders (an unlimited mailbox is left out of Dovecot's quota: bob has no quota row);
    # a shared mailbox bob may see is support's, not his.
    sizes = ("Username\tmailbox\tvsize\n"
             "ann@example.org\tINBOX\t2038000000\n"
             "ann@example.org\tSent\t1000000\n"
             "bob@example.org\tINBOX\t307200\n"
             "bob@example.org\tShared/support@example.org/INBOX\t9000000\n"
             "support@example.org\tINBOX\t9000000\n")
    quota = ("Username\tQuota name\tType\tValue\tLimit\t%\n"
             "ann@example.org\tUser quota\tSTORAGE\t1991210\t2097152\t94\n"
             "ann@example.org\tUser quota\tMESSAGE\t120\t-\t0\n"
             "support@example.org\tUser quota\tSTORAGE\t8790\t-\t0\n")
    assert host_script("report.py").parse_quotas(sizes, quota) == [
        ("ann@example.org", 1991211, 2097152), ("bob@example.org", 300, None), ("support@example.org", 8790, None)]
    assert host_script("report.py").parse_quotas("", "") == []
    # The shared mailboxes' namespaces are where orgmail-sync puts them.
    assert host_script("report.py").SHARED_PREFIX == host_script("sync.py").SHARED_PREFIX


def test_the_report_says_what_it_could_not_read() -> None:
    report = host_script("report.py")
    week = report.tally(LINES)
    text = report.render("mail.example.org", 7, week, 3, 1,
                         [("ann@example.org", 2_040_000, 2_097_152), ("bob@example.org", 300, None)],
                         (40 * 1024**3, 50 * 1024**3), ["queue: postqueue exited 1"])
    assert text.startswith("Mail on mail.example.org, the last 7 days\n")
    assert "  delivered into mailboxes   2\n" in text and "  refused at the door        3\n" in text
    assert "  in the queue now           3 (1 deferred)\n" in text
    assert "      2  ann@example.org\n" in text  # the busiest login
    assert "1.9 GiB of 2.0 GiB (97 %)  ann@example.org" in text and "300 KiB (no quota)  bob@example.org" in text
    assert "at 95 % of the quota or more: ann@example.org" in text
    assert "Mail volume (/srv/mail): 80 % used" in text
    assert "Not in this report (could not be read):\n  queue: postqueue exited 1\n" in text


def test_mailed_to_the_admin_with_sendmail(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    report = host_script("report.py")
    env = tmp_path / "admin.env"
    env.write_text("ADMIN_EMAIL=it@example.net\n")
    monkeypatch.setattr(report, "ADMIN_ENV", str(env))
    monkeypatch.setattr(report, "MAIL_ROOT", str(tmp_path))
    monkeypatch.setattr(report.socket, "getfqdn", lambda: "mail.example.org")
    sent: list[tuple[list[str], bytes]] = []

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        if cmd[0] == "journalctl":
            assert cmd[cmd.index("postfix/lmtp") - 1: cmd.index("postfix/lmtp") + 1] == ["-t", "postfix/lmtp"]
            out = "".join(f'{{"SYSLOG_IDENTIFIER": "{i}", "MESSAGE": {json.dumps(m)}}}\n'
                          for i, m in LINES)
            return subprocess.CompletedProcess(cmd, 0, out, "")
        if cmd[0] == "postqueue":
            return subprocess.CompletedProcess(cmd, 0, '{"queue_name": "deferred"}\n', "")
        if cmd[0] == "doveadm":
            return subprocess.CompletedProcess(cmd, 75, "", "doveadm: auth failed")
        sent.append((cmd, kwargs["input"]))
        return subprocess.CompletedProcess(cmd, 0, b"", b"")

    monkeypatch.setattr(report.subprocess, "run", run)
    assert report.main(["orgmail-report"]) == 0
    [(cmd, body)] = sent
    assert cmd == ["/usr/sbin/sendmail", "-i", "-f", "root@mail.example.org", "--", "it@example.net"]
    msg = email.message_from_bytes(body, policy=email.policy.default)
    assert msg["Subject"] == "Weekly mail report for mail.example.org: 2 delivered, 1 sent, 3 refused"
    assert msg["Auto-Submitted"] == "auto-generated" and msg["To"] == "it@example.net"
    assert "mailboxes: doveadm mailbox status exited 75: doveadm: auth failed" in msg.get_content()
    assert "sent to it@example.net" in capsys.readouterr().out
    env.write_text("ADMIN_EMAIL=\n")
    assert report.main(["orgmail-report"]) == 1 and len(sent) == 1


def test_the_mailbox_host_runs_it_weekly() -> None:
    rows = {h.path: h for h in HOST_FILES if "report" in h.path}
    assert set(rows) == {"/usr/local/sbin/orgmail-report", "/etc/systemd/system/orgmail-report.service",
                         "/etc/systemd/system/orgmail-report.timer"}
    assert all(h.roles == ("mailbox",) and h.via_ssm for h in rows.values())
    boot = files_of(MAILBOX)["/usr/local/sbin/orgmail-bootstrap"]
    assert "systemctl enable --now orgmail-report.timer orgmail-health.timer" in boot
    assert "orgmail-report" not in files_of(RELAY)["/usr/local/sbin/orgmail-bootstrap"]
