"""Cost estimate per example stack: positive, lines add up, per-mailbox = total / users, tier and region move it."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.settings import Settings, load_settings, raw_from_pulumi_config
from components.tiers import TIERS
from tools.cost import ASSUMPTIONS, PriceError, cost_section, estimate, format_cost, load_prices
from tools.mockengine import MockRun, run_program

ROOT = Path(__file__).resolve().parents[2]
STACKS = ("dev", "small", "medium", "large", "isp-single")


def config_of(stack: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    return config


@functools.cache
def planned(stack: str, tier: str | None = None, region: str | None = None) -> tuple[MockRun, Settings]:
    config = copy.deepcopy(config_of(stack))
    if tier:
        config["orgmail:tier"] = tier
    if region:
        config["orgmail:region"] = region
    return run_program(config, stack), load_settings(raw_from_pulumi_config(config), stack)


@pytest.mark.parametrize("stack", STACKS)
def test_estimate_is_positive_and_adds_up(stack: str) -> None:
    est = estimate(*planned(stack))
    assert est.monthly_total > 0
    assert all(line.monthly >= 0 for line in est.lines)
    assert est.monthly_total == pytest.approx(sum(line.monthly for line in est.lines), abs=0.01)
    for line in est.lines:
        assert line.monthly == pytest.approx(line.quantity * line.unit_price, abs=0.01), line
    # Per mailbox at the stack's own mailboxes (issue 17, item 15), not at the tier's range.
    assert est.mailboxes == len(planned(stack)[1].mailboxes) > 0
    assert est.per_mailbox == pytest.approx(est.monthly_total / est.mailboxes, abs=0.01)


@pytest.mark.parametrize("stack", STACKS)
def test_every_host_and_address_is_priced(stack: str) -> None:
    run, settings = planned(stack)
    est = estimate(run, settings)
    hosts = TIERS[settings.tier].host_count
    assert sum(1 for line in est.lines if line.item.startswith("instance ")) == hosts
    assert sum(1 for line in est.lines if line.item.startswith("public IPv4 ")) == hosts
    assert sum(1 for line in est.lines if line.item.startswith("root volume ")) == hosts
    assert sum(1 for line in est.lines if line.item.startswith("snapshot of the image copy ")) == 1
    # Every host's own volume (the mailbox host's mail data, each relay's queue) is priced; only the
    # mail data is snapshotted and backed up.
    volumes = {line.item: line.quantity for line in est.lines if line.item.startswith("volume ") and "(gp3)" in line.item}
    assert len(volumes) == hosts
    mail_gb = TIERS[settings.tier].mail_volume_gb
    assert volumes.pop("volume mail-data (gp3)") == mail_gb
    assert set(volumes.values()) <= {TIERS[settings.tier].relay_queue_volume_gb}
    snapshots = next(line for line in est.lines if line.item == "EBS snapshots of the mail data (estimate)")
    assert snapshots.quantity == pytest.approx(mail_gb * ASSUMPTIONS["mailVolumeUsedShare"] * ASSUMPTIONS["snapshotFactor"])


def test_large_tier_pays_for_iops_and_throughput_above_baseline() -> None:
    est = estimate(*planned("large"))
    prices = load_prices()["regions"]["us-east-1"]
    by_item = {line.item: line for line in est.lines}
    assert by_item["volume mail-data: IOPS above 3000"].quantity == 3000  # 6000 provisioned
    assert by_item["volume mail-data: throughput above 125 MiB/s"].quantity == 125  # 250 provisioned
    assert by_item["volume mail-data: IOPS above 3000"].monthly == pytest.approx(3000 * prices["gp3IopsMonth"])
    small = estimate(*planned("small"))
    assert not any("above" in line.item for line in small.lines), "small tier stays within gp3's free baseline"


def test_tier_change_changes_the_total_as_the_table_says() -> None:
    small = estimate(*planned("dev"))
    medium = estimate(*planned("dev", tier="medium"))
    p = load_prices()["regions"]["eu-central-1"]
    t_small, t_medium = TIERS["small"], TIERS["medium"]
    expected = (730 * (p["instanceHourly"][t_medium.instance_type] - p["instanceHourly"][t_small.instance_type])
                + p["gp3GbMonth"] * (t_medium.root_volume_gb - t_small.root_volume_gb
                                     + t_medium.mail_volume_gb - t_small.mail_volume_gb)
                + (t_medium.mail_volume_gb - t_small.mail_volume_gb) * 0.5
                * (1.2 * p["snapshotGbMonth"] + 1.3 * p["s3StandardGbMonth"]))
    assert medium.monthly_total - small.monthly_total == pytest.approx(expected, abs=0.05)


def test_region_change_changes_the_total_as_the_table_says() -> None:
    frankfurt = estimate(*planned("dev"))
    virginia = estimate(*planned("dev", region="us-east-1"))
    table = load_prices()["regions"]
    rate = {r: table[r]["instanceHourly"]["t3.medium"] for r in ("eu-central-1", "us-east-1")}
    inst = {est.region: next(line for line in est.lines if line.item.startswith("instance ")) for est in (frankfurt, virginia)}
    assert inst["us-east-1"].unit_price == rate["us-east-1"] and inst["eu-central-1"].unit_price == rate["eu-central-1"]
    assert virginia.monthly_total < frankfurt.monthly_total  # us-east-1 is the cheaper region in the table


def test_unknown_region_is_a_clear_error() -> None:
    run, settings = planned("dev", region="ap-south-2")
    with pytest.raises(PriceError, match=r"no prices for region 'ap-south-2'.*priced regions: eu-central-1"):
        estimate(run, settings)


def test_cli_unknown_region_exits_2(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())
    doc["config"]["orgmail:region"] = "ap-south-2"
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = subprocess.run([sys.executable, "-m", "tools.cost", str(path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "no prices for region 'ap-south-2'" in result.stderr and "Traceback" not in result.stderr


def test_cost_section_and_format_for_the_plan() -> None:
    run, settings = planned("medium")
    section = cost_section(run, settings)
    json.dumps(section)  # JSON-ready
    text = format_cost(section)
    assert f"{section['monthly_total']:.2f}" in text
    assert f"per mailbox, at this stack's {len(settings.mailboxes)} mailboxes" in text
    assert "Google Workspace" in text and "Exchange Online" in text
    assert section["hostedAlternatives"]["alternatives"]


def test_price_tables_are_dated_and_sourced() -> None:
    for path in sorted((ROOT / "tools" / "prices").glob("*.json")):
        doc = json.loads(path.read_text())
        assert doc["date"] in path.name, path
        text = path.read_text()
        assert "https://" in text, path
    table = load_prices()
    for region, prices in table["regions"].items():
        assert set(prices["instanceHourly"]) >= {t.instance_type for t in TIERS.values()} | {
            t.relay_instance_type for t in TIERS.values()}, region
        assert "status" in prices, region


def test_ses_costs_per_1000_messages_only_with_ses() -> None:
    """Issue 14: with outbound.relay ses the estimate prices the messages sent through SES and says what SES
    costs per 1,000 messages; with direct it has no SES line."""
    config = copy.deepcopy(config_of("dev"))
    config["orgmail:outbound"] = {"relay": "ses"}
    run, settings = run_program(config, "dev"), load_settings(raw_from_pulumi_config(config), "dev")
    table = load_prices()
    est = estimate(run, settings, table)
    [messages] = [line for line in est.lines if line.item.startswith("Amazon SES relay: messages")]
    count = len(settings.mailboxes)
    assert messages.quantity == count * ASSUMPTIONS["sesMessagesPerMailboxMonth"] / 1000
    assert messages.unit == "1,000 messages" and messages.unit_price == table["ses"]["per1000Messages"] == 0.10
    assert "ses perGbAttachments" in est.unconfirmed
    section = cost_section(run, settings)
    assert section["ses"]["per1000Messages"] == 0.10
    assert "Amazon SES relay (eu-central-1): 0.1 USD per 1,000 messages sent" in format_cost(section)
    direct_run, direct_settings = planned("dev")
    assert not [line for line in estimate(direct_run, direct_settings, table).lines if "SES" in line.item]
    assert cost_section(direct_run, direct_settings)["ses"] is None
    assert est.monthly_total > estimate(direct_run, direct_settings, table).monthly_total


def test_a_clusters_outside_mail_is_priced_for_the_tiers_users_not_for_none() -> None:
    """A cluster keeps no mailbox in its config (its users are in the directory): egress and SES are priced for
    the ISP tier's smallest size, said to be an assumption, instead of silently for zero users."""
    config = copy.deepcopy(config_of("isp"))
    config["orgmail:outbound"] = {"relay": "ses"}
    run, settings = run_program(config, "isp"), load_settings(raw_from_pulumi_config(config), "isp")
    assert settings.cluster is not None and not settings.mailboxes
    est = estimate(run, settings, load_prices())
    [messages] = [line for line in est.lines if line.item.startswith("Amazon SES relay: messages")]
    [egress] = [line for line in est.lines if line.item.startswith("data transfer out to the internet")]
    users = TIERS["isp"].users_min
    assert messages.quantity == users * ASSUMPTIONS["sesMessagesPerMailboxMonth"] / 1000 > 0
    assert egress.quantity == users * ASSUMPTIONS["egressGbPerMailboxMonth"] > 0
    assert f"{users} users assumed" in messages.item and f"{users} users assumed" in egress.item
