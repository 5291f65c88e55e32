"""The backup component on the mock engine: bucket, restic password, snapshots, recovery alarms."""

from __future__ import annotations

import json

from components.backup import SNAPSHOT_TAG
from components.settings import load_settings
from tests.unit.conftest import raw_config, run_stack, stack_config
from tools.mockengine import MockRun, run_program

BUCKET = "aws:s3/bucket:Bucket"
ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"
DLM = "aws:dlm/lifecyclePolicy:LifecyclePolicy"


def bucket_of(run: MockRun) -> tuple[str, str]:
    bucket = run.one(BUCKET, "backup-bucket")
    return bucket.id, f"arn:aws:s3:::{bucket.id}"


def refers_to_bucket(run: MockRun, type_: str) -> dict:
    bucket_id, _ = bucket_of(run)
    [r] = run.of_type(type_)
    assert r.inputs["bucket"] == bucket_id and r.parent.endswith("orgmail:index:Backup::backup")
    return r.inputs


def test_one_protected_bucket_per_stack(stack_run) -> None:
    stack, run = stack_run
    [bucket] = run.of_type(BUCKET)
    assert bucket.protect and bucket.inputs["bucketPrefix"] == f"orgmail-{stack}-backup-"
    assert run.outputs["backupBucket"] == bucket.id


