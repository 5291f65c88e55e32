"""Issue 14 on the booted host: with orgmail:outbound.relay = ses, outside mail leaves through SES's SMTP
endpoint, logged in with the credentials from SSM, over TLS whose certificate is verified; switching
back to "direct" is a sync, and the host delivers to the providers' MX hosts itself again.

SES's endpoint is stood in for in the internet in a box (tests/e2e/standin.py with logins): an
authenticating STARTTLS smarthost on 587 at email-smtp.<region>.amazonaws.com, whose certificate comes
from a test CA the guest trusts (as it trusts Amazon's). It answers 530 to mail without a login, as
SES does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from components.parameters import part_count, part_value
from tests.e2e import sink
from tests.e2e.conftest import Internet
from tests.e2e.overrides import trust_test_ca
from tests.e2e.test_mailhost import ANN, message, publish_relay_addresses, rcpt_codes, reload_rspamd, wait_for
from tests.e2e.test_outbound import GMAIL, MICROSOFT, OUTSIDE_SENDER, queue, send_from_outside, submit, with_subject
from tests.e2e.test_resolver import MOTO_URL, sync
from tests.verify.harness import Pem, TestCA
from tools.plan import stored_value

pytestmark = pytest.mark.e2e

SES_IP = "198.51.100.87"  # TEST-NET-2: an address of the world
OLD = {"username": "AKIAOLDKEY0000000001", "password": "BOld+Smtp/Password="}
NEW = {"username": "AKIANEWKEY0000000002", "password": "BNew+Smtp/Password="}


@dataclass
class SesStandIn:
    world: Any
    dir: Path
    host: str
    logins: Path
    good: Pem  # from the CA the guest trusts
    untrusted: Pem  # the right name, from a CA nobody trusts: a man in the middle
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.dir / "ses.jsonl"

    def start(self, pem: Pem) -> None:
        self.stop()
        self.proc = self.world.popen([sys.executable, "-m", "tests.e2e.standin", SES_IP, "587", self.host,
                                      str(self.log), str(pem.cert), str(pem.key), str(self.logins)])
        wait_for(lambda: self.world.exec([sys.executable, "-c", f"import socket; socket.create_connection(('{SES_IP}', 587), 2)"]
                                         ).returncode == 0, 30, "the SES stand-in")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def wait(self, match: Callable[[dict[str, Any]], bool], what: str, timeout: float = 120) -> dict[str, Any]:
        found: list[dict[str, Any]] = wait_for(lambda: [r for r in self.records() if match(r)], timeout, what)
        return found[0]


def with_data(subject: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: with_subject(subject)({"message": r["data"]})


def put_outbound(h: Internet, outbound: dict[str, Any] | None, login: dict[str, str] | None,
                 **changes: Any) -> None:
    """A `pulumi up` with orgmail:outbound changed (and any other host config `changes`): the config
    parameter (and SES's credentials) in SSM, then the host's sync. None: the config exactly as planned."""
    path = h.stack.settings.ssm_path
    planned = stored_value(h.stack.run, f"{path}/config") or ""
    config = json.loads(planned)
    if outbound is not None:
        config.update(outbound=outbound, **changes)
    value = json.dumps(config, separators=(",", ":")) if outbound is not None else planned
    count = max(part_count(len(value)), len([p for p in h.stack.run.of_type("aws:ssm/parameter:Parameter")
                                             if p.inputs["name"].startswith(f"{path}/config/part-")]))
    for i in range(count):
        h.guest.put_ssm_parameter(MOTO_URL, f"{path}/config/part-{i:03d}", part_value(value, i, count, path),
                                  secure=False)
    if login is not None:
        h.guest.put_ssm_parameter(MOTO_URL, f"{path}/ses/smtp", json.dumps(login))
    sync(h)


@pytest.fixture(scope="module")
def ses(internet: Internet, sinks: sink.RunningSinks) -> Iterator[SesStandIn]:
    world, settings = internet.world, internet.stack.settings
    host = f"email-smtp.{settings.region}.amazonaws.com"
    world.add_address(SES_IP)
    world.set_records(host, "A", [SES_IP])
    work = world.dir / "ses"
    work.mkdir()
    ca = TestCA(work)
    trust_test_ca(internet.guest, ca.ca_file.read_text())
    (work / "impostor").mkdir()
    standin = SesStandIn(world, work, host, work / "logins", ca.issue([host]),
                         TestCA(work / "impostor").issue([host]))
    standin.logins.write_text(f"{OLD['username']}:{OLD['password']}\n")
    standin.start(standin.good)
    try:
        put_outbound(internet, {"relay": "ses", "host": host, "port": 587}, OLD)
        yield standin
    finally:
        put_outbound(internet, None, None)
        standin.stop()


def test_user_mail_root_mail_and_notices_leave_through_ses_logged_in_over_verified_tls(
        internet: Internet, sinks: sink.RunningSinks, ses: SesStandIn) -> None:
    g = internet.guest
    assert g.exec(["postmap", "-q", f"@{internet.stack.settings.primary_domain.name}",
                   "regexp:/etc/postfix/orgmail/relayhost"]).stdout.strip() == f"[{ses.host}]:587"
    subject = "user mail through SES"
    submit(internet, [f"someone@{GMAIL.domain}"], subject)
    r = ses.wait(with_data(subject), "user mail at the SES stand-in")
    assert (r["mail_from"], r["rcpts"], r["tls"], r["login"]) == (ANN, [f"someone@{GMAIL.domain}"], True, OLD["username"])
    assert "DKIM-Signature:" in r["data"]  # rspamd still signs for example.org
    # The host's own mail (root, through /etc/aliases to the admin, pointed outside here).
    aliases = g.read_file("/etc/aliases").decode()
    admin = f"admin@{GMAIL.domain}"
    with g.sync_paused():  # /etc/aliases is the sync's
        try:
            g.exec(["sh", "-c", f"sed -i 's/^root: .*/root: {admin}/' /etc/aliases && newaliases"], check=True)
            g.exec(["sendmail", "-i", "root"], input=message("root", "root", "root mail through SES"), check=True)
            root = ses.wait(with_data("root mail through SES"), "root mail at the SES stand-in")
        finally:
            g.exec(["sh", "-c", "cat > /etc/aliases && newaliases"], input=aliases, check=True)
    assert (root["mail_from"], root["rcpts"], root["login"]) == (
        f"root@{internet.stack.settings.mail_host}", [admin], OLD["username"])
    # A delivery notice the host makes (the null sender, as every bounce) goes through SES too.
    notice = "a notice through SES"
    send_from_outside(internet, ANN, notice)
    dsn = ses.wait(lambda r: r["mail_from"] == "" and notice.replace(" ", "-") in r["data"], "the notice at SES")
    assert dsn["rcpts"] == [OUTSIDE_SENDER] and dsn["login"] == OLD["username"]
    # None of it went to the providers' MX hosts directly.
    assert not [s for s in sinks.records() if any(x in s.get("message", "") for x in (subject, "root mail through SES"))]


def test_an_unverified_certificate_keeps_mail_queued_then_it_goes(internet: Internet, ses: SesStandIn) -> None:
    """TLS to SES is verified: a certificate from a CA the host does not trust (a man in the middle)
    gets neither the login nor the message; the message waits in the queue, and leaves once the
    endpoint shows its real certificate."""
    subject = "held back from an impostor"
    ses.start(ses.untrusted)
    try:
        submit(internet, [f"someone@{MICROSOFT.domain}"], subject)
        held = wait_for(lambda: [m for m in queue(internet) if any(
            "certificate" in (r.get("delay_reason") or "").lower() for r in m["recipients"])], 120,
            "the message deferred for its certificate")
        assert not [r for r in ses.records() if with_data(subject)(r)]
    finally:
        ses.start(ses.good)
    # The next retry now rather than after the back-off: a reload restarts the queue manager, which
    # had set the failed destination aside for minimal_backoff_time.
    internet.guest.exec(["postfix", "reload"], check=True)
    internet.guest.exec(["postqueue", "-i", held[0]["queue_id"]], check=True)
    r = ses.wait(with_data(subject), "the held message, once the certificate verifies")
    assert r["login"] == OLD["username"] and r["tls"]


def test_a_rotated_key_takes_over_without_losing_queued_mail(internet: Internet, ses: SesStandIn) -> None:
    """A key rotation: SES knows only the new key, while the host still has the old one. Mail sent
    meanwhile is deferred (a refused login never bounces); once SSM holds the new key the sync
    reloads Postfix and the queued message leaves, logged in with the new key."""
    subject = "sent during a key rotation"
    ses.logins.write_text(f"{NEW['username']}:{NEW['password']}\n")
    try:
        submit(internet, [f"someone@{MICROSOFT.domain}"], subject)
        queued = wait_for(lambda: [m for m in queue(internet) if any(
            "authentication failed" in (r.get("delay_reason") or "").lower() for r in m["recipients"])], 120,
            "the message deferred for the old key")
        time.sleep(1)
        assert not [r for r in ses.records() if with_data(subject)(r)]
        put_outbound(internet, {"relay": "ses", "host": ses.host, "port": 587}, NEW)
        internet.guest.exec(["postqueue", "-i", queued[0]["queue_id"]], check=True)
        r = ses.wait(with_data(subject), "the queued message with the new key")
        assert r["login"] == NEW["username"]
    finally:
        ses.logins.write_text(f"{OLD['username']}:{OLD['password']}\n{NEW['username']}:{NEW['password']}\n")


RELAY_NAME, RELAY_IP = "mx2.example.org", "198.51.100.88"  # a backup MX relay and its Elastic IP


def test_a_relays_notices_leave_through_ses_and_nothing_else_it_hands_on(internet: Internet, ses: SesStandIn) -> None:
    """A relay sends nothing outside itself (test_relay.py): it hands its notices (the null sender) and
    root's mail to the mailbox host, which relays for a relay's address only the notices, here through
    SES; other mail from a relay to outside, and anyone else's notice, is refused as relaying."""
    ses_nexthop = {"relay": "ses", "host": ses.host, "port": 587}
    put_outbound(internet, ses_nexthop, None, relayHosts=[RELAY_NAME])
    publish_relay_addresses(internet, {RELAY_NAME: RELAY_IP})
    try:
        sync(internet)
        assert internet.guest.read_file("/etc/postfix/orgmail/relay_clients") == f"{RELAY_IP}/32 permit\n".encode()
        outside = f"someone@{GMAIL.domain}"
        subject = "a relay's delivery notice"
        # rspamd's workers with the relay's settings (no greylisting): the sync's reload does not wait for them.
        reload_rspamd(internet)
        notice = message(f"MAILER-DAEMON@{internet.stack.settings.mail_host}", outside, subject)
        session = internet.world.probe("smtp", source=RELAY_IP, port=25, mail_from="", rcpts=[outside], data=notice)
        assert session["steps"][-1][:2] == ["DATA", 250], session
        r = ses.wait(with_data(subject), "the relay's notice at SES")
        assert (r["mail_from"], r["rcpts"], r["tls"]) == ("", [outside], True) and r["login"], r
        root = f"root@{internet.stack.settings.mail_host}"
        refused = internet.world.probe("smtp", source=RELAY_IP, port=25, mail_from=root, rcpts=[outside])
        assert rcpt_codes(refused) == [554], refused
        local = internet.world.probe("smtp", source=RELAY_IP, port=25, mail_from=root, rcpts=[root])
        assert rcpt_codes(local) == [250], local
        stranger = internet.world.probe("smtp", source="198.51.100.89", port=25, mail_from="", rcpts=[outside])
        assert rcpt_codes(stranger) == [554], stranger
    finally:
        publish_relay_addresses(internet, None)
        put_outbound(internet, ses_nexthop, None)


def test_direct_again_delivers_to_the_providers_itself(internet: Internet, sinks: sink.RunningSinks,
                                                       ses: SesStandIn) -> None:
    put_outbound(internet, {"relay": "direct"}, None)
    try:
        assert internet.guest.read_file("/etc/postfix/orgmail/relayhost") == b""
        subject = "direct again"
        submit(internet, [f"someone@{GMAIL.domain}"], subject)
        r = sinks.wait(with_subject(subject), what=subject)[0]
        assert r["sink"] == "gmail" and r["accepted"], r
        assert not [x for x in ses.records() if with_data(subject)(x)]
    finally:
        put_outbound(internet, {"relay": "ses", "host": ses.host, "port": 587}, NEW)
