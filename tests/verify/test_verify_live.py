"""tools.verify against a live test bed: Knot serving the stack's exported zones, TLS stubs for the hosts.

The good set is all ok; every broken variant makes exactly the named check(s) fail, with the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from components.dns_records import dkim_value, mta_sts_id, mta_sts_policy, quote_txt
from tests.verify import harness
from tests.verify.conftest import Bed
from tools import verify

ROOT = Path(__file__).resolve().parents[2]
MAIL, MX2 = "mail.example.org", "mx2.example.org"


def not_ok(checks: list[verify.Check]) -> list[tuple[str, str, str]]:
    return sorted((c.check, c.subject, c.status) for c in checks if c.status != verify.OK)


def test_good_setup_is_all_ok(bed: Bed) -> None:
    checks = bed.run()
    assert not_ok(checks) == [], "\n".join(f"{c.status} {c.check} {c.subject}: {c.found}" for c in checks)
    kinds = {c.check for c in checks}
    assert kinds == {"a", "ptr", "spf", "caa", "mx", "dkim", "dmarc", "dmarc-report", "mta-sts", "mta-sts-policy",
                     "tls-rpt", "srv", "dnsbl", "smtp-banner", "tls:25", "tls:465", "tls:587", "tls:993", "tls:995"}
    # every published record of the stack was looked at
    assert sum(c.check == "srv" for c in checks) == 12
    assert sum(c.check == "dnsbl" for c in checks) == 2 * len(harness.DNSBL_ZONES)


# ---------------------------------------------------------------- broken variants


def _other_dkim_txt() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return quote_txt(dkim_value(pem))


def _policy(bed: Bed, **change: str) -> str:
    lines = mta_sts_policy(bed.expected.settings).split("\r\n")
    out = []
    for line in lines:
        key = line.split(":", 1)[0]
        if key in change:
            if change[key]:
                out.append(f"{key}: {change[key]}")
        else:
            out.append(line)
    return "\r\n".join(out)


def _spf_chain(bed: Bed) -> None:
    harness.set_records(bed.zones, "example.org", "TXT", ['"v=spf1 mx include:s1.example.org -all"'])
    for i in range(1, 11):
        nxt = f"include:s{i + 1}.example.org " if i < 10 else ""
        harness.set_records(bed.zones, f"s{i}.example.org", "TXT", [f'"v=spf1 {nxt}?all"'])


def _spf_include_open(bed: Bed) -> None:
    harness.set_records(bed.zones, "example.org", "TXT", ['"v=spf1 mx include:open.example.org -all"'])
    harness.set_records(bed.zones, "open.example.org", "TXT", ['"v=spf1 +all"'])


def _dnsbl_spamhaus_refuses(bed: Bed) -> None:
    """Spamhaus answers 127.255.255.254 to every query from a public resolver, its test entry included."""
    for name in ("2.0.0.127", "10.53.0.127", "11.53.0.127"):
        harness.set_records(bed.zones, f"{name}.zen.spamhaus.org", "A", ["127.255.255.254"])


def _cert(bed: Bed, host: str, port: int, names: list[str], days: float = 60, self_signed: bool = False) -> None:
    bed.stubs.service(host, port).ctx = harness.server_context(
        bed.stubs.ca.issue(names, days=days, self_signed=self_signed))


@dataclass
class Variant:
    id: str
    breaks: Callable[[Bed], None]
    expect: list[tuple[str, str, str]]  # (check, subject, status) that are not ok
    fix: str  # must appear in the fix text of the first expected check


E, W = verify.ERROR, verify.WARNING
# What Cloudflare adds by itself to a name with CAA records, as its documentation shows it (`dig caa`):
# https://developers.cloudflare.com/ssl/edge-certificates/caa-records/#caa-records-added-by-cloudflare
CLOUDFLARE_CAA = ['0 issue "pki.goog; cansignhttpexchanges=yes"', '0 issuewild "pki.goog; cansignhttpexchanges=yes"',
                  '0 issue "letsencrypt.org"', '0 issuewild "letsencrypt.org"', '0 issue "ssl.com"',
                  '0 issuewild "ssl.com"', '0 issue "sectigo.com"', '0 issuewild "sectigo.com"']
REV10 = "10.53.0.127.in-addr.arpa"
SMTP_MAIL = f"{MAIL} (127.0.53.10:10025)"
VARIANTS = [
    Variant("a-stale-extra-address", lambda b: harness.add_records(b.zones, MX2, "A", ["198.51.100.7"]),
            [("a", MX2, E)], "publish exactly: mx2.example.org. 300 IN A 127.0.53.11 and delete mx2.example.org. "
                             "IN A 198.51.100.7"),
    # A wrong address also breaks the PTR's forward confirmation and every SPF that authorises the host
    # through a/mx; those say the record is fine and point at the A record (see the next variant).
    Variant("a-wrong-address", lambda b: harness.set_records(b.zones, MAIL, "A", ["198.51.100.8"]),
            [("a", MAIL, E), ("ptr", "127.0.53.10", E), ("spf", MAIL, E), ("spf", "example.org", E),
             ("spf", "example.net", E)],
            "publish exactly: mail.example.org. 300 IN A 127.0.53.10 and delete mail.example.org. IN A 198.51.100.8"),
    Variant("ptr-wrong-name", lambda b: harness.set_records(b.zones, REV10, "PTR", ["ec2-1-2-3-4.compute.example."]),
            [("ptr", "127.0.53.10", E)], f"{REV10}. IN PTR mail.example.org."),
    Variant("ptr-missing", lambda b: harness.set_records(b.zones, REV10, "PTR", []),
            [("ptr", "127.0.53.10", E)], "aws ec2 modify-address-attribute"),
    Variant("mx-priorities-swapped", lambda b: harness.set_records(
        b.zones, "example.org", "MX", ["20 mail.example.org.", "10 mx2.example.org."]),
        [("mx", "example.org", E)], "example.org. 300 IN MX 10 mail.example.org. | example.org. 300 IN MX 20 "
                                     "mx2.example.org. and delete example.org. IN MX 10 mx2.example.org."),
    Variant("spf-two-records", lambda b: harness.add_records(b.zones, "example.org", "TXT", ['"v=spf1 a -all"']),
            [("spf", "example.org", E)], 'example.org. 300 IN TXT "v=spf1 mx -all" and delete the others'),
    Variant("spf-syntax", lambda b: harness.set_records(b.zones, "example.net", "TXT",
                                                        ['"v=spf1 mx ipv4:192.0.2.1 -all"']),
            [("spf", "example.net", E)], 'example.net. 300 IN TXT "v=spf1 mx -all"'),
    Variant("spf-does-not-authorise-host", lambda b: harness.set_records(b.zones, "example.net", "TXT",
                                                                         ['"v=spf1 ip4:192.0.2.0/24 -all"']),
            [("spf", "example.net", E)], 'example.net. 300 IN TXT "v=spf1 mx -all"'),
    Variant("spf-11-lookups", _spf_chain, [("spf", "example.org", E)], 'example.org. 300 IN TXT "v=spf1 mx -all"'),
    Variant("spf-plus-all", lambda b: harness.set_records(b.zones, "example.net", "TXT", ['"v=spf1 mx +all"']),
            [("spf", "example.net", E)], 'example.net. 300 IN TXT "v=spf1 mx -all"'),
    Variant("spf-neutral-all", lambda b: harness.set_records(b.zones, "example.org", "TXT", ['"v=spf1 mx ?all"']),
            [("spf", "example.org", E)], 'example.org. 300 IN TXT "v=spf1 mx -all"'),
    Variant("spf-include-ends-plus-all", _spf_include_open,
            [("spf", "example.org", E)], 'example.org. 300 IN TXT "v=spf1 mx -all"'),
    Variant("spf-ipv4-range-too-wide", lambda b: harness.set_records(
        b.zones, "example.net", "TXT", ['"v=spf1 mx ip4:0.0.0.0/1 ip4:128.0.0.0/1 -all"']),
        [("spf", "example.net", E)], 'example.net. 300 IN TXT "v=spf1 mx -all"'),
    Variant("spf-ipv6-range-too-wide", lambda b: harness.set_records(
        b.zones, "example.net", "TXT", ['"v=spf1 mx ip6:2000::/3 -all"']),
        [("spf", "example.net", E)], 'example.net. 300 IN TXT "v=spf1 mx -all"'),
    Variant("helo-spf-wrong", lambda b: harness.set_records(b.zones, MX2, "TXT", ['"v=spf1 ip4:192.0.2.1 -all"']),
            [("spf", MX2, E)], 'mx2.example.org. 300 IN TXT "v=spf1 a -all"'),
    Variant("dkim-other-key", lambda b: harness.set_records(b.zones, "orgmail._domainkey.example.org", "TXT",
                                                            [_other_dkim_txt()]),
            [("dkim", "orgmail._domainkey.example.org", E)], "orgmail._domainkey.example.org. 300 IN TXT "
                                                             '"v=DKIM1; k=rsa; p=MIIB'),
    Variant("dkim-revoked", lambda b: harness.set_records(b.zones, "orgmail._domainkey.example.net", "TXT",
                                                          ['"v=DKIM1; k=rsa; p="']),
            [("dkim", "orgmail._domainkey.example.net", E)], "orgmail._domainkey.example.net. 300 IN TXT"),
    Variant("dmarc-weaker-policy", lambda b: harness.set_records(b.zones, "_dmarc.example.org", "TXT",
                                                                 ['"v=DMARC1; p=none; rua=mailto:dmarc@example.org"']),
            [("dmarc", "_dmarc.example.org", E)],
            '_dmarc.example.org. 300 IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@example.org"'),
    Variant("dmarc-two-records", lambda b: harness.add_records(b.zones, "_dmarc.example.net", "TXT",
                                                               ['"v=DMARC1; p=none"']),
            [("dmarc", "_dmarc.example.net", E)], '_dmarc.example.net. 300 IN TXT "v=DMARC1; p=reject'),
    Variant("dmarc-report-authorisation-missing",
            lambda b: harness.set_records(b.zones, "example.net._report._dmarc.example.org", "TXT", []),
            [("dmarc-report", "example.net._report._dmarc.example.org", E)],
            'example.net._report._dmarc.example.org. 300 IN TXT "v=DMARC1"'),
    Variant("mta-sts-stale-id", lambda b: harness.set_records(b.zones, "_mta-sts.example.org", "TXT",
                                                              ['"v=STSv1; id=20240101"']),
            [("mta-sts", "_mta-sts.example.org", E)], '_mta-sts.example.org. 300 IN TXT "v=STSv1; id='),
    Variant("mta-sts-txt-missing", lambda b: harness.set_records(b.zones, "_mta-sts.example.net", "TXT", []),
            [("mta-sts", "_mta-sts.example.net", E)], '_mta-sts.example.net. 300 IN TXT "v=STSv1; id='),
    Variant("mta-sts-policy-misses-backup-mx",
            lambda b: b.stubs.web.http.update(body=_policy(b, mx="mail.example.org")),
            [("mta-sts-policy", "mta-sts.example.net", E), ("mta-sts-policy", "mta-sts.example.org", E)],
            "with exactly 'version: STSv1\\r\\nmode: enforce\\r\\nmx: mail.example.org\\r\\nmx: mx2.example.org"),
    Variant("mta-sts-policy-wrong-mode", lambda b: b.stubs.web.http.update(body=_policy(b, mode="testing")),
            [("mta-sts-policy", "mta-sts.example.net", E), ("mta-sts-policy", "mta-sts.example.org", E)],
            "Worker orgmail-verifytest"),
    Variant("mta-sts-policy-bad-version", lambda b: b.stubs.web.http.update(body=_policy(b, version="STSv2")),
            [("mta-sts-policy", "mta-sts.example.net", E), ("mta-sts-policy", "mta-sts.example.org", E)],
            "HTTP 200, text/plain, no redirect"),
    Variant("mta-sts-policy-html", lambda b: b.stubs.web.http.update(content_type="text/html"),
            [("mta-sts-policy", "mta-sts.example.net", E), ("mta-sts-policy", "mta-sts.example.org", E)],
            "text/plain"),
    Variant("mta-sts-policy-redirect", lambda b: b.stubs.web.http.update(
        status=301, location="https://www.example.org/mta-sts.txt", body=""),
        [("mta-sts-policy", "mta-sts.example.net", E), ("mta-sts-policy", "mta-sts.example.org", E)],
        "https://mta-sts.example.net/.well-known/mta-sts.txt"),
    Variant("mta-sts-host-missing", lambda b: harness.set_records(b.zones, "mta-sts.example.net", "A", []),
            [("mta-sts-policy", "mta-sts.example.net", E)], "custom domain mta-sts.example.net"),
    Variant("tls-rpt-elsewhere", lambda b: harness.set_records(
        b.zones, "_smtp._tls.example.org", "TXT", ['"v=TLSRPTv1; rua=mailto:someone@other.example"']),
        [("tls-rpt", "_smtp._tls.example.org", E)],
        '_smtp._tls.example.org. 300 IN TXT "v=TLSRPTv1; rua=mailto:dmarc@example.org"'),
    Variant("tls-rpt-syntax", lambda b: harness.set_records(b.zones, "_smtp._tls.example.net", "TXT",
                                                            ['"v=TLSRPTv1; rua=dmarc@example.org"']),
            [("tls-rpt", "_smtp._tls.example.net", E)], '_smtp._tls.example.net. 300 IN TXT "v=TLSRPTv1;'),
    Variant("caa-other-ca", lambda b: harness.set_records(
        b.zones, MAIL, "CAA", ['0 issue "pki.goog"', '0 issuewild ";"', '0 iodef "mailto:ann@example.org"']),
        [("caa", MAIL, E)], 'mail.example.org. 300 IN CAA 0 issue "letsencrypt.org"'),
    Variant("caa-missing", lambda b: harness.set_records(b.zones, MX2, "CAA", []),
            [("caa", MX2, E)], 'mx2.example.org. 300 IN CAA 0 issuewild ";"'),
    Variant("caa-unknown-extra-ca", lambda b: harness.add_records(
        b.zones, MAIL, "CAA", [*CLOUDFLARE_CAA, '0 issue "buypass.com"']),
        [("caa", MAIL, E)], 'and delete mail.example.org. IN CAA 0 issue "buypass.com"'),
    Variant("caa-one-missing-beside-cloudflare-additions", lambda b: harness.set_records(
        b.zones, MX2, "CAA", ['0 issue "letsencrypt.org"', *CLOUDFLARE_CAA]),
        [("caa", MX2, E)], 'mx2.example.org. 300 IN CAA 0 issuewild ";"'),
    Variant("srv-wrong-port", lambda b: harness.set_records(b.zones, "_submission._tcp.example.net", "SRV",
                                                            ["0 1 25 mail.example.org."]),
            [("srv", "_submission._tcp.example.net", E)],
            "_submission._tcp.example.net. 300 IN SRV 0 1 587 mail.example.org."),
    Variant("srv-plaintext-offered", lambda b: harness.set_records(b.zones, "_imap._tcp.example.org", "SRV",
                                                                   ["0 1 143 mail.example.org."]),
            [("srv", "_imap._tcp.example.org", E)], "_imap._tcp.example.org. 300 IN SRV 0 0 0 ."),
    Variant("smtp-banner-localhost", lambda b: setattr(b.stubs.service(MAIL, 25), "name", "localhost"),
            [("smtp-banner", SMTP_MAIL, E)], "myhostname = mail.example.org"),
    Variant("smtp-cert-expires-in-10-days", lambda b: _cert(b, MAIL, 25, [MAIL], days=10),
            [("tls:25", SMTP_MAIL, E)], "systemctl start orgmail-cert"),
    Variant("smtp-cert-expires-in-18-days", lambda b: _cert(b, MX2, 25, [MX2], days=18),
            [("tls:25", f"{MX2} (127.0.53.11:10025)", W)], "certbot renew"),
    Variant("smtp-cert-wrong-name", lambda b: _cert(b, MX2, 25, [MAIL]),
            [("tls:25", f"{MX2} (127.0.53.11:10025)", E)], "the certificate must name mx2.example.org"),
    Variant("smtps-self-signed", lambda b: _cert(b, MAIL, 465, [MAIL], self_signed=True),
            [("tls:465", f"{MAIL} (127.0.53.10:10465)", E)], "orgmail-cert"),
    Variant("submission-down", lambda b: b.stubs.stop(MAIL, 587),
            [("tls:587", f"{MAIL} (127.0.53.10:10587)", E)], "Postfix submission must listen on 587"),
    Variant("imaps-wrong-name", lambda b: _cert(b, MAIL, 993, ["imap.example.org"]),
            [("tls:993", f"{MAIL} (127.0.53.10:10993)", E)], "the certificate must name mail.example.org"),
    Variant("pop3s-down", lambda b: b.stubs.stop(MAIL, 995),
            [("tls:995", f"{MAIL} (127.0.53.10:10995)", E)], "Dovecot POP3S must listen on 995"),
    Variant("dnsbl-listed", lambda b: harness.add_records(b.zones, "10.53.0.127.zen.spamhaus.org", "A",
                                                          ["127.0.0.2"]),
            [("dnsbl", "127.0.53.10 on zen.spamhaus.org", E)], "request removal: https://check.spamhaus.org/"),
    Variant("dnsbl-public-resolver-refused",
            lambda b: harness.add_records(b.zones, "11.53.0.127.zen.spamhaus.org", "A", ["127.255.255.254"]),
            [("dnsbl", "127.0.53.11 on zen.spamhaus.org", W)], "resolver of your own"),
    Variant("dnsbl-resolver-answers-nxdomain-by-policy",
            lambda b: harness.set_records(b.zones, "2.0.0.127.zen.spamhaus.org", "A", []),
            [("dnsbl", "127.0.53.10 on zen.spamhaus.org", W), ("dnsbl", "127.0.53.11 on zen.spamhaus.org", W)],
            "resolver of your own (--nameserver)"),
    Variant("dnsbl-spamhaus-refuses-every-query", _dnsbl_spamhaus_refuses,
            [("dnsbl", "127.0.53.10 on zen.spamhaus.org", W), ("dnsbl", "127.0.53.11 on zen.spamhaus.org", W)],
            "resolver of your own"),
    Variant("dnsbl-answers-for-everything",
            lambda b: harness.add_records(b.zones, "1.0.0.127.b.barracudacentral.org", "A", ["127.0.0.2"]),
            [("dnsbl", "127.0.53.10 on b.barracudacentral.org", W),
             ("dnsbl", "127.0.53.11 on b.barracudacentral.org", W)], "resolver of your own"),
    Variant("dnsbl-query-refused", lambda b: setattr(b.opts, "dnsbls", (*b.opts.dnsbls, "dnsbl.unserved.test")),
            [("dnsbl", "127.0.53.10 on dnsbl.unserved.test", W), ("dnsbl", "127.0.53.11 on dnsbl.unserved.test", W)],
            "not a listing"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_each_broken_variant_fails_exactly_its_check(bed: Bed, variant: Variant) -> None:
    variant.breaks(bed)
    checks = bed.run()
    assert not_ok(checks) == sorted(variant.expect), "\n".join(
        f"{c.status} {c.check} {c.subject}: {c.found} | {c.fix}" for c in checks if c.status != verify.OK)
    first = next(c for c in checks if (c.check, c.subject, c.status) == variant.expect[0])
    assert variant.fix in first.fix, first.fix


def test_spf_failing_because_of_the_a_record_points_at_it(bed: Bed) -> None:
    harness.set_records(bed.zones, MAIL, "A", ["198.51.100.8"])
    checks = {(c.check, c.subject): c for c in bed.run()}
    assert checks[("spf", "example.org")].fix == ("the record is the stack's; the A/MX records it refers to do not "
                                                  "give 127.0.53.10: fix the failing a/mx checks")
    assert "forward-confirmed reverse DNS" in checks[("ptr", "127.0.53.10")].fix


def test_caa_records_cloudflare_adds_are_ok(bed: Bed) -> None:
    """Cloudflare answers our CAA records together with its own (hidden from its dashboard): still ok."""
    for host in (MAIL, MX2):
        harness.add_records(bed.zones, host, "CAA", CLOUDFLARE_CAA)
    checks = bed.run()
    assert not_ok(checks) == []
    caa = [c for c in checks if c.check == "caa"]
    assert len(caa) == 2
    for c in caa:
        assert "Cloudflare's own: " in c.found and '0 issue "sectigo.com"' in c.found, c.found
        assert c.found.startswith('0 iodef "mailto:') or c.found.startswith('0 issue "letsencrypt.org"'), c.found


def test_dnsbl_that_does_not_answer_here_says_so_and_is_never_ok(bed: Bed) -> None:
    harness.set_records(bed.zones, "2.0.0.127.zen.spamhaus.org", "A", [])
    checks = [c for c in bed.run() if c.check == "dnsbl"]
    zen = [c for c in checks if c.subject.endswith(" on zen.spamhaus.org")]
    assert [c.status for c in zen] == [verify.WARNING, verify.WARNING]
    for c in zen:
        assert c.found.startswith("this list does not answer here: its test entry 127.0.0.2 is not listed"), c.found
    others = [c for c in checks if c not in zen]
    assert {c.status for c in others} == {verify.OK}
    assert {c.found for c in others} == {"not listed (the list's test entry is)"}


def test_dnsbl_refusal_code_is_neither_listed_nor_ok(bed: Bed) -> None:
    _dnsbl_spamhaus_refuses(bed)
    zen = [c for c in bed.run() if c.check == "dnsbl" and c.subject.endswith(" on zen.spamhaus.org")]
    assert len(zen) == 2
    for c in zen:
        assert c.status == verify.WARNING and "LISTED" not in c.found and "refuses this resolver" in c.found, c


def test_mta_sts_opt_out_is_checked(bed: Bed) -> None:
    """mtaSts.mode: none publishes RFC 8461 8.3's opt-out: a "mode: none" policy, max_age one day, new id."""
    s = bed.expected.settings
    opted_out = dataclasses.replace(s, publishing=dataclasses.replace(s.publishing, mta_sts_mode="none"))
    policy = mta_sts_policy(opted_out)
    txt = f'"v=STSv1; id={mta_sts_id(policy)}"'
    records = [{**r, "content": txt} if r["name"].startswith("_mta-sts.") else r for r in bed.expected.records]
    bed.expected = dataclasses.replace(bed.expected, settings=opted_out, records=records)
    for domain in ("example.org", "example.net"):
        harness.set_records(bed.zones, f"_mta-sts.{domain}", "TXT", [txt])
    bed.stubs.web.http.update(body=policy)
    checks = bed.run()
    assert not_ok(checks) == []
    sts = [c for c in checks if c.check == "mta-sts-policy"]
    assert len(sts) == 2 and all(c.found.startswith("mode none, ") and c.found.endswith(", max_age 86400")
                                 for c in sts), sts
    assert sum(c.check == "mta-sts" for c in checks) == 2
    # the old (enforce) policy still served while the TXT already has the opt-out's id: an error
    bed.stubs.web.http.update(body=mta_sts_policy(s))
    assert not_ok(bed.run()) == [("mta-sts-policy", "mta-sts.example.net", E), ("mta-sts-policy", "mta-sts.example.org", E)]


