"""Firewall: a security group that opens only the mail ports (plus SSH from admin CIDRs)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from components.settings import Settings
from components.userdata import MAIL_PORTS

PORT_NAMES = {53: "dns", 25: "smtp", 465: "submissions", 587: "submission", 993: "imaps", 995: "pop3s", 22: "ssh",
              80: "http", 443: "https"}
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
