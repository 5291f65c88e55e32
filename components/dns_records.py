"""Pure record building: every DNS record the stack publishes, as plain values.

The DNS component turns these into Cloudflare records; the offline plan prints them; the tests
check their exact strings. Names are fully qualified, without the trailing dot.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from components.settings import Settings, zone_of

TXT_CHUNK = 255
DNS_NAME_MAX = 253  # RFC 1035, presentation form without the final dot
DNS_LABEL_MAX = 63
# The record set's names do not depend on the addresses or the key.
PLACEHOLDER_IP = "192.0.2.1"
PLACEHOLDER_PEM = "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----"


@dataclass(frozen=True)
class Record:
    zone: str  # the configured domain whose Cloudflare zone holds the record
    type: str  # A, MX, TXT, SRV, CAA
    name: str
    content: str  # presentation format (SRV: "prio weight port target.", CAA: 'flags tag "value"')
    ttl: int
    priority: int | None = None
    purpose: str = ""
    instance: str = ""  # one of several records of one type at one name (a cluster's A records: lb1, lb2)

    @property
    def logical_name(self) -> str:
        """Stable Pulumi resource name: type and owner name (plus priority for MX, tag for CAA).
        Records at a mail host's name are named by its role instead (components/names.py)."""
        return self.logical_name_at(self.name.replace('.', '-').replace('_', ''))

    def logical_name_at(self, owner: str) -> str:
        """The resource name with `owner` standing for the record's name."""
        base = f"{self.type.lower()}-{owner}" + (f"-{self.instance}" if self.instance else "")
        if self.type == "CAA":
            return f"{base}-{self.content.split()[1]}"
        return f"{base}-{self.priority}" if self.priority is not None else base

    def cloudflare_data(self) -> dict[str, Any] | None:
        """Cloudflare takes SRV and CAA as structured data, not as content."""
        if self.type == "SRV":
            prio, weight, port, target = self.content.split()
            return {"priority": int(prio), "weight": int(weight), "port": int(port), "target": target.rstrip(".") or "."}
        if self.type == "CAA":
            flags, tag, value = self.content.split(" ", 2)
            return {"flags": int(flags), "tag": tag, "value": value.strip('"')}
        return None


def content_from_cloudflare(type_: str, content: str | None, data: dict[str, Any] | None) -> str:
    """Presentation-format content of a record as Cloudflare holds it (inverse of cloudflare_data)."""
    if type_ == "SRV" and data:
        target = data["target"] if data["target"] == "." else data["target"] + "."
        return f"{int(data['priority'])} {int(data['weight'])} {int(data['port'])} {target}"
    if type_ == "CAA" and data:
        return f'{int(data["flags"])} {data["tag"]} "{data["value"]}"'
    return content or ""


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


def cluster_spf_value(relay_ips: list[str]) -> str:
    """A cluster's domains and its MX name (the edges' SRS senders): only its outbound relays send (the
    load balancer's addresses never do); their addresses as ip4 terms, which cost no DNS lookup of SPF's ten."""
    return "v=spf1 " + "".join(f"ip4:{ip} " for ip in relay_ips) + "-all"


def address_keys(settings: Settings) -> list[str]:
    """Every address the records publish, as keys of all_records' host_ips: each host's Elastic IP
    (key: its host name); in a cluster the load balancer's address per zone (`<mail host>#lb<n>`),
    then each outbound relay's."""
    if settings.cluster is None:
        return list(settings.mx_hosts)
    zones = [f"{settings.mail_host}#lb{n}" for n in range(1, settings.cluster.zones + 1)]
    return [*zones, *settings.outbound_relays]


def address_host(key: str) -> str:
    """The host name of an address key."""
    return key.split("#", 1)[0]


def address_instance(key: str) -> str:
    return key.split("#", 1)[1] if "#" in key else ""


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
    priorities = settings.mx_priorities
    return [
        Record(zone=d.name, type="MX", name=d.name, content=host, priority=prio, ttl=settings.dns_ttl,
               purpose="mail for the domain goes to this host")
        for d in settings.domains
        for host, prio in zip(settings.mx_hosts, priorities, strict=True)
    ]


