"""SPF (RFC 7208) parsing and evaluation for the verifier: syntax, DNS-lookup count, check_host().

Macros (%{...}) are not expanded: a record using them is reported, not evaluated.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

# Mechanisms and modifiers that cost a DNS lookup (RFC 7208 4.6.4); the limit is 10 per evaluation.
LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")
MAX_LOOKUPS = 10
MAX_VOID_LOOKUPS = 2

_DOMAIN_SPEC = r"[A-Za-z0-9._%{}+=-]+"
_MECHANISM_RE = re.compile(
    rf"^(?P<q>[+?~-]?)(?P<name>all|include|a|mx|ptr|ip4|ip6|exists)"
    rf"(?::(?P<arg>{_DOMAIN_SPEC}|[0-9a-fA-F:.]+))?(?P<cidr>/\d+(?://\d+)?|//\d+)?$", re.IGNORECASE)
_MODIFIER_RE = re.compile(rf"^(?P<name>[A-Za-z][A-Za-z0-9._-]*)=(?P<arg>{_DOMAIN_SPEC}|)$")
_QUALIFIER_RESULT = {"+": "pass", "": "pass", "-": "fail", "~": "softfail", "?": "neutral"}


class SpfError(Exception):
    """A permanent error (RFC 7208 'permerror'): syntax, too many lookups, missing include target."""


@dataclass(frozen=True)
class Term:
    qualifier: str
    name: str  # lower-case mechanism or modifier name
    arg: str | None
    cidr4: int | None = None
    cidr6: int | None = None
    modifier: bool = False


@dataclass
class Evaluation:
    result: str  # pass | fail | softfail | neutral | none | permerror | temperror
    lookups: int = 0
    void_lookups: int = 0
    detail: str = ""
    trail: list[str] = field(default_factory=list)


def is_spf(text: str) -> bool:
    return text.lower() == "v=spf1" or text.lower().startswith("v=spf1 ")


def parse(record: str) -> list[Term]:
    """The record's terms; SpfError on any syntax error."""
    if not is_spf(record):
        raise SpfError(f"does not start with 'v=spf1': {record!r}")
    terms: list[Term] = []
    seen_modifiers: set[str] = set()
    for raw in record.split()[1:]:
        m = _MECHANISM_RE.match(raw)
        if m:
            name = m["name"].lower()
            arg = m["arg"]
            cidr4 = cidr6 = None
            if m["cidr"]:
                parts = m["cidr"].split("//")
                if parts[0]:
                    cidr4 = int(parts[0].lstrip("/"))
                if len(parts) > 1:
                    cidr6 = int(parts[1])
            if name == "all" and (arg or m["cidr"]):
                raise SpfError(f"'all' takes no argument: {raw!r}")
            if name in ("include", "exists") and not arg:
                raise SpfError(f"'{name}' needs a domain: {raw!r}")
            if name in ("ip4", "ip6"):
                if not arg:
                    raise SpfError(f"'{name}' needs an address: {raw!r}")
                try:
                    net = ipaddress.ip_network(arg + (m["cidr"] or ""), strict=False)
                except ValueError as e:
                    raise SpfError(f"bad {name} network {raw!r}: {e}") from e
                if (name == "ip4") != (net.version == 4):
                    raise SpfError(f"{name} with an IPv{net.version} address: {raw!r}")
            if (cidr4 is not None and cidr4 > 32) or (cidr6 is not None and cidr6 > 128):
                raise SpfError(f"CIDR length out of range: {raw!r}")
            terms.append(Term(m["q"], name, arg, cidr4, cidr6))
            continue
        m = _MODIFIER_RE.match(raw)
        if m:
            name = m["name"].lower()
            if name in ("redirect", "exp"):
                if name in seen_modifiers:
                    raise SpfError(f"'{name}' may appear only once")
                if not m["arg"]:
                    raise SpfError(f"'{name}' needs a domain: {raw!r}")
                seen_modifiers.add(name)
            terms.append(Term("", name, m["arg"], modifier=True))
            continue
        raise SpfError(f"unknown or malformed term {raw!r}")
    return terms


# A resolver callback: (name, rdtype) -> list of answers as text; [] for NXDOMAIN/no data.
Lookup = Callable[[str, str], list[str]]


def _in_any(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, addresses: list[str], term: Term) -> bool:
    for a in addresses:
        addr = ipaddress.ip_address(a)
        if addr.version != ip.version:
            continue
        prefix = (term.cidr4 if ip.version == 4 else term.cidr6)
        prefix = prefix if prefix is not None else (32 if ip.version == 4 else 128)
        if ip in ipaddress.ip_network(f"{addr}/{prefix}", strict=False):
            return True
    return False


