"""Firewall: a security group that opens only the mail ports (plus SSH from admin CIDRs)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from components.settings import Settings
from components.userdata import MAIL_PORTS

PORT_NAMES = {53: "dns", 25: "smtp", 465: "submissions", 587: "submission", 993: "imaps", 995: "pop3s", 22: "ssh",
              80: "http", 443: "https", 7844: "cloudflared"}
# Outbound: deliver mail (25), and HTTPS/HTTP for SSM, S3, the Cloudflare API, Let's Encrypt
# and Debian's archive. NTP and instance metadata go to Amazon's link-local services, which
# security groups do not filter.
EGRESS_PORTS: tuple[int, ...] = (25, 80, 443)
# With orgmail:outbound.relay ses: submission to Amazon SES's SMTP endpoint (IPv4, as all outbound mail).
SES_RELAY_PORT = 587
# DNS (UDP, and TCP for long answers) from the host's own resolver to the authoritative servers:
# blocklists refuse queries that come through Amazon's shared resolver.
DNS_PROTOCOLS = ("udp", "tcp")
# Mail in and out over IPv4 only: no AAAA record is published, AWS gives reverse DNS only to Elastic
# IPv4 addresses, SPF `a`/`mx` name only the A records, and Gmail refuses IPv6 mail from an address
# without PTR. The host's IPv6 address serves HTTPS egress alone.
MAIL_CIDRS = ("0.0.0.0/0",)
# With orgmail:webmail: cloudflared's connections out to Cloudflare's network (HTTP/2 over TCP, QUIC over
# UDP). Outbound only: the tunnel carries the web requests in, no port opens.
TUNNEL_PORT = 7844
TUNNEL_PROTOCOLS = ("tcp", "udp")
# Path MTU discovery (RFC 1191, RFC 8201): routers report a too-small link with ICMP "fragmentation
# needed" (type 3 code 4) or ICMPv6 "packet too big" (type 2, code 0); dropped, a TLS session with
# full-size segments stalls. AWS's recommended security group rules for path MTU discovery allow these.
PMTU_RULES: tuple[tuple[str, int, int, str, str], ...] = (
    ("icmp", 3, 4, "0.0.0.0/0", "pmtu-frag-needed"),
    ("icmpv6", 2, 0, "::/0", "pmtu-packet-too-big"),
)


@dataclass(frozen=True)
class Rule:
    direction: str  # "ingress" | "egress"
    port: int  # TCP port, or ICMP type
    cidr: str  # IPv4 or IPv6 network
    protocol: str = "tcp"  # "tcp", "udp", "icmp" or "icmpv6"
    code: int | None = None  # ICMP code (AWS's to_port); None for TCP and UDP
    name: str = ""  # what an ICMP rule is for

    @property
    def to_port(self) -> int:
        return self.port if self.code is None else self.code

    @property
    def description(self) -> str:
        if self.protocol == "udp":
            return f"{PORT_NAMES[self.port]}-udp"
        return PORT_NAMES[self.port] if self.protocol == "tcp" else self.name

    @property
    def logical_name(self) -> str:
        family = "v6" if ":" in self.cidr else "v4"
        where = "any" if self.cidr in ("0.0.0.0/0", "::/0") else self.cidr.replace("/", "-").replace(":", "-").replace(".", "-")
        return f"{self.direction}-{self.description}-{family}-{where}"


def firewall_rules(settings: Settings) -> list[Rule]:
    """Every rule of the security group, as data (the tests check this exact set)."""
    rules = [Rule("ingress", port, cidr) for port in MAIL_PORTS for cidr in MAIL_CIDRS]
    rules += [Rule("ingress", 22, cidr) for cidr in settings.admin.ssh_cidrs]
    rules += [Rule("ingress", kind, cidr, protocol, code, name) for protocol, kind, code, cidr, name in PMTU_RULES]
    rules += [Rule("egress", port, cidr) for port in EGRESS_PORTS
              for cidr in (MAIL_CIDRS if port == 25 else ("0.0.0.0/0", "::/0"))]
    rules += [Rule("egress", 53, cidr, protocol) for protocol in DNS_PROTOCOLS for cidr in ("0.0.0.0/0", "::/0")]
    if settings.outbound.ses:
        rules += [Rule("egress", SES_RELAY_PORT, cidr) for cidr in MAIL_CIDRS]
    if settings.webmail is not None:
        rules += [Rule("egress", TUNNEL_PORT, cidr, protocol) for protocol in TUNNEL_PROTOCOLS
                  for cidr in ("0.0.0.0/0", "::/0")]
    return rules


class Firewall(pulumi.ComponentResource):
    security_group_id: pulumi.Output[str]

    def __init__(self, name: str, settings: Settings, vpc_id: pulumi.Input[str],
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:Firewall", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        sg = aws.ec2.SecurityGroup(
            f"{name}-mail", vpc_id=vpc_id, description=f"orgmail {settings.stack}: mail ports only",
            tags={"Name": f"orgmail-{settings.stack}", "orgmail:stack": settings.stack}, opts=child)
        for rule in firewall_rules(settings):
            v6 = ":" in rule.cidr
            cls = aws.vpc.SecurityGroupIngressRule if rule.direction == "ingress" else aws.vpc.SecurityGroupEgressRule
            cls(f"{name}-{rule.logical_name}", security_group_id=sg.id, ip_protocol=rule.protocol,
                from_port=rule.port, to_port=rule.to_port, description=rule.description,
                cidr_ipv4=None if v6 else rule.cidr, cidr_ipv6=rule.cidr if v6 else None, opts=child)
        self.security_group_id = sg.id
        self.register_outputs({"securityGroupId": sg.id})


# --- the ISP cluster (orgmail:cluster) -------------------------------------------------------------------
# One security group per role, and every rule between them names the other group (or the load balancer's
# subnets), so that reachability is exactly: internet -> load balancer (mail ports) -> edges (mail ports,
# from the load balancer's subnets only) -> shards (LMTP, IMAP/POP3 behind the proxy) and relays (SMTP);
# shards -> shards (doveadm, for moving a mailbox); edges and shards -> directory (PostgreSQL); edges -> their
# shared rspamd store (components/edge_cache.py). The administrator reaches the directory through
# Session Manager port forwarding on a shard (its group's rule), never from outside the VPC.
# The load balancer does not preserve client addresses (its target groups carry the client's address in the
# PROXY v2 header instead): every connection to an edge comes from a load-balancer address, so "from the
# load balancer's subnets" is a rule a security group can state; with preservation on, the edges would have
# to take the mail ports from the whole internet.
CLUSTER_GROUPS = ("lb", "edge", "shard", "relay", "directory", "cache")
PORT_NAMES.update({24: "lmtp", 110: "pop3", 143: "imap", 24245: "doveadm", 5432: "postgresql", 6379: "valkey"})
# Inside the cluster (Dovecot's proxy to its backend, Postfix to LMTP): components/shard.py uses the same table.
SHARD_PORTS: tuple[int, ...] = (24, 143, 110, 24245)
# doveadm over TCP (Dovecot has no fixed port: this one is ours). Only shards reach it, from each other:
# `orgmail-users move` runs on a shard, and the old shard copies the mailbox to the new one (doveadm
# backup to tcp:<new shard>). It takes the shards' shared doveadm_password, which only shards hold; the
# edges, facing the internet, neither hold it nor reach the port.
DOVEADM_PORT = 24245
EDGE_TO_SHARD_PORTS: tuple[int, ...] = tuple(p for p in SHARD_PORTS if p != DOVEADM_PORT)
DIRECTORY_PORT = 5432
CACHE_PORT = 6379  # ElastiCache's (Valkey, TLS): the edges' shared rspamd store
CLUSTER_GROUP_DESCRIPTIONS = {
    "lb": "load balancer: mail ports from anywhere, to the edges",
    "edge": "edges: mail ports from the load balancer subnets only",
    "shard": "mailbox shards: LMTP, IMAP, POP3 from the edges, doveadm from the shards only",
    "relay": "outbound relays: SMTP from the edges only",
    "directory": "directory (PostgreSQL): from edges and shards only",
    "cache": "shared rspamd store of the edges (Valkey, TLS): from the edges only",
}
INTERNET_EGRESS: tuple[tuple[str, int], ...] = (("tcp", 80), ("tcp", 443), ("udp", 53), ("tcp", 53))


@dataclass(frozen=True)
class GroupRule:
    """One rule of a cluster security group: `peer` is a network (CIDR) or another group ("sg:<group>")."""

    group: str
    direction: str  # "ingress" | "egress"
    port: int
    peer: str
    protocol: str = "tcp"

    @property
    def peer_group(self) -> str | None:
        return self.peer[3:] if self.peer.startswith("sg:") else None

    @property
    def description(self) -> str:
        name = PORT_NAMES[self.port]
        return f"{name}-udp" if self.protocol == "udp" else name

    @property
    def logical_name(self) -> str:
        if self.peer_group:
            where = self.peer_group
        else:
            family = "v6" if ":" in self.peer else "v4"
            slug = "any" if self.peer in ("0.0.0.0/0", "::/0") else re.sub(r"[./:]", "-", self.peer)
            where = f"{family}-{slug}"
        return f"{self.group}-{self.direction}-{self.description}-{where}"


@dataclass(frozen=True)
class ClusterFirewallArgs:
    stack: str
    vpc_id: pulumi.Input[str]
    lb_cidrs: tuple[str, ...]  # the load balancer's subnets: the only source of the edges' mail ports
    ssh_cidrs: tuple[str, ...] = ()  # admin.sshCidrs
    ses: bool = False  # outbound.relay ses: the outbound relays send to Amazon SES on 587


def cluster_firewall_args(settings: Settings, vpc_id: pulumi.Input[str], lb_cidrs: tuple[str, ...]) -> ClusterFirewallArgs:
    return ClusterFirewallArgs(stack=settings.stack, vpc_id=vpc_id, lb_cidrs=lb_cidrs,
                               ssh_cidrs=settings.admin.ssh_cidrs, ses=settings.outbound.ses)


def cluster_rules(args: ClusterFirewallArgs) -> list[GroupRule]:
    """Every rule of the cluster's security groups, as data (tests/unit/test_cluster.py checks reachability)."""
    lb_cidrs = args.lb_cidrs
    everywhere = ("0.0.0.0/0", "::/0")
    rules = [GroupRule("lb", "ingress", p, cidr) for p in MAIL_PORTS for cidr in MAIL_CIDRS]
    rules += [GroupRule("lb", "egress", p, "sg:edge") for p in MAIL_PORTS]
    rules += [GroupRule("edge", "ingress", p, cidr) for p in MAIL_PORTS for cidr in lb_cidrs]
    rules += [GroupRule("edge", "egress", p, "sg:shard") for p in EDGE_TO_SHARD_PORTS]
    rules += [GroupRule("edge", "egress", 25, "sg:relay")]
    rules += [GroupRule("shard", "ingress", p, "sg:edge") for p in EDGE_TO_SHARD_PORTS]
    rules += [GroupRule("shard", "ingress", DOVEADM_PORT, "sg:shard"), GroupRule("shard", "egress", DOVEADM_PORT, "sg:shard")]
    rules += [GroupRule("relay", "ingress", 25, "sg:edge"), GroupRule("relay", "egress", 25, "0.0.0.0/0")]
    if args.ses:  # the relays hand outside mail to Amazon SES (forwarded mail still leaves on 25)
        rules += [GroupRule("relay", "egress", SES_RELAY_PORT, cidr) for cidr in MAIL_CIDRS]
    for client in ("edge", "shard"):
        rules += [GroupRule(client, "egress", DIRECTORY_PORT, "sg:directory"),
                  GroupRule("directory", "ingress", DIRECTORY_PORT, f"sg:{client}")]
    rules += [GroupRule("edge", "egress", CACHE_PORT, "sg:cache"), GroupRule("cache", "ingress", CACHE_PORT, "sg:edge")]
    for host in ("edge", "shard", "relay"):
        rules += [GroupRule(host, "ingress", 22, cidr) for cidr in args.ssh_cidrs]
        rules += [GroupRule(host, "egress", port, cidr, protocol) for protocol, port in INTERNET_EGRESS
                  for cidr in everywhere]
    return rules


