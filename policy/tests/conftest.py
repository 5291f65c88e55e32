"""Load the example stacks' resources (exported by policy/export_plans.py) and run policies on them."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orgmail_policies import POLICIES  # noqa: E402
from pulumi_policy import (  # noqa: E402
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

STACKS = ("dev", "small", "medium", "large", "isp-single", "isp")


def plans_dir() -> Path:
    where = os.environ.get("ORGMAIL_PLANS")
    if not where:
        pytest.fail("ORGMAIL_PLANS is not set: run policy/run-tests.sh, which exports the plans first")
    return Path(where)


def load_stack(stack: str) -> list[dict[str, Any]]:
    """The stack's resources in URN order: registration order varies between runs (outputs resolve
    concurrently), so anything a test compares in order must not depend on it."""
    resources: list[dict[str, Any]] = json.loads((plans_dir() / f"{stack}.json").read_text())["resources"]
    return sorted(copy.deepcopy(resources), key=lambda r: r["urn"])


def _opts(r: dict[str, Any]) -> PolicyResourceOptions:
    return PolicyResourceOptions(protect=bool(r.get("protect")), ignore_changes=[], delete_before_replace=None,
                                 aliases=[], custom_timeouts=PolicyCustomTimeouts(0, 0, 0),
                                 additional_secret_outputs=[], parent=r.get("parent") or None)


def resource_args(r: dict[str, Any]) -> ResourceValidationArgs:
    return ResourceValidationArgs(resource_type=r["type"], props=r["props"], urn=r["urn"], name=r["name"],
                                  opts=_opts(r), provider=None)


def stack_args(resources: list[dict[str, Any]]) -> StackValidationArgs:
    by_urn: dict[str, PolicyResource] = {}
    for r in resources:
        by_urn[r["urn"]] = PolicyResource(resource_type=r["type"], props=r["props"], urn=r["urn"], name=r["name"],
                                          opts=_opts(r), provider=None, parent=None, dependencies=[],
                                          property_dependencies={})
    for r in resources:
        res = by_urn[r["urn"]]
        res.dependencies = [by_urn[u] for u in r.get("dependencies", []) if u in by_urn]
        res.property_dependencies = {k: [by_urn[u] for u in urns if u in by_urn]
                                     for k, urns in (r.get("propertyDependencies") or {}).items()}
    return StackValidationArgs(resources=list(by_urn.values()))


def violations(resources: list[dict[str, Any]], only: str | None = None) -> list[tuple[str, str]]:
    """(policy name, message) for every violation of every policy (or only the named one)."""
    found: list[tuple[str, str]] = []
    for policy in POLICIES:
        if only and policy.name != only:
            continue

        def report(message: str, urn: str | None = None, _name: str = policy.name) -> None:
            found.append((_name, message))

        if isinstance(policy, ResourceValidationPolicy):
            validations = policy.validate if isinstance(policy.validate, list) else [policy.validate]
            for r in resources:
                for validate in validations:
                    validate(resource_args(r), report)
        elif isinstance(policy, StackValidationPolicy):
            policy.validate(stack_args(resources), report)
    return found


def of_type(resources: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["type"] == type_]
