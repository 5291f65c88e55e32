"""Pulumi resource names derived from the settings, in one place, and the check that no two coincide.

A resource's name (with its type and its parents' types) is its identity in the stack's state: when
the name changes, Pulumi creates a resource under the new name and deletes the old one. So whatever a
host's name is, its resources are named by its role: `mail` for the mailbox host (mail-ip, mail-data,
mail-instance, dns-ptr-mail, ...) and `mx2`, `mx3`, ... for the backup-MX relays, by MX rank. Renaming a
host then changes its resources' inputs (the PTR's domain name, the A record's name, tags), not their
identity. Resources that earlier versions named after the host name keep their state through aliases
(`legacy_*` below); see README, "Rename a mail host".

Every other name derived from a setting (a mailbox address, a domain, a network) is made by a function
here or by the record and rule types the components use, and `name_collisions` refuses settings that
would give two resources one name (`a.b@` and `a-b@` both become `a-b`): Pulumi would stop with
"Duplicate resource URN", or worse, one record would silently stand for two.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import pulumi

if TYPE_CHECKING:
    from components.dns_records import Record
    from components.settings import Settings

MAILBOX_HOST = "mail"  # the stable name of the mailbox host's resources


def host_names(settings: Settings) -> dict[str, str]:
    """Host name -> the stable name of that host's resources: the mailbox host `mail`, relays `mx2`, ...;
    in a cluster the load balancer's name `mail` and the outbound relays `relay1`, `relay2`, ..."""
    names = {settings.mail_host: MAILBOX_HOST}
    for rank, relay in enumerate(settings.relay_hosts, start=2):
        names[relay] = f"mx{rank}"
    for rank, relay in enumerate(settings.outbound_relays, start=1):
        names[relay] = f"relay{rank}"
    return names


def address_names(settings: Settings) -> dict[str, str]:
    """Address key (components.dns_records.address_keys) -> the stable name of its PTR and A record: the host's
    (mail, mx2, relay1) or, for the load balancer's address in a zone, `lb1`, `lb2`, ..."""
    from components.dns_records import address_host, address_instance, address_keys

    hosts = host_names(settings)
    return {k: address_instance(k) or hosts[address_host(k)] for k in address_keys(settings)}


def legacy_host_name(hostname: str) -> str:
    """What earlier versions named a host's resources after: the first label of its host name."""
    return hostname.split(".")[0]


def dashed(name: str) -> str:
    """A DNS name as part of a resource name. Not one-to-one ('a.b' and 'a-b' give 'a-b'):
    name_collisions refuses the settings where that matters."""
    return name.replace(".", "-")


def password_name(address: str) -> str:
    """The generated initial password of a mailbox (no passwordHashes entry)."""
    return "password-" + dashed(address.replace("@", "-at-"))


def web_host_name(host: str) -> str:
    """A Worker custom domain (mta-sts.<domain>, autoconfig.<domain>)."""
    return dashed(host)


def legacy_ptr_name(hostname: str) -> str:
    """The PTR's name before it was named by role (suffix of dns-ptr-)."""
    return dashed(hostname)


def aliases(*old_names: str | None, new: str) -> list[pulumi.Alias | str] | None:
    """Aliases to the names a resource had before, if they differ from its name now."""
    found: list[pulumi.Alias | str] = [pulumi.Alias(name=old) for old in dict.fromkeys(old_names)
                                       if old is not None and old != new]
    return found or None


