"""Verify that a stack's mail domain is live: DNS records, reverse DNS, certificates, DNSBLs.

    python -m tools.verify Pulumi.prod.yaml --outputs outputs.json     # a deployed stack
    python -m tools.verify Pulumi.dev.yaml                               # the offline plan's records

`outputs.json` is `pulumi stack output --json` (or `-` to read it from standard input); without it
the expected records come from the offline plan, whose Elastic IPs and DKIM key are placeholders
(those checks then compare what they can and warn). Prints one line per check (ok / warning /
error), what was found and the exact fix; exits 1 if any check is an error (0 with --no-fail).
See docs/verify.md.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from components.dns_records import MTA_STS_OPT_OUT_MAX_AGE, dkim_public_key_b64, mta_sts_policy, worker_name
from components.settings import ConfigError, Settings, load_settings, raw_from_pulumi_config
from tools import verify_spf as spf
from tools.stackfile import StackFileError, load_stack_config, project_name, stack_name
from tools.verify_net import TlsResult, https_get, implicit_tls, smtp_starttls, tls_context

OK, WARNING, ERROR = "ok", "warning", "error"
CERT_ERROR_DAYS = 14  # a certificate this close to expiry is an error (certbot renews at 30 days left)
CERT_WARNING_DAYS = 21
MTA_STS_PATH = "/.well-known/mta-sts.txt"
MTA_STS_MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2
DNSBLS: dict[str, str] = {
    "zen.spamhaus.org": "https://check.spamhaus.org/",
    "bl.spamcop.net": "https://www.spamcop.net/bl.shtml",
    "b.barracudacentral.org": "https://www.barracudacentral.org/rbl/removal-request",
}
# Spamhaus answers these instead of a listing when it refuses the query (public/open resolver,
# unregistered high volume, typing error): https://www.spamhaus.org/faq/section/DNSBL%20Usage
DNSBL_REFUSED = ipaddress.ip_network("127.255.255.0/24")
# The CAA records Cloudflare adds by itself, hidden from the dashboard, when a zone with Universal SSL or
# advanced certificates has any CAA record, so that its own CAs may still issue for the zone's names:
# https://developers.cloudflare.com/ssl/edge-certificates/caa-records/#caa-records-added-by-cloudflare
# (Google Trust Services, Let's Encrypt, SSL.com, Sectigo) and, for DigiCert (being retired as a
# Cloudflare CA), https://developers.cloudflare.com/ssl/reference/certificate-authorities/#caa-records
CLOUDFLARE_CAA_ISSUERS = ("pki.goog; cansignhttpexchanges=yes", "letsencrypt.org", "ssl.com", "sectigo.com",
                          "digicert.com; cansignhttpexchanges=yes")
CLOUDFLARE_CAA = frozenset(f'0 {tag} "{issuer}"' for issuer in CLOUDFLARE_CAA_ISSUERS
                           for tag in ("issue", "issuewild"))
# What each client port must greet with, and how TLS starts there.
CLIENT_PORTS: tuple[tuple[int, str, str], ...] = (
    (465, "implicit", "220"), (587, "starttls", "220"), (993, "implicit", "* OK"), (995, "implicit", "+OK"))
PORT_SERVICE = {25: "Postfix postscreen/smtpd", 465: "Postfix submissions", 587: "Postfix submission",
                993: "Dovecot IMAPS", 995: "Dovecot POP3S"}


@dataclass
class Check:
    check: str  # what is checked, e.g. "mx", "tls:465"
    subject: str  # the name or address checked
    status: str  # ok | warning | error
    found: str
    fix: str = ""


@dataclass
class Expected:
    """What the stack publishes: from `pulumi stack output --json`, or from the offline plan."""

    settings: Settings
    records: list[dict[str, Any]]  # {type, name, content, priority, ttl}
    host_ips: dict[str, str | None]  # None: not known (offline plan placeholder)
    dkim_key_b64: str | None  # None: not known (offline plan)
    source: str
    retiring_keys_b64: dict[str, str] = field(default_factory=dict)  # orgmail:dkimRetiring selector -> key

    def of(self, name: str, type_: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["name"] == name and r["type"] == type_]


@dataclass
class Options:
    nameserver: tuple[str, int] | None = None
    host_addresses: dict[str, str] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)  # service port -> port actually probed
    https_port: int = 443
    ca_file: str | None = None
    skip_host: bool = False
    dnsbls: tuple[str, ...] = tuple(DNSBLS)
    timeout: float = 5.0
    # outbound.relay ses: a botocore sesv2 client to ask about the account (tests stub one); None makes one with
    # boto3 from the environment's credentials, if boto3 and credentials are there.
    ses_client: Any = None


# ---------------------------------------------------------------- DNS answers


@dataclass
class Answer:
    status: str  # ok | nxdomain | nodata | refused | timeout
    values: list[str]
    detail: str = ""


class Resolver:
    def __init__(self, nameserver: tuple[str, int] | None, timeout: float) -> None:
        if nameserver:
            self._r = dns.resolver.Resolver(configure=False)
            self._r.nameservers = [nameserver[0]]
            self._r.port = nameserver[1]
        else:
            self._r = dns.resolver.Resolver()
        self._r.lifetime = timeout
        self._r.timeout = min(timeout, 2.0)
        self._r.cache = None

    def query(self, name: str, rdtype: str) -> Answer:
        try:
            ans = self._r.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return Answer("nxdomain", [])
        except dns.resolver.NoNameservers as e:
            return Answer("refused", [], str(e))
        except dns.exception.Timeout as e:
            return Answer("timeout", [], str(e))
        except dns.exception.DNSException as e:
            return Answer("refused", [], str(e))
        if ans.rrset is None:
            return Answer("nodata", [])
        return Answer("ok", [_rdata_text(r) for r in ans.rrset])

    def values(self, name: str, rdtype: str) -> list[str]:
        return self.query(name, rdtype).values

    @property
    def dns(self) -> dns.resolver.Resolver:
        return self._r


def _rdata_text(r: Any) -> str:
    if r.rdtype == dns.rdatatype.TXT:
        return b"".join(r.strings).decode("utf-8", "replace")
    return str(r.to_text())


def _canonical(type_: str, content: str) -> str:
    """Record content in the presentation form dnspython prints (to compare with answers)."""
    rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(type_), content, origin=dns.name.root,
                             relativize=False)
    return _rdata_text(rd)


def _unquote(content: str) -> str:
    return "".join(re.findall(r'"([^"]*)"', content))


def zone_line(record: dict[str, Any]) -> str:
    """A record in BIND zone-file syntax (as tools.zonefile writes it)."""
    rdata = (f"{record['priority']} {record['content'].rstrip('.')}." if record["type"] == "MX"
             else str(record["content"]))
    return f"{record['name'].rstrip('.')}. {int(record['ttl'])} IN {record['type']} {rdata}"


def _fix_records(records: list[dict[str, Any]], intro: str = "publish") -> str:
    return f"{intro}: " + " | ".join(zone_line(r) for r in records) if records else ""


# ---------------------------------------------------------------- checks: names


def check_a(exp: Expected, res: Resolver, host: str, ip: str | None) -> Check:
    ans = res.query(host, "A")
    found = ", ".join(ans.values) or ans.status
    want = exp.of(host, "A")
    if ip is None:
        status = WARNING if len(ans.values) == 1 else ERROR
        return Check("a", host, status, f"{found} (expected address unknown: offline plan; pass --outputs)",
                     "" if status == WARNING else "publish the host's Elastic IP: "
                     f"{host}. {exp.settings.dns_ttl} IN A <pulumi stack output hostIps>")
    if set(ans.values) == {ip}:
        return Check("a", host, OK, found)
    rec = want[0] if want else {"type": "A", "name": host, "content": ip, "ttl": exp.settings.dns_ttl}
    extra = sorted(set(ans.values) - {ip})
    fix = _fix_records([{**rec, "content": ip}], "publish exactly")
    if extra:
        fix += " and delete " + ", ".join(f"{host}. IN A {x}" for x in extra)
    return Check("a", host, ERROR, f"{found}; expected {ip}", fix)


def check_ptr(res: Resolver, host: str, ip: str | None) -> Check:
    if ip is None:
        return Check("ptr", host, WARNING, "address unknown (offline plan; pass --outputs)")
    rev = dns.reversename.from_address(ip).to_text()
    ans = res.query(rev, "PTR")
    names = [v.rstrip(".").lower() for v in ans.values]
    found = f"{rev} -> {', '.join(names) or ans.status}"
    fix_ptr = (f"set the Elastic IP's reverse DNS to {host} (`pulumi up` does it with aws:ec2/eipDomainName once "
               f"the A record resolves; by hand: aws ec2 modify-address-attribute --allocation-id <eipalloc-…> "
               f"--domain-name {host}); zone form: {rev} IN PTR {host}.")
    if names != [host.lower()]:
        return Check("ptr", ip, ERROR, f"{found}; expected exactly {host}", fix_ptr)
    forward = res.values(host, "A")
    if ip not in forward:
        return Check("ptr", ip, ERROR, f"{found}, but {host} resolves to {', '.join(forward) or 'nothing'}",
                     f"publish {host}. IN A {ip} (forward-confirmed reverse DNS needs both directions)")
    return Check("ptr", ip, OK, f"{found} -> {ip}")


def check_mx(exp: Expected, res: Resolver, domain: str) -> Check:
    want = exp.of(domain, "MX")
    expected = {(int(r["priority"]), r["content"].rstrip(".").lower()) for r in want}
    ans = res.query(domain, "MX")
    found = set()
    for v in ans.values:
        prio, host = v.split()
        found.add((int(prio), host.rstrip(".").lower()))
    text = ", ".join(f"{p} {h}" for p, h in sorted(found)) or ans.status
    if found == expected:
        return Check("mx", domain, OK, text)
    fix = _fix_records(want, "publish exactly")
    stale = sorted(found - expected)
    if stale:
        fix += " and delete " + ", ".join(f"{domain}. IN MX {p} {h}." for p, h in stale)
    return Check("mx", domain, ERROR, f"{text}; expected {', '.join(f'{p} {h}' for p, h in sorted(expected))}", fix)


def check_spf(exp: Expected, res: Resolver, name: str, ips: list[str]) -> Check:
    want = exp.of(name, "TXT")
    want_spf = [r for r in want if spf.is_spf(_unquote(r["content"]))]
    fix = _fix_records(want_spf, "publish exactly one SPF record")
    ans = res.query(name, "TXT")
    records = [v for v in ans.values if spf.is_spf(v)]
    if not records:
        return Check("spf", name, ERROR, f"no SPF record ({ans.status})", fix)
    if len(records) > 1:
        return Check("spf", name, ERROR, f"{len(records)} SPF records: " + " | ".join(records),
                     fix + " and delete the others (more than one is a permerror)")
    record = records[0]
    lookup = spf.through(res.dns)
    report = spf.walk(name, record, lookup)
    if report.error:
        return Check("spf", name, ERROR, f"{record!r}: {report.error}", fix)
    if report.problems:
        return Check("spf", name, ERROR, f"{record!r}: " + "; ".join(report.problems), fix)
    for ip in ips:
        ev = spf.check_host(ip, name, lookup)
        if ev.result != "pass":
            why = f": {ev.detail}" if ev.detail else ""
            if want_spf and _unquote(want_spf[0]["content"]) == record and not ev.detail:
                # The record is the stack's: what its a/mx terms resolve to is wrong, not the record.
                fix = (f"the record is the stack's; the A/MX records it refers to do not give {ip}: "
                       "fix the failing a/mx checks")
            return Check("spf", name, ERROR, f"{record!r} gives {ev.result} for {ip}{why}", fix)
    found = f"{record!r}, {report.lookups} lookup(s), passes {', '.join(ips) or '(no known host address)'}"
    if want_spf and _unquote(want_spf[0]["content"]) != record:
        return Check("spf", name, WARNING, found + "; differs from the stack's record", fix)
    return Check("spf", name, OK, found)


def _tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        if part.strip():
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"malformed tag {part.strip()!r}")
            tags[key.strip().lower()] = value.strip()
    return tags


def check_dkim(exp: Expected, res: Resolver, domain: str, selector: str | None = None,
               today: datetime.date | None = None) -> Check:
    """The signing selector's key (default), or a retiring selector's (orgmail:dkimRetiring): published,
    equal to the key Pulumi made, and for a retiring one, whether its date has passed."""
    selector = selector or exp.settings.dkim_selector
    until = exp.settings.dkim_retiring.get(selector)
    check, expected = ("dkim", exp.dkim_key_b64) if until is None else (
        "dkim-retiring", exp.retiring_keys_b64.get(selector))
    name = f"{selector}._domainkey.{domain}"
    want = exp.of(name, "TXT")
    fix = _fix_records(want, "publish") if expected else (
        "publish the key Pulumi made: `python -m tools.zonefile` with outputs, or `pulumi up`")
    ans = res.query(name, "TXT")
    records = [v for v in ans.values if v.startswith("v=DKIM1") or "p=" in v]
    if len(records) != 1:
        return Check(check, name, ERROR, f"{len(records)} DKIM records ({ans.status})", fix)
    try:
        tags = _tags(records[0])
        key = tags.get("p", "").replace(" ", "")
        if not key:
            raise ValueError("empty p= (revoked key)")
        if tags.get("k", "rsa") != "rsa":
            raise ValueError(f"k={tags['k']}, the host signs with RSA")
        public = serialization.load_der_public_key(base64.b64decode(key, validate=True))
        if not isinstance(public, rsa.RSAPublicKey):
            raise ValueError("p= is not an RSA key")
        bits = public.key_size
    except (ValueError, TypeError) as e:
        return Check(check, name, ERROR, f"invalid DKIM record: {e}", fix)
    state = "the host signs with it" if until is None else f"retiring: not signed with, published until {until}"
    if until is not None and (today or datetime.date.today()) > datetime.date.fromisoformat(until):
        return Check(check, name, WARNING, f"RSA {bits}-bit key, retiring, its date {until} has passed",
                     f"remove {selector} from orgmail:dkimRetiring and `pulumi up` (its key and records go)")
    if expected is None:
        return Check(check, name, WARNING, f"RSA {bits}-bit key ({state}); not compared (offline plan: pass --outputs)")
    if key != expected:
        return Check(check, name, ERROR, f"RSA {bits}-bit key, not the key Pulumi made (signatures with that "
                     "one fail)", fix)
    return Check(check, name, OK, f"RSA {bits}-bit key, equals the stack's key ({state})")


def _one_versioned_txt(exp: Expected, res: Resolver, name: str, version: str, check: str,
                       label: str, ignore_case: bool = False) -> tuple[str, str, Check | None]:
    """The one TXT record at `name` starting with `version`, the fix text that publishes the stack's
    record, and an error Check when there is not exactly one."""
    fix = _fix_records(exp.of(name, "TXT"), "publish exactly")
    ans = res.query(name, "TXT")
    records = [v for v in ans.values
               if (v.lower().startswith(version.lower()) if ignore_case else v.startswith(version))]
    if len(records) != 1:
        return "", fix, Check(check, name, ERROR, f"{len(records)} {label} records ({ans.status})"
                              + (": " + " | ".join(records) if records else ""), fix)
    return records[0], fix, None


def check_dmarc(exp: Expected, res: Resolver, domain: str) -> Check:
    name = f"_dmarc.{domain}"
    record, fix, error = _one_versioned_txt(exp, res, name, "v=DMARC1", "dmarc", "DMARC", ignore_case=True)
    if error:
        return error
    d = exp.settings.dmarc
    try:
        tags = _tags(record)
        keys = list(tags)
        if keys[:2] != ["v", "p"] or tags["v"] != "DMARC1":
            raise ValueError("must start with v=DMARC1; p=")
        for tag, allowed in (("p", ("none", "quarantine", "reject")), ("sp", ("none", "quarantine", "reject"))):
            if tag in tags and tags[tag] not in allowed:
                raise ValueError(f"{tag}={tags[tag]} is not one of {', '.join(allowed)}")
        if "pct" in tags and not (tags["pct"].isdigit() and 0 <= int(tags["pct"]) <= 100):
            raise ValueError(f"pct={tags['pct']} is not 0-100")
    except (ValueError, KeyError) as e:
        return Check("dmarc", name, ERROR, f"{record!r}: {e}", fix)
    problems = []
    if tags["p"] != d.policy:
        problems.append(f"p={tags['p']}, configured {d.policy}")
    if tags.get("sp", tags["p"]) != d.subdomain_policy:
        problems.append(f"sp={tags.get('sp', '(= p)')}, configured {d.subdomain_policy}")
    if int(tags.get("pct", "100")) != d.percent:
        problems.append(f"pct={tags.get('pct', '100')}, configured {d.percent}")
    rua = [u.strip().lower() for u in tags.get("rua", "").split(",") if u.strip()]
    if f"mailto:{d.report_address}".lower() not in rua:
        problems.append(f"rua={tags.get('rua', '(none)')}, configured mailto:{d.report_address}")
    if problems:
        return Check("dmarc", name, ERROR, f"{record!r}: " + "; ".join(problems), fix)
    return Check("dmarc", name, OK, repr(record))


def check_dmarc_report(exp: Expected, res: Resolver, record: dict[str, Any]) -> Check:
    name = record["name"]
    values = [v for v in res.values(name, "TXT") if v.lower().startswith("v=dmarc1")]
    if values:
        return Check("dmarc-report", name, OK, repr(values[0]))
    return Check("dmarc-report", name, ERROR, "missing: reports for this domain cannot go to the report address",
                 _fix_records([record]))


def _mta_sts_id(content: str) -> str:
    return _tags(_unquote(content)).get("id", "")


def check_mta_sts_txt(exp: Expected, res: Resolver, domain: str) -> Check:
    name = f"_mta-sts.{domain}"
    record, fix, error = _one_versioned_txt(exp, res, name, "v=STSv1", "mta-sts", "MTA-STS")
    if error:
        return error
    try:
        tags = _tags(record)
        if list(tags)[:2] != ["v", "id"] or not re.fullmatch(r"[A-Za-z0-9]{1,32}", tags["id"]):
            raise ValueError("must be 'v=STSv1; id=<1-32 letters or digits>'")
    except (ValueError, KeyError) as e:
        return Check("mta-sts", name, ERROR, f"{record!r}: {e}", fix)
    want = exp.of(name, "TXT")
    want_id = _mta_sts_id(want[0]["content"]) if want else ""
    if want_id and tags["id"] != want_id:
        return Check("mta-sts", name, ERROR, f"id={tags['id']}, the stack's policy has id={want_id} (senders "
                     "keep a stale cached policy)", fix)
    return Check("mta-sts", name, OK, repr(record))


def parse_sts_policy(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """RFC 8461 3.2 policy -> (single-valued fields, mx patterns, problems)."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    problems: list[str] = []
    for line in re.split(r"\r?\n", text):
        if not line:
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep:
            problems.append(f"malformed line {line!r}")
        elif key == "mx":
            mx.append(value.lower())
        elif key in fields:
            problems.append(f"'{key}' given twice")
        else:
            fields[key] = value
    if fields.get("version") != "STSv1":
        problems.append(f"version is {fields.get('version')!r}, must be STSv1")
    if fields.get("mode") not in ("enforce", "testing", "none"):
        problems.append(f"mode is {fields.get('mode')!r}, must be enforce, testing or none")
    age = fields.get("max_age", "")
    if not (age.isdigit() and int(age) <= MTA_STS_MAX_AGE_LIMIT):
        problems.append(f"max_age is {age!r}, must be 0-{MTA_STS_MAX_AGE_LIMIT}")
    if fields.get("mode") != "none" and not mx:
        problems.append("no mx line")
    return fields, mx, problems


