"""Record building: exact strings, checked again by an independent parser (dnspython)."""

from __future__ import annotations

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from components.dns_records import (
    all_records,
    caa_records,
    dkim_public_key_b64,
    dmarc_value,
    mta_sts_id,
    mta_sts_policy,
    mx_records,
    policy_records,
    quote_txt,
    srv_records,
    transport_security_records,
    unquote_txt,
    web_hosts,
)
from components.settings import load_settings
from tests.unit.conftest import raw_config


@pytest.fixture(scope="module")
def public_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def settings(stack: str = "dev", **changes):
    cfg = raw_config(stack)
    cfg.update(changes)
    return load_settings(cfg, stack)


def test_quote_txt_splits_at_255() -> None:
    value = "x" * 600
    quoted = quote_txt(value)
    assert quoted == '"' + "x" * 255 + '" "' + "x" * 255 + '" "' + "x" * 90 + '"'
    assert unquote_txt(quoted) == value
    assert quote_txt("v=spf1 mx -all") == '"v=spf1 mx -all"'
    with pytest.raises(ValueError):
        quote_txt('say "hi"')


def test_dev_records_exact(public_pem: str) -> None:
    s = settings()
    records = all_records(s, {"mail.example.org": "198.51.100.7"}, public_pem)
    simple = [(r.type, r.name, r.content, r.priority, r.ttl) for r in records if "_domainkey" not in r.name]
    assert simple[:5] == [
        ("A", "mail.example.org", "198.51.100.7", None, 300),
        ("TXT", "mail.example.org", '"v=spf1 a -all"', None, 300),
        ("MX", "example.org", "mail.example.org", 10, 300),
        ("TXT", "example.org", '"v=spf1 mx -all"', None, 300),
        ("TXT", "_dmarc.example.org", '"v=DMARC1; p=quarantine; rua=mailto:dmarc@example.org"', None, 300),
    ]
    dkim = [r for r in records if "_domainkey" in r.name]
    assert [r.name for r in dkim] == ["s2026._domainkey.example.org"]
    assert unquote_txt(dkim[0].content) == "v=DKIM1; k=rsa; p=" + dkim_public_key_b64(public_pem)


def test_dkim_txt_parses_as_rfc1035_strings(public_pem: str) -> None:
    content = [r for r in all_records(settings(), {"mail.example.org": "198.51.100.7"}, public_pem)
               if "_domainkey" in r.name][0].content
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, content)
    assert isinstance(rdata, dns.rdtypes.ANY.TXT.TXT)
    assert len(rdata.strings) == 2  # a 2048-bit key does not fit in one 255-byte string
    assert all(len(s) <= 255 for s in rdata.strings)
    assert b"".join(rdata.strings).decode() == "v=DKIM1; k=rsa; p=" + dkim_public_key_b64(public_pem)


def test_every_record_parses(public_pem: str) -> None:
    for stack in ("dev", "small", "medium", "large", "isp-single"):
        s = settings(stack)
        ips = {h: f"198.51.100.{i + 1}" for i, h in enumerate(s.mx_hosts)}
        for r in all_records(s, ips, public_pem):
            text = f"{r.priority} {r.content}." if r.type == "MX" else r.content
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(r.type), text)


def test_mx_priorities_per_tier() -> None:
    isp = settings("isp-single")
    mx = [(r.name, r.content, r.priority) for r in mx_records(isp)]
    assert mx == [
        ("isp.example", "mail.isp.example", 10), ("isp.example", "mx2.isp.example", 20),
        ("isp.example", "mx3.isp.example", 30),
        ("customers.isp.example", "mail.isp.example", 10), ("customers.isp.example", "mx2.isp.example", 20),
        ("customers.isp.example", "mx3.isp.example", 30),
    ]


def test_dmarc_variants() -> None:
    assert dmarc_value(settings(dmarc={"policy": "reject", "reportAddress": "r@example.org"})) == \
        "v=DMARC1; p=reject; rua=mailto:r@example.org"
    assert dmarc_value(settings(dmarc={"policy": "none", "subdomainPolicy": "reject", "percent": 50,
                                       "reportAddress": "r@example.org"})) == \
        "v=DMARC1; p=none; sp=reject; pct=50; rua=mailto:r@example.org"


def test_external_report_authorisation() -> None:
    """A second domain reporting to an address in the first domain gets the RFC 7489 record."""
    records = policy_records(settings("medium"))
    auth = [(r.zone, r.name, r.content) for r in records if "._report._dmarc." in r.name]
    assert auth == [("medium.example", "medium-brand.example._report._dmarc.medium.example", '"v=DMARC1"')]


