"""Each host role holds only its own secrets: the IAM policies of the mailbox and relay roles,
evaluated against every parameter and bucket the stack creates."""

from __future__ import annotations

import fnmatch
import json
import subprocess
from typing import Any

import pytest

from components.secrets import instance_policy
from components.settings import load_settings
from components.userdata import render_files
from tests.unit.conftest import host_script, raw_config, run_stack, stack_config
from tests.unit.test_userdata import MAILBOX, RELAY
from tools.mockengine import MockRun, run_program
from tools.plan import user_data_text

ACCOUNT = "123456789012"


def _listify(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]


def allowed(policy: dict[str, Any], action: str, resource: str) -> bool:
    """IAM's answer for an identity policy without conditions: an explicit Deny wins, then any Allow.
    Actions match case-insensitively, resources case-sensitively, with * and ? wildcards."""
    def matches(st: dict[str, Any]) -> bool:
        acts = any(fnmatch.fnmatch(action.lower(), a.lower()) for a in _listify(st["Action"]))
        res = any(fnmatch.fnmatchcase(resource, r) for r in _listify(st["Resource"]))
        return acts and res and "Condition" not in st
    statements = policy["Statement"]
    if any(st["Effect"] == "Deny" and matches(st) for st in statements):
        return False
    return any(st["Effect"] == "Allow" and matches(st) for st in statements)


def test_the_evaluator_itself() -> None:
    policy = {"Statement": [{"Effect": "Allow", "Action": ["ssm:GetParameter*"], "Resource": ["arn:x/a/*"]},
                            {"Effect": "Deny", "Action": "ssm:GetParameter", "Resource": "arn:x/a/secret"}]}
    assert allowed(policy, "ssm:GetParameters", "arn:x/a/b")
    assert not allowed(policy, "ssm:GetParameter", "arn:x/a/secret")
    assert not allowed(policy, "ssm:GetParameter", "arn:x/b/c")
    assert not allowed(policy, "s3:GetObject", "arn:x/a/b")


def parameter_arn(stack_run: MockRun, region: str, name: str) -> str:
    return f"arn:aws:ssm:{region}:{ACCOUNT}:parameter{name}"


def policies(run: MockRun) -> dict[str, dict[str, Any]]:
    return {r.name: json.loads(r.inputs["policy"]) for r in run.of_type("aws:iam/rolePolicy:RolePolicy")
            if r.name in ("secrets-host-policy", "secrets-relay-policy")}


@pytest.mark.parametrize("stack", ["large", "isp-single"])
def test_a_relay_reads_its_config_files_and_own_acme_key_and_nothing_else(stack: str) -> None:
    run = run_stack(stack)
    s = load_settings(raw_config(stack), stack)
    relay = policies(run)["secrets-relay-policy"]
    mailbox = policies(run)["secrets-host-policy"]
    names = [r.inputs["name"] for r in run.of_type("aws:ssm/parameter:Parameter")]
    readable = {n for n in names
                if allowed(relay, "ssm:GetParameter", parameter_arn(run, s.region, n))}
    relay_keys = tuple(f"{s.ssm_path}/{kind}/{h}/" for h in s.relay_hosts for kind in ("certbot", "bundle"))
    assert readable == {n for n in names
                        if n.startswith((f"{s.ssm_path}/config/", f"{s.ssm_path}/files/relay/", *relay_keys,
                                         f"{s.ssm_path}/spamhaus/"))}
    assert {f"{s.ssm_path}/bundle/{h}/part-000" for h in s.relay_hosts} <= readable
    # One policy for every relay: each may read the others' bundles (no secret there), never the mailbox host's.
    assert f"{s.ssm_path}/bundle/{s.mail_host}/part-000" in set(names) - readable
    assert {f"{s.ssm_path}/certbot/{h}/key" for h in s.relay_hosts} <= readable
    for secret in (f"{s.ssm_path}/dkim/{s.dkim_selector}", f"{s.ssm_path}/backup/restic-password",
                   f"{s.ssm_path}/mailbox-passwords/part-000", f"{s.ssm_path}/certbot/{s.mail_host}/key",
                   f"{s.ssm_path}/files/mailbox/part-000"):
        assert secret in names
        assert not allowed(relay, "ssm:GetParameter", parameter_arn(run, s.region, secret))
        assert allowed(mailbox, "ssm:GetParameter", parameter_arn(run, s.region, secret))
    # A path grants its whole subtree to GetParametersByPath: the relay may not ask for the stack's root.
    assert not allowed(relay, "ssm:GetParametersByPath", parameter_arn(run, s.region, s.ssm_path))
    assert allowed(relay, "ssm:GetParametersByPath", parameter_arn(run, s.region, f"{s.ssm_path}/config"))
    bucket = run.one("aws:s3/bucket:Bucket", "backup-bucket").id
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"):
        for arn in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/data/x"):
            assert not allowed(relay, action, arn)
    assert not any(a.startswith("s3:") for st in relay["Statement"] for a in st["Action"])
    # Its only CloudWatch right: reporting its set-up at boot, in orgmail's namespace (issue 17, item 8).
    assert [(st["Action"], st["Condition"]) for st in relay["Statement"] if "cloudwatch:" in str(st["Action"])] == \
        [(["cloudwatch:PutMetricData"], {"StringEquals": {"cloudwatch:namespace": "orgmail"}})]


