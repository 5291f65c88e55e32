"""orgmail's mandatory guard rails as CrossGuard policies.

Each validate function takes pulumi-policy's ResourceValidationArgs (or StackValidationArgs) and a
report_violation callback. Property names are the engine's camelCase wire names (cidrIpv4,
metadataOptions.httpTokens, ...), the same the program's mock tests see.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    Policy,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

MAIL_PORTS = (25, 465, 587, 993, 995)
SSH = 22
# The ISP cluster's ports between its own roles (components/firewall.py: LMTP, POP3, IMAP behind the edges'
# proxy, PostgreSQL, the edges' shared store, doveadm): open only from another of the stack's security groups,
# never from a network. tests/unit/test_policy_ports.py keeps this equal to the program's table.
CLUSTER_INTERNAL_PORTS = (24, 110, 143, 5432, 6379, 24245)
# Path MTU discovery, as AWS recommends: ICMP "fragmentation needed" (type 3 code 4) and ICMPv6 "packet
# too big" (type 2; its only code is 0). (protocol, type, code); -1 is AWS's "any code".
PMTU_ICMP = {("icmp", 3, 4), ("icmpv6", 2, 0), ("icmpv6", 2, -1)}
# The widest network admin.sshCidrs accepts (components/settings.py), per IP version.
SSH_MAX_WIDTH = {4: 8, 6: 16}

SG = "aws:ec2/securityGroup:SecurityGroup"
DEFAULT_SG = "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup"
SG_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
VPC = "aws:ec2/vpc:Vpc"
INSTANCE = "aws:ec2/instance:Instance"
SPOT_INSTANCE = "aws:ec2/spotInstanceRequest:SpotInstanceRequest"
LAUNCH_CONFIGURATION = "aws:ec2/launchConfiguration:LaunchConfiguration"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
# Resources that launch instances, as named in messages; the first three share the Instance shape.
LAUNCHERS = {INSTANCE: "instance", SPOT_INSTANCE: "spot instance", LAUNCH_CONFIGURATION: "launch configuration",
             LAUNCH_TEMPLATE: "launch template"}
VOLUME = "aws:ebs/volume:Volume"
DATABASE = "aws:rds/instance:Instance"
CACHE = "aws:elasticache/replicationGroup:ReplicationGroup"
DNS_RECORDS = ("cloudflare:index/dnsRecord:DnsRecord", "cloudflare:index/record:Record")
BUCKETS = ("aws:s3/bucketV2:BucketV2", "aws:s3/bucket:Bucket")
VERSIONING = ("aws:s3/bucketVersioningV2:BucketVersioningV2", "aws:s3/bucketVersioning:BucketVersioning")
LIFECYCLES = ("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration",
              "aws:s3/bucketLifecycleConfigurationV2:BucketLifecycleConfigurationV2")
PUBLIC_ACCESS_BLOCK = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
PUBLIC_ACLS = {"public-read", "public-read-write", "authenticated-read"}
BLOCK_FLAGS = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")

# IANA protocol numbers AWS also accepts by name; "-1" is AWS's "all protocols".
PROTOCOL_NAMES = {"6": "tcp", "17": "udp", "1": "icmp", "58": "icmpv6", "-1": "all"}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Where "everyone" connects from: every address minus the IANA special-purpose blocks that are not
# globally reachable (IPv4), the global unicast space (IPv6). Leaving those out of a rule set is no
# narrower than 0.0.0.0/0.
NOT_PUBLIC_V4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                 "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
                 "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4")


@dataclass(frozen=True)
class Ingress:
    """One ingress rule, whatever resource carried it; protocol normalised, ports made explicit."""

    protocol: str  # "tcp", "udp", "icmp", "icmpv6", "all", or another IANA protocol number
    lo: int
    hi: int
    cidrs: tuple[str, ...]
    others: tuple[str, ...]  # sources that are not CIDRs: security groups, prefix lists, self

    def carries_tcp(self, port: int) -> bool:
        return self.protocol == "all" or (self.protocol == "tcp" and self.lo <= port <= self.hi)

    def single_tcp_port(self) -> int | None:
        return self.lo if self.protocol == "tcp" and self.lo == self.hi else None

    def pmtu_icmp(self) -> bool:
        return (self.protocol, self.lo, self.hi) in PMTU_ICMP

    def __str__(self) -> str:
        if self.protocol in ("icmp", "icmpv6"):
            what = f"{self.protocol} type {self.lo} code {self.hi}"
        else:
            what = "all traffic" if self.protocol == "all" else f"{self.protocol} {self.lo}-{self.hi}"
        return f"{what} from {', '.join(self.cidrs + self.others) or '(no source)'}"


def _protocol(raw: Any) -> str:
    name = str(raw).strip().lower()
    if name.endswith(".0") and name[:-2].lstrip("-").isdigit():  # the engine sends numbers as floats
        name = name[:-2]
    return PROTOCOL_NAMES.get(name, name)


def _port(raw: Any, default: int) -> int:
    """A port bound; missing or negative (AWS's "any") is the widest bound, so nothing slips through."""
    try:
        port = int(raw)
    except (TypeError, ValueError):
        return default
    return default if port < 0 else port


def _ingress(protocol: Any, lo: Any, hi: Any, cidrs: list[Any], others: list[str]) -> Ingress:
    proto = _protocol(protocol)
    if proto in ("tcp", "udp"):
        first, last = _port(lo, 0), _port(hi, 65535)
    elif proto in ("icmp", "icmpv6"):  # AWS reads the ports as ICMP type and code; -1 (or none) is any
        first, last = _port(lo, -1), _port(hi, -1)
    else:  # AWS ignores the ports of every other protocol, and "all" is every port
        first, last = 0, 65535
    return Ingress(proto, first, last, tuple(str(c) for c in cidrs if c), tuple(others))


def _inline(rule: Mapping[str, Any], sg_key: str) -> Ingress:
    """The ingress shape shared by SecurityGroup/DefaultSecurityGroup inline rules and SecurityGroupRule."""
    groups = rule.get(sg_key) or []
    others = [f"security group {g}" for g in (groups if isinstance(groups, list) else [groups]) if g]
    others += [f"prefix list {p}" for p in rule.get("prefixListIds") or []]
    if rule.get("self") is True:
        others.append("self")
    return _ingress(rule.get("protocol"), rule.get("fromPort"), rule.get("toPort"),
                    list(rule.get("cidrBlocks") or []) + list(rule.get("ipv6CidrBlocks") or []), others)


def ingress_rules(resource_type: str, props: Mapping[str, Any]) -> Iterator[Ingress]:
    """Every ingress rule a resource opens, from every resource shape that can open one.

    Every network policy reads rules through here, so a new shape is added once for all of them.
    """
    if resource_type == INGRESS_RULE:
        others = [f"security group {props['referencedSecurityGroupId']}"] if props.get("referencedSecurityGroupId") \
            else []
        if props.get("prefixListId"):
            others.append(f"prefix list {props['prefixListId']}")
        yield _ingress(props.get("ipProtocol"), props.get("fromPort"), props.get("toPort"),
                       [props.get("cidrIpv4"), props.get("cidrIpv6")], others)
    elif resource_type == SG_RULE and str(props.get("type", "")).strip().lower() == "ingress":
        yield _inline(props, "sourceSecurityGroupId")
    elif resource_type in (SG, DEFAULT_SG):
        for rule in props.get("ingress") or []:
            yield _inline(rule, "securityGroups")


def _network(cidr: str) -> Network | None:
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        return None


def _too_wide_for_ssh(cidr: str) -> str | None:
    """Why SSH from this CIDR is refused ("" for the whole internet), or None if admin.sshCidrs could hold it."""
    net = _network(cidr)
    if net is None:
        return ", which is not a network"
    if net.prefixlen == 0:
        return ""
    limit = SSH_MAX_WIDTH[net.version]
    return f", wider than /{limit}" if net.prefixlen < limit else None


def no_ssh_from_world(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    for rule in ingress_rules(args.resource_type, args.props):
        if not rule.carries_tcp(SSH):
            continue
        for cidr in rule.cidrs:
            why = _too_wide_for_ssh(cidr)
            if why is not None:
                report_violation(f"{args.name}: SSH (port 22) is open to {cidr}{why}; "
                                 "allow it from admin.sshCidrs only, or use SSM Session Manager", None)


def _subtract(nets: list[Network], cut: Network) -> list[Network]:
    left: list[Network] = []
    for net in nets:
        if net.version != cut.version or not net.overlaps(cut):
            left.append(net)
        elif cut.supernet_of(net):  # type: ignore[arg-type]
            continue
        else:
            left.extend(net.address_exclude(cut))  # type: ignore[arg-type]
    return left


def _public(version: int) -> list[Network]:
    if version == 6:
        return [ipaddress.ip_network("2000::/3")]
    public: list[Network] = [ipaddress.ip_network("0.0.0.0/0")]
    for block in NOT_PUBLIC_V4:
        public = _subtract(public, ipaddress.ip_network(block))
    return public


def ssh_not_from_everywhere(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    """Rules each narrow enough can still add up to the whole internet: look at their union."""
    ssh_from: dict[int, set[Network]] = {4: set(), 6: set()}
    for resource in args.resources:
        for rule in ingress_rules(resource.resource_type, resource.props):
            if rule.carries_tcp(SSH):
                for net in (_network(c) for c in rule.cidrs):
                    if net is not None:  # what is not a network is no-ssh-from-world's to report
                        ssh_from[net.version].add(net)
    for version, nets in ssh_from.items():
        left = _public(version)
        for net in ipaddress.collapse_addresses(sorted(nets)):  # type: ignore[type-var]
            left = _subtract(left, net)
        if nets and not left:
            report_violation(f"together, the stack's ingress rules open SSH (port 22) to every public IPv{version} "
                             f"address ({len(nets)} networks); allow it from admin.sshCidrs only, "
                             "or use SSM Session Manager", None)


def mail_ports_only(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    for rule in ingress_rules(args.resource_type, args.props):
        port = rule.single_tcp_port()
        if port in MAIL_PORTS or (rule.pmtu_icmp() and rule.cidrs and not rule.others):
            continue
        if port in CLUSTER_INTERNAL_PORTS and not rule.cidrs and rule.others \
                and all(o.startswith("security group ") for o in rule.others):
            continue
        if port == SSH and rule.cidrs and not rule.others \
                and all(_too_wide_for_ssh(c) is None for c in rule.cidrs):
            continue
        report_violation(f"{args.name}: ingress {rule} is not allowed; only TCP "
                         f"{', '.join(map(str, MAIL_PORTS))} (and 22 from admin CIDRs, the ICMP of path "
                         "MTU discovery, and a cluster's own ports from its security groups) may be open", None)


def _targets_default_group(resource: Any, resources: list[Any]) -> bool:
    """A rule resource whose securityGroupId comes from a DefaultSecurityGroup or a Vpc (its defaultSecurityGroupId)."""
    deps = (getattr(resource, "property_dependencies", None) or {}).get("securityGroupId") or []
    urns = {getattr(d, "urn", None) for d in deps}
    return any(r.urn in urns and r.resource_type in (DEFAULT_SG, VPC) for r in resources)


def default_security_group_closed(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    resources = list(args.resources)
    for resource in resources:
        if resource.resource_type == DEFAULT_SG or (resource.resource_type in (INGRESS_RULE, SG_RULE)
                                                     and _targets_default_group(resource, resources)):
            for rule in ingress_rules(resource.resource_type, resource.props):
                report_violation(f"{resource.name}: the VPC's default security group must have no ingress "
                                 f"(got {rule}); open mail ports in the stack's own security group", resource.urn)


def _is_true(value: Any) -> bool:
    """Instances take a boolean, launch templates the string "true"."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def imdsv2_required(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    kind = LAUNCHERS.get(args.resource_type)
    if kind is None:
        return
    tokens = (args.props.get("metadataOptions") or {}).get("httpTokens")
    if tokens != "required":
        report_violation(f"{args.name}: {kind} metadata must require IMDSv2 tokens "
                         f"(metadataOptions.httpTokens = \"required\", got {tokens!r})", None)


def ebs_encrypted(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if args.resource_type == VOLUME and args.props.get("encrypted") is not True:
        report_violation(f"{args.name}: EBS volume must be encrypted (encrypted = true)", None)
    elif args.resource_type == LAUNCH_TEMPLATE:
        for mapping in args.props.get("blockDeviceMappings") or []:
            ebs = mapping.get("ebs")
            if ebs is not None and not _is_true(ebs.get("encrypted")):  # without ebs: instance store or no device
                report_violation(f"{args.name}: launch template block device {mapping.get('deviceName')} must be "
                                 "encrypted (ebs.encrypted = \"true\")", None)
    elif args.resource_type in LAUNCHERS:
        root = args.props.get("rootBlockDevice")
        if not root or root.get("encrypted") is not True:
            report_violation(f"{args.name}: root block device must be encrypted (rootBlockDevice.encrypted = true)",
                             None)
        for device in args.props.get("ebsBlockDevices") or []:
            if device.get("encrypted") is not True and device.get("noDevice") is not True:
                report_violation(f"{args.name}: EBS block device {device.get('deviceName')} must be encrypted", None)


def data_stores_encrypted(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """A cluster's directory (RDS) and the edges' shared store (ElastiCache) hold users' password hashes, sender
    addresses and learned spam data: encrypted at rest, and the store in transit with an AUTH token."""
    if args.resource_type == DATABASE and args.props.get("storageEncrypted") is not True:
        report_violation(f"{args.name}: RDS storage must be encrypted (storageEncrypted = true)", None)
    elif args.resource_type == CACHE:
        for key in ("atRestEncryptionEnabled", "transitEncryptionEnabled"):
            if args.props.get(key) is not True:
                report_violation(f"{args.name}: ElastiCache must be encrypted ({key} = true)", None)
        if not args.props.get("authToken"):
            report_violation(f"{args.name}: ElastiCache must require an AUTH token (authToken)", None)


def is_mail_data_volume(args: ResourceValidationArgs) -> bool:
    """The mailbox host's mail-data volume, or a relay's queue volume: both hold accepted mail."""
    tags = args.props.get("tags") or {}
    return args.resource_type == VOLUME and (tags.get("orgmail:role") in ("mailbox", "relay")
                                             or args.name.endswith(("-data", "-queue")))


def mail_data_protected(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if is_mail_data_volume(args) and not args.opts.protect:
        report_violation(f"{args.name}: this volume holds accepted mail (mailboxes or a queue); it must be "
                         "created with protect=True so `pulumi destroy` and replacements cannot delete it", None)


def _webmail_tunnel_record(args: ResourceValidationArgs) -> bool:
    """orgmail:webmail's CNAME to its Cloudflare Tunnel, which answers only through the proxy (before the
    tunnel exists a preview sees no content yet: then its logical name tells it)."""
    content = args.props.get("content")
    return args.props.get("type") == "CNAME" and (
        str(content).endswith(".cfargotunnel.com") if content else args.name == "webmail-record")


def dns_not_proxied(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if args.resource_type in DNS_RECORDS and args.props.get("proxied") is True and not _webmail_tunnel_record(args):
        report_violation(f"{args.name}: {args.props.get('type')} {args.props.get('name')} must not be proxied "
                         "(proxied = false): Cloudflare's proxy carries HTTP only, never SMTP/IMAP, and hides the "
                         "address MX, SPF and PTR checks need", None)


def _refers_to(resource: Any, bucket: Any) -> bool:
    deps = (getattr(resource, "property_dependencies", None) or {}).get("bucket") or []
    if any(getattr(d, "urn", None) == bucket.urn for d in deps):
        return True
    name = resource.props.get("bucket")
    return bool(name) and name in (bucket.props.get("bucket"), bucket.props.get("id"), bucket.name)


def backup_bucket_private_and_versioned(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    resources = list(args.resources)
    for bucket in (r for r in resources if r.resource_type in BUCKETS):
        acl = bucket.props.get("acl")
        if acl in PUBLIC_ACLS:
            report_violation(f"{bucket.name}: backup bucket must not be public (acl {acl!r})", bucket.urn)
        inline = (bucket.props.get("versioning") or {}).get("enabled") is True
        versioned = inline or any(
            r.resource_type in VERSIONING and _refers_to(r, bucket)
            and (r.props.get("versioningConfiguration") or {}).get("status") == "Enabled" for r in resources)
        if not versioned:
            report_violation(f"{bucket.name}: backup bucket must be versioned (a BucketVersioning with "
                             "status \"Enabled\"), so a compromised host cannot overwrite old backups", bucket.urn)
        blocks = [r for r in resources if r.resource_type == PUBLIC_ACCESS_BLOCK and _refers_to(r, bucket)]
        if not any(all(b.props.get(flag) is True for flag in BLOCK_FLAGS) for b in blocks):
            report_violation(f"{bucket.name}: backup bucket needs a BucketPublicAccessBlock with "
                             f"{', '.join(BLOCK_FLAGS)} all true", bucket.urn)


def _lifecycle_rules(resource_type: str, props: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(label, rule) for every rule in effect, from a lifecycle configuration or a bucket's inline lifecycleRules."""
    if resource_type in LIFECYCLES:
        rules, active = props.get("rules") or [], lambda r: r.get("status") != "Disabled"
    elif resource_type in BUCKETS:
        rules, active = props.get("lifecycleRules") or [], lambda r: r.get("enabled") is not False
    else:
        return
    for i, rule in enumerate(rules):
        if active(rule):
            yield (repr(rule["id"]) if rule.get("id") else f"#{i + 1}"), rule


def _current_object_changes(rule: Mapping[str, Any]) -> Iterator[str]:
    expirations = rule.get("expiration") or rule.get("expirations") or []
    for expiration in expirations if isinstance(expirations, list) else [expirations]:
        for key in ("days", "date"):
            if expiration.get(key):  # expiredObjectDeleteMarker alone only tidies delete markers
                yield f"expires current objects (expiration.{key} {expiration[key]})"
    for transition in rule.get("transitions") or []:
        yield f"moves current objects to {transition.get('storageClass')}"


def backup_lifecycle_keeps_current(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    for label, rule in _lifecycle_rules(args.resource_type, args.props):
        for change in _current_object_changes(rule):
            report_violation(f"{args.name}: lifecycle rule {label} {change}; restic's repository breaks when a "
                             "current object goes away or cannot be read at once: expire noncurrent versions only",
                             None)


def _resource_policy(name: str, description: str, validate: Any) -> ResourceValidationPolicy:
    return ResourceValidationPolicy(name=name, description=description, validate=validate,
                                    enforcement_level=EnforcementLevel.MANDATORY)


POLICIES: list[Policy] = [
    _resource_policy("no-ssh-from-world", "No SSH from a network wider than admin.sshCidrs allows (/8, /16).",
                     no_ssh_from_world),
    StackValidationPolicy(name="ssh-not-from-everywhere",
                          description="The stack's SSH rules together do not cover every public address.",
                          validate=ssh_not_from_everywhere, enforcement_level=EnforcementLevel.MANDATORY),
    _resource_policy("mail-ports-only", "Security-group ingress only on TCP 25, 465, 587, 993, 995 "
                     "(plus 22 from admin CIDRs and the ICMP of path MTU discovery).", mail_ports_only),
    StackValidationPolicy(name="default-security-group-closed",
                          description="The VPC's default security group has no ingress.",
                          validate=default_security_group_closed, enforcement_level=EnforcementLevel.MANDATORY),
    _resource_policy("imdsv2-required", "Instances and launch templates require IMDSv2 session tokens.",
                     imdsv2_required),
    _resource_policy("ebs-encrypted", "Every EBS volume, root and launch-template block device is encrypted.",
                     ebs_encrypted),
    _resource_policy("data-stores-encrypted", "The directory (RDS) and the edges' shared store (ElastiCache) are "
                     "encrypted; the store in transit too, with an AUTH token.", data_stores_encrypted),
    _resource_policy("mail-data-protected", "The mail-data volume is protected from deletion.", mail_data_protected),
    _resource_policy("dns-not-proxied", "Cloudflare DNS records are not proxied.", dns_not_proxied),
    StackValidationPolicy(name="backup-bucket-private-versioned",
                          description="The backup S3 bucket is versioned and blocks public access.",
                          validate=backup_bucket_private_and_versioned,
                          enforcement_level=EnforcementLevel.MANDATORY),
    _resource_policy("backup-lifecycle-keeps-current", "The backup bucket's lifecycle never expires or transitions "
                     "current objects.", backup_lifecycle_keeps_current),
]
