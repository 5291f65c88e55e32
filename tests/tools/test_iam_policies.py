"""The IAM policy documents in docs/iam/ against what the program really creates (offline).

Every example stack, plus the optional features they leave off (alarm mail, an existing subnet), is
planned on the mock engine; every resource type and data source of those plans must be mapped in
tools/iam.py, the deploy policy must allow every mapped action on the plan's own resources, and the
preview policy must deny the backup objects and the stack's parameters. Conditions are not
evaluated by the matcher; the tests of the conditioned statements check them against the plan.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.backup import DLM_SERVICE_POLICY, REPORT_STATEMENT, bucket_prefix
from components.boundary import BOUNDARY_NAME, IAM_PATH, boundary_arn
from components.secrets import SESSION_MANAGER_ACTIONS
from tools.iam import (
    AGENT_ONLY_ACTIONS,
    AWS_ACTIONS,
    BOTOCORE_SERVICE,
    BOUNDARY_CONDITION_ACTIONS,
    CLOUDFLARE_PERMISSIONS,
    CLUSTER_DEPLOY_POLICY,
    GITHUB_OIDC,
    IAM_DIR,
    IAM_ONLY_ACTIONS,
    MANAGED_POLICIES,
    SERVICE_LINKED_ROLES,
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


def is_cluster(run: MockRun) -> bool:
    return any(r.type == "orgmail:index:Cluster" for r in run.resources)


def deploy_policy_for(run: MockRun) -> dict[str, Any]:
    """The deploy role's policies for a plan: the inline one, and for a cluster the managed one beside it."""
    statements = list(load_policy("deploy-policy.json")["Statement"])
    if is_cluster(run):
        statements += load_policy(CLUSTER_DEPLOY_POLICY)["Statement"]
    return {"Version": "2012-10-17", "Statement": statements}


SERVICE_OF_TYPE = {"aws:lb/": "elasticloadbalancing.amazonaws.com", "aws:autoscaling/": "autoscaling.amazonaws.com",
                   "aws:rds/": "rds.amazonaws.com", "aws:elasticache/": "elasticache.amazonaws.com"}


def resource_arn(run: MockRun, type_: str, name: str, inputs: dict[str, Any], action: str) -> str:
    """The ARN IAM authorises `action` on for one planned resource ("*" where it takes none)."""
    service = action.split(":")[0]
    if action == "iam:CreateServiceLinkedRole":  # the service's own role, under aws-service-role/
        [linked] = [svc for prefix, svc in SERVICE_OF_TYPE.items() if type_.startswith(prefix)]
        return f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:role/aws-service-role/{linked}/AWSServiceRoleFor{name}"
    if service == "secretsmanager":  # the directory's master secret, named by RDS
        return f"arn:aws:secretsmanager:{region(run)}:{PLACEHOLDER_ACCOUNT}:secret:rds!db-0123-abcdef"
    if service == "s3":
        [bucket] = bucket_names(run)
        return f"arn:aws:s3:::{bucket}"
    if service == "ssm" and type_ == "aws:ssm/parameter:Parameter" and action != "ssm:DescribeParameters":
        return f"arn:aws:ssm:{region(run)}:{PLACEHOLDER_ACCOUNT}:parameter{inputs['name']}"
    if service == "iam" and type_ == "aws:iam/getPolicy:getPolicy":
        return boundary_arn(PLACEHOLDER_ACCOUNT)
    if service == "iam" and type_.startswith(("aws:iam/user", "aws:iam/accessKey")):
        return f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:user/orgmail/{name}"  # the SMTP user's path (components/ses.py)
    if action == "iam:PassRole":  # the role handed over, with its path
        return passed_role(run, type_, inputs)
    if service == "iam":
        kind = "instance-profile" if type_ == "aws:iam/instanceProfile:InstanceProfile" else "role"
        path = inputs.get("path", "/") if type_ == "aws:iam/role:Role" else "/"
        return f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:{kind}{path}{name}"
    return "*"


