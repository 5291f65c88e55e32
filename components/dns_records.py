"""Pure record building: every DNS record the stack publishes, as plain values.

The DNS component turns these into Cloudflare records; the offline plan prints them; the tests
check their exact strings. Names are fully qualified, without the trailing dot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from components.settings import Settings, zone_of
from components.tiers import TIERS

TXT_CHUNK = 255


@dataclass(frozen=True)
class Record:
    zone: str  # the configured domain whose Cloudflare zone holds the record
    type: str  # A, MX, TXT
    name: str
    content: str
    ttl: int
    priority: int | None = None
    purpose: str = ""

    @property
    def logical_name(self) -> str:
        """Stable Pulumi resource name: type and owner name (plus priority for MX)."""
        base = f"{self.type.lower()}-{self.name.replace('.', '-').replace('_', '')}"
        return f"{base}-{self.priority}" if self.priority is not None else base


def quote_txt(value: str) -> str:
    """TXT content as Cloudflare stores it: quoted strings of at most 255 characters.

    Pre-splitting avoids a perpetual diff: Cloudflare splits long values itself and would
    otherwise report the stored content as different from what the program asked for.
    """
    if '"' in value or "\\" in value:
        raise ValueError("TXT values with quotes or backslashes are not supported")
    chunks = [value[i:i + TXT_CHUNK] for i in range(0, len(value), TXT_CHUNK)] or [""]
    return " ".join(f'"{c}"' for c in chunks)


def unquote_txt(content: str) -> str:
    """Inverse of quote_txt: the value a resolver's client reassembles."""
    return "".join(re.findall(r'"([^"]*)"', content))


def dkim_public_key_b64(public_key_pem: str) -> str:
    """The base64 SubjectPublicKeyInfo of a PEM public key, as DKIM's p= tag wants it."""
    lines = [ln.strip() for ln in public_key_pem.strip().splitlines()]
    if not lines or lines[0] != "-----BEGIN PUBLIC KEY-----" or lines[-1] != "-----END PUBLIC KEY-----":
        raise ValueError("expected a PEM 'PUBLIC KEY' block")
    return "".join(lines[1:-1])


def dkim_value(public_key_pem: str) -> str:
    return f"v=DKIM1; k=rsa; p={dkim_public_key_b64(public_key_pem)}"


def spf_value() -> str:
    # Only the MX hosts send for the domain; everything else fails hard.
    return "v=spf1 mx -all"


def helo_spf_value() -> str:
    # For the host name itself (HELO identity, used by bounces): only its own address.
    return "v=spf1 a -all"


def dmarc_value(settings: Settings) -> str:
    d = settings.dmarc
    parts = [f"v=DMARC1; p={d.policy}"]
    if d.subdomain_policy != d.policy:
        parts.append(f"sp={d.subdomain_policy}")
    if d.percent != 100:
        parts.append(f"pct={d.percent}")
    parts.append(f"rua=mailto:{d.report_address}")
    return "; ".join(parts)


def mx_records(settings: Settings) -> list[Record]:
    priorities = TIERS[settings.tier].mx_priorities
    return [
        Record(zone=d.name, type="MX", name=d.name, content=host, priority=prio, ttl=settings.dns_ttl,
               purpose="mail for the domain goes to this host")
        for d in settings.domains
        for host, prio in zip(settings.mx_hosts, priorities, strict=True)
    ]


def host_a_record(settings: Settings, host: str, ip: str) -> Record:
    zone = zone_of(host, settings.domains)
    assert zone is not None, f"{host} lies in no configured zone"  # settings guarantee it
    return Record(zone=zone.name, type="A", name=host, content=ip, ttl=settings.dns_ttl,
                  purpose="address of a mail host; PTR of its Elastic IP points back here")


def host_spf_records(settings: Settings) -> list[Record]:
    return [
        Record(zone=settings.primary_domain.name, type="TXT", name=host, content=quote_txt(helo_spf_value()),
               ttl=settings.dns_ttl, purpose="SPF for the host's HELO name")
        for host in settings.mx_hosts
    ]


def policy_records(settings: Settings) -> list[Record]:
    """SPF and DMARC per domain, plus DMARC external-report authorisations we can publish."""
    records: list[Record] = []
    for d in settings.domains:
        records.append(Record(zone=d.name, type="TXT", name=d.name, content=quote_txt(spf_value()),
                              ttl=settings.dns_ttl, purpose="SPF: only the MX hosts send for this domain"))
        records.append(Record(zone=d.name, type="TXT", name=f"_dmarc.{d.name}",
                              content=quote_txt(dmarc_value(settings)), ttl=settings.dns_ttl,
                              purpose="DMARC policy and aggregate report address"))
    report_domain = settings.dmarc.report_address.split("@", 1)[1]
    report_zone = zone_of(report_domain, settings.domains)
    if report_zone is not None:
        # RFC 7489 7.1: a report address outside the policy domain must authorise it.
        for d in settings.domains:
            if d.name != report_domain:
                records.append(Record(zone=report_zone.name, type="TXT",
                                      name=f"{d.name}._report._dmarc.{report_domain}",
                                      content=quote_txt("v=DMARC1"), ttl=settings.dns_ttl,
                                      purpose="lets this domain's DMARC reports go to the report address"))
    return records


def dkim_records(settings: Settings, public_key_pem: str) -> list[Record]:
    value = quote_txt(dkim_value(public_key_pem))
    return [
        Record(zone=d.name, type="TXT", name=f"{settings.dkim_selector}._domainkey.{d.name}", content=value,
               ttl=settings.dns_ttl, purpose="DKIM public key; signatures by the host verify against it")
        for d in settings.domains
    ]


def all_records(settings: Settings, host_ips: dict[str, str], public_key_pem: str) -> list[Record]:
    """Every record the stack publishes, given the hosts' addresses and the DKIM public key."""
    records = [host_a_record(settings, h, host_ips[h]) for h in settings.mx_hosts]
    records += host_spf_records(settings)
    records += mx_records(settings)
    records += policy_records(settings)
    records += dkim_records(settings, public_key_pem)
    return records