@pytest.mark.parametrize("stack", ["large", "isp-single"])
def test_each_host_gets_its_roles_profile(stack: str) -> None:
    run = run_stack(stack)
    profiles = {r.name: r for r in run.of_type("aws:iam/instanceProfile:InstanceProfile")}
    assert set(profiles) == {"secrets-host-profile", "secrets-relay-profile"}
    for inst in run.of_type("aws:ec2/instance:Instance"):
        expected = "secrets-host-profile" if inst.name == "mail-instance" else "secrets-relay-profile"
        assert inst.inputs["iamInstanceProfile"] == profiles[expected].outputs["name"], inst.name
    roles = {r.name for r in run.of_type("aws:iam/role:Role")}
    assert {"secrets-host-role", "secrets-relay-role"} <= roles


def test_single_host_stacks_have_no_relay_role() -> None:
    run = run_stack("small")
    assert [r.name for r in run.of_type("aws:iam/instanceProfile:InstanceProfile")] == ["secrets-host-profile"]


def test_relay_policy_shape() -> None:
    s = load_settings(raw_config("large"), "large")
    doc = instance_policy(s, ACCOUNT, "relay", "arn:aws:s3:::bucket")
    base = f"arn:aws:ssm:{s.region}:{ACCOUNT}:parameter/orgmail/large"
    assert doc["Statement"][0]["Resource"] == [
        f"{base}/bundle/mx2.large.example", f"{base}/bundle/mx2.large.example/*",
        f"{base}/certbot/mx2.large.example", f"{base}/certbot/mx2.large.example/*",
        f"{base}/config", f"{base}/config/*", f"{base}/files/relay", f"{base}/files/relay/*",
        f"{base}/spamhaus", f"{base}/spamhaus/*"]
    with pytest.raises(ValueError, match="unknown host role"):
        instance_policy(s, ACCOUNT, "edge")


def _host_env(host: Any) -> str:
    [env] = [f.content for f in render_files(host) if f.path == "/etc/orgmail/host.env"]
    return env