def passed_role(run: MockRun, type_: str, inputs: dict[str, Any]) -> str:
    """The ARN of the role an instance (through its profile), an instance profile or a DLM policy is given."""
    roles = {str(r.outputs["name"]): str(r.outputs["arn"]) for r in run.of_type("aws:iam/role:Role")}
    profiles = {str(p.outputs["name"]): str(p.inputs["role"])
                for p in run.of_type("aws:iam/instanceProfile:InstanceProfile")}
    if type_ == "aws:ec2/instance:Instance":
        return roles[profiles[inputs["iamInstanceProfile"]]]
    if type_ == "aws:iam/instanceProfile:InstanceProfile":
        return roles[inputs["role"]]
    if type_ == "aws:dlm/lifecyclePolicy:LifecyclePolicy":
        return str(inputs["executionRoleArn"])
    if type_ == "aws:ec2/launchTemplate:LaunchTemplate":
        return roles[profiles[inputs["iamInstanceProfile"]["name"]]]
    if type_ == "aws:autoscaling/group:Group":  # its launch template's profile
        [template] = [t for t in run.of_type("aws:ec2/launchTemplate:LaunchTemplate")
                      if t.id == inputs["launchTemplate"]["id"]]
        return roles[profiles[template.inputs["iamInstanceProfile"]["name"]]]
    raise AssertionError(f"which role does {type_} pass?")


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
    missing: set[tuple[str, str, str]] = set()
    denied: set[tuple[str, str]] = set()
    assert any(is_cluster(run) for run in plans().values()), "a cluster plan (Pulumi.isp.yaml)"
    for run in plans().values():
        policy = deploy_policy_for(run)
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
    assert statements["HostRolesCreateBounded"]["Condition"]["Null"] == {"aws:RequestTag/orgmail:stack": "false"}
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
    lookups = {(a, PLAN_BOUNDARY if t == "aws:iam/getPolicy:getPolicy" else "*")
               for t in planned_types() if (t.startswith("aws:") and "/get" in t) or t == "pulumi:providers:aws"
               for a in AWS_ACTIONS[t]}  # Cloudflare's lookups are its read token's (test_cloudflare_token_scopes_...)
    assert lookups and all(allowing(policy, Request(a, r)) for a, r in lookups)
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
    for name in ("deploy-policy.json", "preview-policy.json", "state-bucket-policy.json", "boundary-policy.json",
                 CLUSTER_DEPLOY_POLICY):
        unknown = [a for a in action_patterns(load_policy(name)) if not known_action(a)]
        assert not unknown, (name, unknown)
    unknown = sorted({a for actions in AWS_ACTIONS.values() for a in actions if not known_action(a)})
    assert not unknown
    for action, operation in IAM_ONLY_ACTIONS.items():
        service, _, op = operation.partition(":")
        assert op in botocore_operations(service), (action, operation)
    assert not known_action("s3:GetBuckeVersioning") and not known_action("ec2:DescribeVpc")
    # The agent-only names are exactly the Session Manager actions the host roles are given, none in botocore.
    assert set(AGENT_ONLY_ACTIONS) == set(SESSION_MANAGER_ACTIONS)
    for action in AGENT_ONLY_ACTIONS:
        service, _, op = action.partition(":")
        assert service not in BOTOCORE_SERVICE or op not in botocore_operations(service), action
    assert not known_action("ssmmessages:OpenControlChanel")
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


# IAM and AWS STS quotas (IAM User Guide): characters of a policy, white space not counted. A role's
# inline policies together hold 10,240; a customer managed policy 6,144.
ROLE_INLINE_MAX, MANAGED_MAX = 10240, 6144


@pytest.mark.parametrize(("name", "limit"), [("deploy-policy.json", ROLE_INLINE_MAX),
                                             ("preview-policy.json", ROLE_INLINE_MAX),
                                             (CLUSTER_DEPLOY_POLICY, MANAGED_MAX),
                                             ("boundary-policy.json", MANAGED_MAX)])