def test_spf_for_every_domain() -> None:
    s = settings("medium")
    spf = {r.name: r.content for r in policy_records(s) if r.content.startswith('"v=spf1')}
    assert spf == {"medium.example": '"v=spf1 mx -all"', "medium-brand.example": '"v=spf1 mx -all"'}


def test_bad_pem_rejected() -> None:
    with pytest.raises(ValueError):
        dkim_public_key_b64("-----BEGIN RSA PRIVATE KEY-----\nAAA\n-----END RSA PRIVATE KEY-----")


def test_mta_sts_policy_and_id() -> None:
    large = settings("large")
    policy = mta_sts_policy(large)
    assert policy == ("version: STSv1\r\nmode: enforce\r\nmx: mail.large.example\r\nmx: mx2.large.example\r\n"
                      "max_age: 2592000\r\n")
    dev = settings("dev")
    assert mta_sts_policy(dev) == "version: STSv1\r\nmode: testing\r\nmx: mail.example.org\r\nmax_age: 604800\r\n"
    ident = mta_sts_id(policy)
    assert ident.isalnum() and 1 <= len(ident) <= 32
    # the id changes whenever the policy does
    assert mta_sts_id(mta_sts_policy(settings("large", mtaSts={"mode": "testing"}))) != ident


def test_transport_security_records_exact() -> None:
    recs = [(r.type, r.name, r.content) for r in transport_security_records(settings("dev"))]
    assert recs == [
        ("TXT", "_mta-sts.example.org", f'"v=STSv1; id={mta_sts_id(mta_sts_policy(settings("dev")))}"'),
        ("TXT", "_smtp._tls.example.org", '"v=TLSRPTv1; rua=mailto:dmarc@example.org"'),
    ]
    # RFC 8461 8.3 opt-out: a "mode: none" policy with a short max_age under a new id, not a removal
    off = settings("dev", mtaSts={"mode": "none"}, tlsRpt={"reportAddress": "tls@example.org"})
    assert mta_sts_policy(off) == "version: STSv1\r\nmode: none\r\nmx: mail.example.org\r\nmax_age: 86400\r\n"
    assert mta_sts_id(mta_sts_policy(off)) != mta_sts_id(mta_sts_policy(settings("dev")))
    assert [(r.name, r.content) for r in transport_security_records(off)] == [
        ("_mta-sts.example.org", f'"v=STSv1; id={mta_sts_id(mta_sts_policy(off))}"'),
        ("_smtp._tls.example.org", '"v=TLSRPTv1; rua=mailto:tls@example.org"')]
    assert web_hosts(off) == [("example.org", "mta-sts.example.org"), ("example.org", "autoconfig.example.org")]
    # without autoconfig the Worker (every stack has one) still serves the opt-out policy
    bare = settings("dev", mtaSts={"mode": "none"}, autoconfig=False)
    assert [r.name for r in transport_security_records(bare)] == ["_mta-sts.example.org", "_smtp._tls.example.org"]
    assert web_hosts(bare) == [("example.org", "mta-sts.example.org")]


def test_caa_exact() -> None:
    recs = [(r.zone, r.name, r.content) for r in caa_records(settings("dev"))]
    assert recs == [("example.org", "mail.example.org", '0 issue "letsencrypt.org"'),
                    ("example.org", "mail.example.org", '0 issuewild ";"')]
    large = [(r.name, r.content) for r in caa_records(settings("large"))]
    assert ("mx2.large.example", '0 iodef "mailto:helpdesk@large.example"') in large and len(large) == 6
    for r in caa_records(settings("large")):
        assert r.cloudflare_data() == {"flags": 0, "tag": r.content.split()[1], "value": r.content.split(" ", 2)[2].strip('"')}


def test_srv_exact() -> None:
    recs = [(r.name, r.content) for r in srv_records(settings("dev"))]
    assert recs == [
        ("_submissions._tcp.example.org", "0 1 465 mail.example.org."),
        ("_submission._tcp.example.org", "0 1 587 mail.example.org."),
        ("_imaps._tcp.example.org", "0 1 993 mail.example.org."),
        ("_pop3s._tcp.example.org", "10 1 995 mail.example.org."),
        ("_imap._tcp.example.org", "0 0 0 ."),
        ("_pop3._tcp.example.org", "0 0 0 ."),
    ]
    assert srv_records(settings("dev"))[4].cloudflare_data() == {"priority": 0, "weight": 0, "port": 0, "target": "."}
