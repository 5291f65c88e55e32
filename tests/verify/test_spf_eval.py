"""The verifier's SPF parser and evaluator (RFC 7208) on an in-memory DNS: no server needed."""

from __future__ import annotations

import pytest

from tools import verify_spf as spf

DNS: dict[tuple[str, str], list[str]] = {
    ("example.org", "TXT"): ["v=spf1 mx -all", "google-site-verification=abc"],
    ("example.org", "MX"): ["10 mail.example.org.", "20 mx2.example.org."],
    ("mail.example.org", "A"): ["203.0.113.10"],
    ("mx2.example.org", "A"): ["203.0.113.11"],
    ("inc.example", "TXT"): ["v=spf1 ip4:198.51.100.0/24 ~all"],
    ("red.example", "TXT"): ["v=spf1 redirect=example.org"],
    ("void.example", "TXT"): ["v=spf1 a:n1.example a:n2.example a:n3.example -all"],
    ("twice.example", "TXT"): ["v=spf1 -all", "v=spf1 +all"],
}


def lookup(name: str, rdtype: str) -> list[str]:
    return DNS.get((name, rdtype), [])


@pytest.mark.parametrize(("ip", "domain", "result"), [
    ("203.0.113.10", "example.org", "pass"),
    ("203.0.113.11", "example.org", "pass"),
    ("203.0.113.12", "example.org", "fail"),
    ("192.0.2.7", "inc.example", "softfail"),
    ("203.0.113.11", "red.example", "pass"),
    ("192.0.2.1", "nothing.example", "none"),
    ("192.0.2.1", "twice.example", "permerror"),
    ("192.0.2.1", "void.example", "permerror"),
])
def test_check_host(ip: str, domain: str, result: str) -> None:
    assert spf.check_host(ip, domain, lookup).result == result


def test_include_and_redirect_count_lookups() -> None:
    DNS[("chain.example", "TXT")] = ["v=spf1 include:inc.example include:red.example -all"]
    ev = spf.check_host("203.0.113.10", "chain.example", lookup)
    assert (ev.result, ev.lookups) == ("pass", 4)  # include, include, redirect, mx
    assert spf.count_lookups("v=spf1 include:inc.example include:red.example -all", lookup) == 4


def test_more_than_ten_lookups_is_a_permerror() -> None:
    record = "v=spf1 " + " ".join(f"a:h{i}.example" for i in range(11)) + " -all"
    assert spf.count_lookups(record, lookup) == 11
    DNS[("many.example", "TXT")] = ["v=spf1 " + " ".join(f"exists:h{i}.example" for i in range(11)) + " -all"]
    for i in range(11):
        DNS[(f"h{i}.example", "A")] = ["127.0.0.2"] if i == 10 else []
    assert spf.check_host("192.0.2.1", "many.example", lookup).result == "permerror"


@pytest.mark.parametrize("record", [
    "v=spf1 ipv4:192.0.2.1 -all", "v=spf1 ip4:192.0.2.300 -all", "v=spf1 ip4:2001:db8::1 -all",
    "v=spf1 include -all", "v=spf1 all:foo", "v=spf1 redirect=a.example redirect=b.example", "v=spf10 -all",
    "v=spf1 a/33 -all",
])
def test_syntax_errors(record: str) -> None:
    with pytest.raises(spf.SpfError):
        spf.parse(record)


def test_valid_terms_parse() -> None:
    terms = spf.parse("v=spf1 +a -mx:example.org/24 ~ip4:192.0.2.0/24 ?ip6:2001:db8::/32 exists:x.example "
                      "include:y.example ptr a//64 exp=explain.example -all")
    assert [t.name for t in terms] == ["a", "mx", "ip4", "ip6", "exists", "include", "ptr", "a", "exp", "all"]
