"""Honest cost (issue 17, item 15): data transfer out priced from a stated egress estimate, exclusions
printed, and per-mailbox figures at the stack's own mailbox count and storage per mailbox, compared
with hosted plans at the same storage."""

from __future__ import annotations

import pytest

import tools.cost as cost
from tests.tools.test_cost import planned
from tools.cost import ASSUMPTIONS, cost_section, estimate, format_cost, hosted_alternatives, load_prices


def test_data_transfer_out_is_priced_from_the_stated_estimate() -> None:
    run, settings = planned("medium")
    est = estimate(run, settings)
    line = next(line for line in est.lines if line.item.startswith("data transfer out to the internet"))
    price = load_prices()["regions"][settings.region]["dataTransferOutGb"]
    assert line.quantity == pytest.approx(len(settings.mailboxes) * ASSUMPTIONS["egressGbPerMailboxMonth"])
    assert line.unit_price == price and line.note.startswith("assumption")
    assert "GB a month per mailbox" in est.assumptions


def test_every_priced_region_prices_data_transfer_out() -> None:
    for region, prices in load_prices()["regions"].items():
        assert prices["dataTransferOutGb"] > 0, region


def test_exclusions_are_printed() -> None:
    text = format_cost(cost_section(*planned("small")))
    assert "Not included:" in text
    for excluded in cost.EXCLUSIONS:
        assert excluded in text
    assert any("CloudWatch" in e for e in cost.EXCLUSIONS) and any("100 GB" in e for e in cost.EXCLUSIONS)


@pytest.mark.parametrize("extra", [0, 9])
def test_per_mailbox_uses_the_stacks_own_mailboxes(extra: int) -> None:
    import copy

    from components.settings import load_settings, raw_from_pulumi_config
    from tests.tools.test_cost import config_of
    from tools.mockengine import run_program

    config = copy.deepcopy(config_of("small"))
    config["orgmail:mailboxes"] += [{"address": f"u{i}@small.example"} for i in range(extra)]
    settings = load_settings(raw_from_pulumi_config(config), "small")
    est = estimate(run_program(config, "small"), settings)
    count = 2 + extra
    assert est.mailboxes == count
    assert est.per_mailbox == pytest.approx(est.monthly_total / count, abs=0.01)
    assert est.storage_per_mailbox_gb == pytest.approx(50 / count)
    text = format_cost(cost_section(run_program(config, "small"), settings))
    assert f"per mailbox, at this stack's {count} mailboxes: {est.per_mailbox:.2f}" in text
    assert f"{50 / count:.1f} GB of mail volume each" in text
    assert "at 20" not in text  # no longer the tier's range, whose 2.5 GB mailboxes were set beside 30-50 GB plans


def test_hosted_plans_are_compared_at_their_own_storage() -> None:
    run, settings = planned("small")
    section = cost_section(run, settings)
    est = estimate(run, settings)
    p = load_prices()["regions"][settings.region]
    full = p["gp3GbMonth"] + ASSUMPTIONS["snapshotFactor"] * p["snapshotGbMonth"] + \
        ASSUMPTIONS["backupFactor"] * p["s3StandardGbMonth"]
    count = len(settings.mailboxes)
    for alt in hosted_alternatives()["alternatives"]:
        row = next(r for r in section["hostedAlternatives"]["alternatives"] if r["name"] == alt["name"])
        extra_gb = max(0.0, count * alt["mailboxGb"] - 50)
        assert row["orgmailPerMailboxAtThisStorage"] == pytest.approx((est.monthly_total + extra_gb * full) / count,
                                                                     abs=0.01)
    text = format_cost(section)
    assert "orgmail at 30 GB per mailbox" in text