def _mx_matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.count(".") >= pattern.count(".") and host.split(".", 1)[1] == pattern[2:]
    return host == pattern


def check_mta_sts_policy(exp: Expected, res: Resolver, opts: Options, domain: str) -> Check:
    name = f"mta-sts.{domain}"
    url = f"https://{name}{MTA_STS_PATH}"
    s = exp.settings
    policy = mta_sts_policy(s)
    serve_fix = (f"serve {url} (HTTP 200, text/plain, no redirect) with exactly {policy!r}: `pulumi up` deploys the "
                 f"Worker {worker_name(s)} with custom domain {name}")
    ip = opts.host_addresses.get(name)
    if ip is None:
        addresses = res.values(name, "A")
        if not addresses:
            return Check("mta-sts-policy", name, ERROR, f"{name} does not resolve", serve_fix)
        ip = addresses[0]
    got = https_get(name, ip, opts.https_port, MTA_STS_PATH, tls_context(opts.ca_file), timeout=opts.timeout)
    if got.error:
        return Check("mta-sts-policy", name, ERROR, f"GET {url} ({ip}): {got.error}", serve_fix)
    if got.status != 200:
        extra = f" to {got.location} (redirects are not allowed)" if got.location else ""
        return Check("mta-sts-policy", name, ERROR, f"GET {url}: HTTP {got.status}{extra}", serve_fix)
    if not got.content_type.lower().startswith("text/plain"):
        return Check("mta-sts-policy", name, ERROR, f"Content-Type {got.content_type!r}, must be text/plain",
                     serve_fix)
    fields, mx, problems = parse_sts_policy(got.body)
    if not problems:
        if fields["mode"] != s.publishing.mta_sts_mode:
            problems.append(f"mode {fields['mode']}, configured {s.publishing.mta_sts_mode}")
        uncovered = [h for h in s.mx_hosts if not any(_mx_matches(h.lower(), p) for p in mx)]
        unused = [p for p in mx if not any(_mx_matches(h.lower(), p) for h in s.mx_hosts)]
        if uncovered:
            problems.append(f"MX host(s) {', '.join(uncovered)} not listed (senders in enforce mode refuse them)")
        if unused:
            problems.append(f"mx {', '.join(unused)} is no MX host of the stack")
        max_age = MTA_STS_OPT_OUT_MAX_AGE if s.publishing.mta_sts_mode == "none" else s.publishing.mta_sts_max_age
        if int(fields["max_age"]) != max_age:
            problems.append(f"max_age {fields['max_age']}, configured {max_age}")
    if problems:
        return Check("mta-sts-policy", name, ERROR, "; ".join(problems), serve_fix)
    found = f"mode {fields['mode']}, mx {', '.join(mx)}, max_age {fields['max_age']}"
    if got.body != policy:
        return Check("mta-sts-policy", name, WARNING, found + "; text differs from the stack's policy "
                     "(so its id does not match the published one)", serve_fix)
    return Check("mta-sts-policy", name, OK, found)


