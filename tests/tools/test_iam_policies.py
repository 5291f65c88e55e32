"""The IAM policy documents in docs/iam/ against what the program really creates (offline).

Every example stack, plus the optional features they leave off (alarm mail, an existing subnet), is
planned on the mock engine; every resource type and data source of those plans must be mapped in
tools/iam.py, the deploy policy must allow every mapped action on the plan's own resources, and the
preview policy must deny the backup objects and the stack's parameters. Conditions are not
evaluated by the matcher; the tests of the conditioned statements check them against the plan.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.backup import bucket_prefix
from tools.iam import (
    AWS_ACTIONS,
    CLOUDFLARE_PERMISSIONS,
    GITHUB_OIDC,
    IAM_DIR,
    IAM_ONLY_ACTIONS,
    Request,
    action_patterns,
    allowing,
    botocore_operations,
    denying,
    known_action,
    load_policy,
    unmapped,
)
from tools.mockengine import PLACEHOLDER_ACCOUNT, MockRun, run_program
from tools.stackfile import load_stack_config

ROOT = Path(__file__).resolve().parents[2]
STACK_FILES = sorted(p for p in ROOT.glob("Pulumi.*.yaml") if p.name != "Pulumi.yaml")


def _variants() -> dict[str, tuple[dict[str, Any], str]]:
    """Every example stack, and dev with each optional feature the examples leave off."""
    configs = {p.name: (load_stack_config(p), p.name.split(".")[1]) for p in STACK_FILES}
    dev = load_stack_config(ROOT / "Pulumi.dev.yaml")
    configs["dev+alarmEmail"] = ({**dev, "orgmail:backup": {**dev.get("orgmail:backup", {}), "alarmEmail": True}},
                                 "dev")
    # The SES relay, in the stack's region and in another (its own provider), with alarm mail and a retiring key.
    configs["dev+ses"] = ({**dev, "orgmail:outbound": {"relay": "ses"}}, "dev")
    configs["dev+sesElsewhere"] = ({**dev, "orgmail:outbound": {"relay": "ses", "sesRegion": "us-east-1",
                                                                "sesKeyGeneration": 2, "sesKeyRetiring": 1},
                                    "orgmail:backup": {"alarmEmail": True}}, "dev")
    configs["dev+existingNetwork"] = ({**dev, "orgmail:network": {"vpcId": "vpc-0123456789abcdef0",
                                                                  "subnetId": "subnet-0123456789abcdef0"}}, "dev")
    return configs


@functools.cache
def plans() -> dict[str, MockRun]:
    return {name: run_program(config, stack) for name, (config, stack) in _variants().items()}


def planned_types() -> set[str]:
    return {r.type for run in plans().values() for r in run.resources} | {
        tok for run in plans().values() for tok in run.invokes}


def region(run: MockRun) -> str:
    [provider] = [r for r in run.resources if r.type == "pulumi:providers:aws" and r.name == "aws"]  # the stack's
    return str(provider.inputs["region"])


def bucket_names(run: MockRun) -> list[str]:
    return [str(r.outputs["bucket"]) for r in run.of_type("aws:s3/bucket:Bucket")]


def resource_arn(run: MockRun, type_: str, name: str, inputs: dict[str, Any], action: str) -> str:
    """The ARN IAM authorises `action` on for one planned resource ("*" where it takes none)."""
    service = action.split(":")[0]
    if service == "s3":
        [bucket] = bucket_names(run)
        return f"arn:aws:s3:::{bucket}"
    if service == "ssm" and type_ == "aws:ssm/parameter:Parameter" and action != "ssm:DescribeParameters":
        return f"arn:aws:ssm:{region(run)}:{PLACEHOLDER_ACCOUNT}:parameter{inputs['name']}"
    if service == "iam" and type_.startswith(("aws:iam/user", "aws:iam/accessKey")):
        return f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:user/orgmail/{name}"  # the SMTP user's path (components/ses.py)
    if service == "iam":
        kind = "instance-profile" if type_ == "aws:iam/instanceProfile:InstanceProfile" and action != "iam:PassRole" \
            else "role"
        return f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:{kind}/{name}"
    return "*"


def test_the_variants_reach_every_optional_type() -> None:
    types = planned_types()
    assert {"aws:sns/topic:Topic", "aws:sns/topicSubscription:TopicSubscription", "aws:ec2/getSubnet:getSubnet",
            "aws:sesv2/emailIdentity:EmailIdentity", "aws:iam/accessKey:AccessKey",
            "aws:ec2/getAmi:getAmi", "aws:index/getCallerIdentity:getCallerIdentity"} <= types


def test_every_planned_type_and_data_source_is_mapped() -> None:
    assert unmapped(planned_types()) == []
    # A type the program does not create yet is caught as soon as a plan has it.
    assert unmapped(["aws:sqs/queue:Queue", "cloudflare:index/zone:Zone"]) == [
        "aws:sqs/queue:Queue", "cloudflare:index/zone:Zone"]


def test_the_deploy_policy_allows_every_action_on_the_plans_own_resources() -> None:
    policy = load_policy("deploy-policy.json")
    missing: set[tuple[str, str, str]] = set()
    denied: set[tuple[str, str]] = set()
    for run in plans().values():
        items = [(r.type, r.name, r.inputs) for r in run.resources] + [(tok, tok, {}) for tok in run.invokes]
        for type_, name, inputs in items:
            for action in AWS_ACTIONS.get(type_, ()):
                request = Request(action, resource_arn(run, type_, name, inputs, action))
                if not allowing(policy, request):
                    missing.add((type_, action, request.resource))
                if denying(policy, request):
                    denied.add((action, request.resource))
    services = sorted({action.split(":")[0] for _, action, _ in missing})
    assert not missing, f"not allowed for services {services}, e.g. {sorted(missing)[:5]}"
    assert not denied, sorted(denied)[:20]


def test_a_new_action_without_a_permission_fails() -> None:
    policy = load_policy("deploy-policy.json")
    assert not allowing(policy, Request("sqs:CreateQueue"))
    assert not allowing(policy, Request("s3:GetObject", "arn:aws:s3:::orgmail-dev-backup-0abc/restic/config"))
    assert not allowing(policy, Request("ssm:PutParameter", "arn:aws:ssm:eu-central-1:1:parameter/other/x"))


def test_the_deploy_policy_scopes_host_roles_by_the_plans_tags_policies_and_services() -> None:
    policy = load_policy("deploy-policy.json")
    statements = {s["Sid"]: s for s in policy["Statement"]}
    roles = [r for run in plans().values() for r in run.resources
             if r.type in ("aws:iam/role:Role", "aws:iam/instanceProfile:InstanceProfile")]
    assert roles and all(r.inputs["tags"]["orgmail:stack"] for r in roles), "the conditions need the tag"
    assert statements["HostRolesCreateTagged"]["Condition"] == {"Null": {"aws:RequestTag/orgmail:stack": "false"}}
    assert statements["HostRolesChangeOnlyTagged"]["Condition"] == {
        "Null": {"aws:ResourceTag/orgmail:stack": "false"}}
    writes = [a for a in action_patterns({"Statement": [s for s in policy["Statement"] if s["Effect"] == "Allow"
                                                          and "Condition" not in s]}) if a.startswith("iam:")]
    assert all(re.fullmatch(r"iam:(Get|List)\w+", a) for a in writes), f"unconditioned IAM writes: {writes}"
    attached = {r.inputs["policyArn"] for run in plans().values()
                for r in run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")}
    attach = statements["HostRolesAttachOnlyTheseManagedPolicies"]["Condition"]
    assert set(attach["ArnEquals"]["iam:PolicyARN"]) == attached
    services = {stmt["Principal"]["Service"] for run in plans().values() for r in run.of_type("aws:iam/role:Role")
                for stmt in yaml.safe_load(r.inputs["assumeRolePolicy"])["Statement"]}
    passed = statements["PassHostRolesToEc2AndDlmOnly"]["Condition"]["StringEquals"]["iam:PassedToService"]
    assert set(passed) == services == {"ec2.amazonaws.com", "dlm.amazonaws.com"}


def test_the_preview_policy_allows_what_preview_looks_up_and_nothing_that_writes() -> None:
    policy = load_policy("preview-policy.json")
    lookups = {a for t in planned_types() if "/get" in t or t == "pulumi:providers:aws" for a in AWS_ACTIONS[t]}
    assert lookups and all(allowing(policy, Request(a)) for a in lookups)
    allowed = [a for s in policy["Statement"] if s["Effect"] == "Allow" for a in s["Action"]]
    assert all(re.fullmatch(r"\w+:(Describe|Get|List)\w+", a) for a in allowed), allowed


@pytest.mark.parametrize("policy_name", ["preview-policy.json", "deploy-policy.json"])
def test_backup_objects_are_denied(policy_name: str) -> None:
    policy = load_policy(policy_name)
    buckets = [b for run in plans().values() for b in bucket_names(run)]
    long_stack = bucket_prefix("a-very-long-stack-name-for-an-isp-customer") + "0abc"  # the shortened prefix
    for bucket in [*buckets, long_stack]:
        for action in ("s3:GetObject", "s3:GetObjectVersion"):
            denies = denying(policy, Request(action, f"arn:aws:s3:::{bucket}/restic/data/00/0123"))
            assert [d for d in denies if "Condition" not in d], f"{policy_name}: {action} on {bucket} not denied"


def test_the_preview_policy_denies_the_stacks_parameters_and_their_decryption() -> None:
    policy = load_policy("preview-policy.json")
    for run in plans().values():
        for r in run.of_type("aws:ssm/parameter:Parameter"):
            arn = f"arn:aws:ssm:{region(run)}:{PLACEHOLDER_ACCOUNT}:parameter{r.inputs['name']}"
            for action in ("ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath",
                           "ssm:GetParameterHistory"):
                denies = denying(policy, Request(action, arn))
                assert [d for d in denies if "Condition" not in d], f"{action} on {arn} not denied"
    kms = [d.get("Condition") for d in denying(policy, Request("kms:Decrypt"))]
    assert {"StringLike": {"kms:ViaService": "ssm.*.amazonaws.com"}} in kms, "kms:Decrypt through SSM not denied"


def test_every_action_named_exists_in_botocore() -> None:
    for name in ("deploy-policy.json", "preview-policy.json", "state-bucket-policy.json"):
        unknown = [a for a in action_patterns(load_policy(name)) if not known_action(a)]
        assert not unknown, (name, unknown)
    unknown = sorted({a for actions in AWS_ACTIONS.values() for a in actions if not known_action(a)})
    assert not unknown
    for action, operation in IAM_ONLY_ACTIONS.items():
        service, _, op = operation.partition(":")
        assert op in botocore_operations(service), (action, operation)
    assert not known_action("s3:GetBuckeVersioning") and not known_action("ec2:DescribeVpc")
    assert known_action("ec2:DescribeVpcs") and known_action("kms:ReEncrypt*")


def environments_assuming(role_variable: str) -> set[str]:
    found = set()
    for path in (ROOT / ".github/workflows").glob("*.yml"):
        for job in yaml.safe_load(path.read_text())["jobs"].values():
            for step in job.get("steps", []):
                if role_variable in str(step.get("with", {}).get("role-to-assume", "")):
                    found.add(str(job["environment"]))
    return found


@pytest.mark.parametrize(("name", "role_variable"), [("preview-trust-policy.json", "AWS_PREVIEW_ROLE_ARN"),
                                                      ("deploy-trust-policy.json", "AWS_DEPLOY_ROLE_ARN")])
def test_trust_policies_pin_the_audience_and_the_environments_of_the_workflows(name: str, role_variable: str) -> None:
    [statement] = load_policy(name)["Statement"]
    assert statement["Effect"] == "Allow" and statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Principal"] == {"Federated": f"arn:aws:iam::ACCOUNT_ID:oidc-provider/{GITHUB_OIDC}"}
    assert set(statement["Condition"]) == {"StringEquals"}, "no StringLike: no wildcard can widen the subject"
    condition = statement["Condition"]["StringEquals"]
    assert condition[f"{GITHUB_OIDC}:aud"] == "sts.amazonaws.com"
    subjects = condition[f"{GITHUB_OIDC}:sub"]
    subjects = [subjects] if isinstance(subjects, str) else subjects
    environments = set()
    for subject in subjects:
        m = re.fullmatch(r"repo:OWNER/REPO:environment:(?P<env>[A-Za-z0-9_-]+)", subject)
        assert m is not None, subject
        environments.add(m["env"])
    workflow = {"STACK" if e == "${{ matrix.stack }}" else e for e in environments_assuming(role_variable)}
    assert environments == workflow


def test_cloudflare_token_scopes_are_documented() -> None:
    types = {t for t in planned_types() if t.startswith("cloudflare:")}
    assert types == set(CLOUDFLARE_PERMISSIONS)
    doc = (ROOT / "docs/pull-requests.md").read_text()
    deploy_row = next(line for line in doc.splitlines() if line.startswith("| `CLOUDFLARE_API_TOKEN`"))
    read_row = next(line for line in doc.splitlines() if line.startswith("| `CLOUDFLARE_READ_TOKEN`"))
    wanted = {p for perms in CLOUDFLARE_PERMISSIONS.values() for p in perms}
    for permission in wanted:
        assert permission in deploy_row, permission
        assert permission.replace(": Edit", ": Read") in read_row, permission
    assert ": Edit" not in read_row


def test_the_docs_name_every_policy_document() -> None:
    doc = (ROOT / "docs/pull-requests.md").read_text()
    for path in sorted(IAM_DIR.glob("*.json")):
        assert f"docs/iam/{path.name}" in doc, path.name