class ClusterFirewall(pulumi.ComponentResource):
    """The cluster's security groups (CLUSTER_GROUPS) and their rules (cluster_rules)."""

    group_ids: dict[str, pulumi.Output[str]]

    def __init__(self, name: str, args: ClusterFirewallArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:ClusterFirewall", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        groups = {
            group: aws.ec2.SecurityGroup(
                f"{name}-{group}", vpc_id=args.vpc_id,
                description=f"orgmail {args.stack} {CLUSTER_GROUP_DESCRIPTIONS[group]}",
                tags={"Name": f"orgmail-{args.stack}-{group}", "orgmail:stack": args.stack}, opts=child)
            for group in CLUSTER_GROUPS}
        for rule in cluster_rules(args):
            cls = aws.vpc.SecurityGroupIngressRule if rule.direction == "ingress" else aws.vpc.SecurityGroupEgressRule
            peer = rule.peer_group
            v6 = peer is None and ":" in rule.peer
            cls(f"{name}-{rule.logical_name}", security_group_id=groups[rule.group].id, ip_protocol=rule.protocol,
                from_port=rule.port, to_port=rule.port, description=rule.description,
                referenced_security_group_id=groups[peer].id if peer else None,
                cidr_ipv4=None if peer or v6 else rule.peer, cidr_ipv6=rule.peer if v6 else None, opts=child)
        self.group_ids = {group: sg.id for group, sg in groups.items()}
        self.register_outputs({})
