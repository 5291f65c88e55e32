"""Layer 3 for the backup MX: boot a relay's rendered user-data (large stack, mx2)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gzip
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from components.server import host_config
from components.settings import load_settings, raw_from_pulumi_config
from components.userdata import render_user_data
from tests.e2e import harness
from tests.e2e.overrides import HOST_OVERRIDES, MOTO_PORT, put_parameters, trust_test_ca
from tests.e2e.test_mailhost import message, rcpt_codes, wait_for
from tests.e2e.tinydns import start_dns
from tests.unit.conftest import ROOT, stack_config
from tools.mockengine import PROVIDER_BCRYPT_COST, run_program

pytestmark = pytest.mark.e2e

STACK = "e2e-relay"
KNOWN = "helpdesk@large.example"
ALIAS = "board@large.example"
SENDER = "someone@elsewhere.example"


@pytest.fixture(scope="module")
def relay() -> Iterator[harness.BootedHost]:
    harness.require_e2e()
    config = stack_config("large")
    run = run_program(config, STACK, bcrypt_cost=PROVIDER_BCRYPT_COST)
    settings = load_settings(raw_from_pulumi_config(config), STACK)
    volume_id = run.one("aws:ebs/volume:Volume", "mx2-queue").id
    host = dataclasses.replace(host_config(settings, "mx2.large.example", "relay", volume_id), **HOST_OVERRIDES)

    def serve_parameters(guest: harness.BootedHost) -> None:
        put_parameters(guest, guest.start_moto(MOTO_PORT), run, settings.region, host)

    with harness.boot_host(gzip.compress(render_user_data(host).encode()), name="relay", data_disk_mb=256,
                           volume_id=volume_id, boot_timeout=120, before_boot=serve_parameters) as guest:
        status = guest.wait_cloud_init(timeout=600)
        assert status["errors"] == [], status

        wait_for(lambda: {25, 11332} <= guest.listening_ports(), 240, "port 25 and the milter to listen")
        yield guest


def probe(guest: harness.BootedHost, **args: Any) -> dict[str, Any]:
    res = guest.in_guest_net([sys.executable, "-m", "tests.e2e.probes"], input=json.dumps({"probe": "smtp", **args}),
                             timeout=180, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout)
    return result


def test_relay_runs_no_mailbox_service(relay: harness.BootedHost) -> None:
    ports = relay.listening_ports()
    assert 25 in ports and not ports & {465, 587, 993, 995}
    assert relay.exec(["systemctl", "is-active", "postfix.service"]).stdout.strip() == "active"
    nft = relay.exec(["nft", "list", "table", "inet", "orgmail"]).stdout
    assert "tcp dport 25 accept" in nft and "465" not in nft


def deferred(relay: harness.BootedHost) -> list[dict[str, Any]]:
    """Queue entries, once Postfix has tried (and failed) to pass them on."""
    out = relay.exec(["postqueue", "-j"]).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    tried = all(r.get("delay_reason") for e in entries for r in e["recipients"])
    return entries if entries and tried else []


def test_relay_accepts_known_recipients_and_forwards_to_the_mailbox_host(relay: harness.BootedHost) -> None:
    session = probe(relay, port=25, source="127.0.0.2", mail_from=SENDER, rcpts=[KNOWN, ALIAS],
                    data=message(SENDER, KNOWN, "via the backup MX"))
    assert session["steps"][-1][:2] == ["DATA", 250], session

    entries = wait_for(lambda: deferred(relay), 120, "the relay's first delivery attempt")
    recipients = {r["address"]: r for e in entries for r in e["recipients"]}
    assert set(recipients) == {KNOWN, ALIAS}
    # The mailbox host is unreachable here, so the message waits for it (never bounced).
    reasons = " ".join(r.get("delay_reason", "") for r in recipients.values())
    assert "mail.large.example" in reasons, reasons
    transport = relay.read_file("/etc/postfix/orgmail/transport").decode()
    assert transport == "large.example relay:[mail.large.example]:25\n"


def test_relay_refuses_unknown_recipients_and_relaying(relay: harness.BootedHost) -> None:
    session = probe(relay, port=25, source="127.0.0.3", mail_from=SENDER,
                    rcpts=["nobody@large.example", "victim@elsewhere.example"])
    assert rcpt_codes(session) == [550, 554], session


def test_replaced_relay_still_holds_the_mail_for_the_mailbox_host(relay: harness.BootedHost) -> None:
    """Issue 16 item 1 on the backup MX: a new instance (fresh root disk, same user-data, same queue
    volume) still holds the mail the old one accepted for the mailbox host, under the same queue ids,
    and keeps trying to pass it on. (Delivery once the next hop answers is the same Postfix queue run
    the mailbox host's replacement test shows.)"""
    session = probe(relay, port=25, source="127.0.0.4", mail_from=SENDER, rcpts=[KNOWN],
                    data=message(SENDER, KNOWN, "held across a replacement"))
    assert session["steps"][-1][:2] == ["DATA", 250], session
    before = {e["queue_id"] for e in wait_for(lambda: deferred(relay), 120, "a deferred message")}
    relay.exec(["sh", "-c", "echo old > /root/old-instance"], check=True)

    relay.replace(timeout=120)
    status = relay.wait_cloud_init(timeout=600)
    assert status["errors"] == [], status
    assert relay.exec(["test", "-e", "/root/old-instance"]).returncode == 1  # a new root disk
    wait_for(lambda: {25, 11332} <= relay.listening_ports(), 240, "the new instance's port 25 and milter")
    queued = {json.loads(line)["queue_id"] for line in relay.exec(["postqueue", "-j"]).stdout.splitlines() if line}
    assert queued == before, (before, queued)
    assert relay.exec(["findmnt", "-n", "-o", "TARGET", "/var/spool/postfix"]).stdout.strip() == "/var/spool/postfix"
    relay.exec(["postqueue", "-f"], check=True)  # the new instance tries at once, and defers again
    after = wait_for(lambda: deferred(relay), 120, "the new instance's delivery attempt")
    assert {e["queue_id"] for e in after} == before, (before, after)
    reasons = " ".join(r.get("delay_reason", "") for e in after for r in e["recipients"])
    assert "mail.large.example" in reasons, reasons



GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def test_relay_refuses_before_its_queue_what_the_mailbox_host_would_refuse(relay: harness.BootedHost) -> None:
    """No backscatter: spam at rspamd's reject threshold (the mailbox host's, actions.conf) and mail too
    big for the mailbox host after the relay's own headers are refused in the SMTP dialogue, never
    accepted and bounced later."""
    spam = probe(relay, port=25, source="127.0.0.6", mail_from=SENDER, rcpts=[KNOWN],
                 data=message(SENDER, KNOWN, "spam at the relay", f"{GTUBE}\n"))
    assert spam["steps"][-1][0] == "DATA" and spam["steps"][-1][1] == 554, spam
    limit = 25 * 1024 * 1024  # rateLimits.messageSizeMb of the large stack (default): the mailbox host's limit
    assert int(relay.exec(["postconf", "-h", "message_size_limit"], check=True).stdout) == limit - 64 * 1024
    body = ("x" * 76 + "\n") * ((limit - 32 * 1024) // 77)  # fits the mailbox host, not the relay's margin
    session = probe(relay, port=25, source="127.0.0.7", mail_from=SENDER, rcpts=[KNOWN],
                    data=message(SENDER, KNOWN, "just under the mailbox host's limit", body))
    assert session["steps"][-1][0] == "DATA" and session["steps"][-1][1] == 552, session["steps"]


# --- the hop to the mailbox host: verified TLS only (issue 13, defect 7) ---------------------------

MAILBOX_HOST = "mail.large.example"
STAND_IN = "192.0.2.25"  # the mailbox host's stand-in, in a namespace of its own, over a veth link


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def certificate(subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
                ca: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `subject` signed by `issuer` (None: self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(issuer[0].subject if issuer else _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def write_pair(directory: Path, name: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> tuple[str, str]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(pair[0].public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pair[1].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(cert), str(key)


@contextlib.contextmanager
def mailbox_stand_in(relay: harness.BootedHost, workdir: Path) -> Iterator[Callable[..., None]]:
    """The mailbox host's name resolves (in the relay's resolver) to a stand-in in a network namespace
    of its own; yields serve(cert, key) to (re)start it with that certificate (None: no TLS)."""
    ns = f"{relay.name}-mbx"
    undo: list[Callable[[], None]] = []
    served: list[subprocess.Popen[bytes]] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def serve(cert: str | None, key: str | None) -> None:
        while served:
            old = served.pop()
            old.kill()
            old.wait()
        argv = [sys.executable, "-m", "tests.e2e.standin", STAND_IN, "25", MAILBOX_HOST, str(workdir / "got.jsonl")]
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv, *([cert, key] if cert and key else [])],
                                cwd=str(ROOT), start_new_session=True, stdout=subprocess.PIPE)
        served.append(proc)
        assert proc.stdout is not None and b"listening" in proc.stdout.readline(), "the stand-in did not start"

    try:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "mbx0", "netns", relay.name, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", relay.name, "addr", "add", "192.0.2.1/24", "dev", "mbx0")
        ip("-n", relay.name, "link", "set", "mbx0", "up")
        ip("-n", ns, "addr", "add", f"{STAND_IN}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        undo.append(start_dns(relay, {f"{MAILBOX_HOST}.": {"A": [STAND_IN]}}))
        yield serve
    finally:
        for proc in served:
            proc.kill()
            proc.wait()
        for step in undo:
            step()
        subprocess.run(["ip", "netns", "delete", ns], check=False)  # takes the veth pair with it


def relay_attempts(relay: harness.BootedHost, queue_id: str, since: float) -> list[str]:
    """The relay's log lines about `queue_id`'s delivery attempts since `since` (epoch seconds)."""
    out = relay.exec(["journalctl", "-o", "cat", "--since", f"@{int(since)}", "SYSLOG_IDENTIFIER=postfix/relay/smtp"]).stdout
    return [line for line in out.splitlines() if line.startswith(f"{queue_id}: ") and "status=" in line]


def attempt(relay: harness.BootedHost, queue_id: str) -> str:
    """Retry the queue now (a reload also forgets that the mailbox host failed before); the attempt's log line."""
    since = time.time() + 1
    time.sleep(max(0.0, since - time.time()))
    relay.exec(["postfix", "reload"], check=True)
    relay.exec(["postqueue", "-f"], check=True)
    lines: list[str] = wait_for(lambda: relay_attempts(relay, queue_id, since), 120, f"a delivery attempt of {queue_id}")
    return lines[-1]


def test_relay_hands_mail_to_the_mailbox_host_only_over_verified_tls(relay: harness.BootedHost,
                                                                   tmp_path: Path) -> None:
    """Never in clear, never to an impostor: with no STARTTLS, a self-signed certificate, or a certificate
    of a trusted CA for another name, the message stays queued; with a trusted certificate for the
    mailbox host's name it is delivered, over TLS."""
    ca = certificate("orgmail test CA", None, ca=True)
    trust_test_ca(relay, ca[0].public_bytes(serialization.Encoding.PEM).decode())
    good = write_pair(tmp_path, "good", certificate(MAILBOX_HOST, ca))
    self_signed = write_pair(tmp_path, "self-signed", certificate(MAILBOX_HOST, None))
    impostor = write_pair(tmp_path, "impostor", certificate("impostor.elsewhere.example", ca))
    subject = "to the mailbox host over verified TLS"
    with mailbox_stand_in(relay, tmp_path) as serve:
        session = probe(relay, port=25, source="127.0.0.5", mail_from=SENDER, rcpts=[KNOWN],
                        data=message(SENDER, KNOWN, subject))
        assert session["steps"][-1][:2] == ["DATA", 250], session
        queue_id = session["steps"][-1][2].rsplit(" ", 1)[-1]
        got = tmp_path / "got.jsonl"
        for cert, refusal in (((None, None), "TLS is required, but was not offered"),
                              (self_signed, "Server certificate not"), (impostor, "Server certificate not")):
            serve(*cert)
            line = attempt(relay, queue_id)
            assert "status=deferred" in line and refusal in line, (cert, line)
            assert not got.exists() or subject not in got.read_text(), (cert, got.read_text())
        serve(*good)
        line = attempt(relay, queue_id)
        assert "status=sent" in line and STAND_IN in line, line
        delivered = [json.loads(row) for row in got.read_text().splitlines()]
        ours = [d for d in delivered if subject in d["data"]]
        assert len(ours) == 1 and ours[0]["tls"] and ours[0]["rcpts"] == [KNOWN], delivered
    assert queue_id not in relay.exec(["postqueue", "-p"]).stdout


def test_the_relay_sends_nothing_outside_itself(relay: harness.BootedHost, tmp_path: Path) -> None:
    """Issue 14: "the relays never send outside". A relay's own mail (root's, through its aliases; mail
    for an outside address; a delivery notice, the null sender) goes to the mailbox host over verified
    TLS, from the mail host's name, and never to another MX: the mailbox host sends it on as its own
    (directly, or through SES), and takes from a relay nothing for outside but notices (test_ses_relay)."""
    ca = certificate("orgmail test CA for the relay's own mail", None, ca=True)
    trust_test_ca(relay, ca[0].public_bytes(serialization.Encoding.PEM).decode())
    good = write_pair(tmp_path, "good", certificate(MAILBOX_HOST, ca))
    outside = "someone@elsewhere.example"
    sent = {"root": ("root", "relay root mail"), "outside": (outside, "relay mail for outside"),
            "notice": (outside, "relay notice")}
    with mailbox_stand_in(relay, tmp_path) as serve:
        serve(*good)
        since = time.time()
        for kind, (to, subject) in sent.items():
            sender = ["-f", ""] if kind == "notice" else []
            relay.exec(["sendmail", "-i", *sender, to], input=f"Subject: {subject}\n\n{kind}\n", check=True)
        relay.exec(["postfix", "reload"], check=True)  # forget that the mailbox host was down before
        relay.exec(["postqueue", "-f"], check=True)
        got = tmp_path / "got.jsonl"

        def arrived() -> dict[str, dict[str, Any]]:
            rows = [json.loads(line) for line in got.read_text().splitlines()] if got.exists() else []
            found = {k: r for k, (_, subject) in sent.items() for r in rows if f"Subject: {subject}" in r["data"]}
            return found if len(found) == len(sent) else {}

        found = wait_for(arrived, 120, "the relay's own mail at the mailbox host")
    assert (found["root"]["mail_from"], found["root"]["rcpts"]) == (f"root@{MAILBOX_HOST}", [f"root@{MAILBOX_HOST}"])
    assert (found["outside"]["mail_from"], found["outside"]["rcpts"]) == (f"root@{MAILBOX_HOST}", [outside])
    assert (found["notice"]["mail_from"], found["notice"]["rcpts"]) == ("", [outside])
    assert all(r["tls"] for r in found.values()), found
    assert f"\nFrom: root <root@{MAILBOX_HOST}>\r\n" in found["outside"]["data"], found["outside"]["data"]
    # Every delivery attempt since went to the mailbox host (the relay transport), none to an MX of its own.
    log = relay.exec(["journalctl", "-o", "cat", "--since", f"@{int(since)}", "SYSLOG_IDENTIFIER=postfix/smtp"]).stdout
    assert "status=" not in log, log
    attempts = relay.exec(["journalctl", "-o", "cat", "--since", f"@{int(since)}",
                           "SYSLOG_IDENTIFIER=postfix/relay/smtp"]).stdout
    assert outside in attempts and f"relay={MAILBOX_HOST}[{STAND_IN}]:25" in attempts, attempts