def test_each_policy_document_fits_iams_size_quota(name: str, limit: int) -> None:
    """The deploy and preview documents are the roles' inline policies (docs/pull-requests.md); the
    boundary is a managed policy. One too big is refused by IAM when the admin installs it."""
    size = len(re.sub(r"\s", "", json.dumps(load_policy(name))))
    assert size <= limit, f"{name}: {size} characters, IAM takes {limit}"


def test_the_docs_name_every_policy_document() -> None:
    doc = (ROOT / "docs/pull-requests.md").read_text()
    for path in sorted(IAM_DIR.glob("*.json")):
        assert f"docs/iam/{path.name}" in doc, path.name


# --- The permissions boundary (issue 14): what the deploy role creates is capped ------------------

BOUNDARY_IN_POLICY = f"arn:aws:iam::${{aws:PrincipalAccount}}:policy/orgmail/{BOUNDARY_NAME}"
PLAN_BOUNDARY = boundary_arn(PLACEHOLDER_ACCOUNT)
# IAM actions that write a principal's permissions: allowed only with the boundary as the principal's
# (iam:PermissionsBoundary, Service Authorization Reference for IAM: see tools/iam.py BOUNDARY_CONDITION_ACTIONS).
BOUNDED_WRITES = ("iam:CreateRole", "iam:CreateUser", "iam:PutRolePolicy", "iam:AttachRolePolicy",
                  "iam:PutUserPolicy", "iam:PutRolePermissionsBoundary", "iam:PutUserPermissionsBoundary")
# Removing a permission cannot raise one: it needs only the stack's tag, so the upgrade that replaces an
# existing stack's roles (new path, with the boundary) can clean up the old, unbounded ones by itself.
REMOVALS = ("iam:DeleteRolePolicy", "iam:DetachRolePolicy", "iam:DeleteUserPolicy")


def _statements_with(policy: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in policy["Statement"] if s["Effect"] == "Allow" and action in s["Action"]]


def test_the_cluster_policy_writes_no_principal_and_creates_only_its_services_linked_roles() -> None:
    """The cluster's managed policy adds load balancing, Auto Scaling, RDS and launch templates; the only IAM
    action is the first deploy's service-linked roles, of exactly those services; secrets only RDS's own."""
    policy = load_policy(CLUSTER_DEPLOY_POLICY)
    iam = [(a, s) for s in policy["Statement"] for a in s["Action"] if a.startswith("iam:")]
    assert [a for a, _ in iam] == ["iam:CreateServiceLinkedRole"]
    [(_, linked)] = iam
    assert linked["Resource"] == "arn:aws:iam::*:role/aws-service-role/*"
    assert linked["Condition"] == {"StringEquals": {"iam:AWSServiceName": sorted(SERVICE_LINKED_ROLES)}}
    secrets = [s for s in policy["Statement"] if any(a.startswith("secretsmanager:") for a in s["Action"])]
    assert [s["Resource"] for s in secrets] == ["arn:aws:secretsmanager:*:*:secret:rds!*"]
    assert not allowing(policy, Request("secretsmanager:GetSecretValue", "arn:aws:secretsmanager:r:1:secret:rds!db-1"))
    assert not [a for s in policy["Statement"] for a in s["Action"] if a.split(":")[0] in ("s3", "ssm", "sts")]


def test_the_deploy_role_cannot_pass_or_create_an_uncapped_principal() -> None:
    """Fails on the policy before the boundary: any role of the account could be passed to an instance, and
    roles and users could be created and given any inline policy."""
    policy = load_policy("deploy-policy.json")
    for admin in ("arn:aws:iam::123456789012:role/OrganizationAccountAccessRole", "arn:aws:iam::123456789012:role/x"):
        assert not allowing(policy, Request("iam:PassRole", admin)), f"{admin} can be passed to an instance"
    assert allowing(policy, Request("iam:PassRole", "arn:aws:iam::123456789012:role/orgmail/secrets-host-role-1"))
    for action in BOUNDED_WRITES:
        statements = _statements_with(policy, action)
        assert statements, action
        for s in statements:
            assert s.get("Condition", {}).get("StringEquals", {}).get("iam:PermissionsBoundary") == \
                BOUNDARY_IN_POLICY, (action, s["Sid"])