# RFC 8460 3: mailto: or https: URIs. The TLD may be an IDNA A-label (xn--...), as the settings allow.
_RUA_MAILTO = re.compile(r"mailto:[^@\s,!]+@[^@\s,!]+\.([A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})")


def rua_uri_valid(uri: str) -> bool:
    return bool(_RUA_MAILTO.fullmatch(uri) or re.fullmatch(r"https://\S+", uri))


def check_tls_rpt(exp: Expected, res: Resolver, domain: str) -> Check:
    name = f"_smtp._tls.{domain}"
    record, fix, error = _one_versioned_txt(exp, res, name, "v=TLSRPTv1", "tls-rpt", "TLS-RPT")
    if error:
        return error
    try:
        tags = _tags(record)
        if list(tags)[:2] != ["v", "rua"]:
            raise ValueError("must be 'v=TLSRPTv1; rua=<uri>[,<uri>]'")
        uris = [u.strip() for u in tags["rua"].split(",")]
        for u in uris:
            if not rua_uri_valid(u):
                raise ValueError(f"rua {u!r} is neither mailto: nor https:")
    except (ValueError, KeyError) as e:
        return Check("tls-rpt", name, ERROR, f"{record!r}: {e}", fix)
    want_uri = f"mailto:{exp.settings.publishing.tls_rpt_address}"
    if want_uri.lower() not in [u.lower() for u in uris]:
        return Check("tls-rpt", name, ERROR, f"{record!r}: reports do not go to {want_uri}", fix)
    return Check("tls-rpt", name, OK, repr(record))


