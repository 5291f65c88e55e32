"""Backup: the stack's private S3 bucket for restic, the repository password in SSM, daily EBS
snapshots of the mail-data volume (Data Lifecycle Manager), and alarms that recover or reboot a
host whose status checks fail (optionally mailing the administrator).
"""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from components.boundary import IAM_PATH
from components.names import aliases
from components.settings import Settings

# The tag on the mail-data volume that Data Lifecycle Manager snapshots by.
SNAPSHOT_TAG = "orgmail:snapshot"
DLM_SERVICE_POLICY = "arn:aws:iam::aws:policy/service-role/AWSDataLifecycleManagerServiceRole"
SNAPSHOT_TIME = "03:30"  # UTC; the nightly restic run is at 02:15 (systemd timer on the host)
RESTIC_PASSWORD_PARAMETER = "backup/restic-password"  # under the stack's SSM path


# The provider appends a 26-character unique suffix; S3 names are at most 63 characters.
BUCKET_PREFIX_MAX = 37


def bucket_prefix(stack: str) -> str:
    """`orgmail-<stack>-backup-`, shortened for long stack names to fit S3's 63 characters.

    Stacks whose prefix already fits keep it, so their existing (protected) bucket is not replaced.
    """
    prefix = f"orgmail-{stack}-backup-"
    if len(prefix) <= BUCKET_PREFIX_MAX:
        return prefix
    return f"orgmail-{stack[:BUCKET_PREFIX_MAX - 9].rstrip('-')}-"


def restic_password_parameter(settings: Settings) -> str:
    """The restic password's parameter: under the stack's path, or in a cluster under the shards' own
    sub-path (each cluster role reads only its own: components/cluster.py)."""
    if settings.cluster is not None:
        return f"{settings.ssm_path}/shard/{RESTIC_PASSWORD_PARAMETER}"
    return f"{settings.ssm_path}/{RESTIC_PASSWORD_PARAMETER}"


def backup_keep(settings: Settings) -> dict[str, int]:
    """restic's retention as the hosts read it (a mailbox host in its config, a shard in `backup/keep`)."""
    b = settings.backup
    return {"keepDaily": b.keep_daily, "keepWeekly": b.keep_weekly, "keepMonthly": b.keep_monthly}


def schedule_name(days: int) -> str:
    """DLM schedule names allow only [0-9A-Za-z _-]."""
    return f"daily kept {days} days"


def snapshot_tag(settings: Settings) -> dict[str, str]:
    return {SNAPSHOT_TAG: f"orgmail-{settings.namespace}"}


# orgmail-backup on the host reports every run here (dimension Stack): 0 ok, 1 warning (restic made
# an incomplete snapshot), 2 failed (including a run killed by its timeout, or refused).
BACKUP_NAMESPACE = "orgmail"
BACKUP_METRIC = "BackupResult"
BACKUP_STALE_HOURS = 26  # nightly at 02:15 (up to 15 min late): a day without a report is an alarm


# orgmail-bootstrap reports how each run at boot ended (dimensions Stack, Host): 0 finished, 1 failed
# (it tries again, backing off, and at every boot until it has finished).
BOOTSTRAP_METRIC = "BootstrapResult"

# Every host's reports (the backup's, the bootstrap's), in orgmail's own CloudWatch namespace only.
# PutMetricData has no resource-level permissions: the namespace condition is the limit.
REPORT_STATEMENT: dict[str, Any] = {
    "Sid": "ReportToCloudWatch", "Effect": "Allow", "Action": ["cloudwatch:PutMetricData"], "Resource": "*",
    "Condition": {"StringEquals": {"cloudwatch:namespace": BACKUP_NAMESPACE}}}


