"""Outbound mail in the internet in a box: what the big providers' MX hosts see of our host.

The dev stack's mailbox host (the session's `internet` boot) delivers to sink MX servers
(tests/e2e/sink.py) in the world: a Gmail stand-in that refuses mail from an address without
forward-confirmed reverse DNS, in Gmail's words; a Microsoft stand-in that takes everything; a
provider that tempfails. Every delivery must arrive as a big provider requires: over IPv4 (the
only family with reverse DNS on AWS), with TLS, DKIM passing for d=example.org, SPF passing, and
DMARC aligned with From:.
"""

from __future__ import annotations

import email
import email.message
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e import sink
from tests.e2e.conftest import Internet
from tests.e2e.test_mailhost import ANN, BOB, mailbox_messages, message, new_client, wait_for
from tests.e2e.world import BUSY, GOOGLEMAIL, PROVIDERS, deliver_from

pytestmark = pytest.mark.e2e

GMAIL, MICROSOFT = PROVIDERS["gmail"], PROVIDERS["microsoft"]
OUTSIDE_SENDER = f"someone@{MICROSOFT.domain}"


def submit(h: Internet, to: list[str], subject: str, sender: str = ANN) -> None:
    session = h.probe("smtp", port=587, mode="starttls", source=new_client(), login=[sender, h.stack.passwords[sender]],
                      mail_from=sender, rcpts=to, data=message(sender, ", ".join(to), subject))
    assert session["steps"][-1][1] == 250, session