def host_a_record(settings: Settings, host: str, ip: str, instance: str = "") -> Record:
    zone = zone_of(host, settings.domains)
    assert zone is not None, f"{host} lies in no configured zone"  # settings guarantee it
    purpose = ("the load balancer's address in one zone; PTR of its Elastic IP points back here" if instance
               else "address of a mail host; PTR of its Elastic IP points back here")
    return Record(zone=zone.name, type="A", name=host, content=ip, ttl=settings.dns_ttl, purpose=purpose,
                  instance=instance)


def named_hosts(settings: Settings) -> tuple[str, ...]:
    """Every host name with an A record: the MX hosts, and a cluster's outbound relays."""
    return (*settings.mx_hosts, *settings.outbound_relays)


def host_spf_records(settings: Settings, relay_ips: list[str] | None = None) -> list[Record]:
    records = [
        Record(zone=settings.primary_domain.name, type="TXT", name=host, content=quote_txt(helo_spf_value()),
               ttl=settings.dns_ttl, purpose="SPF for the host's HELO name")
        for host in named_hosts(settings) if host not in settings.mx_hosts or settings.cluster is None
    ]
    if settings.cluster is not None:
        # The edges' SRS senders (mail an alias forwards outside) are at the MX name; the relays send it.
        records.insert(0, Record(zone=settings.primary_domain.name, type="TXT", name=settings.mail_host,
                                 content=quote_txt(cluster_spf_value(relay_ips or [])), ttl=settings.dns_ttl,
                                 purpose="SPF of the SRS senders at the MX name: only the outbound relays send"))
    return records


def policy_records(settings: Settings, relay_ips: list[str] | None = None) -> list[Record]:
    """SPF and DMARC per domain, plus DMARC external-report authorisations we can publish. A cluster's SPF
    names its outbound relays' addresses (`relay_ips`), never the load balancer's."""
    records: list[Record] = []
    spf = spf_value() if settings.cluster is None else cluster_spf_value(relay_ips or [])
    why = "only the MX hosts send" if settings.cluster is None else "only the outbound relays send"
    for d in settings.domains:
        records.append(Record(zone=d.name, type="TXT", name=d.name, content=quote_txt(spf),
                              ttl=settings.dns_ttl, purpose=f"SPF: {why} for this domain"))
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


def dkim_records(settings: Settings, public_key_pem: str, retiring_keys: Mapping[str, str] | None = None
                 ) -> list[Record]:
    """The signing selector's key in every domain, then each retiring selector's (orgmail:dkimRetiring),
    which stays published, unsigned with, until its date."""
    records = [
        Record(zone=d.name, type="TXT", name=f"{settings.dkim_selector}._domainkey.{d.name}",
               content=quote_txt(dkim_value(public_key_pem)),
               ttl=settings.dns_ttl, purpose="DKIM public key; signatures by the host verify against it")
        for d in settings.domains
    ]
    for selector, until in sorted(settings.dkim_retiring.items()):
        pem = (retiring_keys or {}).get(selector, PLACEHOLDER_PEM)
        records += [Record(zone=d.name, type="TXT", name=f"{selector}._domainkey.{d.name}",
                           content=quote_txt(dkim_value(pem)), ttl=settings.dns_ttl,
                           purpose=f"retiring DKIM key, no longer signed with; published until {until}")
                    for d in settings.domains]
    return records


# Amazon SES custom MAIL FROM (outbound.relay: ses): the envelope sender of relayed mail is in this
# subdomain of each mail domain, whose MX takes SES's bounce and complaint feedback and whose SPF names SES,
# so SPF passes and aligns (relaxed) for DMARC while the domain's own SPF stays "mx -all".
SES_MAIL_FROM_LABEL = "bounce"
SES_MAIL_FROM_PRIORITY = 10  # as SES's set-up instructions give it


def ses_mail_from_domain(domain: str) -> str:
    return f"{SES_MAIL_FROM_LABEL}.{domain}"


def ses_feedback_host(region: str) -> str:
    """Where SES takes bounces for a custom MAIL FROM domain in `region`."""
    return f"feedback-smtp.{region}.amazonses.com"


def ses_smtp_host(region: str) -> str:
    """The SES SMTP endpoint of `region` (port 587, STARTTLS)."""
    return f"email-smtp.{region}.amazonaws.com"


def ses_spf_value() -> str:
    return "v=spf1 include:amazonses.com -all"


