"""Estimated monthly cost of a stack, from its offline plan and a dated on-demand price table.

    python -m tools.cost Pulumi.small.yaml [--json]

Prices: tools/prices/aws-all-<date>.json (on-demand Linux, USD, per region; every figure says
whether it was confirmed against a public page) and tools/prices/hosted-mail-<date>.json (hosted
alternatives' list prices per user). The newest file by name is used.

What is counted, from the resources the program registers: each instance (730 hours a month),
each root volume and the mail-data volume (gp3 GB-month, plus IOPS and throughput provisioned
above gp3's free 3000 IOPS / 125 MiB/s), and each Elastic IP (public IPv4 address-hours). Three
lines are estimates with stated assumptions (ASSUMPTIONS below): EBS snapshots of the mail volume,
the off-host backup in S3, and data transfer out to the internet (clients downloading mail, mail
sent out), per mailbox of the stack. What is not counted is printed with the estimate (EXCLUSIONS).

Per-mailbox figures use the stack's own mailboxes: the total divided by their number, the mail
volume's share of each, and, beside each hosted plan, what this stack would cost per mailbox with
that plan's storage per mailbox (the mail volume grown to it, full, snapshotted and backed up).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.backup import SNAPSHOT_TAG
from components.settings import ConfigError, Settings, load_settings, raw_from_pulumi_config
from components.tiers import TIERS
from tools.mockengine import MockRun, run_program

PRICES_DIR = Path(__file__).resolve().parent / "prices"
INSTANCE = "aws:ec2/instance:Instance"
VOLUME = "aws:ebs/volume:Volume"
IMAGE_COPY = "aws:ec2/amiCopy:AmiCopy"
EIP = "aws:ec2/eip:Eip"
BUCKETS = ("aws:s3/bucketV2:BucketV2", "aws:s3/bucket:Bucket")
GROUP = "aws:autoscaling/group:Group"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
LOAD_BALANCER = "aws:lb/loadBalancer:LoadBalancer"
DATABASE = "aws:rds/instance:Instance"
CACHE = "aws:elasticache/replicationGroup:ReplicationGroup"

# Stated assumptions for the two estimated lines.
ASSUMPTIONS = {
    "mailVolumeUsedShare": 0.5,  # share of the mail-data volume actually holding mail
    "imageSnapshotGb": 2.0,  # the stack's copy of the Debian AMI: the used blocks of an 8 GB root
    "snapshotFactor": 1.2,  # incremental EBS snapshots kept: one full copy + 20% changed blocks
    "backupFactor": 1.3,  # deduplicated, versioned off-host backup (restic in S3): used data + 30%
    # Internet egress per mailbox: its clients download each message (about 100 a day of 75 KB, on three
    # devices: 0.7 GB) plus what it sends and any forwarding (0.3 GB).
    "egressGbPerMailboxMonth": 1.0,
    # With outbound.relay ses: what each mailbox sends out through SES (recipients counted one by one) and the
    # attachments among it (part of the 0.3 GB sent above).
    "sesMessagesPerMailboxMonth": 400,
    "sesAttachmentGbPerMailboxMonth": 0.2,
}
SES_IDENTITY = "aws:sesv2/emailIdentity:EmailIdentity"
SES_ASSUMPTION_TEXT = (" Through the Amazon SES relay each mailbox sends {messages} messages a month (each recipient "
                       "counts), {gb:g} GB of it attachments.")
ASSUMPTION_TEXT = (
    "mail volume {used:.0%} full; EBS snapshots hold {snap:.1f}x the used data (first snapshot full, then "
    "incremental); the S3 backup holds {backup:.1f}x the used data (deduplicated, versioned); clients and outgoing "
    "mail take {egress:g} GB a month per mailbox out to the internet. Snapshot policy and backup bucket are "
    "estimated even before the stack creates them."
)
# What the estimate leaves out; printed with it.
EXCLUSIONS: tuple[str, ...] = (
    "AWS's 100 GB of free data transfer out a month (shared by the whole account; not subtracted)",
    "data transfer out beyond the first 10 TB a month (cheaper tiers) and between the stack's hosts (relays to "
    "the mailbox host over public addresses)",
    "CloudWatch alarms and metrics, SNS notifications, SSM parameters and API calls, S3 requests",
    "Cloudflare (DNS, Workers on the free plan)",
    "taxes, AWS support plans, and the administrator's time",
    "burstable CPU credits (t3 runs in standard mode, which never bills surplus credits)",
)


class PriceError(ValueError):
    """The price table has no figure for what the stack uses (unknown region or instance type)."""


@dataclass(frozen=True)
class Line:
    item: str
    quantity: float
    unit: str
    unit_price: float
    monthly: float
    note: str = ""


@dataclass(frozen=True)
class Estimate:
    stack: str
    region: str
    tier: str
    price_date: str
    lines: tuple[Line, ...]
    monthly_total: float
    users_min: int
    users_max: int | None
    mailboxes: int  # the stack's own mailboxes
    per_mailbox: float | None  # total / mailboxes (None: no mailbox configured)
    storage_per_mailbox_gb: float | None  # the mail volume / mailboxes
    storage_gb_month_full: float  # a GB of mail kept: volume, snapshots and backup of a full volume
    mail_volume_gb: float
    assumptions: str
    unconfirmed: tuple[str, ...]
    # What the stack creates that the price table has no figure for (a cluster's load balancer, directory and
    # store):
    # named, never counted as free. The total leaves them out.
    unpriced: tuple[str, ...] = ()


def latest(prefix: str, directory: Path = PRICES_DIR) -> Path:
    files = sorted(directory.glob(f"{prefix}-*.json"))
    if not files:
        raise PriceError(f"no price table {prefix}-<date>.json in {directory}")
    return files[-1]


def load_prices(path: Path | None = None) -> dict[str, Any]:
    table: dict[str, Any] = json.loads((path or latest("aws-all")).read_text())
    return table


def region_prices(table: dict[str, Any], region: str) -> dict[str, Any]:
    regions: dict[str, Any] = table["regions"]
    if region not in regions:
        raise PriceError(f"no prices for region {region!r} in the {table['date']} table; "
                         f"priced regions: {', '.join(sorted(regions))} (add the region to tools/prices/)")
    prices: dict[str, Any] = regions[region]
    return prices


def _money(x: float) -> float:
    return round(x, 2)


def estimate(run: MockRun, settings: Settings, table: dict[str, Any] | None = None) -> Estimate:
    table = table or load_prices()
    p = region_prices(table, settings.region)
    hours = float(table["hoursPerMonth"])
    base_iops = float(table["gp3Baseline"]["iops"])
    base_tput = float(table["gp3Baseline"]["throughputMiBps"])
    lines: list[Line] = []

    for r in run.of_type(INSTANCE):
        itype = str(r.inputs["instanceType"])
        if itype not in p["instanceHourly"]:
            raise PriceError(f"no {settings.region} price for instance type {itype} in the {table['date']} table")
        rate = float(p["instanceHourly"][itype])
        lines.append(Line(f"instance {r.name} ({itype})", hours, "hours", rate, _money(hours * rate)))
        root = r.inputs.get("rootBlockDevice") or {}
        size = float(root.get("volumeSize", 8))
        lines.append(Line(f"root volume of {r.name} (gp3)", size, "GB-month", p["gp3GbMonth"],
                          _money(size * p["gp3GbMonth"])))

    # A cluster's edges: its Auto Scaling group at its desired size, each edge with its root volume and the
    # public IPv4 address it gets for egress (billed like an Elastic IP).
    templates = {t.id: t for t in run.of_type(LAUNCH_TEMPLATE)}
    for r in run.of_type(GROUP):
        template = templates[r.inputs["launchTemplate"]["id"]].inputs
        itype, count = str(template["instanceType"]), float(r.inputs["desiredCapacity"])
        if itype not in p["instanceHourly"]:
            raise PriceError(f"no {settings.region} price for instance type {itype} in the {table['date']} table")
        rate = float(p["instanceHourly"][itype])
        lines.append(Line(f"{count:g} edges of {r.name} ({itype}, desired capacity)", count * hours, "hours", rate,
                          _money(count * hours * rate)))
        root = sum(float(m["ebs"]["volumeSize"]) for m in template.get("blockDeviceMappings", []))
        lines.append(Line(f"root volumes of the {count:g} edges (gp3)", count * root, "GB-month", p["gp3GbMonth"],
                          _money(count * root * p["gp3GbMonth"])))
        if any(n.get("associatePublicIpAddress") == "true" for n in template.get("networkInterfaces", [])):
            lines.append(Line(f"public IPv4 of the {count:g} edges (egress)", count * hours, "address-hours",
                              p["publicIpv4Hourly"], _money(count * hours * p["publicIpv4Hourly"])))
    unpriced: list[str] = []
    for r in run.of_type(LOAD_BALANCER):
        unpriced.append(f"Network Load Balancer {r.name}: its hourly charge and load-balancer capacity units (NLCU), and "
                        "the inter-zone data transfer of cross-zone load balancing (the price table has no Elastic "
                        "Load Balancing figures)")
    for r in run.of_type(DATABASE):
        i = r.inputs
        copies = 2 if i.get("multiAz") else 1
        unpriced.append(f"RDS for PostgreSQL {r.name}: {copies} x {i['instanceClass']} instance hours (Multi-AZ bills the "
                        f"standby), {copies} x {float(i['allocatedStorage']):g} GB {i.get('storageType', 'gp2')} storage, backups "
                        "beyond the database's size, and its master secret in Secrets Manager (the price table has no "
                        "RDS or Secrets Manager figures)")
    for r in run.of_type(CACHE):
        i = r.inputs
        unpriced.append(f"ElastiCache ({i.get('engine', 'redis')}) {r.name}: {float(i.get('numCacheClusters', 1)):g} x "
                        f"{i['nodeType']} node hours, snapshots beyond one node's size, and the inter-zone traffic "
                        "between the edges and the store (the price table has no ElastiCache figures)")

    mail_gb = 0.0
    for r in run.of_type(VOLUME):
        size = float(r.inputs["size"])
        if SNAPSHOT_TAG in (r.inputs.get("tags") or {}):  # mail data; a relay's queue is neither snapshotted nor backed up
            mail_gb += size
        lines.append(Line(f"volume {r.name} (gp3)", size, "GB-month", p["gp3GbMonth"], _money(size * p["gp3GbMonth"])))
        extra_iops = max(0.0, float(r.inputs.get("iops", base_iops)) - base_iops)
        if extra_iops:
            lines.append(Line(f"volume {r.name}: IOPS above {base_iops:.0f}", extra_iops, "IOPS-month",
                              p["gp3IopsMonth"], _money(extra_iops * p["gp3IopsMonth"])))
        extra_tput = max(0.0, float(r.inputs.get("throughput", base_tput)) - base_tput)
        if extra_tput:
            lines.append(Line(f"volume {r.name}: throughput above {base_tput:.0f} MiB/s", extra_tput, "MiB/s-month",
                              p["gp3ThroughputMiBpsMonth"], _money(extra_tput * p["gp3ThroughputMiBpsMonth"])))

    for r in run.of_type(EIP):
        lines.append(Line(f"public IPv4 of {r.name} (Elastic IP)", hours, "address-hours", p["publicIpv4Hourly"],
                          _money(hours * p["publicIpv4Hourly"])))

    for r in run.of_type(IMAGE_COPY):
        # The copy's snapshot holds the used blocks of Debian's 8 GB root (about 2 GB).
        gb = ASSUMPTIONS["imageSnapshotGb"]
        lines.append(Line(f"snapshot of the image copy {r.name} (estimate)", gb, "GB-month", p["snapshotGbMonth"],
                          _money(gb * p["snapshotGbMonth"]), "assumption"))

    used = mail_gb * ASSUMPTIONS["mailVolumeUsedShare"]
    snap = used * ASSUMPTIONS["snapshotFactor"]
    lines.append(Line("EBS snapshots of the mail data (estimate)", snap, "GB-month", p["snapshotGbMonth"],
                      _money(snap * p["snapshotGbMonth"]), "assumption"))
    backup = used * ASSUMPTIONS["backupFactor"]
    exists = any(run.of_type(t) for t in BUCKETS)
    lines.append(Line("off-host backup in S3 Standard (estimate)", backup, "GB-month", p["s3StandardGbMonth"],
                      _money(backup * p["s3StandardGbMonth"]), "assumption" if exists else "assumption; not created yet"))

    count, who = len(settings.mailboxes), f"{len(settings.mailboxes)} mailboxes"
    if settings.cluster is not None:
        # A cluster's users live in its directory, not in the config: the tier's smallest size, said so.
        count = TIERS[settings.tier].users_min
        who = f"{count} users assumed"
    egress = count * ASSUMPTIONS["egressGbPerMailboxMonth"]
    lines.append(Line(f"data transfer out to the internet, {who} (estimate)", egress, "GB",
                      p["dataTransferOutGb"], _money(egress * p["dataTransferOutGb"]), "assumption"))

    if run.of_type(SES_IDENTITY):
        ses = table["ses"]
        messages = count * ASSUMPTIONS["sesMessagesPerMailboxMonth"]
        lines.append(Line(f"Amazon SES relay: messages sent, {who} (estimate)", messages / 1000,
                          "1,000 messages", ses["per1000Messages"], _money(messages / 1000 * ses["per1000Messages"]),
                          "assumption"))
        attached = count * ASSUMPTIONS["sesAttachmentGbPerMailboxMonth"]
        lines.append(Line("Amazon SES relay: attachments sent (estimate)", attached, "GB", ses["perGbAttachments"],
                          _money(attached * ses["perGbAttachments"]), "assumption"))

    tier = TIERS[settings.tier]
    total = _money(sum(line.monthly for line in lines))
    status: dict[str, str] = p.get("status", {})
    unconfirmed = tuple(f"{settings.region} {k}" for k in ("instanceHourly", "gp3GbMonth", "gp3IopsMonth",
                                                           "gp3ThroughputMiBpsMonth", "snapshotGbMonth",
                                                           "publicIpv4Hourly", "s3StandardGbMonth", "dataTransferOutGb")
                        if not status.get(k, status.get("*", "")).startswith("confirmed"))
    if run.of_type(SES_IDENTITY):
        unconfirmed += tuple(f"ses {k}" for k, v in table["ses"]["status"].items() if not v.startswith("confirmed"))
    full = (p["gp3GbMonth"] + ASSUMPTIONS["snapshotFactor"] * p["snapshotGbMonth"]
            + ASSUMPTIONS["backupFactor"] * p["s3StandardGbMonth"])
    return Estimate(
        stack=settings.stack, region=settings.region, tier=settings.tier, price_date=str(table["date"]),
        lines=tuple(lines), monthly_total=total, users_min=tier.users_min, users_max=tier.users_max,
        mailboxes=count, per_mailbox=_money(total / count) if count else None,
        storage_per_mailbox_gb=mail_gb / count if count else None, storage_gb_month_full=full, mail_volume_gb=mail_gb,
        assumptions=ASSUMPTION_TEXT.format(used=ASSUMPTIONS["mailVolumeUsedShare"],
                                           snap=ASSUMPTIONS["snapshotFactor"], backup=ASSUMPTIONS["backupFactor"],
                                           egress=ASSUMPTIONS["egressGbPerMailboxMonth"])
        + (SES_ASSUMPTION_TEXT.format(messages=ASSUMPTIONS["sesMessagesPerMailboxMonth"],
                                      gb=ASSUMPTIONS["sesAttachmentGbPerMailboxMonth"])
           if run.of_type(SES_IDENTITY) else ""),
        unconfirmed=unconfirmed, unpriced=tuple(unpriced))


def at_storage(est: Estimate, gb_per_mailbox: float) -> float | None:
    """This stack's cost per mailbox if each mailbox had `gb_per_mailbox` (the mail volume grown to
    mailboxes x that, the added part full, snapshotted and backed up); None without mailboxes."""
    if not est.mailboxes:
        return None
    extra = max(0.0, est.mailboxes * gb_per_mailbox - est.mail_volume_gb)
    return _money((est.monthly_total + extra * est.storage_gb_month_full) / est.mailboxes)


def hosted_alternatives(path: Path | None = None) -> dict[str, Any]:
    table: dict[str, Any] = json.loads((path or latest("hosted-mail")).read_text())
    return table


def cost_section(run: MockRun, settings: Settings) -> dict[str, Any]:
    """The cost part of the offline plan, as JSON-ready data."""
    est = estimate(run, settings)
    hosted = hosted_alternatives()
    doc = asdict(est)
    doc["lines"] = [asdict(line) for line in est.lines]
    doc["currency"] = "USD"
    doc["exclusions"] = list(EXCLUSIONS)
    doc["ses"] = ses_section(run, settings, table=load_prices())
    doc["hostedAlternatives"] = {"date": hosted["date"], "alternatives": [
        {**alt, "orgmailPerMailboxAtThisStorage": at_storage(est, float(alt["mailboxGb"]))}
        for alt in hosted["alternatives"]]}
    return doc


def ses_section(run: MockRun, settings: Settings, table: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What relaying through SES costs (outbound.relay ses), per 1,000 messages; None with direct."""
    if not run.of_type(SES_IDENTITY):
        return None
    ses = (table or load_prices())["ses"]
    return {"region": settings.outbound.ses_region, "per1000Messages": ses["per1000Messages"],
            "perGbAttachments": ses["perGbAttachments"], "status": ses["status"], "note": ses["note"]}


