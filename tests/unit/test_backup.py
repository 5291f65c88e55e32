"""The backup component on the mock engine: bucket, restic password, snapshots, recovery and backup
alarms; and the pure parts of the host's orgmail-backup/orgmail-restore and orgmail-sync."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

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
    volume = run.one("aws:ebs/volume:Volume", "mail-data")  # relays have queue volumes of their own
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
    alarms = [a for a in run.of_type(ALARM) if a.inputs["namespace"] == "AWS/EC2"]
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
    relay_free = run_stack("isp-single").one("aws:ec2/instance:Instance", "mx2-instance")
    assert "BACKUP_BUCKET" not in user_data(relay_free)


def _host_script(template: str, name: str) -> ModuleType:  # a host script under cloud-init/files, as a module
    import importlib.machinery
    import importlib.util

    from components.userdata import TEMPLATE_DIR
    loader = importlib.machinery.SourceFileLoader(name, str(TEMPLATE_DIR / "files" / template))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _backup_script() -> Any:  # the host's orgmail-backup (and orgmail-restore)
    return _host_script("backup/orgmail-backup.py", "orgmail_backup")


def test_restic_repository_on_ec2_and_in_tests(monkeypatch) -> None:
    script = _backup_script()
    host = {"REGION": "eu-central-1", "BACKUP_BUCKET": "orgmail-dev-backup-x", "HOSTNAME": "mail.example.org",
            "STACK": "dev"}
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
    run = run_stack("isp-single")
    mailbox = user_data(run.one("aws:ec2/instance:Instance", "mail-instance"))
    assert "systemctl enable --now orgmail-backup.timer" in mailbox
    # The scripts and units come through SSM (the mailbox role's host files), written before the
    # bootstrap enables the timer.
    from components.userdata import ssm_files
    backup = {"/usr/local/sbin/orgmail-backup", "/usr/local/sbin/orgmail-restore",
              "/etc/systemd/system/orgmail-backup.service", "/etc/systemd/system/orgmail-backup.timer"}
    assert backup <= set(ssm_files("mailbox"))
    assert "OnCalendar=*-*-* 02:15:00" in ssm_files("mailbox")["/etc/systemd/system/orgmail-backup.timer"]["content"]
    assert not backup & set(ssm_files("relay"))
    relay = user_data(run.one("aws:ec2/instance:Instance", "mx2-instance"))
    for name in ("orgmail-backup.timer", "/usr/local/sbin/orgmail-restore", "/usr/local/sbin/orgmail-backup"):
        assert name not in relay


BACKUP_ALARMS = ("backup-not-ok", "backup-stale")


def test_backup_results_alarm_when_not_ok_or_missing_for_a_day(stack_run) -> None:
    """Issue 16 item 4: the host reports each run (0 ok, 1 warning, 2 failed); a run that was not ok,
    or no report for 26 hours (a dead host, a timer that never fires), raises an alarm."""
    stack, run = stack_run
    alarms = {a.name: a.inputs for a in run.of_type(ALARM) if a.inputs["metricName"] == "BackupResult"}
    assert set(alarms) == set(BACKUP_ALARMS)
    for a in alarms.values():
        assert a["metricName"] == "BackupResult" and a["dimensions"] == {"Stack": stack}
        assert int(a["period"]) == 3600
    not_ok = alarms["backup-not-ok"]
    assert not_ok["statistic"] == "Maximum" and not_ok["comparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert float(not_ok["threshold"]) == 1  # a warning (incomplete snapshot) alarms too
    assert not_ok["treatMissingData"] == "ignore"  # a failure stays an alarm until the next run reports
    stale = alarms["backup-stale"]
    assert stale["statistic"] == "SampleCount" and stale["comparisonOperator"] == "LessThanThreshold"
    # every one of 26 hours without a report (DatapointsToAlarm defaults to EvaluationPeriods)
    assert int(stale["evaluationPeriods"]) == 26 and "datapointsToAlarm" not in stale
    assert float(stale["threshold"]) == 1 and stale["treatMissingData"] == "breaching"
    # CloudWatch: evaluation periods x period may span at most 7 days
    assert int(stale["evaluationPeriods"]) * int(stale["period"]) <= 7 * 86400


def test_backup_alarms_go_to_the_alarm_topic() -> None:
    cfg = stack_config("dev")
    cfg["orgmail:backup"] = {"alarmEmail": True}
    run = run_program(cfg, "dev")
    [topic] = run.of_type("aws:sns/topic:Topic")
    for alarm in (a for a in run.of_type(ALARM) if a.name in BACKUP_ALARMS):
        assert alarm.inputs["alarmActions"] == [topic.outputs["arn"]] == alarm.inputs["okActions"]
    for alarm in (a for a in run_stack("dev").of_type(ALARM) if a.name in BACKUP_ALARMS):
        assert not alarm.inputs.get("alarmActions")  # no topic: the alarm is still there to see


def test_instance_role_reports_backups_in_its_namespace_only(stack_run) -> None:
    _, run = stack_run
    policy = json.loads(run.one("aws:iam/rolePolicy:RolePolicy", "secrets-host-policy").inputs["policy"])
    [st] = [st for st in policy["Statement"] if any(a.startswith("cloudwatch:") for a in st["Action"])]
    assert st == {"Sid": "ReportToCloudWatch", "Effect": "Allow", "Action": ["cloudwatch:PutMetricData"], "Resource": "*",
                  "Condition": {"StringEquals": {"cloudwatch:namespace": "orgmail"}}}


@pytest.mark.parametrize(("address", "folder", "path"), [
    ("ann@example.org", "", "/srv/mail/vmail/example.org/ann/mail/mailboxes"),
    ("ann@example.org", "INBOX", "/srv/mail/vmail/example.org/ann/mail/mailboxes/INBOX/dbox-Mails"),
    ("ann@example.org", "Sent", "/srv/mail/vmail/example.org/ann/mail/mailboxes/Sent/dbox-Mails"),
    ("a.b+c@mail.example.org", "Projects/2026 Q1",
     "/srv/mail/vmail/mail.example.org/a.b+c/mail/mailboxes/Projects/2026 Q1/dbox-Mails"),
    ("ann@example.org", "Entw&APw-rfe", "/srv/mail/vmail/example.org/ann/mail/mailboxes/Entw&APw-rfe/dbox-Mails"),
    # A dot is only a character in sdbox (in Maildir it separated folders).
    ("ann@example.org", "v1.2", "/srv/mail/vmail/example.org/ann/mail/mailboxes/v1.2/dbox-Mails"),
    ("ann@example.org", "Projects/2026.Q1..x", "/srv/mail/vmail/example.org/ann/mail/mailboxes/Projects/2026.Q1..x/dbox-Mails"),
])
def test_restore_maps_a_mailbox_and_folder_to_its_sdbox_directory(address: str, folder: str, path: str) -> None:
    assert _backup_script().mail_dir(address, folder) == path


@pytest.mark.parametrize(("address", "folder", "path"), [
    ("ann@example.org", "", "/srv/mail/vmail/example.org/ann/Maildir"),
    ("ann@example.org", "INBOX", "/srv/mail/vmail/example.org/ann/Maildir"),
    ("ann@example.org", "Sent", "/srv/mail/vmail/example.org/ann/Maildir/.Sent"),
    ("a.b+c@mail.example.org", "Projects/2026 Q1", "/srv/mail/vmail/mail.example.org/a.b+c/Maildir/.Projects.2026 Q1"),
    ("ann@example.org", "Entw&APw-rfe", "/srv/mail/vmail/example.org/ann/Maildir/.Entw&APw-rfe"),
])
def test_restore_maps_a_folder_of_a_snapshot_from_before_sdbox_to_its_maildir(
        address: str, folder: str, path: str) -> None:
    assert _backup_script().maildir(address, folder) == path


@pytest.mark.parametrize(("uids", "expected"), [
    ([1], "1"), ([1, 2, 3], "1:3"), ([5, 1, 3, 4], "1,3:5"), ([2, 4, 6], "2,4,6"), ([7, 8, 10, 11, 12], "7:8,10:12"),
])
def test_restore_imports_missing_messages_by_a_compact_uid_set(uids: list[int], expected: str) -> None:
    assert _backup_script().uid_set(uids) == expected


@pytest.mark.parametrize(("address", "folder"), [
    ("..@example.org", ""), (".@example.org", ""), (".ann@example.org", ""), ("ann.@example.org", ""),
    ("a..b@example.org", ""), ("ann@..", ""), ("ann@example..org", ""), ("ann@.example.org", ""),
    ("ann@example", ""), ("ann/../bob@example.org", ""), ("Ann@example.org", ""), ("ann@example.org/..", ""),
    ("", ""), ("ann@example.org", ".."), ("ann@example.org", "."), ("ann@example.org", "../bob"),
    ("ann@example.org", "Sent/.."), ("ann@example.org", "Sent/../../x"), ("ann@example.org", "/Sent"),
    ("ann@example.org", "Sent/"), ("ann@example.org", ".Sent"), ("ann@example.org", "Sent/.x"),
    ("ann@example.org", "Sent/./x"), ("ann@example.org", "..."),
    ("ann@example.org", "Sent//x"), ("ann@example.org", "x\n"), ("ann@example.org", "*"),
])
def test_restore_refuses_what_is_not_a_mailbox_or_folder(address: str, folder: str) -> None:
    script = _backup_script()
    for where in (script.mail_dir, script.maildir):
        with pytest.raises(script.Refused):
            where(address, folder)


def test_a_folder_of_a_snapshot_from_before_sdbox_has_no_dot() -> None:
    script = _backup_script()
    with pytest.raises(script.Refused):
        script.maildir("ann@example.org", "a.b")


KEEP = {"keepDaily": 7, "keepWeekly": 4, "keepMonthly": 12}


def test_a_shard_reads_its_bucket_and_retention_from_ssm_checked_whole() -> None:
    script = _backup_script()
    assert script.backup_settings("orgmail-isp-backup-20260101", json.dumps(KEEP)) == (
        "BACKUP_BUCKET=orgmail-isp-backup-20260101\nKEEP_DAILY=7\nKEEP_WEEKLY=4\nKEEP_MONTHLY=12\n")
    for bucket in ("Orgmail", "x", "bucket\nKEEP_DAILY=1", "bucket ", "a" * 64, "-bucket", "bucket/restic"):
        with pytest.raises(RuntimeError, match="backup-bucket in SSM"):
            script.backup_settings(bucket, json.dumps(KEEP))
    for keep in ({**KEEP, "keepDaily": 0}, {**KEEP, "keepDaily": True}, {**KEEP, "keepWeekly": "4"},
                 {**KEEP, "keepMonthly": 241}, {"keepDaily": 7}, {**KEEP, "keepHourly": 1}, [7, 4, 12]):
        with pytest.raises(RuntimeError, match="backup/keep in SSM"):
            script.backup_settings("orgmail-isp-backup-1", json.dumps(keep))


def test_a_shard_keeps_its_last_settings_when_ssm_cannot_answer(monkeypatch, tmp_path: Path) -> None:
    script = _backup_script()
    target = tmp_path / "backup.env"
    monkeypatch.setattr(script, "Path", lambda p: target if p == "/etc/orgmail/backup.env" else Path(p))
    host = {"SSM_PATH": "/orgmail/isp/shard", "REGION": "eu-central-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    answers: list[Any] = []

    def fake_run(args: list[str], **kwargs: Any) -> Any:
        assert args[:3] == ["aws", "ssm", "get-parameters"] and kwargs["env"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1"
        assert args[args.index("--names") + 1:args.index("--names") + 3] == [
            "/orgmail/isp/shard/backup-bucket", "/orgmail/isp/shard/backup/keep"]
        return answers.pop(0)

    monkeypatch.setattr(script.subprocess, "run", fake_run)
    found = {"Parameters": [{"Name": "/orgmail/isp/shard/backup-bucket", "Value": "orgmail-isp-backup-1"},
                            {"Name": "/orgmail/isp/shard/backup/keep", "Value": json.dumps(KEEP)}]}
    failed = type("P", (), {"returncode": 255, "stdout": "", "stderr": "Could not connect"})()
    # No settings yet and SSM down: the run fails (it has no bucket to write to).
    answers.append(failed)
    with pytest.raises(RuntimeError, match="Could not connect"):
        script.refresh_cluster_settings(host)
    assert not target.exists()
    answers.append(type("P", (), {"returncode": 0, "stdout": json.dumps(found), "stderr": ""})())
    script.refresh_cluster_settings(host)
    written = target.read_text()
    assert written.startswith("BACKUP_BUCKET=orgmail-isp-backup-1\n")
    # Later: SSM down, or a parameter missing or malformed: the last settings stay.
    for answer in (failed, type("P", (), {"returncode": 0, "stdout": json.dumps({"Parameters": found["Parameters"][:1]}),
                                          "stderr": ""})()):
        answers.append(answer)
        script.refresh_cluster_settings(host)
        assert target.read_text() == written


def test_a_shards_restic_repository_and_reports_name_the_host(monkeypatch) -> None:
    script = _backup_script()
    files = {"/etc/orgmail/host.env": {"ROLE": "shard", "REGION": "eu-central-1", "STACK": "isp",
                                       "HOSTNAME": "shard1.example.org", "SSM_PATH": "/orgmail/isp/shard"},
             "/etc/orgmail/backup.env": {"BACKUP_BUCKET": "orgmail-isp-backup-1", "KEEP_DAILY": "7"}}
    monkeypatch.setattr(script, "read_env", lambda path: dict(files.get(path, {})))
    env = script.restic_env()
    assert env["RESTIC_REPOSITORY"] == "s3:https://s3.eu-central-1.amazonaws.com/orgmail-isp-backup-1/restic"
    assert env["HOSTNAME"] == "shard1.example.org"
    # A restore before the shard's first backup: the settings come from SSM first.
    del files["/etc/orgmail/backup.env"]
    refreshed: list[str] = []

    def refresh(host: dict[str, str]) -> None:
        refreshed.append(host["SSM_PATH"])
        files["/etc/orgmail/backup.env"] = {"BACKUP_BUCKET": "orgmail-isp-backup-2"}

    monkeypatch.setattr(script, "refresh_cluster_settings", refresh)
    assert script.restic_env()["RESTIC_REPOSITORY"].endswith("/orgmail-isp-backup-2/restic")
    assert refreshed == ["/orgmail/isp/shard"]
    script.restic_env()
    assert refreshed == ["/orgmail/isp/shard"]  # once there, read as it is
    del files["/etc/orgmail/backup.env"]
    monkeypatch.setattr(script, "refresh_cluster_settings", lambda host: None)  # SSM had nothing
    with pytest.raises(RuntimeError, match="BACKUP_BUCKET"):
        script.restic_env()
    sent: list[list[str]] = []
    monkeypatch.setattr(script, "run", lambda env, *args, **kw: sent.append(list(args)))
    script.report(env, "warning")
    data = json.loads(sent[0][sent[0].index("--metric-data") + 1])
    # By stack (the single mailbox host's alarms) and by stack and host (each shard's own alarms).
    assert [d["Dimensions"] for d in data] == [[{"Name": "Stack", "Value": "isp"}],
                                               [{"Name": "Stack", "Value": "isp"},
                                                {"Name": "Host", "Value": "shard1.example.org"}]]
    assert {d["Value"] for d in data} == {1}


def test_a_mailbox_restores_from_another_hosts_snapshot_only_by_its_id(monkeypatch) -> None:
    """A cluster's shards share the repository: mail from before a move is in the old shard's snapshots. `latest`
    of this host, an explicit id of any host's (restore_mailbox); restore_all takes this host's; migrate any host's."""
    script = _backup_script()
    asked: list[list[str]] = []

    def fake_restic(env: dict[str, str], *args: str, ok: Any = (0,)) -> Any:
        asked.append(list(args))
        return type("P", (), {"stdout": json.dumps([{"short_id": "0a1b2c3d", "hostname": "shard1", "time": "2026"}])})()

    monkeypatch.setattr(script, "restic", fake_restic)
    env = {"HOSTNAME": "shard2.example.org"}
    for snapshot, any_host, hosts in (("latest", False, ["--host", "shard2.example.org"]),
                                      ("latest", True, []),  # migrate: the old host's latest
                                      ("0a1b2c3d", True, []),
                                      ("0a1b2c3d", False, ["--host", "shard2.example.org"])):
        asked.clear()
        script.pick(env, snapshot, any_host=any_host)
        [args] = asked
        assert args == ["snapshots", "--json", *hosts, "--tag", "orgmail", *([] if snapshot == "latest" else [snapshot])]


