"""What the plan tells a user before a first deploy: quotas, offerings, port 25, tokens, image."""

from __future__ import annotations

import pytest

from components.settings import load_settings
from components.tiers import INSTANCE_SPECS, TIERS
from tests.unit.conftest import STACKS, raw_config, run_stack
from tools.plan import before_first_deploy
from tools.preflight import QUOTA_OF_FAMILY, STANDARD, preflight, vcpus_needed


def test_every_instance_type_counts_against_a_known_quota() -> None:
    for instance_type in INSTANCE_SPECS:
        assert instance_type.split(".")[0] in QUOTA_OF_FAMILY, instance_type


@pytest.mark.parametrize(("stack", "vcpus"), [("small", 2), ("medium", 4), ("large", 10), ("isp-single", 36)])
def test_vcpus_per_tier(stack: str, vcpus: int) -> None:
    settings = load_settings(raw_config(stack), stack)
    assert vcpus_needed(settings) == {STANDARD: vcpus}
    tier = TIERS[settings.tier]
    assert sum(vcpus_needed(settings).values()) == (
        tier.spec.vcpu + (tier.host_count - 1) * tier.relay_spec.vcpu)


@pytest.mark.parametrize("stack", STACKS)
def test_plan_says_what_the_account_needs_and_which_image_replacements_boot(stack: str) -> None:
    settings = load_settings(raw_config(stack), stack)
    lines = before_first_deploy(settings, run_stack(stack))
    text = "\n".join(lines)
    assert "L-1216C47A" in text and f"--region {settings.region}" in text
    assert "Request to remove email sending limitations" in text
    assert "API token creation" in text
    assert "aws iam create-policy --path /orgmail/ --policy-name orgmail-permissions-boundary" in text
    assert f"python -m tools.verify Pulumi.{stack}.yaml --pre-deploy" in text  # existing records that clash
    assert "ami-debian13-placeholder" in lines[-1] and "replacement" in lines[-1]
    assert lines[:-1] == preflight(settings)