def test_every_check_has_a_breaking_variant() -> None:
    broken = {check for v in VARIANTS for (check, _, status) in v.expect if status == verify.ERROR}
    assert broken == {"a", "ptr", "spf", "caa", "mx", "dkim", "dmarc", "dmarc-report", "mta-sts", "mta-sts-policy",
                      "tls-rpt", "srv", "dnsbl", "smtp-banner", "tls:25", "tls:465", "tls:587", "tls:993", "tls:995"}


# ---------------------------------------------------------------- the command line


def test_cli_json_all_ok_exit_0(bed: Bed, outputs_file: Path, ca: harness.TestCA) -> None:
    bed.knot.serve(bed.zones)
    args = [*harness.verify_args(Path("-"), ca.ca_file), "--json"]  # outputs on stdin, as piped from pulumi
    for z in harness.DNSBL_ZONES:
        args += ["--dnsbl", z]
    proc = subprocess.run([sys.executable, "-m", "tools.verify", *args], cwd=ROOT, capture_output=True, text=True,
                          input=outputs_file.read_text(), timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["stack"] == "verifytest" and doc["expected"] == "stack outputs"
    assert {c["status"] for c in doc["checks"]} == {"ok"}
    assert len(doc["checks"]) == 49


def test_cli_table_error_exit_1_and_no_fail(bed: Bed, outputs_file: Path, ca: harness.TestCA,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    harness.set_records(bed.zones, "_dmarc.example.org", "TXT", ['"v=DMARC1; p=none; rua=mailto:dmarc@example.org"'])
    bed.knot.serve(bed.zones)
    args = [*harness.verify_args(outputs_file, ca.ca_file), "--skip-host"]
    for z in harness.DNSBL_ZONES:
        args += ["--dnsbl", z]
    assert verify.main(args) == 1
    out = capsys.readouterr().out
    assert "error    dmarc" in out
    assert 'fix: publish exactly: _dmarc.example.org. 300 IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@example.org"' \
        in out
    assert "tls:25" not in out and "mta-sts-policy" not in out  # --skip-host: DNS only
    assert out.rstrip().endswith("1 error(s)")
    assert verify.main([*args, "--no-fail"]) == 0


def test_offline_plan_mode_compares_what_it_can(bed: Bed) -> None:
    """Without outputs, addresses and the DKIM key are unknown: those checks warn, nothing errs."""
    bed.knot.serve(bed.zones)
    exp = verify.load_expected(harness.STACK_FILE, None)
    opts = verify.Options(**{**bed.opts.__dict__, "skip_host": True})
    checks = verify.run_checks(exp, opts)
    assert not_ok(checks) == sorted([
        ("a", MAIL, W), ("a", MX2, W), ("ptr", MAIL, W), ("ptr", MX2, W),
        ("dkim", "orgmail._domainkey.example.org", W), ("dkim", "orgmail._domainkey.example.net", W)])
    assert any(c.check == "spf" and "passes 127.0.53.10, 127.0.53.11" in c.found for c in checks)