def test_migrate_reads_the_copied_repository_with_the_old_password_only() -> None:
    script = _backup_script()
    env = {"RESTIC_REPOSITORY": "s3:https://s3.eu-central-1.amazonaws.com/orgmail-isp-backup-1/restic",
           "RESTIC_PASSWORD_FILE": "/etc/orgmail/restic-password", "HOSTNAME": "shard1.example.org"}
    moved = script.migration_env(env, "old-secret")
    assert moved["RESTIC_REPOSITORY"] == "s3:https://s3.eu-central-1.amazonaws.com/orgmail-isp-backup-1/migration"
    assert moved["RESTIC_PASSWORD"] == "old-secret" and "RESTIC_PASSWORD_FILE" not in moved
    assert env["RESTIC_REPOSITORY"].endswith("/restic")  # this host's own environment unchanged
    with pytest.raises(script.Refused, match="password must come on stdin"):
        script.migration_env(env, "")


def test_migrate_takes_the_mailboxes_this_host_serves_and_reports_the_others(monkeypatch, capsys) -> None:
    script = _backup_script()
    tree = {"/srv/mail/vmail": ["example.org", "example.net"],
            "/srv/mail/vmail/example.org": ["ann", "dave", "Bad Name"], "/srv/mail/vmail/example.net": ["eve"]}

    def fake_restic(env: dict[str, str], *args: str, ok: Any = (0,)) -> Any:
        if args[0] == "snapshots":
            return type("P", (), {"stdout": json.dumps([{"id": "f" * 64, "short_id": "ffffffff",
                                                         "hostname": "mail.example.org", "time": "2026-12-05T02"}])})()
        assert args[:3] == ("ls", "--json", "f" * 64)
        path = args[3]
        lines = [{"struct_type": "snapshot"}, {"struct_type": "node", "type": "dir", "name": path.rsplit("/", 1)[1],
                                                "path": path}]
        lines += [{"struct_type": "node", "type": "dir", "name": n, "path": f"{path}/{n}"} for n in tree.get(path, [])]
        lines.append({"struct_type": "node", "type": "file", "name": "stray", "path": f"{path}/stray"})
        return type("P", (), {"stdout": "\n".join(map(json.dumps, lines))})()

    served = {"ann@example.org", "eve@example.net"}
    monkeypatch.setattr(script, "restic", fake_restic)
    monkeypatch.setattr(script.subprocess, "run",
                        lambda args, **kw: type("P", (), {"returncode": 0 if args[2] in served else 67})())
    migrated: list[str] = []

    def fake_migrate(env: dict[str, str], sid: str, address: str) -> int:
        if address == "eve@example.net":
            raise RuntimeError("doveadm sync failed (75)")
        migrated.append(address)
        return 3

    monkeypatch.setattr(script, "migrate_mailbox", fake_migrate)
    env = {"RESTIC_REPOSITORY": "s3:https://s3/b/restic", "HOSTNAME": "shard1.example.org"}
    with pytest.raises(RuntimeError, match="1 mailboxes failed: eve@example.net"):
        script.migrate(env, "latest", "old-secret")
    out = capsys.readouterr()
    assert migrated == ["ann@example.org"]
    assert "skipped dave@example.org: not a mailbox of this host" in out.out
    assert "skipped 'Bad Name@example.org': not a mailbox address" in out.err
    assert "1 mailboxes migrated, 2 skipped, 1 failed" in out.out