def _caa_key(text: str) -> str:
    """A CAA record in one comparable form: tag and issuer domain lower-case, no blanks around ';' '='."""
    flags, tag, value = text.split(None, 2)
    value = value.strip('"')
    if tag.lower() in ("issue", "issuewild"):
        parts = [p.strip() for p in value.split(";")]
        value = "; ".join([parts[0].lower()] + [re.sub(r"\s*=\s*", "=", p) for p in parts[1:] if p])
    return f'{int(flags)} {tag.lower()} "{value}"'


def check_caa(exp: Expected, res: Resolver, host: str) -> Check:
    want = exp.of(host, "CAA")
    published = {_caa_key(text): text for text in (_canonical("CAA", r["content"]) for r in want)}
    expected = set(published)
    ans = res.query(host, "CAA")
    found = {_caa_key(v): v for v in ans.values}
    missing = sorted(published[k] for k in expected - set(found))
    cloudflare = sorted(found[k] for k in set(found) - expected if k in CLOUDFLARE_CAA)
    unknown = sorted(found[k] for k in set(found) - expected - CLOUDFLARE_CAA)
    ours = " | ".join(sorted(found[k] for k in expected if k in found)) or ("none of the stack's" if found
                                                                           else ans.status)
    text = ours + (f" (and Cloudflare's own: {' | '.join(cloudflare)})" if cloudflare else "")
    if not missing and not unknown:
        return Check("caa", host, OK, text)
    fix = _fix_records(want, "publish")
    if unknown:
        fix += " and delete " + ", ".join(f"{host}. IN CAA {x}" for x in unknown)
    problems = ([f"missing {' | '.join(missing)}"] if missing else []) + (
        [f"not ours nor Cloudflare's: {' | '.join(unknown)}"] if unknown else [])
    return Check("caa", host, ERROR, f"{text}; {'; '.join(problems)}", fix)


