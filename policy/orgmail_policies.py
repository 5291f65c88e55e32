"""orgmail's mandatory guard rails as CrossGuard policies.

Each validate function takes pulumi-policy's ResourceValidationArgs (or StackValidationArgs) and a
report_violation callback. Property names are the engine's camelCase wire names (cidrIpv4,
metadataOptions.httpTokens, ...), the same the program's mock tests see.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
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
WORLD = {"0.0.0.0/0", "::/0"}

SG = "aws:ec2/securityGroup:SecurityGroup"
SG_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
INSTANCE = "aws:ec2/instance:Instance"
VOLUME = "aws:ebs/volume:Volume"
DNS_RECORDS = ("cloudflare:index/dnsRecord:DnsRecord", "cloudflare:index/record:Record")
BUCKETS = ("aws:s3/bucketV2:BucketV2", "aws:s3/bucket:Bucket")
VERSIONING = ("aws:s3/bucketVersioningV2:BucketVersioningV2", "aws:s3/bucketVersioning:BucketVersioning")
PUBLIC_ACCESS_BLOCK = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
PUBLIC_ACLS = {"public-read", "public-read-write", "authenticated-read"}
BLOCK_FLAGS = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")


def ingress_rules(resource_type: str, props: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every ingress rule a resource opens, as {protocol, from, to, cidrs}, whatever resource shape it has."""
    if resource_type == INGRESS_RULE:
        cidrs = [c for c in (props.get("cidrIpv4"), props.get("cidrIpv6")) if c]
        yield {"protocol": str(props.get("ipProtocol", "")), "from": props.get("fromPort"),
               "to": props.get("toPort"), "cidrs": cidrs}
    elif resource_type == SG_RULE and props.get("type") == "ingress":
        yield {"protocol": str(props.get("protocol", "")), "from": props.get("fromPort"), "to": props.get("toPort"),
               "cidrs": list(props.get("cidrBlocks") or []) + list(props.get("ipv6CidrBlocks") or [])}
    elif resource_type == SG:
        for rule in props.get("ingress") or []:
            yield {"protocol": str(rule.get("protocol", "")), "from": rule.get("fromPort"), "to": rule.get("toPort"),
                   "cidrs": list(rule.get("cidrBlocks") or []) + list(rule.get("ipv6CidrBlocks") or [])}


def _covers(rule: Mapping[str, Any], port: int) -> bool:
    if rule["protocol"] in ("-1", "all"):
        return True
    lo, hi = rule["from"], rule["to"]
    return rule["protocol"] in ("tcp", "6") and lo is not None and hi is not None and int(lo) <= port <= int(hi)


def _is_world(cidr: str) -> bool:
    try:
        return ipaddress.ip_network(cidr, strict=False).prefixlen == 0
    except ValueError:
        return cidr in WORLD


def _where(rule: Mapping[str, Any]) -> str:
    return f"{rule['protocol']} {rule['from']}-{rule['to']} from {', '.join(rule['cidrs']) or '(no CIDR)'}"


def no_ssh_from_world(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    for rule in ingress_rules(args.resource_type, args.props):
        world = [c for c in rule["cidrs"] if _is_world(c)]
        if world and _covers(rule, SSH):
            report_violation(f"{args.name}: SSH (port 22) is open to {', '.join(world)}; "
                             "allow it from admin.sshCidrs only, or use SSM Session Manager", None)


def mail_ports_only(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    for rule in ingress_rules(args.resource_type, args.props):
        single_tcp = rule["protocol"] in ("tcp", "6") and rule["from"] is not None and rule["from"] == rule["to"]
        port = int(rule["from"]) if single_tcp else None
        if port in MAIL_PORTS:
            continue
        if port == SSH and rule["cidrs"] and not any(_is_world(c) for c in rule["cidrs"]):
            continue
        report_violation(f"{args.name}: ingress {_where(rule)} is not allowed; only TCP "
                         f"{', '.join(map(str, MAIL_PORTS))} (and 22 from admin CIDRs) may be open", None)


def imdsv2_required(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if args.resource_type != INSTANCE:
        return
    tokens = (args.props.get("metadataOptions") or {}).get("httpTokens")
    if tokens != "required":
        report_violation(f"{args.name}: instance metadata must require IMDSv2 tokens "
                         f"(metadataOptions.httpTokens = \"required\", got {tokens!r})", None)


def ebs_encrypted(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if args.resource_type == VOLUME and args.props.get("encrypted") is not True:
        report_violation(f"{args.name}: EBS volume must be encrypted (encrypted = true)", None)
    elif args.resource_type == INSTANCE:
        root = args.props.get("rootBlockDevice")
        if not root or root.get("encrypted") is not True:
            report_violation(f"{args.name}: root block device must be encrypted (rootBlockDevice.encrypted = true)",
                             None)
        for device in args.props.get("ebsBlockDevices") or []:
            if device.get("encrypted") is not True:
                report_violation(f"{args.name}: EBS block device {device.get('deviceName')} must be encrypted", None)


def is_mail_data_volume(args: ResourceValidationArgs) -> bool:
    tags = args.props.get("tags") or {}
    return args.resource_type == VOLUME and (tags.get("orgmail:role") == "mailbox" or args.name.endswith("-data"))


def mail_data_protected(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if is_mail_data_volume(args) and not args.opts.protect:
        report_violation(f"{args.name}: the mail-data volume holds every mailbox; it must be created with "
                         "protect=True so `pulumi destroy` and replacements cannot delete it", None)


def dns_not_proxied(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if args.resource_type in DNS_RECORDS and args.props.get("proxied") is True:
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


def _resource_policy(name: str, description: str, validate: Any) -> ResourceValidationPolicy:
    return ResourceValidationPolicy(name=name, description=description, validate=validate,
                                    enforcement_level=EnforcementLevel.MANDATORY)


POLICIES: list[Policy] = [
    _resource_policy("no-ssh-from-world", "No SSH from 0.0.0.0/0 or ::/0.", no_ssh_from_world),
    _resource_policy("mail-ports-only", "Security-group ingress only on TCP 25, 465, 587, 993, 995 "
                     "(plus 22 from admin CIDRs).", mail_ports_only),
    _resource_policy("imdsv2-required", "Instances require IMDSv2 session tokens.", imdsv2_required),
    _resource_policy("ebs-encrypted", "Every EBS volume and root block device is encrypted.", ebs_encrypted),
    _resource_policy("mail-data-protected", "The mail-data volume is protected from deletion.", mail_data_protected),
    _resource_policy("dns-not-proxied", "Cloudflare DNS records are not proxied.", dns_not_proxied),
    StackValidationPolicy(name="backup-bucket-private-versioned",
                          description="The backup S3 bucket is versioned and blocks public access.",
                          validate=backup_bucket_private_and_versioned,
                          enforcement_level=EnforcementLevel.MANDATORY),
]