def ses_records(settings: Settings) -> list[Record]:
    """The custom MAIL FROM domain's MX and SPF per mail domain, with outbound.relay ses (none with direct).
    DKIM needs no record of its own: SES signs with the stack's key (BYODKIM) under orgmail:dkimSelector,
    whose TXT record dkim_records publishes already."""
    region = settings.outbound.ses_region
    if not settings.outbound.ses or region is None:
        return []
    records: list[Record] = []
    for d in settings.domains:
        name = ses_mail_from_domain(d.name)
        records.append(Record(zone=d.name, type="MX", name=name, content=ses_feedback_host(region),
                              priority=SES_MAIL_FROM_PRIORITY, ttl=settings.dns_ttl,
                              purpose="SES MAIL FROM domain: bounces of relayed mail go to SES"))
        records.append(Record(zone=d.name, type="TXT", name=name, content=quote_txt(ses_spf_value()),
                              ttl=settings.dns_ttl, purpose="SPF of the SES MAIL FROM domain: only SES sends"))
    return records


def dkim_rotation(settings: Settings) -> list[str]:
    """Where a DKIM key rotation stands, for the plan (README, "Rotate the DKIM key")."""
    lines = [f"signs with {settings.dkim_selector} (orgmail:dkimSelector), from the first sync after its "
             "records are published"]
    lines += [f"retiring {sel}: published, not signed with, until {until}; after that date remove it from "
              "orgmail:dkimRetiring" for sel, until in sorted(settings.dkim_retiring.items())]
    return lines


# RFC 8461 8.3: to opt out, publish a "mode: none" policy with a short max_age (its example: one day),
# so that senders replace their cached policy with it soon and then stop applying any.
MTA_STS_OPT_OUT_MAX_AGE = 86400


def mta_sts_policy(settings: Settings) -> str:
    """RFC 8461 policy file: CRLF lines, every MX host listed; "none" with MTA_STS_OPT_OUT_MAX_AGE."""
    p = settings.publishing
    max_age = MTA_STS_OPT_OUT_MAX_AGE if p.mta_sts_mode == "none" else p.mta_sts_max_age
    lines = ["version: STSv1", f"mode: {p.mta_sts_mode}", *(f"mx: {h}" for h in settings.mx_hosts),
             f"max_age: {max_age}"]
    return "".join(line + "\r\n" for line in lines)


def mta_sts_id(policy: str) -> str:
    """Changes whenever the policy changes (RFC 8461 3.1: 1-32 alphanumerics)."""
    return hashlib.sha256(policy.encode()).hexdigest()[:20]


def transport_security_records(settings: Settings) -> list[Record]:
    """MTA-STS announcement and TLS-RPT per domain (the policy itself is served over HTTPS)."""
    p = settings.publishing
    records: list[Record] = []
    for d in settings.domains:
        # Every mode is published, "none" as the opt-out policy: every stack has the Worker serving it.
        records.append(Record(zone=d.name, type="TXT", name=f"_mta-sts.{d.name}",
                              content=quote_txt(f"v=STSv1; id={mta_sts_id(mta_sts_policy(settings))}"),
                              ttl=settings.dns_ttl, purpose="MTA-STS: senders must use TLS to our MX hosts"
                              if p.mta_sts_mode != "none" else "MTA-STS opt-out (RFC 8461 8.3)"))
        records.append(Record(zone=d.name, type="TXT", name=f"_smtp._tls.{d.name}",
                              content=quote_txt(f"v=TLSRPTv1; rua=mailto:{p.tls_rpt_address}"),
                              ttl=settings.dns_ttl, purpose="TLS-RPT: where senders report TLS failures"))
    return records


def caa_records(settings: Settings) -> list[Record]:
    """Only Let's Encrypt may issue for the mail hosts' names, and no wildcards.

    Published at the host names, not the domain apex, so certificates for the organisation's
    other names (its web site) are not affected.
    """
    zone = settings.primary_domain.name
    records: list[Record] = []
    for host in named_hosts(settings):
        records.append(Record(zone=zone, type="CAA", name=host, content='0 issue "letsencrypt.org"',
                              ttl=settings.dns_ttl, purpose="only Let's Encrypt may issue for this host"))
        records.append(Record(zone=zone, type="CAA", name=host, content='0 issuewild ";"',
                              ttl=settings.dns_ttl, purpose="no wildcard certificates"))
        if settings.publishing.caa_iodef:
            records.append(Record(zone=zone, type="CAA", name=host,
                                  content=f'0 iodef "mailto:{settings.publishing.caa_iodef}"',
                                  ttl=settings.dns_ttl, purpose="where CAs report refused requests"))
    return records