def test_bucket_private_versioned_encrypted_owner_enforced(dev_run) -> None:
    block = refers_to_bucket(dev_run, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    assert all(block[k] is True for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls",
                                          "restrictPublicBuckets"))
    versioning = refers_to_bucket(dev_run, "aws:s3/bucketVersioning:BucketVersioning")
    assert versioning["versioningConfiguration"]["status"] == "Enabled"
    sse = refers_to_bucket(dev_run, "aws:s3/bucketServerSideEncryptionConfiguration:"
                                    "BucketServerSideEncryptionConfiguration")
    assert sse["rules"][0]["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "AES256"
    owner = refers_to_bucket(dev_run, "aws:s3/bucketOwnershipControls:BucketOwnershipControls")
    assert owner["rule"]["objectOwnership"] == "BucketOwnerEnforced"


def test_bucket_policy_denies_plain_http(dev_run) -> None:
    _, arn = bucket_of(dev_run)
    policy = json.loads(refers_to_bucket(dev_run, "aws:s3/bucketPolicy:BucketPolicy")["policy"])
    [st] = policy["Statement"]
    assert st["Effect"] == "Deny" and st["Principal"] == "*" and st["Action"] == "s3:*"
    assert st["Resource"] == [arn, f"{arn}/*"]
    assert st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_lifecycle_expires_noncurrent_versions() -> None:
    cfg = stack_config("dev")
    cfg["orgmail:backup"] = {"noncurrentDays": 45}
    run = run_program(cfg, "dev")
    [rule] = refers_to_bucket(run, "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")["rules"]
    assert rule["status"] == "Enabled" and rule["noncurrentVersionExpiration"]["noncurrentDays"] == 45
    assert "expiration" not in rule  # current objects (the live repository) never expire
    dev = refers_to_bucket(run_stack("dev"), "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")
    assert dev["rules"][0]["noncurrentVersionExpiration"]["noncurrentDays"] == 30  # the default


def test_instance_role_uses_only_the_backup_bucket(stack_run) -> None:
    _, run = stack_run
    _, arn = bucket_of(run)
    policy = json.loads(run.one("aws:iam/rolePolicy:RolePolicy", "secrets-host-policy").inputs["policy"])
    s3 = [st for st in policy["Statement"]
          if any(a.startswith("s3:") for a in st["Action"]) and st["Sid"] != "BackupsOutliveTheHost"]
    assert {(tuple(st["Action"]), tuple(st["Resource"])) for st in s3} == {
        (("s3:ListBucket",), (arn,)),
        (("s3:GetObject", "s3:PutObject", "s3:DeleteObject"), (f"{arn}/*",)),
    }
    assert all(st["Effect"] == "Allow" for st in s3)


def test_restic_password_is_a_secure_parameter(stack_run) -> None:
    stack, run = stack_run
    param = run.one("aws:ssm/parameter:Parameter", "backup-restic-password")
    assert param.inputs["name"] == f"/orgmail/{stack}/backup/restic-password"
    assert param.inputs["type"] == "SecureString"
    password = run.one("random:index/randomPassword:RandomPassword", "backup-restic-password")
    assert password.protect and int(password.inputs["length"]) >= 32
    assert param.inputs["value"] == password.outputs["result"]


def test_daily_snapshots_of_the_tagged_mail_volume(stack_run) -> None:
    stack, run = stack_run
    s = load_settings(raw_config(stack), stack)
    [volume] = run.of_type("aws:ebs/volume:Volume")
    [policy] = run.of_type(DLM)
    details = policy.inputs["policyDetails"]
    assert details["resourceTypes"] == ["VOLUME"]
    assert details["targetTags"] == {SNAPSHOT_TAG: f"orgmail-{stack}"}
    assert volume.inputs["tags"][SNAPSHOT_TAG] == f"orgmail-{stack}" and volume.protect
    [schedule] = details["schedules"]
    assert schedule["createRule"]["interval"] == 24 and schedule["createRule"]["intervalUnit"] == "HOURS"
    assert schedule["retainRule"]["count"] == s.backup.snapshot_days
    assert policy.inputs["state"] == "ENABLED"
    role = run.one("aws:iam/role:Role", "backup-dlm-role")
    assert json.loads(role.inputs["assumeRolePolicy"])["Statement"][0]["Principal"] == {
        "Service": "dlm.amazonaws.com"}
    [attach] = [a for a in run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
                if a.name == "backup-dlm-policy"]
    assert attach.inputs["policyArn"].endswith("service-role/AWSDataLifecycleManagerServiceRole")


def test_snapshot_retention_from_config() -> None:
    cfg = stack_config("dev")
    cfg["orgmail:backup"] = {"snapshotDays": 14}
    [policy] = run_program(cfg, "dev").of_type(DLM)
    assert policy.inputs["policyDetails"]["schedules"][0]["retainRule"]["count"] == 14


def test_status_check_alarms_recover_and_reboot_every_host(stack_run) -> None:
    stack, run = stack_run
    s = load_settings(raw_config(stack), stack)
    instances = {r.id for r in run.of_type("aws:ec2/instance:Instance")}
    alarms = run.of_type(ALARM)
    assert len(alarms) == 2 * len(instances)
    seen = set()
    for a in alarms:
        i = a.inputs
        action = {"StatusCheckFailed_System": "recover", "StatusCheckFailed_Instance": "reboot"}[i["metricName"]]
        assert i["namespace"] == "AWS/EC2" and i["dimensions"]["InstanceId"] in instances
        assert f"arn:aws:automate:{s.region}:ec2:{action}" in i["alarmActions"]
        assert i["comparisonOperator"] == "GreaterThanOrEqualToThreshold" and float(i["threshold"]) == 1
        seen.add((i["dimensions"]["InstanceId"], action))
    assert len(seen) == len(alarms)
    assert not run.of_type("aws:sns/topic:Topic")  # alarm mail is off by default


def test_alarm_email_to_the_admin_when_enabled() -> None:
    cfg = stack_config("dev")
    cfg["orgmail:backup"] = {"alarmEmail": True}
    run = run_program(cfg, "dev")
    s = load_settings(raw_config("dev") | {"backup": {"alarmEmail": True}}, "dev")
    [topic] = run.of_type("aws:sns/topic:Topic")
    [sub] = run.of_type("aws:sns/topicSubscription:TopicSubscription")
    assert sub.inputs["protocol"] == "email" and sub.inputs["endpoint"] == s.admin.email
    assert sub.inputs["topic"] == topic.outputs["arn"]
    for alarm in run.of_type(ALARM):
        assert topic.outputs["arn"] in alarm.inputs["alarmActions"]


def test_backup_retention_reaches_the_host_config() -> None:
    cfg = stack_config("dev")
    cfg["orgmail:backup"] = {"keepDaily": 3, "keepWeekly": 2, "keepMonthly": 6}
    run = run_program(cfg, "dev")
    config = json.loads("".join(p.inputs["value"] for p in sorted(run.of_type("aws:ssm/parameter:Parameter"),
                                                                  key=lambda p: p.inputs["name"])
                                if p.inputs["name"].startswith("/orgmail/dev/config/")))
    assert config["backup"] == {"keepDaily": 3, "keepWeekly": 2, "keepMonthly": 6}


def test_mailbox_host_knows_its_backup_bucket(dev_run) -> None:
    from tests.unit.test_stack import user_data
    bucket_id, _ = bucket_of(dev_run)
    ud = user_data(dev_run.one("aws:ec2/instance:Instance", "mail-instance"))
    assert f"BACKUP_BUCKET={bucket_id}" in ud and "  - restic\n" in ud
    password = dev_run.one("random:index/randomPassword:RandomPassword", "backup-restic-password")
    assert password.outputs["result"] not in ud  # the host reads it from SSM
    relay_free = run_stack("isp").one("aws:ec2/instance:Instance", "mx2-instance")
    assert "BACKUP_BUCKET" not in user_data(relay_free)


def _backup_script():  # the host's orgmail-backup, loaded as a module
    import importlib.machinery
    import importlib.util

    from components.userdata import TEMPLATE_DIR
    path = str(TEMPLATE_DIR / "files/backup/orgmail-backup.py")
    loader = importlib.machinery.SourceFileLoader("orgmail_backup", path)
    spec = importlib.util.spec_from_loader("orgmail_backup", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_restic_repository_on_ec2_and_in_tests(monkeypatch) -> None:
    script = _backup_script()
    host = {"REGION": "eu-central-1", "BACKUP_BUCKET": "orgmail-dev-backup-x", "HOSTNAME": "mail.example.org"}
    monkeypatch.setattr(script, "read_env", lambda path: dict(host))
    env = script.restic_env()
    # EC2: no AWS_* keys at all, so restic falls back to the instance role (IMDS)
    assert env["RESTIC_REPOSITORY"] == "s3:https://s3.eu-central-1.amazonaws.com/orgmail-dev-backup-x/restic"
    assert not any(k.startswith("AWS_") and k != "AWS_DEFAULT_REGION" for k in env)
    assert env["RESTIC_PASSWORD_FILE"] == "/etc/orgmail/restic-password"
    host["AWS_ENDPOINT_URL"] = "http://127.0.0.1:5000"
    assert script.restic_env()["RESTIC_REPOSITORY"] == "s3:http://127.0.0.1:5000/orgmail-dev-backup-x/restic"


def test_backup_units_only_on_the_mailbox_host() -> None:
    from tests.unit.test_stack import user_data
    run = run_stack("isp")
    mailbox = user_data(run.one("aws:ec2/instance:Instance", "mail-instance"))
    assert "systemctl enable --now orgmail-backup.timer" in mailbox
    assert "path: /usr/local/sbin/orgmail-restore" in mailbox and "OnCalendar=*-*-* 02:15:00" in mailbox
    relay = user_data(run.one("aws:ec2/instance:Instance", "mx2-instance"))
    for name in ("orgmail-backup.timer", "/usr/local/sbin/orgmail-restore", "path: /usr/local/sbin/orgmail-backup\n"):
        assert name not in relay