def check_srv(exp: Expected, res: Resolver, name: str) -> Check:
    want = exp.of(name, "SRV")
    expected = {_canonical("SRV", r["content"]) for r in want}
    ans = res.query(name, "SRV")
    found = set(ans.values)
    text = " | ".join(sorted(found)) or ans.status
    if found == expected:
        return Check("srv", name, OK, text)
    return Check("srv", name, ERROR, f"{text}; expected {' | '.join(sorted(expected))}",
                 _fix_records(want, "publish exactly"))


# ---------------------------------------------------------------- checks: the host


def _cert_check(check: str, subject: str, r: TlsResult, host: str, port: int, greeting: str) -> Check:
    renew = (f"renew and reload: on the host `systemctl start orgmail-cert` (certbot renew, deploy hook "
             f"reloads Postfix and Dovecot); the certificate must name {host}")
    if not r.ok:
        if "certificate" in r.error:
            return Check(check, subject, ERROR, r.error, renew)
        return Check(check, subject, ERROR, r.error or "no TLS",
                     f"{PORT_SERVICE.get(port, 'the service')} must listen on {port} (security group and nftables "
                     f"open it); on the host: systemctl status postfix dovecot")
    days = r.days_left()
    found = f"{r.greeting[:60]!r}; certificate for {r.subject}, expires in {days:.0f} days" if days is not None \
        else f"{r.greeting[:60]!r}"
    if not r.greeting.startswith(greeting):
        return Check(check, subject, ERROR, f"{found}; greeting should start {greeting!r}",
                     f"{PORT_SERVICE.get(port, 'the service')} must answer on {port}")
    if days is not None and days < CERT_ERROR_DAYS:
        return Check(check, subject, ERROR, found, renew)
    if days is not None and days < CERT_WARNING_DAYS:
        return Check(check, subject, WARNING, found, renew)
    return Check(check, subject, OK, found)


def check_smtp(opts: Options, host: str, ip: str) -> list[Check]:
    port = opts.ports.get(25, 25)
    subject = f"{host} ({ip}:{port})"
    r = smtp_starttls(ip, port, host, tls_context(opts.ca_file), timeout=opts.timeout)
    banner_fix = (f"the 220 banner must name {host}: Postfix myhostname = {host}, smtpd_banner = $myhostname ESMTP "
                  f"(and postscreen_greet_banner); port 25 open in the security group and nftables")
    if not r.greeting:
        banner = Check("smtp-banner", subject, ERROR, r.error or "no banner", banner_fix + (
            "; if this machine's network blocks outbound port 25 (many ISPs and clouds do), run the verifier "
            "elsewhere" if "timed out" in r.error else ""))
    else:
        words = r.greeting.split()
        named = words[1].lower() if len(words) > 1 else ""
        banner = (Check("smtp-banner", subject, OK, repr(r.greeting)) if words[0] == "220" and named == host.lower()
                  else Check("smtp-banner", subject, ERROR, f"{r.greeting!r} does not name {host}", banner_fix))
    return [banner, _cert_check("tls:25", subject, r, host, 25, "220")]