def check_host(ip: str, domain: str, lookup: Lookup, spf_records: list[str] | None = None) -> Evaluation:
    """RFC 7208 check_host() for `ip` and `domain`, counting DNS lookups across includes/redirects.

    `spf_records` are the domain's SPF TXT strings if the caller already has them.
    """
    ev = Evaluation(result="none")
    address = ipaddress.ip_address(ip)
    try:
        ev.result = _evaluate(address, domain.rstrip("."), lookup, ev, spf_records, depth=0)
    except SpfError as e:
        ev.result, ev.detail = "permerror", str(e)
    return ev


def _count(ev: Evaluation, what: str) -> None:
    ev.lookups += 1
    ev.trail.append(what)
    if ev.lookups > MAX_LOOKUPS:
        raise SpfError(f"more than {MAX_LOOKUPS} DNS lookups ({', '.join(ev.trail)})")


def _void(ev: Evaluation, answers: list[str]) -> list[str]:
    if not answers:
        ev.void_lookups += 1
        if ev.void_lookups > MAX_VOID_LOOKUPS:
            raise SpfError(f"more than {MAX_VOID_LOOKUPS} lookups returned nothing (RFC 7208 4.6.4)")
    return answers


def _evaluate(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, domain: str, lookup: Lookup, ev: Evaluation,
              records: list[str] | None, depth: int) -> str:
    if depth > MAX_LOOKUPS:
        raise SpfError("include/redirect loop")
    if records is None:
        records = [t for t in lookup(domain, "TXT") if is_spf(t)]
    if not records:
        return "none"
    if len(records) > 1:
        raise SpfError(f"{domain} has {len(records)} SPF records")
    terms = parse(records[0])
    if any("%" in (t.arg or "") for t in terms):
        raise SpfError("macros are not evaluated by this verifier")
    redirect: str | None = None
    for t in terms:
        if t.modifier:
            if t.name == "redirect":
                redirect = t.arg
            continue
        target = (t.arg or domain).rstrip(".")
        matched = False
        if t.name == "all":
            matched = True
        elif t.name in ("ip4", "ip6"):
            assert t.arg is not None
            net = ipaddress.ip_network(t.arg + (f"/{t.cidr4}" if t.name == "ip4" and t.cidr4 is not None else
                                                 f"/{t.cidr6}" if t.name == "ip6" and t.cidr6 is not None else ""),
                                       strict=False)
            matched = ip.version == net.version and ip in net
        elif t.name == "a":
            _count(ev, f"a:{target}")
            matched = _in_any(ip, _void(ev, lookup(target, "A" if ip.version == 4 else "AAAA")), t)
        elif t.name == "mx":
            _count(ev, f"mx:{target}")
            hosts = _void(ev, [h.split()[-1].rstrip(".") for h in lookup(target, "MX")])
            if len(hosts) > 10:
                raise SpfError(f"mx:{target} has more than 10 MX hosts")
            matched = any(_in_any(ip, lookup(h, "A" if ip.version == 4 else "AAAA"), t) for h in hosts)
        elif t.name == "ptr":
            _count(ev, f"ptr:{target}")
            names = lookup(ipaddress.ip_address(ip).reverse_pointer, "PTR")
            matched = any((n.rstrip(".") == target or n.rstrip(".").endswith("." + target))
                          and str(ip) in lookup(n.rstrip("."), "A" if ip.version == 4 else "AAAA")
                          for n in names[:10])
        elif t.name == "exists":
            _count(ev, f"exists:{target}")
            matched = bool(_void(ev, lookup(target, "A")))
        elif t.name == "include":
            _count(ev, f"include:{target}")
            inner = _evaluate(ip, target, lookup, ev, None, depth + 1)
            if inner == "none":
                raise SpfError(f"include:{target} has no SPF record")
            if inner in ("permerror", "temperror"):
                return inner
            matched = inner == "pass"
        if matched:
            return _QUALIFIER_RESULT[t.qualifier]
    if redirect:
        _count(ev, f"redirect={redirect}")
        inner = _evaluate(ip, redirect.rstrip("."), lookup, ev, None, depth + 1)
        if inner == "none":
            raise SpfError(f"redirect={redirect} has no SPF record")
        return inner
    return "neutral"


def count_lookups(record: str, lookup: Lookup, depth: int = 0) -> int:
    """Worst-case DNS-lookup terms in the record, following include/redirect (for reporting)."""
    if depth > MAX_LOOKUPS:
        raise SpfError("include/redirect loop")
    total = 0
    for t in parse(record):
        if t.name in LOOKUP_TERMS:
            total += 1
            if t.name in ("include", "redirect") and t.arg and "%" not in t.arg:
                inner = [r for r in lookup(t.arg.rstrip("."), "TXT") if is_spf(r)]
                if len(inner) == 1:
                    total += count_lookups(inner[0], lookup, depth + 1)
    return total
