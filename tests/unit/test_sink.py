"""The sink MX servers of the internet in a box (tests/e2e/sink.py), without a boot.

A local client delivers signed and unsigned mail to the sinks on 127.0.0.1 and ::1; the DNS they
judge by is a small dnspython responder on loopback serving the records below.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import dkim
import dns.message
import dns.rcode
import dns.rrset
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.e2e import sink
from tests.verify.harness import TestCA

HOST = "mail.example.org"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Responder:
    """Answers UDP queries from a table of (name, type) -> rdata texts; NXDOMAIN otherwise."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = {(n.lower().rstrip(".") + ".", t): v for (n, t), v in records.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            question = query.question[0]
            key = (question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype))
            if key in self.records:
                reply.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", key[1], self.records[key]))
            elif not any(name == key[0] for name, _ in self.records):
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


def txt(text: str) -> str:
    return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[sink.RunningSinks, bytes]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    dns_server = Responder({
        ("example.org", "TXT"): [txt("v=spf1 mx -all")],
        ("example.org", "MX"): [f"10 {HOST}."],
        (HOST, "A"): ["127.0.0.1"],
        (HOST, "TXT"): [txt("v=spf1 a -all")],
        ("s1._domainkey.example.org", "TXT"): [txt("v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())],
        ("1.0.0.127.in-addr.arpa", "PTR"): [f"{HOST}."],
        ("elsewhere.test", "TXT"): [txt("v=spf1 -all")],
    })
    work = tmp_path_factory.mktemp("sinks")
    ca = TestCA(work)
    pem = ca.issue(["mx.gmail.test", "mx.outlook.test", "mx.busy.test"])
    config = sink.SinkConfig(
        sinks=(sink.Sink("gmail", "mx.gmail.test", ("127.0.0.1", "::1"), "gmail", port=free_port()),
               sink.Sink("microsoft", "mx.outlook.test", ("127.0.0.1", "::1"), "accept", port=free_port()),
               sink.Sink("busy", "mx.busy.test", ("127.0.0.1",), "tempfail", port=free_port())),
        log=str(work / "deliveries.jsonl"), nameserver="127.0.0.1", dns_port=dns_server.port,
        cert=str(pem.cert), key=str(pem.key))
    running = sink.start(config, work)
    try:
        yield running, private
    finally:
        running.stop()
        dns_server.close()


def port_of(running: sink.RunningSinks, name: str) -> int:
    return next(s.port for s in running.config.sinks if s.name == name)


def message(sender: str, to: str, subject: str, key: bytes | None, d: str = "example.org") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@example.org>"
    msg.set_content("Hello from the sink tests.\n")
    raw = msg.as_bytes().replace(b"\n", b"\r\n")
    if key is not None:
        raw = dkim.sign(raw, b"s1", d.encode(), key, include_headers=[b"from", b"to", b"subject"]) + raw
    return raw


def deliver(running: sink.RunningSinks, name: str, source: str, mail_from: str, rcpt: str, raw: bytes,
            tls: bool = True, helo: str = HOST) -> tuple[int, str]:
    """One SMTP session from `source`; the reply to DATA (or to the refused RCPT)."""
    conn = smtplib.SMTP(source, port_of(running, name), local_hostname=helo, timeout=30,
                        source_address=(source, 0))
    try:
        conn.ehlo(helo)
        if tls:
            ctx = ssl.create_default_context(cafile=str(Path(running.config.cert).parent / "ca.pem"))
            ctx.check_hostname = False
            conn.starttls(context=ctx)
            conn.ehlo(helo)
        conn.mail(mail_from)
        code, text = conn.rcpt(rcpt)
        if code >= 400:
            return code, text.decode()
        code, text = conn.data(raw)
        return code, text.decode()
    finally:
        conn.close()


def record_of(running: sink.RunningSinks, subject: str) -> dict:
    return running.wait(lambda r: f"Subject: {subject}" in r.get("message", ""), timeout=20, what=subject)[0]


def test_signed_mail_over_ipv4_passes_everything(world) -> None:
    running, key = world
    code, _ = deliver(running, "gmail", "127.0.0.1", "ann@example.org", "x@gmail.test",
                      message("ann@example.org", "x@gmail.test", "signed v4", key))
    assert code == 250
    r = record_of(running, "signed v4")
    assert (r["sink"], r["family"], r["peer"], r["helo"]) == ("gmail", "ipv4", "127.0.0.1", HOST)
    assert r["tls"] in ("TLSv1.2", "TLSv1.3")
    assert (r["mail_from"], r["rcpt_to"]) == ("ann@example.org", ["x@gmail.test"])
    assert r["dkim_result"] == "pass" and [(d["d"], d["s"]) for d in r["dkim"]] == [("example.org", "s1")]
    assert r["spf"] == {"result": "pass", "identity": "mailfrom", "domain": "example.org",
                        "explanation": r["spf"]["explanation"]}
    assert r["dmarc"] == {"from_domain": "example.org", "dkim_aligned": True, "spf_aligned": True, "pass": True}
    assert r["ptr"] == [HOST] and r["fcrdns"] and r["accepted"]


def test_gmail_refuses_ipv6_without_ptr_in_its_words(world) -> None:
    running, key = world
    code, text = deliver(running, "gmail", "::1", "ann@example.org", "x@gmail.test",
                         message("ann@example.org", "x@gmail.test", "signed v6", key))
    assert code == 550
    assert "5.7.25 [::1] The IP address sending this message does not have a" in text
    assert "PTR record setup" in text and "Gmail does not accept messages" in text
    r = record_of(running, "signed v6")
    assert (r["family"], r["accepted"], r["ptr"], r["fcrdns"]) == ("ipv6", False, [], False)
    assert r["reply"].startswith("550-5.7.25") and r["reply"].splitlines()[-1].startswith("550 5.7.25")
    assert r["spf"]["result"] == "fail"  # `mx` covers the IPv4 address only
    assert r["dkim_result"] == "pass" and r["dmarc"]["pass"]


def test_another_provider_takes_ipv6_and_records_the_failures(world) -> None:
    running, key = world
    code, _ = deliver(running, "microsoft", "::1", "ann@example.org", "x@outlook.test",
                      message("ann@example.org", "x@outlook.test", "unsigned v6", None), tls=False)
    assert code == 250
    r = record_of(running, "unsigned v6")
    assert (r["family"], r["tls"], r["dkim_result"], r["dkim"]) == ("ipv6", None, "none", [])
    assert r["spf"]["result"] == "fail"
    assert r["dmarc"] == {"from_domain": "example.org", "dkim_aligned": False, "spf_aligned": False, "pass": False}


def test_tampered_and_unaligned_signatures(world) -> None:
    running, key = world
    raw = message("ann@example.org", "x@outlook.test", "tampered", key).replace(b"Hello", b"Jello")
    deliver(running, "microsoft", "127.0.0.1", "ann@example.org", "x@outlook.test", raw)
    r = record_of(running, "tampered")
    assert r["dkim_result"] == "fail" and not r["dmarc"]["dkim_aligned"]
    assert r["dmarc"]["spf_aligned"] and r["dmarc"]["pass"]  # SPF alone aligns
    # Signed by example.org, From: another domain, sender of that domain: nothing aligns.
    raw = message("eve@elsewhere.test", "x@outlook.test", "unaligned", key)
    deliver(running, "microsoft", "127.0.0.1", "eve@elsewhere.test", "x@outlook.test", raw)
    r = record_of(running, "unaligned")
    assert r["dkim_result"] == "pass" and r["spf"]["result"] == "fail"
    assert r["dmarc"] == {"from_domain": "elsewhere.test", "dkim_aligned": False, "spf_aligned": False, "pass": False}


def test_null_sender_is_judged_by_the_helo_name(world) -> None:
    running, key = world
    raw = message(f"MAILER-DAEMON@{HOST}", "x@gmail.test", "a bounce", key)
    code, _ = deliver(running, "gmail", "127.0.0.1", "", "x@gmail.test", raw)
    assert code == 250
    r = record_of(running, "a bounce")
    assert r["mail_from"] == ""
    assert (r["spf"]["result"], r["spf"]["identity"], r["spf"]["domain"]) == ("pass", "helo", HOST)
    assert r["dmarc"] == {"from_domain": HOST, "dkim_aligned": True, "spf_aligned": True, "pass": True}
    raw = message(f"MAILER-DAEMON@{HOST}", "x@gmail.test", "a bounce from a stranger", key)
    deliver(running, "gmail", "127.0.0.1", "", "x@gmail.test", raw, helo="stranger.elsewhere.test")
    r = record_of(running, "a bounce from a stranger")
    assert r["spf"]["identity"] == "helo" and r["spf"]["result"] != "pass"


def test_busy_provider_tempfails_every_recipient(world) -> None:
    running, key = world
    code, text = deliver(running, "busy", "127.0.0.1", "ann@example.org", "x@busy.test",
                         message("ann@example.org", "x@busy.test", "busy", key))
    assert code == 451 and text.startswith("4.7.500 Server busy")
    r = running.wait(lambda r: r["sink"] == "busy", timeout=10)[0]
    assert (r["rcpt_to"], r["accepted"]) == (["x@busy.test"], False)


def test_unknown_account_refused_at_rcpt_in_gmails_words(world) -> None:
    running, key = world
    code, text = deliver(running, "microsoft", "127.0.0.1", "ann@example.org", "nosuchuser@outlook.test",
                         message("ann@example.org", "nosuchuser@outlook.test", "no such user", key))
    assert code == 550 and text.startswith("5.1.1 The email account that you tried to reach does not exist.")
    r = running.wait(lambda r: r["rcpt_to"] == ["nosuchuser@outlook.test"], timeout=10)[0]
    assert not r["accepted"] and r["reply"].endswith("?p=NoSuchUser microsoft-rcpt - gsmtp")


@pytest.mark.parametrize(("name", "org"), [("mail.example.org", "example.org"), ("Example.ORG.", "example.org"),
                                          ("mx.a.example.co.uk", "example.co.uk"), ("mail.gmail.test", "gmail.test")])
def test_organisational_domain(name: str, org: str) -> None:
    assert sink.organisational_domain(name) == org


def test_unknown_policy_refused() -> None:
    with pytest.raises(ValueError, match="policy 'bounce' is not one of accept, gmail, tempfail"):
        sink.Sink("x", "mx.x.test", ("127.0.0.1",), "bounce")