def check_client_ports(opts: Options, host: str, ip: str) -> list[Check]:
    checks = []
    ctx = tls_context(opts.ca_file)
    for port, mode, greeting in CLIENT_PORTS:
        actual = opts.ports.get(port, port)
        subject = f"{host} ({ip}:{actual})"
        r = (implicit_tls(ip, actual, host, ctx, timeout=opts.timeout) if mode == "implicit"
             else smtp_starttls(ip, actual, host, ctx, timeout=opts.timeout))
        checks.append(_cert_check(f"tls:{port}", subject, r, host, port, greeting))
    return checks


def _dnsbl_name(ip: str, dnsbl: str) -> str:
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return ".".join(reversed(ip.split("."))) + "." + dnsbl
    return ".".join(reversed(addr.exploded.replace(":", ""))) + "." + dnsbl


def _dnsbl_refused(values: list[str]) -> bool:
    return any(ipaddress.ip_address(v) in DNSBL_REFUSED for v in values)


def dnsbl_self_test(res: Resolver, dnsbl: str) -> tuple[str, str] | None:
    """None when the list answers here as RFC 5782 section 5 requires (its test entry 127.0.0.2 listed,
    127.0.0.1 not); otherwise (found, fix) for every check against that list, which is then a warning.

    Resolvers that answer NXDOMAIN by policy (public resolvers, some providers), and lists that
    refuse a resolver, would otherwise make every address look "not listed"."""
    lookup = DNSBLS.get(dnsbl, dnsbl)
    own = "not a listing: query through a resolver of your own (--nameserver), not a public or provider one"
    test = res.query(_dnsbl_name("127.0.0.2", dnsbl), "A")
    if test.status not in ("ok", "nxdomain", "nodata"):
        return (f"this list does not answer here: its test entry 127.0.0.2 could not be queried ({test.status} "
                f"{test.detail})".strip(), f"{own}; or check the list's web lookup: {lookup}")
    if test.status == "ok" and _dnsbl_refused(test.values):
        return (f"this list does not answer here: it refuses this resolver ({', '.join(test.values)} for its "
                "test entry 127.0.0.2: public/open resolver or over quota), not a listing",
                f"{own}; or check the list's web lookup: {lookup}")
    if test.status != "ok":
        return (f"this list does not answer here: its test entry 127.0.0.2 is not listed ({test.status}), so "
                "'not listed' would mean nothing (a resolver answering NXDOMAIN by policy?)",
                f"{own}; or check the list's web lookup: {lookup}")
    if not all(ipaddress.ip_address(v) in ipaddress.ip_network("127.0.0.0/8") for v in test.values):
        return (f"this list does not answer here: its test entry 127.0.0.2 gives {', '.join(test.values)}, "
                "outside 127.0.0.0/8 (a resolver rewriting answers?)", f"{own}; or check the list's web lookup: "
                f"{lookup}")
    negative = res.query(_dnsbl_name("127.0.0.1", dnsbl), "A")
    if negative.status == "ok":
        return (f"this list does not answer here: it lists 127.0.0.1 too ({', '.join(negative.values)}), which "
                "no list does (a resolver rewriting answers?)", f"{own}; or check the list's web lookup: {lookup}")
    return None


def check_dnsbl(res: Resolver, host: str, ip: str, dnsbl: str,
                self_test: tuple[str, str] | None = None) -> Check:
    """Whether `ip` is on `dnsbl`; `self_test` is dnsbl_self_test()'s verdict on the list (run once per list)."""
    subject = f"{ip} on {dnsbl}"
    if self_test is not None:
        return Check("dnsbl", subject, WARNING, *self_test)
    query = _dnsbl_name(ip, dnsbl)
    ans = res.query(query, "A")
    if ans.status in ("nxdomain", "nodata"):
        return Check("dnsbl", subject, OK, "not listed (the list's test entry is)")
    if ans.status != "ok":
        return Check("dnsbl", subject, WARNING, f"could not query {query}: {ans.status} {ans.detail}".strip(),
                     "query through a resolver of your own (the lists refuse public resolvers), not a listing")
    codes = [ipaddress.ip_address(v) for v in ans.values]
    if _dnsbl_refused(ans.values):
        return Check("dnsbl", subject, WARNING, f"query refused by the list ({', '.join(ans.values)}: public/open "
                     "resolver or over quota), not a listing",
                     "check from a resolver of your own, or the list's web lookup: " + DNSBLS.get(dnsbl, dnsbl))
    if not all(c in ipaddress.ip_network("127.0.0.0/8") for c in codes):
        return Check("dnsbl", subject, WARNING, f"unexpected answer {', '.join(ans.values)} (a resolver rewriting "
                     "NXDOMAIN?), not a listing", "use a resolver that returns NXDOMAIN unchanged")
    reason = " ".join(res.values(query, "TXT"))
    return Check("dnsbl", subject, ERROR, f"LISTED ({', '.join(ans.values)}){': ' + reason if reason else ''}",
                 f"find why {host} was listed (open relay? compromised account? check `postqueue -p`), fix it, then "
                 f"request removal: {DNSBLS.get(dnsbl, dnsbl)}")


# ---------------------------------------------------------------- running


def check_ses_mail_from(exp: Expected, res: Resolver, domain: str) -> list[Check]:
    """The SES MAIL FROM domain of `domain` (outbound.relay ses): its MX to SES's feedback host and its SPF
    record exactly as the stack publishes them (SES checks the MX; receivers check the SPF)."""
    from components.dns_records import ses_mail_from_domain

    name = ses_mail_from_domain(domain)
    mx = check_mx(exp, res, name)
    checks = [Check("ses-mail-from-mx", name, mx.status, mx.found, mx.fix)]
    want = [r for r in exp.of(name, "TXT") if spf.is_spf(_unquote(r["content"]))]
    expected = [_unquote(r["content"]) for r in want]
    ans = res.query(name, "TXT")
    found = [v for v in ans.values if spf.is_spf(v)]
    text = " | ".join(repr(v) for v in found) or f"no SPF record ({ans.status})"
    if found == expected:
        checks.append(Check("ses-mail-from-spf", name, OK, text))
    else:
        checks.append(Check("ses-mail-from-spf", name, ERROR, text, _fix_records(want, "publish exactly one SPF record")
                            + (" and delete the others" if len(found) > 1 else "")))
    return checks