def name_collisions(settings: Settings) -> list[str]:
    """Config problems: settings that would give two resources (or two DNS host names) one name.

    Checked after the settings are otherwise valid, before any resource is registered.
    """
    from components.acme import acme_hostname
    from components.dns_records import PLACEHOLDER_IP, PLACEHOLDER_PEM, address_keys, all_records, web_hosts
    from components.firewall import firewall_rules

    problems: list[str] = []
    domain_index = {d.name: i for i, d in enumerate(settings.domains)}

    def domain_setting(zone: str) -> str:
        return f"orgmail:domains[{domain_index[zone]}].name ({zone})"

    # Host names the stack points somewhere: each may stand for one thing only.
    claims: dict[str, list[str]] = defaultdict(list)
    claims[settings.mail_host].append(f"orgmail:mailHost ({settings.mail_host})")
    for rank, relay in enumerate(settings.relay_hosts, start=2):
        claims[relay].append(f"relay {rank - 1} of tier {settings.tier} ({relay}, named mx{rank}.<the mail host's zone>)")
    for rank, relay in enumerate(settings.outbound_relays, start=1):
        claims[relay].append(f"outbound relay {rank} of the cluster ({relay}, named relay{rank}.<the mail host's zone>)")
    for zone, host in web_hosts(settings):
        claims[host].append(f"the MTA-STS/autoconfig Worker's name {host} of {domain_setting(zone)}")
    if settings.webmail is not None:
        claims[settings.webmail.hostname].append(f"orgmail:webmail.hostname ({settings.webmail.hostname})")
    claims[acme_hostname(settings)].append(f"the ACME challenge Worker's name {acme_hostname(settings)}")
    for host, origins in claims.items():
        if len(origins) > 1:
            setting = "webmail.hostname" if any(o.startswith("orgmail:webmail") for o in origins) else "mailHost"
            problems.append(f"orgmail:{setting}: {host} is claimed by {' and by '.join(origins)}; "
                            f"choose a {'webmail' if setting != 'mailHost' else 'mail host'} name that is none of these")
    if problems:
        return problems  # the names below are made from these hosts

    # Resource names made from settings: (kind, name) -> the settings behind each resource of that name.
    derived: dict[tuple[str, str], list[tuple[str, ...]]] = defaultdict(list)
    for i, m in enumerate(settings.mailboxes):
        if m.address not in settings.password_hashes and not m.shared_with:
            derived[("generated password", password_name(m.address))].append(
                (f"orgmail:mailboxes[{i}].address ({m.address})",))
    for zone, host in web_hosts(settings):
        derived[("Worker custom domain", web_host_name(host))].append((domain_setting(zone),))
    hosts = host_names(settings)
    for rec in all_records(settings, {k: PLACEHOLDER_IP for k in address_keys(settings)}, PLACEHOLDER_PEM):
        # The domains whose names the record's name is made of (a report authorisation names two).
        origin = tuple(domain_setting(d.name) for d in settings.domains if f".{d.name}." in f".{rec.name}.")
        derived[("DNS record", record_name(rec, hosts))].append(origin or (domain_setting(rec.zone),))
    for i, cidr in enumerate(settings.admin.ssh_cidrs):
        for rule in firewall_rules(settings):
            if rule.port == 22 and rule.cidr == cidr:
                derived[("security group rule", rule.logical_name)].append((f"orgmail:admin.sshCidrs[{i}] ({cidr})",))

    # One problem per set of settings that collide, with the first resource name as the example.
    grouped: dict[tuple[str, ...], list[tuple[str, str]]] = defaultdict(list)
    for (kind, name), sources in derived.items():
        if len(sources) < 2:
            continue
        every = [s for o in sources for s in o]
        shared = set.intersection(*(set(o) for o in sources))
        involved = tuple(dict.fromkeys(s for s in every if s not in shared))
        if len(involved) < 2:
            involved = tuple(dict.fromkeys(every))
        grouped[involved].append((kind, name))
    for involved, names in grouped.items():
        kind, name = names[0]
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        if kind == "security group rule":
            why, advice = "the same network twice", "list it once"
        elif kind == "generated password":
            why = "resource names turn '@' into '-at-' and '.' into '-'"
            advice = "give one of them a passwordHashes entry (then no password is generated for it) or another address"
        else:
            why = "resource names turn '.' into '-' and drop '_'"
            advice = "one stack cannot serve both; deploy one of them from another stack"
        problems.append(f"{' and '.join(involved)} give {kind} resources the same name {name!r}{more} ({why}); {advice}")
    return problems


def record_name(rec: Record, hosts: dict[str, str]) -> str:
    """A DNS record's resource name: at a mail host's name, by that host's role (dns-a-mail)."""
    return rec.logical_name_at(hosts[rec.name]) if rec.name in hosts else rec.logical_name
