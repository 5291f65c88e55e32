"""The tier table meets the source article's sizing guidance."""

from __future__ import annotations

import pytest

from components.tiers import (
    ARTICLE_MIN_DISK_GB,
    ARTICLE_MIN_MEMORY_GIB,
    ARTICLE_MIN_VCPU,
    ARTICLE_RECOMMENDED_DISK_GB,
    ARTICLE_RECOMMENDED_MEMORY_GIB,
    ARTICLE_RECOMMENDED_VCPU,
    INSTANCE_SPECS,
    TIERS,
)


def test_tiers_are_the_articles_sizes() -> None:
    assert list(TIERS) == ["small", "medium", "large", "isp"]
    assert [(t.users_min, t.users_max) for t in TIERS.values()] == [(1, 20), (20, 100), (100, 500), (500, None)]
    assert TIERS["small"].download_mbps == (50, 100) and TIERS["small"].upload_mbps == (10, 20)
    assert TIERS["isp"].download_mbps[0] >= 10000 and TIERS["isp"].upload_mbps == (1000, 2000)


@pytest.mark.parametrize("tier", list(TIERS.values()), ids=list(TIERS))
def test_every_host_meets_the_article_minimum(tier) -> None:
    for spec in (tier.spec, tier.relay_spec):
        assert spec.vcpu >= ARTICLE_MIN_VCPU
        assert spec.memory_gib >= ARTICLE_MIN_MEMORY_GIB
    assert tier.mail_volume_gb >= ARTICLE_MIN_DISK_GB


@pytest.mark.parametrize("tier", [t for t in TIERS.values() if t.name != "small"], ids=lambda t: t.name)
def test_medium_and_up_meet_the_recommendation(tier) -> None:
    assert tier.spec.vcpu >= ARTICLE_RECOMMENDED_VCPU
    assert tier.spec.memory_gib >= ARTICLE_RECOMMENDED_MEMORY_GIB
    assert tier.mail_volume_gb >= ARTICLE_RECOMMENDED_DISK_GB


@pytest.mark.parametrize("tier", list(TIERS.values()), ids=list(TIERS))
def test_sustained_bandwidth_covers_the_tiers_download(tier) -> None:
    """Baseline (not burst) bandwidth to the internet, after the gateway cap, carries the high end."""
    assert tier.internet_gbps * 1000 >= tier.download_mbps[1]


@pytest.mark.parametrize("tier", list(TIERS.values()), ids=list(TIERS))
def test_mx_priorities_match_host_count(tier) -> None:
    assert len(tier.mx_priorities) == tier.host_count
    assert list(tier.mx_priorities) == [10 * (i + 1) for i in range(tier.host_count)]


def test_every_instance_type_has_a_spec() -> None:
    for tier in TIERS.values():
        assert tier.instance_type in INSTANCE_SPECS and tier.relay_instance_type in INSTANCE_SPECS


def test_gp3_volume_limits() -> None:
    for tier in TIERS.values():
        assert 3000 <= tier.mail_volume_iops <= 16000 and 125 <= tier.mail_volume_throughput <= 1000
        assert tier.mail_volume_iops <= 500 * tier.mail_volume_gb
