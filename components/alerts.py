"""Alarms on what the mailbox host reports about itself (issue 18): `orgmail-health` on the host
publishes these metrics every 5 minutes (namespace orgmail, dimensions Stack and Host), and each
alarm mails admin.email through the stack's alarm topic (backup.alarmEmail). The table is the
runbook too: README "Alarms" prints each line.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from components.backup import BACKUP_NAMESPACE

HEALTH_PERIOD = 300  # orgmail-health.timer runs every 5 minutes


@dataclass(frozen=True)
class HealthAlarm:
    slug: str  # the alarm's name after the host's slug: mail-queue-size
    metric: str
    comparison: str  # CloudWatch's ComparisonOperator
    threshold: float
    periods: int  # 5-minute periods in a row
    missing: str  # TreatMissingData
    runbook: str  # what it means and what to do (README "Alarms")


HEALTH_ALARMS: tuple[HealthAlarm, ...] = (
    HealthAlarm("queue-size", "QueueMessages", "GreaterThanThreshold", 100, 3, "ignore",
                "more than 100 messages have waited in the queue for 15 minutes: `orgmail-queue` and `postqueue -p` "
                "show to whom and why (a provider refusing us, AWS's port-25 block on a new account, a mail loop)"),
    HealthAlarm("queue-age", "QueueOldestMinutes", "GreaterThanThreshold", 240, 1, "ignore",
                "a message has waited more than 4 hours (its sender has just been told it is delayed): "
                "`postqueue -p` shows the reason; `postqueue -f` retries once the cause is fixed"),
    HealthAlarm("volume", "MailVolumeUsedPercent", "GreaterThanOrEqualToThreshold", 85, 1, "ignore",
                "the mail volume is 85 % full: give it more space (`orgmail:tier`, README \"Change tier\"), or "
                "lower quotas; the weekly report names the largest mailboxes"),
    HealthAlarm("root-volume", "RootVolumeUsedPercent", "GreaterThanOrEqualToThreshold", 85, 1, "ignore",
                "the root volume is 85 % full: `journalctl --disk-usage` and `apt-get clean`; mail is not there"),
    HealthAlarm("certificate", "CertificateDaysLeft", "LessThanThreshold", 14, 1, "ignore",
                "the certificate Postfix and Dovecot serve expires in less than 14 days, and certbot renews at "
                "30: `journalctl -u orgmail-cert` says why renewal fails (docs/acme.md)"),
    HealthAlarm("sync", "SyncAgeMinutes", "GreaterThanThreshold", 30, 1, "breaching",
                "no configuration sync has succeeded for 30 minutes, or the host reports nothing at all: "
                "`journalctl -u orgmail-sync` (SSM unreachable, a parameter refused), or the host is down"),
    HealthAlarm("bounces", "BouncePercent", "GreaterThanThreshold", 10, 3, "ignore",
                "more than 10 % of the mail sent out in the last hour bounced (at least 20 messages): a "
                "blocklisting or a user sending to bad lists; the weekly report and `journalctl -t postfix/smtp`"),
    HealthAlarm("blocklisted", "Blocklisted", "GreaterThanOrEqualToThreshold", 1, 1, "ignore",
                "the host's address is on a blocklist it checks hourly (Spamhaus ZEN through its own resolver): "
                "find why (a compromised account: the weekly report's busiest logins), then ask for delisting"),
)


def health_alarms(stack: str, slug: str, hostname: str, topic_arn: pulumi.Input[str] | None, tags: dict[str, str],
                  opts: pulumi.ResourceOptions) -> list[aws.cloudwatch.MetricAlarm]:
    """The mailbox host's health alarms, mailed through `topic_arn` (when alarms are mailed at all)."""
    topic = [topic_arn] if topic_arn is not None else []
    return [aws.cloudwatch.MetricAlarm(
        f"{slug}-{a.slug}", namespace=BACKUP_NAMESPACE, metric_name=a.metric,
        dimensions={"Stack": stack, "Host": hostname}, statistic="Maximum" if a.comparison.startswith("Greater")
        else "Minimum", period=HEALTH_PERIOD, evaluation_periods=a.periods, comparison_operator=a.comparison,
        threshold=a.threshold, treat_missing_data=a.missing, alarm_actions=topic, ok_actions=topic,
        alarm_description=f"{hostname}: {a.runbook}", tags=tags, opts=opts) for a in HEALTH_ALARMS]