def format_cost(section: dict[str, Any]) -> str:
    out = [f"Estimated monthly cost ({section['region']}, on-demand prices of {section['price_date']}, USD):"]
    for line in section["lines"]:
        note = f"  [{line['note']}]" if line["note"] else ""
        out.append(f"  {line['item']:<58} {line['quantity']:>9.1f} {line['unit']:<14} x {line['unit_price']:<8g}"
                   f" = {line['monthly']:>9.2f}{note}")
    total = "total, without the unpriced items below" if section.get("unpriced") else "total"
    out.append(f"  {total:<58} {'':>9} {'':<14}   {'':<8} = {section['monthly_total']:>9.2f}")
    if section.get("unpriced"):
        out.append("  Not priced (no figure in the price table; add them to tools/prices/ to count them):")
        out += [f"    - {u}" for u in section["unpriced"]]
    count = section["mailboxes"]
    if count:
        out.append(f"  per mailbox, at this stack's {count} mailboxes: {section['per_mailbox']:.2f} "
                   f"({section['storage_per_mailbox_gb']:.1f} GB of mail volume each)")
    else:
        out.append("  per mailbox: no mailbox configured")
    ses = section.get("ses")
    if ses:
        out.append(f"  Amazon SES relay ({ses['region']}): {ses['per1000Messages']:g} USD per 1,000 messages sent (every "
                   f"recipient counts) plus {ses['perGbAttachments']:g} USD per GB of attachments; the free tier of a "
                   "new account is not subtracted")
    out.append(f"  assumptions: {section['assumptions']}")
    out.append("  Not included:")
    out += [f"    - {e}" for e in section["exclusions"]]
    if section["unconfirmed"]:
        out.append(f"  unconfirmed prices (verify on the AWS pricing pages): {', '.join(section['unconfirmed'])}")
    hosted = section["hostedAlternatives"]
    out.append(f"Hosted alternatives, list price per user and month ({hosted['date']}), beside this stack per "
               "mailbox with the same storage:")
    for alt in hosted["alternatives"]:
        ours = alt["orgmailPerMailboxAtThisStorage"]
        beside = f"; orgmail at {alt['mailboxGb']} GB per mailbox: {ours:.2f} USD" if ours is not None else ""
        out.append(f"  {alt['name']:<42} {alt['perUserMonth']:>6.2f} {alt['currency']} ({alt['billing']}, "
                   f"{alt['mailboxGb']} GB{beside}) [{alt['status']}]")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from tools.stackfile import StackFileError, load_stack_config, project_name, stack_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack_file", type=Path, help="Pulumi.<stack>.yaml")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = parser.parse_args(argv)
    stack = stack_name(args.stack_file)
    try:
        config = load_stack_config(args.stack_file)
    except StackFileError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        project = project_name(args.stack_file)
        settings = load_settings(raw_from_pulumi_config(config), stack, project)
        section = cost_section(run_program(config, stack, project=project), settings)
    except (ConfigError, PriceError) as e:
        print(f"{args.stack_file}: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(section, sys.stdout, indent=2)
        print()
    else:
        print(format_cost(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
