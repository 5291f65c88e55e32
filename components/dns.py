"""DNS at Cloudflare: every record from dns_records, never proxied, plus PTR on each Elastic IP."""

from __future__ import annotations

import functools

import pulumi
import pulumi_aws as aws
import pulumi_cloudflare as cloudflare

from components.dns_records import (
    PLACEHOLDER_IP,
    PLACEHOLDER_PEM,
    Record,
    address_host,
    address_instance,
    address_keys,
    all_records,
    ses_records,
)
from components.names import address_names, aliases, host_names, legacy_ptr_name, record_name
from components.settings import Settings


def content_of(records: list[Record], index: int) -> str:
    return records[index].content


class Dns(pulumi.ComponentResource):
    records: pulumi.Output[list[dict[str, object]]]

    def __init__(self, name: str, settings: Settings, host_ips: dict[str, pulumi.Output[str]],
                 allocation_ids: dict[str, pulumi.Output[str]], dkim_public_key_pem: pulumi.Output[str],
                 policy_server: pulumi.Resource, opts: pulumi.ResourceOptions | None = None,
                 dkim_retiring_keys_pem: dict[str, pulumi.Output[str]] | None = None) -> None:
        super().__init__("orgmail:index:Dns", name, None, opts)
        zones = {d.name: d.zone_id for d in settings.domains}
        # Every published address: each host's Elastic IP, or a cluster's load balancer (one per zone) and
        # outbound relays. `host_ips` and `allocation_ids` are keyed like this (dns_records.address_keys).
        hosts = address_keys(settings)

        retiring = sorted((dkim_retiring_keys_pem or {}).items())

        def resolved(values: list[str]) -> list[Record]:
            ips = dict(zip(hosts, values[:len(hosts)], strict=True))
            old_keys = {sel: pem for (sel, _), pem in zip(retiring, values[len(hosts) + 1:], strict=True)}
            return all_records(settings, ips, values[len(hosts)], old_keys)

        # The record set's shape does not depend on the addresses or the key: take it from
        # placeholders, then fill each record's content from the real values.
        shape = all_records(settings, {h: PLACEHOLDER_IP for h in hosts}, PLACEHOLDER_PEM)
        real = pulumi.Output.all(*[host_ips[h] for h in hosts], dkim_public_key_pem,
                                 *[pem for _, pem in retiring]).apply(resolved)
        signing = tuple(f"{settings.dkim_selector}._domainkey.{d.name}" for d in settings.domains)
        # The host signs with a selector only after its records exist (orgmail.py: dkim-selector parameter).
        self.signing_dkim_records: list[cloudflare.DnsRecord] = []
        # The SES MAIL FROM domains' MX and SPF (outbound.relay: ses), which the SES identities follow.
        ses_names = {(r.type, r.name) for r in ses_records(settings)}
        self.ses_records: list[cloudflare.DnsRecord] = []
        a_records: dict[str, cloudflare.DnsRecord] = {}
        roles = host_names(settings)
        for i, rec in enumerate(shape):
            data = rec.cloudflare_data()  # SRV and CAA: structured, and their content never depends on outputs
            # Records at a host's name are named by its role (a rename updates them); earlier versions
            # named them by the host name (the alias keeps their state).
            resource_name = f"{name}-{record_name(rec, roles)}"
            res = cloudflare.DnsRecord(
                resource_name, zone_id=zones[rec.zone], name=rec.name, type=rec.type,
                content=None if data else real.apply(functools.partial(content_of, index=i)),
                data=cloudflare.DnsRecordDataArgs(**data) if data else None, ttl=rec.ttl,
                # SRV keeps its priority in data too; without the top-level one the provider diffs forever.
                priority=rec.priority if rec.priority is not None else (data or {}).get("priority"),
                proxied=False, comment="orgmail: " + rec.purpose if rec.purpose else None,
                # RFC 8461 3.1: a new policy id only once the new policy is served, or senders cache the old
                # policy under the new id (and keep it for max_age).
                opts=pulumi.ResourceOptions(parent=self, depends_on=[policy_server]
                                            if rec.name.startswith("_mta-sts.") else None,
                                            # Unpublishing the signing key would fail mail in flight.
                                            protect=rec.name in signing,
                                            aliases=aliases(f"{name}-{rec.logical_name}", new=resource_name)))
            if rec.name in signing:
                self.signing_dkim_records.append(res)
            if (rec.type, rec.name) in ses_names:
                self.ses_records.append(res)
            if rec.type == "A":
                a_records[f"{rec.name}#{rec.instance}" if rec.instance else rec.name] = res

        # The selector the host signs with, set only once that selector's records are published: on a
        # rotation the new key is in DNS before the first message signed with it leaves.
        # In a cluster the edges sign, and read only their own sub-path (components/cluster.py).
        selector_path = f"{settings.ssm_path}/edge" if settings.cluster is not None else settings.ssm_path
        aws.ssm.Parameter(f"{name}-dkim-selector", name=f"{selector_path}/dkim-selector", type="String",
                          value=settings.dkim_selector, description="DKIM selector the mailbox host signs with",
                          tags={"orgmail:stack": settings.stack},
                          opts=pulumi.ResourceOptions(parent=self, depends_on=self.signing_dkim_records))

        # AWS refuses reverse DNS until the forward A record resolves to the address.
        # Named by the host's role, not its name: a renamed host's PTR is updated in place (its domain
        # name), never created anew and then deleted (the delete resets the same address's PTR).
        stable = address_names(settings)
        for key in hosts:
            host = address_host(key)
            legacy = None if address_instance(key) else f"{name}-ptr-{legacy_ptr_name(host)}"
            aws.ec2.EipDomainName(f"{name}-ptr-{stable[key]}", allocation_id=allocation_ids[key],
                                  domain_name=host,
                                  opts=pulumi.ResourceOptions(parent=self, depends_on=[a_records[key]], aliases=aliases(
                                      legacy, new=f"{name}-ptr-{stable[key]}")))

        self.records = real.apply(lambda rs: [
            {"type": r.type, "name": r.name, "content": r.content, "priority": r.priority, "ttl": r.ttl}
            for r in rs])
        self.register_outputs({"records": self.records})
