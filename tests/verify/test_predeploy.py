"""tools.verify --pre-deploy against Knot: zones as a migrating organisation has them before the first
`pulumi up`, with its old provider's records that would clash with the stack's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.verify import harness
from tests.verify.conftest import Bed
from tools import verify
from tools.verify_predeploy import pre_deploy_checks

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("example.org", "example.net")


def before_deploy(bed: Bed) -> None:
    """The stack's zones as they are before its first deploy: nothing of ours in them."""
    for zone in DOMAINS:
        bed.zones[zone] = []


def run_pre_deploy(bed: Bed) -> list[verify.Check]:
    bed.knot.serve(bed.zones)
    return pre_deploy_checks(bed.expected, verify.Resolver(harness.DNS_ADDR, 3.0))


def test_empty_zones_need_no_change(bed: Bed) -> None:
    before_deploy(bed)
    checks = run_pre_deploy(bed)
    assert [c for c in checks if c.status != verify.OK] == []
    assert {c.check for c in checks} == {f"pre-deploy:{k}" for k in (
        "spf", "dmarc", "mx", "mta-sts", "tls-rpt", "dkim", "caa", "name")}
    spf = {c.subject for c in checks if c.check == "pre-deploy:spf"}
    assert spf == {"example.org", "example.net", "mail.example.org", "mx2.example.org"}


# (name, type, existing rdata, the check that must fail, words its fix must contain)
CLASHES = [
    ("example.org", "TXT", '"v=spf1 include:_spf.google.com ~all"', "pre-deploy:spf",
     'delete `example.org. IN TXT "v=spf1 include:_spf.google.com ~all"`; it also authorises '
     "include:_spf.google.com"),
    ("mail.example.org", "TXT", '"v=spf1 a -all"', "pre-deploy:spf",
     'delete `mail.example.org. IN TXT "v=spf1 a -all"`'),
    ("_dmarc.example.net", "TXT", '"v=DMARC1; p=none; rua=mailto:old@example.net"', "pre-deploy:dmarc",
     'delete `_dmarc.example.net. IN TXT "v=DMARC1; p=none; rua=mailto:old@example.net"`'),
    ("example.net", "MX", "10 aspmx.l.google.com.", "pre-deploy:mx",
     "delete `example.net. IN MX 10 aspmx.l.google.com.`; delete them at the cut-over"),
    ("_mta-sts.example.org", "TXT", '"v=STSv1; id=2024old"', "pre-deploy:mta-sts",
     'delete `_mta-sts.example.org. IN TXT "v=STSv1; id=2024old"`'),
    ("mta-sts.example.org", "CNAME", "policy.old-provider.example.", "pre-deploy:name",
     "delete `mta-sts.example.org. IN CNAME policy.old-provider.example.`"),
    ("_smtp._tls.example.org", "TXT", '"v=TLSRPTv1; rua=mailto:tls@old-provider.example"', "pre-deploy:tls-rpt",
     'delete `_smtp._tls.example.org. IN TXT "v=TLSRPTv1; rua=mailto:tls@old-provider.example"`'),
    ("orgmail._domainkey.example.org", "TXT", '"v=DKIM1; k=rsa; p=MIIBIjANBg"', "pre-deploy:dkim",
     "or choose another orgmail:dkimSelector"),
    ("mail.example.org", "CAA", '0 issue "digicert.com"', "pre-deploy:caa",
     'delete `mail.example.org. IN CAA 0 issue "digicert.com"`'),
    ("mx2.example.org", "A", "192.0.2.99", "pre-deploy:name", "delete `mx2.example.org. IN A 192.0.2.99`"),
]


@pytest.mark.parametrize(("name", "type_", "rdata", "check", "words"), CLASHES,
                         ids=[f"{n} {t}" for n, t, *_ in CLASHES])
def test_each_clashing_record_is_named_with_the_change(bed: Bed, name: str, type_: str, rdata: str, check: str,
                                                       words: str) -> None:
    before_deploy(bed)
    harness.add_records(bed.zones, name, type_, [rdata])
    bad = [c for c in run_pre_deploy(bed) if c.status != verify.OK]
    assert [(c.check, c.subject, c.status) for c in bad] == [(check, name, verify.ERROR)], bad
    assert words in bad[0].fix, bad[0].fix


def test_the_fix_shows_the_record_the_stack_will_publish(bed: Bed) -> None:
    before_deploy(bed)
    harness.add_records(bed.zones, "_dmarc.example.org", "TXT", ['"v=DMARC1; p=none"'])
    [bad] = [c for c in run_pre_deploy(bed) if c.status != verify.OK]
    assert 'the stack publishes _dmarc.example.org. 300 IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@example.org"' \
        in bad.fix


def test_cloudflares_own_caa_records_are_no_clash(bed: Bed) -> None:
    before_deploy(bed)
    harness.add_records(bed.zones, "mail.example.org", "CAA", sorted(verify.CLOUDFLARE_CAA))
    assert [c for c in run_pre_deploy(bed) if c.status != verify.OK] == []


def test_command_line_pre_deploy_exits_non_zero_with_the_fix(bed: Bed) -> None:
    before_deploy(bed)
    harness.add_records(bed.zones, "example.org", "TXT", ['"v=spf1 include:mailgun.org -all"'])
    bed.knot.serve(bed.zones)
    proc = subprocess.run([sys.executable, "-m", "tools.verify", str(harness.STACK_FILE), "--pre-deploy",
                           "--nameserver", f"{harness.DNS_ADDR[0]}:{harness.DNS_ADDR[1]}", "--timeout", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pre-deploy" in proc.stdout and "error    pre-deploy:spf" in proc.stdout
    assert 'fix: delete `example.org. IN TXT "v=spf1 include:mailgun.org -all"`' in proc.stdout