# RFC 6186 service records: (service, priority, port); port 0 with target "." means "not offered".
SRV_SERVICES: tuple[tuple[str, int, int], ...] = (
    ("_submissions._tcp", 0, 465),
    ("_submission._tcp", 0, 587),
    ("_imaps._tcp", 0, 993),
    ("_pop3s._tcp", 10, 995),  # IMAP preferred
    ("_imap._tcp", 0, 0),
    ("_pop3._tcp", 0, 0),
)


def srv_records(settings: Settings) -> list[Record]:
    records: list[Record] = []
    for d in settings.domains:
        for service, prio, port in SRV_SERVICES:
            target = f"{settings.mail_host}." if port else "."
            weight = 1 if port else 0
            records.append(Record(zone=d.name, type="SRV", name=f"{service}.{d.name}",
                                  content=f"{prio} {weight} {port} {target}", ttl=settings.dns_ttl,
                                  purpose="mail client autodiscovery (RFC 6186)" if port
                                  else "plaintext service not offered (RFC 6186)"))
    return records


def worker_name(settings: Settings) -> str:
    """The Worker serving MTA-STS and autoconfig (Worker names are unique per Cloudflare account)."""
    return f"orgmail-{settings.namespace}"


def web_hosts(settings: Settings) -> list[tuple[str, str]]:
    """(zone, host name) served by the stack's Cloudflare Worker: MTA-STS policy and autoconfig."""
    hosts: list[tuple[str, str]] = []
    for d in settings.domains:
        hosts.append((d.name, f"mta-sts.{d.name}"))
        if settings.publishing.autoconfig:
            hosts.append((d.name, f"autoconfig.{d.name}"))
    return hosts


def all_records(settings: Settings, host_ips: dict[str, str], public_key_pem: str,
                retiring_keys: Mapping[str, str] | None = None) -> list[Record]:
    """Every record the stack publishes, given the hosts' addresses and the DKIM public keys (the signing
    selector's, and the retiring selectors' by selector)."""
    keys = address_keys(settings)
    records = [host_a_record(settings, address_host(k), host_ips[k], address_instance(k)) for k in keys]
    relay_ips = [host_ips[r] for r in settings.outbound_relays]
    records += host_spf_records(settings, relay_ips)
    records += mx_records(settings)
    records += policy_records(settings, relay_ips)
    records += dkim_records(settings, public_key_pem, retiring_keys)
    records += transport_security_records(settings)
    records += caa_records(settings)
    records += srv_records(settings)
    records += ses_records(settings)
    return records


def name_problems(settings: Settings) -> list[str]:
    """Every record name (and Worker host name) the settings lead to, checked against DNS's limits,
    as config problems naming the domain (and the DKIM selector where it is part of the name)."""
    records = all_records(settings, {k: PLACEHOLDER_IP for k in address_keys(settings)}, PLACEHOLDER_PEM)
    from components.acme import acme_hostname  # acme -> web -> dns_records: imported where used

    names = sorted({(r.zone, r.name) for r in records} | set(web_hosts(settings))
                   | {(settings.primary_domain.name, acme_hostname(settings))})
    index = {d.name: i for i, d in enumerate(settings.domains)}
    problems: list[str] = []
    for zone, name in names:
        long_label = max(name.split("."), key=len)
        if len(name) <= DNS_NAME_MAX and len(long_label) <= DNS_LABEL_MAX:
            continue
        hint = " or orgmail:dkimSelector" if f"{settings.dkim_selector}._domainkey." in name else ""
        problems.append(
            f"orgmail:domains[{index[zone]}].name: {zone} is too long for the records it needs: {name} would be "
            f"{len(name)} characters (DNS names have at most {DNS_NAME_MAX}, labels {DNS_LABEL_MAX}); "
            f"use a shorter domain{hint}")
    return problems