def test_the_relay_sync_asks_only_for_what_its_role_may_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay's orgmail-sync asks SSM only for the sub-paths its role allows (asking for the stack's
    root would be refused); the mailbox host's asks for the whole path."""
    assert f"SSM_READ=config files/relay bundle/{RELAY.hostname} certbot/{RELAY.hostname}" in _host_env(RELAY)
    assert "SSM_READ" not in _host_env(MAILBOX)
    sync = host_script("sync.py")
    asked: list[str] = []

    def fake_run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        path = cmd[cmd.index("--path") + 1]
        asked.append(path)
        names = {"/orgmail/large/config": ["config/part-000"], "/orgmail/large/certbot/mx2": ["certbot/mx2/key"]}
        params = [{"Name": f"/orgmail/large/{n}", "Value": n.upper()} for n in names.get(path, [])]
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"Parameters": params}), "")

    monkeypatch.setattr(sync.subprocess, "run", fake_run)
    got = sync.fetch({"SSM_PATH": "/orgmail/large", "REGION": "eu-west-1", "SSM_READ": "config bundle/mx2 certbot/mx2"})
    assert asked == ["/orgmail/large/config", "/orgmail/large/certbot/mx2"]  # the bundle: only at the first boot
    assert got == {"config": "CONFIG/PART-000", "certbot/mx2/key": "CERTBOT/MX2/KEY"}
    asked.clear()
    sync.fetch({"SSM_PATH": "/orgmail/large", "REGION": "eu-west-1"})
    assert asked == ["/orgmail/large"]
    asked.clear()
    sync.fetch({"SSM_PATH": "/orgmail/large", "REGION": "eu-west-1", "SSM_READ": "config bundle/mx2"}, ("bundle/mx2",))
    assert asked == ["/orgmail/large/bundle/mx2"]


@pytest.mark.parametrize("stack", ["dev", "isp-single"])
def test_a_compromised_mailbox_host_cannot_destroy_its_backups(stack: str) -> None:
    """It may add and delete objects, which on the versioned bucket only adds delete markers: every
    version stays restorable until the lifecycle's retention ends, and nothing shortens that."""
    run = run_stack(stack)
    host = policies(run)["secrets-host-policy"]
    bucket = f"arn:aws:s3:::{run.one('aws:s3/bucket:Bucket', 'backup-bucket').id}"
    for action in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:ListBucket"):
        assert allowed(host, action, bucket if action == "s3:ListBucket" else f"{bucket}/data/ab")
    for action in ("s3:DeleteObjectVersion", "s3:PutBucketVersioning", "s3:PutLifecycleConfiguration",
                   "s3:PutBucketPolicy", "s3:DeleteBucket", "s3:PutBucketObjectLockConfiguration"):
        assert not allowed(host, action, bucket) and not allowed(host, action, f"{bucket}/data/ab")
    # An explicit deny, so a broader policy attached to the role later cannot undo it.
    widened = {"Statement": [*host["Statement"], {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    assert not allowed(widened, "s3:DeleteObjectVersion", f"{bucket}/data/ab")
    versioning = run.one("aws:s3/bucketVersioning:BucketVersioning", "backup-versioning")
    assert versioning.inputs["versioningConfiguration"]["status"] == "Enabled"
    [rule] = run.one("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration", "backup-lifecycle").inputs["rules"]
    assert rule["noncurrentVersionExpiration"]["noncurrentDays"] >= 1
    assert "expiration" not in rule and "transitions" not in rule  # current objects: restic's live repository


def test_spamhaus_dqs_key_is_a_secret_parameter_every_host_role_reads() -> None:
    key = "abcdefghijklm0123456789xyz"
    config = {**stack_config("large"), "orgmail:spamhausDqsKey": key}
    run = run_program(config, "large")
    s = load_settings(raw_config("large"), "large")
    [param] = [r for r in run.of_type("aws:ssm/parameter:Parameter") if r.inputs["name"].endswith("/spamhaus/dqs-key")]
    assert param.inputs["name"] == f"{s.ssm_path}/spamhaus/dqs-key" and param.inputs["type"] == "SecureString"
    for policy in policies(run).values():
        assert allowed(policy, "ssm:GetParameter", parameter_arn(run, s.region, param.inputs["name"]))
    for instance in run.of_type("aws:ec2/instance:Instance"):
        assert key not in user_data_text(instance.inputs)
    assert not [r for r in run_stack("large").of_type("aws:ssm/parameter:Parameter")
                if "spamhaus" in r.inputs["name"]]  # no key: no parameter
