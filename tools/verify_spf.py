"""SPF (RFC 7208) for the verifier: pyspf evaluates, this module adds the policy checks pyspf does not make.

Evaluation is pyspf's (PyPI `pyspf`, Debian `python3-spf`, a maintained RFC 7208 implementation):
record syntax, check_host() with include/redirect/exists/ptr/a/mx, macros, the 10-lookup and
2-void-lookup limits, one record per name. Its DNS goes through the verifier's dnspython resolver.

pyspf judges whether a record is valid, not whether it protects anything. What we add, walking
the record and everything it includes with pyspf's own parser and evaluator:
- `+all` anywhere in the chain (an include that ends `+all` lets every address pass too);
- `?all` at the top, or reached through `redirect=`, and a record that ends with neither `all`
  nor `redirect=`: every other address gets neutral, which receivers treat like no SPF at all;
- `pass` ranges wider than /8 (IPv4) or /32 (IPv6), in ip4/ip6 and in the CIDR of a/mx.
No parser of our own is kept: the walk reads the terms as pyspf parses them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.rdatatype
import dns.resolver
import spf as pyspf  # type: ignore[import-untyped]

MAX_LOOKUPS = pyspf.MAX_LOOKUP  # RFC 7208 4.6.4
WIDEST_IP4, WIDEST_IP6 = 8, 32  # a pass range wider than these is an error
# The walk evaluates for an address no SPF record should name (TEST-NET-1, RFC 5737), and lets no
# ip4/ip6/a/mx term match, so it visits every term an evaluation could reach.
WALK_ADDRESS = "192.0.2.1"

# pyspf looks names up through one module-level function; swap it for the duration of one query.
_dns_lock = threading.Lock()
PyspfLookup = Callable[[str, str, Any, float], list[tuple[tuple[str, str], Any]]]


def is_spf(text: str) -> bool:
    return text.lower() == "v=spf1" or text.lower().startswith("v=spf1 ")


def through(resolver: dns.resolver.Resolver) -> PyspfLookup:
    """pyspf's DNSLookup interface on a given dnspython resolver (pyspf's own uses the system one
    through dnspython's deprecated `query`)."""

    def lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
        try:
            ans = resolver.resolve(name, qtype, raise_on_no_answer=False, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise pyspf.TempError(f"DNS {e}") from e
        except dns.exception.DNSException as e:
            raise pyspf.TempError(f"DNS {e}") from e
        out: list[tuple[tuple[str, str], Any]] = []
        for r in ans.rrset or []:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF") and r.rdtype == dns.rdatatype.from_text(qtype):
                out.append(((name, qtype), r.strings))
        return out

    return lookup


@contextlib.contextmanager
def using(lookup: PyspfLookup) -> Iterator[None]:
    with _dns_lock:
        saved = pyspf.DNSLookup
        pyspf.DNSLookup = lookup
        try:
            yield
        finally:
            pyspf.DNSLookup = saved


@dataclass
class Evaluation:
    result: str  # pass | fail | softfail | neutral | none | permerror | temperror
    detail: str = ""  # pyspf's reason for permerror/temperror
    lookups: int = 0


def check_host(ip: str, domain: str, lookup: PyspfLookup) -> Evaluation:
    """RFC 7208 check_host() for mail from postmaster@`domain` sent by `ip` (pyspf)."""
    q = pyspf.query(i=ip, s=f"postmaster@{domain}", h=domain)
    with using(lookup):
        result, _code, explanation = q.check()
    return Evaluation(result, explanation if result in ("permerror", "temperror") else "", q.lookups)


class _Walk(pyspf.query):
    """pyspf's evaluation, with no address ever matching, noting what it parses on the way."""

    def __init__(self, domain: str) -> None:
        super().__init__(i=WALK_ADDRESS, s=f"postmaster@{domain}", h=domain)
        self.top = domain
        self.depth = 0  # include depth of the record being parsed (redirect= does not deepen it)
        self.problems: list[str] = []
        self.top_has_all = False

    def check1(self, spf: str, domain: str, recursion: int) -> Any:
        self.depth = recursion
        return super().check1(spf, domain, recursion)

    def validate_mechanism(self, mech: str) -> Any:
        parsed = super().validate_mechanism(mech)
        _, name, _, _, result = parsed
        where = f"{mech!r}" + (f" in {self.d}'s record" if self.d != self.top else "")
        if name == "all":
            if self.depth == 0:
                self.top_has_all = True
            if result == "pass":
                self.problems.append(f"{where} lets every address on the internet pass")
            elif result == "neutral" and self.depth == 0:
                self.problems.append(f"{where}: every other address gets neutral, as if there were no SPF "
                                     "(end with -all or ~all)")
        elif result == "pass" and name in ("ip4", "ip6", "a", "mx"):
            _, _, cidr, cidr6 = pyspf.parse_mechanism(mech.lstrip("+"), self.d)
            widest4 = cidr if name in ("ip4", "a", "mx") else None
            widest6 = cidr if name == "ip6" else (cidr6 if name in ("a", "mx") else None)
            if widest4 is not None and widest4 < WIDEST_IP4:
                self.problems.append(f"{where} authorises an IPv4 range wider than /{WIDEST_IP4}")
            if widest6 is not None and widest6 < WIDEST_IP6:
                self.problems.append(f"{where} authorises an IPv6 range wider than /{WIDEST_IP6}")
        return parsed

    def cidrmatch(self, ipaddrs: Any, n: int) -> bool:
        return False


@dataclass
class Report:
    """The whole record chain of a name, judged: `error` is pyspf's permerror/temperror, if any."""

    lookups: int
    error: str = ""
    problems: list[str] = field(default_factory=list)


def walk(domain: str, record: str, lookup: PyspfLookup) -> Report:
    """Evaluate `record` (the SPF record of `domain`) through every include and redirect, counting
    DNS-lookup terms the way an evaluation that reaches the end does, and note policy problems."""
    q = _Walk(domain)
    with using(lookup):
        result, _code, explanation = q.check(spf=record)
    report = Report(lookups=q.lookups, problems=list(q.problems))
    if result in ("permerror", "temperror"):
        report.error = f"{result}: {explanation}"
    elif not q.top_has_all and "redirect=" not in record.lower():
        report.problems.append("ends with neither 'all' nor 'redirect=': every other address gets neutral, as if "
                               "there were no SPF (end with -all or ~all)")
    return report
