"""The permissions boundary on the mock engine: looked up before anything is created, on every role and user.

The IAM documents themselves (the boundary's actions, the deploy policy's conditions) are checked in
tests/tools/test_iam_policies.py.
"""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pytest
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

import components.backup
import components.secrets
from components import program
from components.boundary import (
    BOUNDARY_DOCUMENT,
    CREATE_COMMAND,
    IAM_PATH,
    allowed_actions,
    boundary_arn,
    boundary_document,
    boundary_problem,
)
from tests.unit.conftest import stack_config
from tools.mockengine import (
    MISSING_BOUNDARY,
    PLACEHOLDER_ACCOUNT,
    MockRun,
    RecordingMocks,
    RecordingMonitor,
    pulumi_config_values,
    run_program,
)

ARN = boundary_arn(PLACEHOLDER_ACCOUNT)


def run_main(stack: str, boundary: str | None) -> RecordingMonitor:
    """The real entry point (what `pulumi preview` runs), with the account's boundary as given."""
    mocks = RecordingMocks("eu-central-1", boundary=boundary)
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project="orgmail", stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(pulumi_config_values(stack_config(stack)))
    _sync_await(run_pulumi_func(program.main))
    return monitor


def test_the_arn_and_the_create_command_agree() -> None:
    assert ARN == "arn:aws:iam::123456789012:policy/orgmail/orgmail-permissions-boundary"
    assert CREATE_COMMAND == ("aws iam create-policy --path /orgmail/ --policy-name orgmail-permissions-boundary "
                              "--policy-document file://docs/iam/boundary-policy.json")
    assert IAM_PATH == "/orgmail/" and BOUNDARY_DOCUMENT == "docs/iam/boundary-policy.json"


def test_a_missing_boundary_stops_the_run_before_any_resource_with_the_command_that_makes_it() -> None:
    with pytest.raises(pulumi.RunError) as e:
        run_main("dev", MISSING_BOUNDARY)
    message = str(e.value)
    assert message.startswith(f"the permissions boundary {ARN} could not be read (")
    assert "NoSuchEntity" in message and CREATE_COMMAND in message
    assert "iam:GetPolicy and iam:GetPolicyVersion" in message


def test_nothing_but_the_provider_is_registered_without_the_boundary() -> None:
    mocks = RecordingMocks("eu-central-1", boundary=MISSING_BOUNDARY)
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project="orgmail", stack="dev", preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(pulumi_config_values(stack_config("dev")))
    with pytest.raises(pulumi.RunError, match="orgmail-permissions-boundary"):
        _sync_await(run_pulumi_func(program.main))
    assert [(r.type, r.name) for r in monitor.registered] == [("pulumi:providers:aws", "aws")]
    assert mocks.invokes == {"aws:index/getCallerIdentity:getCallerIdentity", "aws:iam/getPolicy:getPolicy"}


def _without(*actions: str) -> str:
    doc = boundary_document()
    for s in doc["Statement"]:
        s["Action"] = [a for a in s["Action"] if a not in actions]
    doc["Statement"] = [s for s in doc["Statement"] if s["Action"]]
    return json.dumps(doc)


def test_a_boundary_made_from_an_older_document_stops_the_run_naming_what_it_lacks() -> None:
    with pytest.raises(pulumi.RunError) as e:
        run_main("dev", _without("ssm:GetParametersByPath"))
    assert str(e.value) == (
        f"the permissions boundary {ARN} does not allow ssm:GetParametersByPath, which this version's hosts, "
        f"snapshots or SMTP user use; an account administrator updates it: aws iam create-policy-version "
        f"--policy-arn {ARN} --policy-document file://docs/iam/boundary-policy.json --set-as-default")


def test_a_boundary_that_allows_more_is_accepted() -> None:
    wider = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["ssm:*", "ssmmessages:*", "s3:*", "ec2:*", "events:*", "cloudwatch:*",
                                       "SES:SendRawEmail"], "Resource": "*"}]})
    assert boundary_problem(ARN, wider) is None
    assert boundary_problem(ARN, json.dumps(boundary_document())) is None
    narrower = json.dumps({"Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*"}]})
    problem = boundary_problem(ARN, narrower)
    assert problem is not None and "ses:SendRawEmail" in problem and "ec2:CreateSnapshot," in problem


def test_the_clusters_own_actions_are_required_of_a_cluster_stack_only() -> None:
    """A boundary made before the cluster existed (without the edges' lifecycle actions) still serves every
    single-host stack; a cluster stack stops, naming what its boundary lacks."""
    from components.boundary import CLUSTER_ONLY_ACTIONS
    older = _without(*CLUSTER_ONLY_ACTIONS)
    assert boundary_problem(ARN, older) is None
    problem = boundary_problem(ARN, older, cluster=True)
    assert problem is not None and "autoscaling:CompleteLifecycleAction, autoscaling:RecordLifecycleActionHeartbeat" in problem
    assert set(CLUSTER_ONLY_ACTIONS) <= allowed_actions(boundary_document())
    with pytest.raises(pulumi.RunError, match="does not allow autoscaling:CompleteLifecycleAction"):
        run_main("isp", older)
    run_main("isp-single", older)  # a single-host stack deploys with it


def _principals(run: MockRun) -> list[Any]:
    return [r for r in run.resources if r.type in ("aws:iam/role:Role", "aws:iam/user:User")]


@pytest.mark.parametrize("stack", ["small", "isp-single"])
def test_every_role_and_the_smtp_user_carry_the_boundary_under_the_orgmail_path(stack: str) -> None:
    cfg = {**stack_config(stack), "orgmail:outbound": {"relay": "ses"}}
    run = run_program(cfg, stack)
    principals = _principals(run)
    assert {r.type for r in principals} == {"aws:iam/role:Role", "aws:iam/user:User"}
    for r in principals:
        assert r.inputs["permissionsBoundary"] == ARN, r.name
        assert r.inputs["path"] == IAM_PATH, r.name
    # The DLM policy is handed the role under that path (the only path the deploy role may pass).
    [dlm] = run.of_type("aws:dlm/lifecyclePolicy:LifecyclePolicy")
    assert dlm.inputs["executionRoleArn"].startswith(f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:role/orgmail/")


def test_moving_the_roles_under_the_orgmail_path_changes_no_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    """A role's path is replace-on-change: existing stacks get new roles. The instances take the instance
    profile (its name stays; only its role changes), so no instance input changes and no host is replaced."""
    def instances(run: MockRun) -> dict[str, Any]:
        return {r.name: r.inputs for r in run.of_type("aws:ec2/instance:Instance")}

    cfg = stack_config("large")
    now = run_program(cfg, "large")
    monkeypatch.setattr(components.secrets, "IAM_PATH", "/")
    monkeypatch.setattr(components.backup, "IAM_PATH", "/")
    before = run_program(cfg, "large")
    assert {r.inputs["path"] for r in before.of_type("aws:iam/role:Role")} == {"/"}
    assert {r.inputs["path"] for r in now.of_type("aws:iam/role:Role")} == {IAM_PATH}
    assert instances(before) == instances(now) and len(instances(now)) == 2  # mail, mx2
    profiles = {r.name: r.inputs for r in now.of_type("aws:iam/instanceProfile:InstanceProfile")}
    assert all("path" not in p for p in profiles.values()), "the instance profiles keep their path: not replaced"