def test_a_shard_backs_up_stops_and_restores_only_dovecot_and_its_mail(monkeypatch, tmp_path: Path) -> None:
    script = _backup_script()
    role = {"ROLE": "shard"}
    monkeypatch.setattr(script, "read_env", lambda path: dict(role) if path == "/etc/orgmail/host.env" else {})
    monkeypatch.setattr(script, "Path", lambda p: tmp_path / p.lstrip("/"))
    for p in [*script.PATHS, *script.SHARD_PATHS]:  # a host with every package installed (as the e2e root is)
        (tmp_path / p.lstrip("/")).mkdir(parents=True, exist_ok=True)
    assert script.services() == ["dovecot"]
    assert script.paths() == ["/etc/dovecot", "/etc/orgmail", "/srv/mail"]
    role = {"ROLE": "mailbox"}
    assert script.services() == ["postfix", "dovecot", "rspamd", "redis-server"]
    assert script.paths() == script.PATHS
    (tmp_path / "var/lib/redis").rmdir()
    assert "/var/lib/redis" not in script.paths()


def _sync_script() -> Any:
    return _host_script("orgmail/sync.py", "orgmail_sync")


MAILBOX_ENV = {"ROLE": "mailbox"}


def _params(mailboxes: list[str], hashes: dict[str, str] | None) -> dict[str, str]:
    params = {"config": json.dumps({"mailboxes": [{"address": a} for a in mailboxes]})}
    if hashes is not None:
        params["mailbox-passwords"] = json.dumps(hashes)
    return params


