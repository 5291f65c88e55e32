"""Estimated monthly cost of a stack, from its offline plan and a dated on-demand price table.

    python -m tools.cost Pulumi.small.yaml [--json]

Prices: tools/prices/aws-all-<date>.json (on-demand Linux, USD, per region; every figure says
whether it was confirmed against a public page) and tools/prices/hosted-mail-<date>.json (hosted
alternatives' list prices per user). The newest file by name is used.

What is counted, from the resources the program registers: each instance (730 hours a month),
each root volume and the mail-data volume (gp3 GB-month, plus IOPS and throughput provisioned
above gp3's free 3000 IOPS / 125 MiB/s), and each Elastic IP (public IPv4 address-hours). Two
lines are estimates with stated assumptions (ASSUMPTIONS below): EBS snapshots of the mail volume
and the off-host backup in S3. Not counted: data transfer out (mail traffic is small next to the
instance, but heavy senders should add it), SSM, CloudWatch, DNS (Cloudflare), taxes, and
burstable CPU credits (the program runs t3 in "standard" mode, which never bills surplus credits).
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

# Stated assumptions for the two estimated lines.
ASSUMPTIONS = {
    "mailVolumeUsedShare": 0.5,  # share of the mail-data volume actually holding mail
    "imageSnapshotGb": 2.0,  # the stack's copy of the Debian AMI: the used blocks of an 8 GB root
    "snapshotFactor": 1.2,  # incremental EBS snapshots kept: one full copy + 20% changed blocks
    "backupFactor": 1.3,  # deduplicated, versioned off-host backup (restic in S3): used data + 30%
}
ASSUMPTION_TEXT = (
    "mail volume {used:.0%} full; EBS snapshots hold {snap:.1f}x the used data (first snapshot full, then "
    "incremental); the S3 backup holds {backup:.1f}x the used data (deduplicated, versioned). Snapshot policy and "
    "backup bucket are estimated even before the stack creates them."
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
    per_mailbox_at_min: float  # total / users_min: the most a mailbox costs in this tier
    per_mailbox_at_max: float | None  # total / users_max: the least (None: open-ended tier)
    assumptions: str
    unconfirmed: tuple[str, ...]


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

    tier = TIERS[settings.tier]
    total = _money(sum(line.monthly for line in lines))
    status: dict[str, str] = p.get("status", {})
    unconfirmed = tuple(f"{settings.region} {k}" for k in ("instanceHourly", "gp3GbMonth", "gp3IopsMonth",
                                                           "gp3ThroughputMiBpsMonth", "snapshotGbMonth",
                                                           "publicIpv4Hourly", "s3StandardGbMonth")
                        if not status.get(k, status.get("*", "")).startswith("confirmed"))
    return Estimate(
        stack=settings.stack, region=settings.region, tier=settings.tier, price_date=str(table["date"]),
        lines=tuple(lines), monthly_total=total, users_min=tier.users_min, users_max=tier.users_max,
        per_mailbox_at_min=_money(total / tier.users_min),
        per_mailbox_at_max=_money(total / tier.users_max) if tier.users_max else None,
        assumptions=ASSUMPTION_TEXT.format(used=ASSUMPTIONS["mailVolumeUsedShare"],
                                           snap=ASSUMPTIONS["snapshotFactor"], backup=ASSUMPTIONS["backupFactor"]),
        unconfirmed=unconfirmed)


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
    doc["hostedAlternatives"] = {"date": hosted["date"], "alternatives": hosted["alternatives"]}
    return doc


def format_cost(section: dict[str, Any]) -> str:
    out = [f"Estimated monthly cost ({section['region']}, on-demand prices of {section['price_date']}, USD):"]
    for line in section["lines"]:
        note = f"  [{line['note']}]" if line["note"] else ""
        out.append(f"  {line['item']:<58} {line['quantity']:>9.1f} {line['unit']:<14} x {line['unit_price']:<8g}"
                   f" = {line['monthly']:>9.2f}{note}")
    out.append(f"  {'total':<58} {'':>9} {'':<14}   {'':<8} = {section['monthly_total']:>9.2f}")
    lo, hi = section["users_min"], section["users_max"]
    per = f"  per mailbox, tier {section['tier']} ({lo}-{hi or 'more'} users): {section['per_mailbox_at_min']:.2f} at {lo}"
    if hi:
        per += f", {section['per_mailbox_at_max']:.2f} at {hi}"
    out.append(per)
    out.append(f"  assumptions: {section['assumptions']}")
    if section["unconfirmed"]:
        out.append(f"  unconfirmed prices (verify on the AWS pricing pages): {', '.join(section['unconfirmed'])}")
    hosted = section["hostedAlternatives"]
    out.append(f"Hosted alternatives, list price per user and month ({hosted['date']}):")
    for alt in hosted["alternatives"]:
        out.append(f"  {alt['name']:<42} {alt['perUserMonth']:>6.2f} {alt['currency']} ({alt['billing']}, "
                   f"{alt['mailboxGb']} GB) [{alt['status']}]")
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
