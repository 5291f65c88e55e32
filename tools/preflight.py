"""What an account must have before a first `pulumi up`: facts no offline plan can check.

The plan prints these (tools.plan); the README's "Real deployment" lists the same. Each fact comes
with the command that checks it on the account.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from components.boundary import CREATE_COMMAND, boundary_arn
from components.settings import Settings
from components.tiers import INSTANCE_SPECS, TIERS


@dataclass(frozen=True)
class VcpuQuota:
    code: str  # Service Quotas code (service "ec2")
    name: str


# EC2 counts On-Demand instances in vCPUs per quota group, by instance family.
STANDARD = VcpuQuota("L-1216C47A", "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances")
QUOTA_OF_FAMILY: dict[str, VcpuQuota] = {"t3": STANDARD, "m6i": STANDARD, "m6in": STANDARD}
ELASTIC_IP_QUOTA = VcpuQuota("L-0263D0A3", "EC2-VPC Elastic IPs")
ELASTIC_IP_DEFAULT = 5  # per region, unless raised


def host_types(settings: Settings) -> tuple[str, ...]:
    """The instance type of every host of the stack, mailbox host first; in a cluster every shard, relay and
    edge at the group's maximum size (the quota must hold a scale-out)."""
    c = settings.cluster
    if c is not None:
        relay = TIERS[settings.tier].relay_instance_type
        return (*(c.shard_instance_type,) * c.shards, *(relay,) * c.relays, *(c.edge_instance_type,) * c.edges_max)
    return TIERS[settings.tier].host_types


def elastic_ips(settings: Settings) -> int:
    """One per host; in a cluster one per zone (the load balancer's), per shard and per relay."""
    c = settings.cluster
    return c.zones + c.shards + c.relays if c is not None else TIERS[settings.tier].host_count


def _summary(types: tuple[str, ...]) -> str:
    counts = Counter(types)
    return " + ".join(f"{n} x {t}" if n > 1 else t for t, n in counts.items())


def vcpus_needed(settings: Settings) -> dict[VcpuQuota, int]:
    """vCPUs per quota group, of the instance types this table knows (a cluster may name others)."""
    needed: Counter[VcpuQuota] = Counter()
    for instance_type in host_types(settings):
        quota = QUOTA_OF_FAMILY.get(instance_type.split(".")[0])
        if quota is not None and instance_type in INSTANCE_SPECS:
            needed[quota] += INSTANCE_SPECS[instance_type].vcpu
    return dict(needed)


def preflight(settings: Settings) -> list[str]:
    """Lines to print before a first deploy, each with how to check it."""
    region = settings.region
    types = sorted(set(host_types(settings)))
    lines = []
    listed = " + ".join(host_types(settings)) if settings.cluster is None else _summary(host_types(settings))
    unknown = sorted({t for t in host_types(settings)
                      if t not in INSTANCE_SPECS or t.split(".")[0] not in QUOTA_OF_FAMILY})
    for quota, vcpus in vcpus_needed(settings).items():
        lines.append(
            f"vCPU quota: {vcpus} vCPUs of '{quota.name}' in {region} ({listed}); "
            f"new accounts often have less. Check: aws service-quotas get-service-quota --service-code ec2 "
            f"--quota-code {quota.code} --region {region}")
    if unknown:
        lines.append(f"vCPU quota: also the vCPUs of {', '.join(unknown)} (not in components/tiers.py's table) in "
                     "their quota group; see the instance type's page")
    hosts = elastic_ips(settings)
    lines.append(
        f"Elastic IPs: {hosts} of the {ELASTIC_IP_DEFAULT} per region by default ('{ELASTIC_IP_QUOTA.name}', "
        f"{ELASTIC_IP_QUOTA.code}); addresses other stacks hold count too."
        + (" More than the default: ask for an increase first." if hosts > ELASTIC_IP_DEFAULT else ""))
    where = "one zone" if settings.cluster is None else f"{settings.cluster.zones} zones"
    lines.append(
        f"Instance types offered: {', '.join(types)} must be offered in {where} of {region} that need no opt-in "
        "(the program chooses; preview stops with a clear error if too few do). Check: "
        f"aws ec2 describe-instance-type-offerings --location-type availability-zone "
        f"--filters Name=instance-type,Values={','.join(types)} --region {region}")
    lines.append(
        "Port 25: AWS blocks outbound TCP 25 until it approves the account's 'Request to remove email sending "
        "limitations' (give the Elastic IPs and their reverse DNS, which this stack sets). Until then mail to "
        "other domains waits in the queue.")
    lines.append(
        f"Permissions boundary: every IAM role and user of the stack carries {boundary_arn('<account>')}, which "
        "an account administrator creates once per account (the deploy role may not); without it preview stops "
        f"before creating anything. Create it with administrator credentials, from this repository: {CREATE_COMMAND}")
    lines.append(
        "Cloudflare: the deploying token needs DNS edit on every mail domain's zone, Workers scripts and Workers "
        "routes edit on the account (MTA-STS/autoconfig Worker and its custom domains), and API token creation "
        "(the stack makes the narrower certbot token).")
    lines.append(
        "Existing DNS records: an SPF, DMARC, MX, MTA-STS, TLS-RPT, DKIM or CAA record already in a mail domain "
        "would be duplicated (two SPF records fail every message). Check, and change what it names: "
        f"python -m tools.verify Pulumi.{settings.stack}.yaml --pre-deploy")
    if settings.cluster is not None:
        lines.append(
            "Cluster: the deploy role needs docs/iam/deploy-cluster-policy.json attached beside its inline policy "
            "(docs/pull-requests.md); the first load balancer, Auto Scaling group, RDS instance and ElastiCache "
            "replication group of the account create their services' service-linked roles. Quotas: Network Load "
            "Balancers per region (50), Auto Scaling groups (500), RDS DB instances (40) and their storage "
            "(100,000 GB) by default, and ElastiCache's nodes per region (Service Quotas shows the account's). RDS must offer "
            f"{settings.cluster.directory_instance_class} for PostgreSQL Multi-AZ in {region}. Check: aws rds "
            "describe-orderable-db-instance-options --engine postgres --engine-version 17 --db-instance-class "
            f"{settings.cluster.directory_instance_class} --region {region}. ElastiCache must offer "
            f"{settings.cluster.cache_node_type} for Valkey in {region}. Check: aws elasticache "
            f"describe-reserved-cache-nodes-offerings --cache-node-type {settings.cluster.cache_node_type} "
            f"--region {region}")
    return lines


def image_note(source_ami: str, pinned: bool) -> str:
    """Which image hosts and their replacements boot."""
    how = ("orgmail:amiId (a new id makes a new copy)" if pinned
           else "the newest Debian 13 AMI at first deploy; later Debian releases are ignored")
    return (f"Image: every host, and every replacement of one, boots the stack's own encrypted copy of "
            f"{source_ami} ({how}). Debian deregistering its AMI does not affect the copy. To move to a newer "
            "Debian image: set orgmail:amiId, or `pulumi up --replace` the aws:ec2/amiCopy:AmiCopy resource.")