def _ses_client(region: str) -> Any:
    import boto3  # the dev requirements' boto3; the verifier runs without it and says so

    return boto3.client("sesv2", region_name=region)


def check_ses_account(region: str, client: Any = None) -> Check:
    """Whether the account may send through SES in `region`: out of the sandbox (ProductionAccessEnabled) and
    sending not paused (SendingEnabled, EnforcementStatus), from sesv2 GetAccount."""
    subject = f"ses {region}"
    try:
        account = (client or _ses_client(region)).get_account()
    except ImportError:
        return Check("ses-account", subject, WARNING, "not checked: boto3 is not installed",
                     "pip install boto3, or run `aws sesv2 get-account --region " + region + "`")
    except Exception as e:  # no credentials, no permission, no network: say so, never fail the run on it
        return Check("ses-account", subject, WARNING, f"not checked: {type(e).__name__}: {e}",
                     f"run with AWS credentials allowed ses:GetAccount, or `aws sesv2 get-account --region {region}`")
    quota = account.get("SendQuota") or {}
    limits = (f"quota {quota.get('Max24HourSend', '?'):g} a day, {quota.get('MaxSendRate', '?'):g} a second, "
              f"{quota.get('SentLast24Hours', 0):g} sent in 24 h") if quota else "no quota reported"
    status = account.get("EnforcementStatus", "")
    if not account.get("SendingEnabled", True) or status == "SHUTDOWN":
        return Check("ses-account", subject, ERROR, f"sending is paused ({status or 'SendingEnabled false'}); {limits}",
                     "SES stopped this account's sending: read the notice in the SES console (Account dashboard, "
                     "Reputation) and answer AWS; mail waits in the host's queue meanwhile")
    if not account.get("ProductionAccessEnabled", False):
        return Check("ses-account", subject, WARNING, f"in the SES sandbox: only verified recipients; {limits}",
                     f"request production access for {region}: SES console, Account dashboard, 'Request production "
                     "access' (README, 'Sending through Amazon SES')")
    if status and status != "HEALTHY":
        return Check("ses-account", subject, WARNING, f"production access; enforcement status {status}; {limits}",
                     "SES is reviewing the account (bounce or complaint rate): see the SES console, Reputation")
    return Check("ses-account", subject, OK, f"production access; {limits}")


def run_checks(exp: Expected, opts: Options) -> list[Check]:
    s = exp.settings
    res = Resolver(opts.nameserver, opts.timeout)
    checks: list[Check] = []
    ips: dict[str, str | None] = {}
    probe: dict[str, str | None] = {}  # the address to test SPF, DNSBLs and services with
    for host in s.mx_hosts:
        ip = opts.host_addresses.get(host) or exp.host_ips.get(host)
        ips[host] = ip
        if ip is None:  # offline plan: use what DNS says, if it says one thing
            found = res.values(host, "A")
            probe[host] = found[0] if len(found) == 1 else None
        else:
            probe[host] = ip
    for host in s.mx_hosts:
        ip = ips[host]
        checks.append(check_a(exp, res, host, ip))
        checks.append(check_ptr(res, host, ip))
        checks.append(check_spf(exp, res, host, [p] if (p := probe[host]) else []))
        checks.append(check_caa(exp, res, host))
    known = [ip for ip in probe.values() if ip]
    for d in s.domains:
        checks.append(check_mx(exp, res, d.name))
        checks.append(check_spf(exp, res, d.name, known))
        checks.append(check_dkim(exp, res, d.name))
        checks += [check_dkim(exp, res, d.name, old) for old in s.dkim_retiring]
        checks.append(check_dmarc(exp, res, d.name))
        checks.append(check_mta_sts_txt(exp, res, d.name))
        if not opts.skip_host:
            checks.append(check_mta_sts_policy(exp, res, opts, d.name))
        checks.append(check_tls_rpt(exp, res, d.name))
        for r in exp.records:
            if r["type"] == "SRV" and r["name"].endswith("." + d.name):
                checks.append(check_srv(exp, res, r["name"]))
        if s.outbound.ses:
            checks += check_ses_mail_from(exp, res, d.name)
    if s.outbound.ses and s.outbound.ses_region:
        checks.append(check_ses_account(s.outbound.ses_region, opts.ses_client))
    for r in exp.records:
        if r["type"] == "TXT" and "._report._dmarc." in r["name"]:
            checks.append(check_dmarc_report(exp, res, r))
    self_tests = {dnsbl: dnsbl_self_test(res, dnsbl) for dnsbl in opts.dnsbls} if any(probe.values()) else {}
    for host in s.mx_hosts:
        ip = probe[host]
        if ip is None:
            continue
        for dnsbl in opts.dnsbls:
            checks.append(check_dnsbl(res, host, ip, dnsbl, self_tests[dnsbl]))
        if not opts.skip_host:
            checks += check_smtp(opts, host, ip)
            if host == s.mail_host:
                checks += check_client_ports(opts, host, ip)
    return checks


def _is_placeholder_ip(ip: str) -> bool:
    from tools.mockengine import PLACEHOLDER_IP_PREFIX
    return ip.startswith(PLACEHOLDER_IP_PREFIX)