def bucket_statements(bucket_arn: str) -> list[dict[str, Any]]:
    """What restic needs on its repository, on this bucket only (for the instance role)."""
    return [
        {"Sid": "BackupBucketList", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [bucket_arn]},
        {"Sid": "BackupBucketObjects", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"], "Resource": [f"{bucket_arn}/*"]},
    ]


def tls_only_policy(bucket_arn: str) -> str:
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
            "Resource": [bucket_arn, f"{bucket_arn}/*"],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        }],
    })


def alarm_actions(region: str, action: str) -> str:
    """EC2 alarm action ARN: "recover" (move to healthy hardware) or "reboot"."""
    return f"arn:aws:automate:{region}:ec2:{action}"


DLM_ASSUME_ROLE = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "dlm.amazonaws.com"}, "Action": "sts:AssumeRole"}],
})

# (metric, action, what it means)
STATUS_ALARMS = (
    ("StatusCheckFailed_System", "recover", "AWS hardware or network failure: recover onto new hardware"),
    ("StatusCheckFailed_Instance", "reboot", "the operating system stopped answering: reboot"),
)


class Backup(pulumi.ComponentResource):
    bucket_name: pulumi.Output[str]
    bucket_arn: pulumi.Output[str]
    alarm_topic_arn: pulumi.Output[str] | None

    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None, *,
                 permissions_boundary: str) -> None:
        super().__init__("orgmail:index:Backup", name, None, opts)
        self._settings = settings
        child = pulumi.ResourceOptions(parent=self)
        tags = {"orgmail:stack": settings.stack}
        b = settings.backup

        # The backups outlive any host, like the mail-data volume: protected from deletion.
        bucket = aws.s3.Bucket(f"{name}-bucket", bucket_prefix=bucket_prefix(settings.namespace), tags=tags,
                               opts=pulumi.ResourceOptions(parent=self, protect=True))
        aws.s3.BucketOwnershipControls(
            f"{name}-ownership", bucket=bucket.id,
            rule={"object_ownership": "BucketOwnerEnforced"}, opts=child)
        block = aws.s3.BucketPublicAccessBlock(
            f"{name}-public-access-block", bucket=bucket.id, block_public_acls=True, block_public_policy=True,
            ignore_public_acls=True, restrict_public_buckets=True, opts=child)
        versioning = aws.s3.BucketVersioning(
            f"{name}-versioning", bucket=bucket.id,
            versioning_configuration={"status": "Enabled"}, opts=child)
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-encryption", bucket=bucket.id,
            rules=[{"apply_server_side_encryption_by_default": {"sse_algorithm": "AES256"}, "bucket_key_enabled": True}],
            opts=child)
        aws.s3.BucketPolicy(f"{name}-tls-only", bucket=bucket.id, policy=bucket.arn.apply(tls_only_policy),
                            opts=pulumi.ResourceOptions(parent=self, depends_on=[block]))
        aws.s3.BucketLifecycleConfiguration(
            f"{name}-lifecycle", bucket=bucket.id,
            rules=[{
                "id": "expire-old-versions", "status": "Enabled", "filter": {},
                "noncurrent_version_expiration": {"noncurrent_days": b.noncurrent_days},
                "abort_incomplete_multipart_upload": {"days_after_initiation": 7},
            }],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[versioning]))
        self.bucket_name = bucket.id
        self.bucket_arn = bucket.arn

        # restic's repository key. Replacing it would lock the existing repository: protected.
        password = random.RandomPassword(f"{name}-restic-password", length=40, special=False,
                                         opts=pulumi.ResourceOptions(parent=self, protect=True))
        restic_parameter = aws.ssm.Parameter(f"{name}-restic-password", name=restic_password_parameter(settings),
                          type="SecureString", value=password.result, description="restic repository password",
                          tags=tags, opts=child)
        # The mailbox host's first boot reads the restic password.
        self.boot_dependencies: list[pulumi.Resource] = [restic_parameter]

        dlm_role = aws.iam.Role(f"{name}-dlm-role", assume_role_policy=DLM_ASSUME_ROLE, path=IAM_PATH,
                                permissions_boundary=permissions_boundary,
                                description=f"orgmail {settings.stack}: EBS snapshots", tags=tags, opts=child)
        dlm_attach = aws.iam.RolePolicyAttachment(f"{name}-dlm-policy", role=dlm_role.name,
                                                  policy_arn=DLM_SERVICE_POLICY, opts=child)
        aws.dlm.LifecyclePolicy(
            f"{name}-snapshots", description=f"orgmail {settings.stack} daily mail-data snapshots",
            execution_role_arn=dlm_role.arn, state="ENABLED",
            policy_details={
                "resource_types": ["VOLUME"],
                "target_tags": snapshot_tag(settings),
                "schedules": [{
                    "name": schedule_name(b.snapshot_days),
                    "create_rule": {"interval": 24, "interval_unit": "HOURS", "times": SNAPSHOT_TIME},
                    "retain_rule": {"count": b.snapshot_days},
                    "copy_tags": True,
                    "tags_to_add": {"orgmail:snapshot-of": "mail-data"},
                }],
            },
            tags=tags, opts=pulumi.ResourceOptions(parent=self, depends_on=[dlm_attach]))

        self.alarm_topic_arn = None
        if b.alarm_email:
            topic = aws.sns.Topic(f"{name}-alarms", tags=tags, opts=child)
            aws.sns.TopicSubscription(f"{name}-alarms-admin", topic=topic.arn, protocol="email",
                                      endpoint=settings.admin.email, opts=child)
            self.alarm_topic_arn = topic.arn
        if settings.cluster is None:  # a cluster's shards each report and are watched on their own (watch_backups_of)
            self._watch_backups(name, {"Stack": settings.namespace}, "the mail host")
        self.register_outputs({"bucket": bucket.id})

    def watch_backups_of(self, slug: str, hostname: str) -> None:
        """A cluster shard's backup alarms (`<slug>-backup-not-ok`, `-stale`): its own reports, by Stack and Host
        (orgmail-backup reports by both), so a shard that stopped backing up shows even while the others do."""
        self._watch_backups(f"{slug}-backup", {"Stack": self._settings.namespace, "Host": hostname}, hostname)

    def _watch_backups(self, name: str, dimensions: dict[str, str], where: str) -> None:
        """Alarms on a host's backup reports: a run that was not ok, and no report for a day."""
        topic = [self.alarm_topic_arn] if self.alarm_topic_arn is not None else []
        stack = self._settings.namespace  # the dimension the host reports under (its STACK)
        tags = {"orgmail:stack": self._settings.stack}
        common: dict[str, Any] = {
            "namespace": BACKUP_NAMESPACE, "metric_name": BACKUP_METRIC, "dimensions": dimensions,
            "period": 3600, "alarm_actions": topic, "ok_actions": topic, "tags": tags,
            "opts": pulumi.ResourceOptions(parent=self),
        }
        # Until the next run reports, a failure stays an alarm ("ignore" keeps the state).
        aws.cloudwatch.MetricAlarm(
            f"{name}-not-ok", statistic="Maximum", evaluation_periods=1,
            comparison_operator="GreaterThanOrEqualToThreshold", threshold=1, treat_missing_data="ignore",
            alarm_description=f"orgmail {stack}: the last backup failed (2) or its snapshot is incomplete (1); "
                              f"see /var/lib/orgmail/backup-status.json on {where}", **common)
        aws.cloudwatch.MetricAlarm(
            f"{name}-stale", statistic="SampleCount", evaluation_periods=BACKUP_STALE_HOURS,  # all of them
            comparison_operator="LessThanThreshold", threshold=1, treat_missing_data="breaching",
            alarm_description=f"orgmail {stack}: no backup{f' of {where}' if 'Host' in dimensions else ''} reported "
                              f"for {BACKUP_STALE_HOURS} hours", **common)

    def watch_host(self, slug: str, hostname: str, instance_id: pulumi.Input[str],
                   legacy_name: str | None = None) -> None:
        """Status-check alarms for one host (`slug`: its role, mail, mx2, ...; `legacy_name`: what earlier
        versions named them after): system failure -> recover, instance failure -> reboot; and an alarm
        while its set-up at boot (orgmail-bootstrap) has failed and not yet finished."""
        region = self._settings.region
        topic = [self.alarm_topic_arn] if self.alarm_topic_arn is not None else []
        # Each run reports: 1 failed (the alarm stays on until a run finishes: "ignore" keeps the
        # state), 0 finished. A host that cannot reach CloudWatch at all cannot report.
        aws.cloudwatch.MetricAlarm(
            f"{slug}-bootstrap", namespace=BACKUP_NAMESPACE, metric_name=BOOTSTRAP_METRIC,
            dimensions={"Stack": self._settings.namespace, "Host": hostname}, statistic="Maximum", period=60,
            evaluation_periods=1, comparison_operator="GreaterThanOrEqualToThreshold", threshold=1,
            treat_missing_data="ignore", alarm_actions=topic, ok_actions=topic,
            alarm_description=f"{hostname}: its set-up at boot failed and retries; Session Manager, "
                              "then journalctl -u orgmail-bootstrap",
            tags={"orgmail:stack": self._settings.stack}, opts=pulumi.ResourceOptions(parent=self))
        for metric, action, meaning in STATUS_ALARMS:
            actions: list[pulumi.Input[str]] = [alarm_actions(region, action)]
            if self.alarm_topic_arn is not None:
                actions.append(self.alarm_topic_arn)
            check = f"-{metric.rsplit('_', 1)[1].lower()}-check"
            aws.cloudwatch.MetricAlarm(
                f"{slug}{check}", namespace="AWS/EC2", metric_name=metric,
                dimensions={"InstanceId": instance_id}, statistic="Maximum", period=60, evaluation_periods=2,
                comparison_operator="GreaterThanOrEqualToThreshold", threshold=1,
                alarm_description=f"{slug}: {meaning}", alarm_actions=actions,
                ok_actions=[self.alarm_topic_arn] if self.alarm_topic_arn is not None else [],
                tags={"orgmail:stack": self._settings.stack},
                opts=pulumi.ResourceOptions(parent=self, aliases=aliases(
                    f"{legacy_name}{check}" if legacy_name else None, new=f"{slug}{check}")))
