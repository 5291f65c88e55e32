"""The verifier's SPF checks (pyspf plus our policy walk) on an in-memory DNS: no server needed."""

from __future__ import annotations

from typing import Any

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
    ("open.example", "TXT"): ["v=spf1 +all"],
    ("neutral.example", "TXT"): ["v=spf1 ?all"],
    ("v6.example", "TXT"): ["v=spf1 ip6:2001:db8::/32 ip6:2001:4860:4000::/36 -all"],
}


def lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
    out: list[tuple[tuple[str, str], Any]] = []
    for v in DNS.get((name, qtype), []):
        if qtype == "TXT":
            out.append(((name, qtype), (v.encode(),)))
        elif qtype == "MX":
            prio, host = v.split()
            out.append(((name, qtype), (int(prio), host)))
        else:
            out.append(((name, qtype), v))
    return out


@pytest.mark.parametrize(("ip", "domain", "result"), [
    ("203.0.113.10", "example.org", "pass"),
    ("203.0.113.11", "example.org", "pass"),
    ("203.0.113.12", "example.org", "fail"),
    ("192.0.2.7", "inc.example", "softfail"),
    ("203.0.113.11", "red.example", "pass"),
    ("192.0.2.1", "nothing.example", "none"),
    ("192.0.2.1", "twice.example", "permerror"),
    ("192.0.2.1", "void.example", "permerror"),
    # ip6 prefixes are applied (ours read /32 as an IPv4 length and matched /128; /36 raised)
    ("2001:db8:ffff::1", "v6.example", "pass"),
    ("2001:4860:4fff::1", "v6.example", "pass"),
    ("2001:4860:5000::1", "v6.example", "fail"),
])
def test_check_host(ip: str, domain: str, result: str) -> None:
    assert spf.check_host(ip, domain, lookup).result == result


def test_walk_counts_lookups_through_include_and_redirect() -> None:
    DNS[("chain.example", "TXT")] = ["v=spf1 include:inc.example include:red.example -all"]
    report = spf.walk("chain.example", DNS[("chain.example", "TXT")][0], lookup)
    assert (report.error, report.problems, report.lookups) == ("", [], 4)  # include, include, redirect, mx


def test_more_than_ten_lookups_is_a_permerror() -> None:
    record = "v=spf1 " + " ".join(f"a:h{i}.example" for i in range(11)) + " -all"
    for i in range(11):
        DNS[(f"h{i}.example", "A")] = ["192.0.2.99"]
    assert "Too many DNS lookups" in spf.walk("many.example", record, lookup).error


@pytest.mark.parametrize(("record", "problem"), [
    ("v=spf1 mx +all", "'+all' lets every address on the internet pass"),
    ("v=spf1 mx all", "'all' lets every address on the internet pass"),
    ("v=spf1 mx include:open.example -all", "'+all' in open.example's record lets every address"),
    ("v=spf1 mx ?all", "'?all': every other address gets neutral"),
    # redirect= replaces the record: its ?all is the domain's own
    ("v=spf1 mx redirect=neutral.example", "'?all' in neutral.example's record: every other address gets neutral"),
    ("v=spf1 mx", "ends with neither 'all' nor 'redirect='"),
    ("v=spf1 ip4:10.0.0.0/7 -all", "'ip4:10.0.0.0/7' authorises an IPv4 range wider than /8"),
    ("v=spf1 +ip4:0.0.0.0/0 -all", "'+ip4:0.0.0.0/0' authorises an IPv4 range wider than /8"),
    ("v=spf1 ip6:2001:db8::/31 -all", "'ip6:2001:db8::/31' authorises an IPv6 range wider than /32"),
    ("v=spf1 a/4 -all", "'a/4' authorises an IPv4 range wider than /8"),
    ("v=spf1 mx//16 -all", "'mx//16' authorises an IPv6 range wider than /32"),
])
def test_policy_problems(record: str, problem: str) -> None:
    report = spf.walk("example.org", record, lookup)
    assert report.error == ""
    assert any(problem in p for p in report.problems), report.problems


@pytest.mark.parametrize("record", [
    "v=spf1 mx -all", "v=spf1 mx ~all", "v=spf1 ip4:10.0.0.0/8 ip6:2001:db8::/32 -all",
    "v=spf1 -ip4:0.0.0.0/0 mx -all", "v=spf1 include:inc.example -all", "v=spf1 redirect=example.org",
    "v=spf1 include:neutral.example mx -all",  # ?all inside an include only means "no match here"
])
def test_no_policy_problem(record: str) -> None:
    report = spf.walk("example.org", record, lookup)
    assert (report.error, report.problems) == ("", [])


@pytest.mark.parametrize("record", [
    "v=spf1 ipv4:192.0.2.1 -all", "v=spf1 ip4:192.0.2.300 -all", "v=spf1 ip4:2001:db8::1 -all",
    "v=spf1 include -all", "v=spf1 all:foo", "v=spf1 redirect=a.example redirect=b.example",
    "v=spf1 a/33 -all", "v=spf1 ip6:2001:db8::/129 -all",
])
def test_syntax_errors_are_permerrors(record: str) -> None:
    assert spf.walk("example.org", record, lookup).error.startswith("permerror: ")