@pytest.mark.parametrize("hashes", [None, {}])
def test_sync_refuses_mailboxes_without_password_hashes(hashes: dict[str, str] | None) -> None:
    """Issue 16 item 5: a missing (or empty) password-hash parameter would write an empty users file
    and lock everyone out: the sync refuses before writing anything."""
    sync = _sync_script()
    with pytest.raises(RuntimeError, match="password hashes"):
        sync.refuse_incomplete(MAILBOX_ENV, _params(["ann@example.org"], hashes))


def test_sync_accepts_complete_parameters() -> None:
    sync = _sync_script()
    sync.refuse_incomplete(MAILBOX_ENV, _params(["ann@example.org"], {"ann@example.org": "{BLF-CRYPT}x"}))
    sync.refuse_incomplete(MAILBOX_ENV, _params([], None))  # no mailboxes, nothing to lock out
    sync.refuse_incomplete({"ROLE": "relay"}, _params(["ann@example.org"], None))  # relays hold no users


_watched: list[Path] = []
_modes: list[int] = []


def _observe_modes(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: before each file operation, the mode every watched file has at that moment."""
    for path in _watched:
        with contextlib.suppress(OSError):
            _modes.append(os.stat(path).st_mode & 0o7777)


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_sync_creates_secret_files_with_their_final_mode(tmp_path: Path, mode: int) -> None:
    """The temporary file a secret is written to never exists with a wider mode than the final one,
    not even for a moment (umask 0 shows what the code itself asks for)."""
    sync = _sync_script()
    target = tmp_path / "secret"
    if not _watched and not _modes:
        sys.addaudithook(_observe_modes)
    _watched[:] = [target.with_name("secret.orgmail-new"), target]
    _modes.clear()
    old = os.umask(0)
    try:
        assert sync.write(str(target), "key material\n", mode, (os.getuid(), os.getgid()))
    finally:
        os.umask(old)
        _watched.clear()
    assert target.read_text() == "key material\n" and target.stat().st_mode & 0o7777 == mode
    assert _modes, "no file operation observed"
    assert all(m & ~mode == 0 for m in _modes), [oct(m) for m in _modes]


def _without_docstrings(source: str) -> str:
    import ast
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and len(node.body) > 1:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                node.body.pop(0)
    return ast.dump(tree)


def test_python_host_scripts_ship_the_same_code_without_comments() -> None:
    """User-data carries the host scripts' code, not their explanations (EC2's 16 KB): the rendered
    scripts parse to exactly the templates' code, and hold no comment but the #! line."""
    import gzip
    import io
    import tokenize

    from components.userdata import HOST_FILES, TEMPLATE_DIR, render_files
    from tests.unit.test_userdata import MAILBOX
    rendered = {f.path: f.content for f in render_files(MAILBOX)}
    scripts = [spec for spec in HOST_FILES if spec.template.endswith(".py")]
    assert {s.template for s in scripts} >= {"orgmail/sync.py", "backup/orgmail-backup.py"}
    saved = 0
    for spec in scripts:
        source, shipped = (TEMPLATE_DIR / "files" / spec.template).read_text(), rendered[spec.path]
        assert _without_docstrings(shipped) == _without_docstrings(source), spec.template
        comments = [t for t in tokenize.generate_tokens(io.StringIO(shipped).readline) if t.type == tokenize.COMMENT]
        assert [c.string for c in comments] == ["#!/usr/bin/python3"], spec.template
        saved += len(gzip.compress(source.encode())) - len(gzip.compress(shipped.encode()))
    assert saved > 1000