def load_expected(stack_file: Path, outputs: dict[str, Any] | None) -> Expected:
    stack, config, project = stack_name(stack_file), load_stack_config(stack_file), project_name(stack_file)
    settings = load_settings(raw_from_pulumi_config(config), stack, project)
    if outputs is not None and isinstance(outputs.get("dnsRecords"), list):
        key = outputs.get("dkimPublicKey")
        retiring = {sel: dkim_public_key_b64(v["publicKey"]) for sel, v in (outputs.get("dkimRetiring") or {}).items()
                    if isinstance(v, dict) and "BEGIN" in str(v.get("publicKey"))}
        return Expected(settings=settings, records=list(outputs["dnsRecords"]),
                        host_ips={h: str(ip) for h, ip in (outputs.get("hostIps") or {}).items()},
                        dkim_key_b64=dkim_public_key_b64(key) if isinstance(key, str) and "BEGIN" in key else None,
                        source="stack outputs", retiring_keys_b64=retiring)
    from tools.mockengine import run_program
    from tools.plan import plan_document
    with tempfile.TemporaryDirectory() as tmp:
        doc = plan_document(run_program(config, stack, project=project), Path(tmp))
    host_ips = {h: (None if _is_placeholder_ip(ip) else ip) for h, ip in doc["outputs"]["hostIps"].items()}
    if outputs is not None:  # outputs without dnsRecords: take what they do give
        host_ips.update({h: str(ip) for h, ip in (outputs.get("hostIps") or {}).items()})
    records = [{k: r[k] for k in ("type", "name", "content", "priority", "ttl")} for r in doc["dns"]]
    for r in records:
        if r["type"] == "A" and host_ips.get(r["name"]):
            r["content"] = host_ips[r["name"]]
    return Expected(settings=settings, records=records, host_ips=host_ips, dkim_key_b64=None,
                    source="offline plan (addresses and DKIM key are known only after deploy)")


# ---------------------------------------------------------------- command line


def _address(text: str, default_port: int) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([0-9.]+)(?::(\d+))?|([0-9a-fA-F:]+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected IP[:PORT] or [IPv6]:PORT, got {text!r}")
    ip = m[1] or m[3] or m[5]
    port = m[2] or m[4]
    ipaddress.ip_address(ip)
    return ip, int(port) if port else default_port


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key.strip().lower().rstrip("."), value.strip()


def print_table(checks: list[Check], out: Callable[[str], None] = print) -> None:
    width = max([len(c.check) for c in checks] + [5])
    swidth = max([len(c.subject) for c in checks] + [7])
    out(f"{'STATUS':<8} {'CHECK':<{width}} {'SUBJECT':<{swidth}} FOUND")
    for c in checks:
        out(f"{c.status:<8} {c.check:<{width}} {c.subject:<{swidth}} {c.found}")
        if c.fix and c.status != OK:
            out(f"{'':<8} {'':<{width}} fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARNING, ERROR)}
    out(f"\n{counts[OK]} ok, {counts[WARNING]} warning(s), {counts[ERROR]} error(s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stack_file", type=Path, help="Pulumi.<stack>.yaml (settings; expected records if no --outputs)")
    p.add_argument("--outputs", help="`pulumi stack output --json` of the deployed stack (file, or - for stdin)")
    p.add_argument("--nameserver", type=lambda t: _address(t, 53), metavar="IP[:PORT]",
                   help="query this server instead of the system resolver")
    p.add_argument("--host-address", type=_pair, action="append", default=[], metavar="HOST=IP",
                   help="connect to IP for HOST (a mail host or mta-sts.<domain>); overrides outputs")
    p.add_argument("--port", type=_pair, action="append", default=[], metavar="SERVICE=PORT",
                   help="probe PORT for service port SERVICE (25, 465, 587, 993, 995), e.g. 25=2525")
    p.add_argument("--https-port", type=int, default=443, help="port of the MTA-STS policy server (443)")
    p.add_argument("--ca-file", help="trust these CA certificates (PEM) instead of the system's")
    p.add_argument("--skip-host", action="store_true", help="DNS only: no SMTP/IMAP/POP3/HTTPS connections")
    p.add_argument("--dnsbl", action="append", metavar="ZONE",
                   help=f"DNS blocklist to query (repeatable; default {', '.join(DNSBLS)})")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per DNS query or connection")
    p.add_argument("--retry-for", type=float, default=0, metavar="SECONDS",
                   help="repeat every 15 s while any check fails, up to this long (DNS propagation after pulumi up)")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when a check is an error (report only)")
    p.add_argument("--pre-deploy", action="store_true",
                   help="before the first `pulumi up`: list existing records that clash with the stack's "
                        "(SPF, DMARC, MX, MTA-STS, TLS-RPT, DKIM selector, CAA, host names) and what to change")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    outputs: dict[str, Any] | None = None
    if args.outputs:
        text = sys.stdin.read() if args.outputs == "-" else Path(args.outputs).read_text()
        outputs = json.loads(text)
    try:
        exp = load_expected(args.stack_file, outputs)
    except StackFileError as e:
        print(e, file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"{args.stack_file}: {e}", file=sys.stderr)
        return 2
    try:
        ports = {int(k): int(v) for k, v in args.port}
    except ValueError:
        print("--port wants SERVICE=PORT with numbers, e.g. 25=2525", file=sys.stderr)
        return 2
    opts = Options(nameserver=args.nameserver, host_addresses=dict(args.host_address), ports=ports,
                   https_port=args.https_port, ca_file=args.ca_file, skip_host=args.skip_host,
                   dnsbls=tuple(args.dnsbl) if args.dnsbl else tuple(DNSBLS), timeout=args.timeout)
    deadline = time.monotonic() + args.retry_for
    while True:
        if args.pre_deploy:
            from tools.verify_predeploy import pre_deploy_checks
            checks = pre_deploy_checks(exp, Resolver(opts.nameserver, opts.timeout))
        else:
            checks = run_checks(exp, opts)
        failed = any(c.status == ERROR for c in checks)
        if not failed or time.monotonic() + 15 > deadline:
            break
        time.sleep(15)
    if args.json:
        json.dump({"stack": exp.settings.stack, "expected": exp.source, "ok": not failed,
                   "checks": [asdict(c) for c in checks]}, sys.stdout, indent=2)
        print()
    else:
        mode = " (pre-deploy: existing records that clash with the stack's)" if args.pre_deploy else ""
        print(f"orgmail verify{mode}: stack {exp.settings.stack}, expected records from {exp.source}\n")
        print_table(checks)
    return 1 if failed and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