def with_subject(subject: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: f"\nSubject: {subject}\r" in r.get("message", "") or f"\nSubject: {subject}\n" in r.get("message", "")


def from_sink(name: str, subject: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r["sink"] == name and with_subject(subject)(r)


def assert_as_a_big_provider_requires(h: Internet, r: dict[str, Any]) -> None:
    """Over IPv4 from the host's address and name, TLS, DKIM pass for example.org, SPF pass, DMARC aligned."""
    assert r["accepted"], r["reply"]
    assert (r["family"], r["peer"], r["helo"]) == ("ipv4", h.world.host_ipv4, h.stack.settings.mail_host), r
    assert r["tls"] in ("TLSv1.2", "TLSv1.3"), r
    assert r["fcrdns"] and r["ptr"] == [h.stack.settings.mail_host], r
    assert [(d["d"], d["s"], d["result"]) for d in r["dkim"]] == [
        ("example.org", h.stack.settings.dkim_selector, "pass")], r["dkim"]
    assert r["spf"]["result"] == "pass", r["spf"]
    assert r["dmarc"]["dkim_aligned"] and r["dmarc"]["spf_aligned"], r["dmarc"]


def inbox_message(h: Internet, user: str, match: Callable[[email.message.Message], bool], what: str,
                  timeout: float = 120) -> email.message.Message:
    def found() -> email.message.Message | None:
        return next((m for m in mailbox_messages(h, user) if match(m)), None)
    got: email.message.Message = wait_for(found, timeout, what)
    return got


# --- user mail ---------------------------------------------------------------------------------------

def test_user_mail_reaches_gmail_and_microsoft_as_they_require(internet: Internet, sinks: sink.RunningSinks) -> None:
    subject = "to the big providers"
    submit(internet, [f"ann.friend@{GMAIL.domain}", f"ann.colleague@{MICROSOFT.domain}"], subject)
    for provider in ("gmail", "microsoft"):
        r = sinks.wait(from_sink(provider, subject), what=f"{subject} at {provider}")[0]
        assert_as_a_big_provider_requires(internet, r)
        assert r["mail_from"] == ANN and r["dmarc"]["from_domain"] == "example.org"


def test_mail_goes_out_over_ipv4_even_where_ipv6_comes_first(internet: Internet, sinks: sink.RunningSinks) -> None:
    """Defect 1: the host has an IPv6 address without reverse DNS. A provider whose first MX has only
    IPv6 gets every message over IPv4 from its second MX, and dual-stack MX hosts get every message
    over IPv4 too (with `inet_protocols = all` Postfix picked either family at random)."""
    subjects = [f"family check {n}" for n in range(4)]
    for subject in subjects:
        submit(internet, [f"x{subject[-1]}@{GMAIL.domain}"], subject)
    submit(internet, [f"y@{GOOGLEMAIL}"], "via the second MX")
    for subject in [*subjects, "via the second MX"]:
        r = sinks.wait(with_subject(subject), what=subject)[0]
        assert_as_a_big_provider_requires(internet, r)
    from_host = [r for r in sinks.records() if r["peer"] in (internet.world.host_ipv4, internet.world.host_ipv6)]
    assert [r for r in from_host if r["family"] != "ipv4"] == []


# --- bounces and DSNs --------------------------------------------------------------------------------

def test_a_refused_recipient_bounces_to_our_user(internet: Internet, sinks: sink.RunningSinks) -> None:
    subject = "to an account that does not exist"
    submit(internet, [f"{sink.NO_SUCH_USER}@{GMAIL.domain}"], subject)
    refused = sinks.wait(lambda r: r["rcpt_to"] == [f"{sink.NO_SUCH_USER}@{GMAIL.domain}"], what="the refused RCPT")[0]
    assert refused["family"] == "ipv4" and not refused["accepted"]
    bounce = inbox_message(internet, ANN, lambda m: "MAILER-DAEMON" in (m["From"] or "") and subject in m.as_string(),
                           "the bounce in ann's INBOX")
    text = bounce.as_string()
    assert "5.1.1" in text and "The email account that you tried to reach does not exist" in text


def send_from_outside(h: Internet, to: str, subject: str) -> dict[str, Any]:
    """A message from the Microsoft stand-in's MX address (its SPF names it) to our host, asking
    for delivery notices (RFC 3461)."""
    return deliver_from(h.world, MICROSOFT, OUTSIDE_SENDER, to, message(OUTSIDE_SENDER, to, subject),
                        mail_options=["RET=HDRS", "ENVID=" + subject.replace(" ", "-")],
                        rcpt_options=["NOTIFY=SUCCESS,DELAY,FAILURE"])


def test_a_delivery_notice_to_an_outside_sender_goes_out_with_null_sender_signed(
        internet: Internet, sinks: sink.RunningSinks) -> None:
    """A DSN the host makes goes to the outside sender with the null sender: SPF of the HELO name
    passes (RFC 7208 2.3) and it is DKIM-signed, aligned with its From: (MAILER-DAEMON@our host)."""
    subject = "please confirm delivery"
    send_from_outside(internet, BOB, subject)
    r = sinks.wait(lambda r: r["sink"] == "microsoft" and r["mail_from"] == "" and subject.replace(" ", "-")
                   in r.get("message", ""), what="the delivery notice at the Microsoft stand-in")[0]
    assert r["rcpt_to"] == [OUTSIDE_SENDER]
    assert_as_a_big_provider_requires(internet, r)
    assert (r["spf"]["identity"], r["spf"]["domain"]) == ("helo", internet.stack.settings.mail_host)
    assert r["dmarc"]["from_domain"] == internet.stack.settings.mail_host
    notice = email.message_from_string(r["message"])
    assert notice.get_content_type() == "multipart/report"


# --- the host's own mail ---------------------------------------------------------------------------

def test_root_mail_to_an_outside_admin(internet: Internet, sinks: sink.RunningSinks) -> None:
    """Mail for root (cron, unattended-upgrades, fail2ban) goes to admin.email through /etc/aliases; with
    the admin at an outside provider it must arrive there as authenticated as user mail. The dev
    stack's admin is inside, so this points root's alias outside for the test and back after."""
    admin = f"admin@{GMAIL.domain}"
    aliases = internet.guest.read_file("/etc/aliases").decode()
    assert f"\nroot: {internet.stack.settings.admin.email}\n" in aliases
    with internet.guest.sync_paused():  # /etc/aliases is the sync's
        try:
            internet.guest.exec(["sh", "-c", f"sed -i 's/^root: .*/root: {admin}/' /etc/aliases && newaliases"],
                                check=True)
            subject = "cron output for the outside admin"
            internet.guest.exec(["sendmail", "-i", "root"], input=message("root", "root", subject), check=True)
            r = sinks.wait(with_subject(subject), what=subject)[0]
        finally:
            internet.guest.exec(["sh", "-c", "cat > /etc/aliases && newaliases"], input=aliases, check=True)
    assert r["rcpt_to"] == [admin]
    assert_as_a_big_provider_requires(internet, r)
    assert r["mail_from"] == f"root@{internet.stack.settings.mail_host}"


# --- stuck mail (defect 9) -------------------------------------------------------------------------

def queue(h: Internet) -> list[dict[str, Any]]:
    out = h.guest.exec(["postqueue", "-j"], check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_sender_hears_when_the_provider_keeps_tempfailing(internet: Internet, sinks: sink.RunningSinks) -> None:
    """Defect 9: a "delayed mail" notice reaches the sender while the message is still retried. The
    production value (4h, tests/unit/test_userdata.py) is shortened to 20 seconds for the message this
    test sends, and restored before anything else is queued."""
    guest = internet.guest
    production = guest.exec(["postconf", "-h", "delay_warning_time"], check=True).stdout.strip()
    assert production == "4h"
    subject = "stuck at a busy provider"
    try:
        guest.exec(["postconf", "-e", "delay_warning_time=20s"], check=True)
        guest.exec(["postfix", "reload"], check=True)
        submit(internet, [f"z@{BUSY}"], subject)
    finally:
        guest.exec(["postconf", "-e", f"delay_warning_time={production}"], check=True)
        guest.exec(["postfix", "reload"], check=True)
    tempfailed = sinks.wait(lambda r: r["sink"] == "busy" and r["rcpt_to"] == [f"z@{BUSY}"], what="the 451")[0]
    assert tempfailed["family"] == "ipv4" and "451 4.7.500" in tempfailed["reply"]
    queued = wait_for(lambda: [m for m in queue(internet) if m["recipients"][0]["address"] == f"z@{BUSY}"], 60,
                      "the deferred message")
    queue_id = queued[0]["queue_id"]
    time.sleep(21)
    guest.exec(["postqueue", "-i", queue_id], check=True)  # the next retry, now rather than in 5 minutes
    try:
        notice = inbox_message(internet, ANN, lambda m: "Delayed Mail" in (m["Subject"] or "")
                               and subject in m.as_string(), "the delay notice in ann's INBOX")
    finally:
        guest.exec(["postsuper", "-d", queue_id], check=False)
    text = notice.as_string()
    assert "THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE." in text
    assert "451 4.7.500 Server busy" in text and "Action: delayed" in text


# --- what the internet sees of the host's IPv6 address ----------------------------------------------

CONNECT = """
import json, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print(json.dumps("open"))
except OSError as e:
    print(json.dumps(type(e).__name__))
"""


def test_mail_ports_answer_over_ipv4_only(internet: Internet) -> None:
    """Defect 1, inbound: no AAAA names the host, so it offers no mail service over IPv6 either
    (nftables drops it, and nothing listens there); path-MTU ICMP is accepted in both families."""
    world = internet.world
    for port in (25, 465, 587, 993, 995):
        seen = {ip: json.loads(world.exec([sys.executable, "-c", CONNECT, ip, str(port)], timeout=30, check=True).stdout)
                for ip in (world.host_ipv4, world.host_ipv6)}
        assert seen == {world.host_ipv4: "open", world.host_ipv6: "TimeoutError"}, (port, seen)
    listening = internet.guest.exec(["ss", "-Hltn"], check=True).stdout
    local = [line.split()[3] for line in listening.splitlines()]
    assert not [a for a in local if a.rsplit(":", 1)[1] in ("25", "465", "587", "993", "995") and a.startswith("[")], local
    chain = internet.guest.exec(["nft", "list", "chain", "inet", "orgmail", "input"], check=True).stdout
    assert "meta l4proto { icmp, ipv6-icmp } accept" in chain