def test_removing_a_permission_needs_only_the_stacks_tag() -> None:
    policy = load_policy("deploy-policy.json")
    for action in REMOVALS:
        statements = _statements_with(policy, action)
        assert [s["Condition"] for s in statements] == [{"Null": {"aws:ResourceTag/orgmail:stack": "false"}}], action


def test_the_deploy_policy_conditions_each_iam_write_exactly() -> None:
    policy = load_policy("deploy-policy.json")
    statements = {s["Sid"]: s for s in policy["Statement"]}
    bounded = {"iam:PermissionsBoundary": BOUNDARY_IN_POLICY}
    created, tagged = {"aws:RequestTag/orgmail:stack": "false"}, {"aws:ResourceTag/orgmail:stack": "false"}
    expected: dict[str, tuple[list[str], dict[str, Any]]] = {
        "HostRolesCreateBounded": (["iam:CreateRole"], {"Null": created, "StringEquals": bounded}),
        "HostInstanceProfilesCreateTagged": (["iam:CreateInstanceProfile"], {"Null": created}),
        "HostRolePoliciesOnlyBounded": (
            ["iam:PutRolePermissionsBoundary", "iam:PutRolePolicy"],
            {"Null": tagged, "StringEquals": bounded}),
        "HostRolesAttachOnlyTheseManagedPolicies": (
            ["iam:AttachRolePolicy"],
            {"Null": tagged, "StringEquals": bounded,
             "ArnEquals": {"iam:PolicyARN": [DLM_SERVICE_POLICY]}}),
        "SesSmtpUserCreateBounded": (["iam:CreateUser"], {"Null": created, "StringEquals": bounded}),
        "SesSmtpUserTagOnCreate": (["iam:TagUser"], {"Null": created}),  # TagUser has no boundary key
        "SesSmtpUserPoliciesOnlyBounded": (
            ["iam:PutUserPermissionsBoundary", "iam:PutUserPolicy"],
            {"Null": tagged, "StringEquals": bounded}),
    }
    for sid, (actions, condition) in expected.items():
        assert sorted(statements[sid]["Action"]) == actions, sid
        assert statements[sid]["Condition"] == condition, sid
    # CreateInstanceProfile has no iam:PermissionsBoundary key: alone, so the condition never has to hold for it.
    for s in policy["Statement"]:
        if "iam:CreateInstanceProfile" in s.get("Action", []):
            assert s["Action"] == ["iam:CreateInstanceProfile"]
    # Every action a bounded statement names supports the key (an action without it would never match).
    for sid in (s for s, (_, c) in expected.items() if "StringEquals" in c):
        assert set(statements[sid]["Action"]) <= set(BOUNDARY_CONDITION_ACTIONS), sid
    assert statements["HostRolesCreateBounded"]["Resource"] == "arn:aws:iam::*:role/orgmail/*"
    assert statements["SesSmtpUserCreateBounded"]["Resource"] == "arn:aws:iam::*:user/orgmail/*"
    passing = statements["PassHostRolesToEc2AndDlmOnly"]
    assert passing["Resource"] == "arn:aws:iam::*:role/orgmail/*" and passing["Action"] == ["iam:PassRole"]
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": ["ec2.amazonaws.com", "dlm.amazonaws.com"]}}


def test_the_boundary_itself_cannot_be_written_or_removed_by_the_deploy_role() -> None:
    policy = load_policy("deploy-policy.json")
    iam_operations = sorted(botocore_operations("iam"))
    for op in iam_operations:
        action = f"iam:{op}"
        if allowing(policy, Request(action, PLAN_BOUNDARY)):
            assert re.fullmatch(r"(Get|List)\w+", op) or denying(policy, Request(action, PLAN_BOUNDARY)), action
    for op in ("CreatePolicy", "CreatePolicyVersion", "DeletePolicy", "DeletePolicyVersion", "SetDefaultPolicyVersion",
               "TagPolicy", "UntagPolicy"):
        assert [d for d in denying(policy, Request(f"iam:{op}", PLAN_BOUNDARY)) if "Condition" not in d], op
    for op in ("DeleteRolePermissionsBoundary", "DeleteUserPermissionsBoundary"):
        assert not _statements_with(policy, f"iam:{op}")
        for arn in ("arn:aws:iam::123456789012:role/orgmail/r", "arn:aws:iam::123456789012:user/orgmail/u"):
            assert [d for d in denying(policy, Request(f"iam:{op}", arn)) if "Condition" not in d], op
    # It reads the boundary (the program looks it up before creating anything), and the preview role too.
    for name in ("deploy-policy.json", "preview-policy.json"):
        for action in AWS_ACTIONS["aws:iam/getPolicy:getPolicy"]:
            assert allowing(load_policy(name), Request(action, PLAN_BOUNDARY)), (name, action)


def test_every_role_and_user_the_plans_create_carries_the_boundary() -> None:
    principals = [(r, name) for name, run in plans().items() for r in run.resources
                  if r.type in ("aws:iam/role:Role", "aws:iam/user:User")]
    assert {r.type for r, _ in principals} == {"aws:iam/role:Role", "aws:iam/user:User"}
    for r, plan in principals:
        assert r.inputs.get("permissionsBoundary") == PLAN_BOUNDARY, (plan, r.name)
        assert r.inputs.get("path") == IAM_PATH, (plan, r.name)


def _allowed_requests(document: dict[str, Any]) -> list[Request]:
    requests = []
    for s in document["Statement"]:
        if s["Effect"] != "Allow":
            continue
        actions = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
        resources = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        requests += [Request(a, r) for a in actions for r in resources]
    return requests


def test_the_boundary_allows_everything_the_plans_principals_are_given() -> None:
    boundary = load_policy("boundary-policy.json")
    documents = {f"{plan}: {r.name}": json.loads(r.inputs["policy"]) for plan, run in plans().items()
                 for r in run.resources if r.type in ("aws:iam/rolePolicy:RolePolicy", "aws:iam/userPolicy:UserPolicy")}
    attached = {r.inputs["policyArn"] for run in plans().values()
                for r in run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")}
    assert attached == {DLM_SERVICE_POLICY} == set(MANAGED_POLICIES)
    documents |= {arn: doc for arn, doc in MANAGED_POLICIES.items()}
    assert any("SessionManager" in json.dumps(d) for d in documents.values()), "a plan with Session Manager"
    missing = [(where, req) for where, doc in documents.items() for req in _allowed_requests(doc)
               if not allowing(boundary, req) or denying(boundary, req)]
    assert not missing, missing[:10]
    # The metric reports stay in orgmail's namespace in the boundary too.
    [report] = [s for s in boundary["Statement"] if "cloudwatch:PutMetricData" in s["Action"]]
    assert report["Condition"] == REPORT_STATEMENT["Condition"]


def test_the_boundary_allows_no_iam_sts_or_organizations_action_and_only_named_ones() -> None:
    boundary = load_policy("boundary-policy.json")
    assert all(s["Effect"] == "Allow" and "Action" in s and "NotAction" not in s for s in boundary["Statement"])
    actions = action_patterns(boundary)
    assert not [a for a in actions if a.split(":")[0] in ("iam", "sts", "organizations")]
    assert not [a for a in actions if "*" in a], "no wildcard: each action is named"
    unknown = [a for a in actions if not known_action(a)]
    assert not unknown
    # Exactly what the principals are given: nothing more.
    given = {req.action for run in plans().values() for r in run.resources
             if r.type in ("aws:iam/rolePolicy:RolePolicy", "aws:iam/userPolicy:UserPolicy")
             for req in _allowed_requests(json.loads(r.inputs["policy"]))}
    given |= {req.action for doc in MANAGED_POLICIES.values() for req in _allowed_requests(doc)}
    assert set(actions) == given
