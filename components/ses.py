"""Amazon SES as the outbound relay (orgmail:outbound.relay: ses): what AWS needs so the mailbox host
can hand outside mail to SES on port 587 while AWS keeps port 25 closed.

Per mail domain an SES v2 domain identity signing with the stack's own DKIM key (BYODKIM, the selector
orgmail:dkimSelector publishes already) and a custom MAIL FROM domain `bounce.<domain>` (its MX and SPF
come from components/dns_records.py ses_records); one configuration set, the identities' default, whose
bounce and complaint events go to an SNS topic; alarms on the account's bounce and complaint rates below
SES's review thresholds; and an IAM user allowed only ses:SendRawEmail for the stack's domains, whose
SMTP credentials the mailbox host reads from SSM (<ssm_path>/ses/smtp; a cluster's outbound relays from
<ssm_path>/relay/ses/smtp). Nothing here exists with
`direct`, and nothing here feeds user-data: switching is a day-2 change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws

from components.boundary import IAM_PATH
from components.dns_records import ses_mail_from_domain
from components.secrets import SES_SMTP_PARAMETER
from components.settings import Settings

# SES's reputation thresholds (SES Developer Guide, "Reputation metrics messages"): an account is placed
# under review at a bounce rate of 5% or a complaint rate of 0.1%, and sending may be paused at 10% and
# 0.5%. The alarms fire below the review thresholds, with time to act before either.
SES_BOUNCE_REVIEW_RATE = 0.05
SES_BOUNCE_PAUSE_RATE = 0.10
SES_COMPLAINT_REVIEW_RATE = 0.001
SES_COMPLAINT_PAUSE_RATE = 0.005
BOUNCE_ALARM_RATE = 0.04
COMPLAINT_ALARM_RATE = 0.0008
# (metric, threshold, what it means) of the account-wide reputation metrics SES publishes (namespace AWS/SES).
REPUTATION_ALARMS: tuple[tuple[str, float, str], ...] = (
    ("Reputation.BounceRate", BOUNCE_ALARM_RATE,
     f"bounce rate at {BOUNCE_ALARM_RATE:.0%}: SES reviews the account at {SES_BOUNCE_REVIEW_RATE:.0%} and may "
     f"pause sending at {SES_BOUNCE_PAUSE_RATE:.0%}"),
    ("Reputation.ComplaintRate", COMPLAINT_ALARM_RATE,
     f"complaint rate at {COMPLAINT_ALARM_RATE:.2%}: SES reviews the account at {SES_COMPLAINT_REVIEW_RATE:.1%} and "
     f"may pause sending at {SES_COMPLAINT_PAUSE_RATE:.1%}"),
)
SES_EVENT_TYPES = ("BOUNCE", "COMPLAINT")
EVENT_DESTINATION_NAME = "bounces-and-complaints"
# The MAIL FROM domain's MX missing: SES falls back to its own amazonses.com MAIL FROM (SPF then does not
# align, DKIM still does, so DMARC passes) rather than refusing the message.
MAIL_FROM_MX_FAILURE = "USE_DEFAULT_VALUE"


def configuration_set_name(settings: Settings) -> str:
    """Unique per account and region, like every account-wide name (Settings.namespace): at most 55 characters."""
    return f"orgmail-{settings.namespace}"


def identity_arn(region: str, account: str, domain: str) -> str:
    return f"arn:aws:ses:{region}:{account}:identity/{domain}"


def configuration_set_arn(region: str, account: str, name: str) -> str:
    return f"arn:aws:ses:{region}:{account}:configuration-set/{name}"


def sender_patterns(settings: Settings) -> list[str]:
    """Every From address the relay may use: any address of a mail domain or of a name inside it (the host's
    own mail, e.g. MAILER-DAEMON@mail.example.org)."""
    return [p for d in settings.domains for p in (f"*@{d.name}", f"*@*.{d.name}")]


def smtp_user_policy(settings: Settings, account: str) -> dict[str, Any]:
    """The SMTP user's only permission: ses:SendRawEmail (what SES's SMTP interface authorises) on the stack's
    identities and configuration set, and only with a From address in the stack's domains."""
    region = settings.outbound.ses_region
    assert region is not None, "SES policy without outbound.relay: ses"
    resources = [identity_arn(region, account, d.name) for d in settings.domains]
    resources.append(configuration_set_arn(region, account, configuration_set_name(settings)))
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "SendOnlyAsTheStacksDomains", "Effect": "Allow", "Action": "ses:SendRawEmail",
        "Resource": resources,
        "Condition": {"StringLike": {"ses:FromAddress": sender_patterns(settings)}},
    }]}


# IAM and AWS STS quotas: a user's inline policies hold 2,048 characters in all, white space excluded.
IAM_USER_POLICY_MAX = 2048
_ACCOUNT_SHAPE = "123456789012"  # every account id has 12 digits: the size does not depend on which


def ses_problems(settings: Settings) -> list[str]:
    """Config problems of outbound.relay ses that only the whole settings show: the SMTP user's policy, which
    names every mail domain, must fit IAM's inline-policy size."""
    if not settings.outbound.ses:
        return []
    size = len(re.sub(r"\s", "", json.dumps(smtp_user_policy(settings, _ACCOUNT_SHAPE))))
    if size <= IAM_USER_POLICY_MAX:
        return []
    return [f"orgmail:outbound.relay: ses for these {len(settings.domains)} domains needs an SMTP user policy of "
            f"{size} characters, and IAM allows {IAM_USER_POLICY_MAX} in a user's inline policies; relay fewer "
            "domains through SES from this stack (serve the others from another stack), or use direct"]


def events_topic_policy(topic_arn: str, account: str, region: str, config_set: str) -> dict[str, Any]:
    """SES may publish this configuration set's events to the topic, and nothing else may publish through SES."""
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "SesPublishesThisConfigurationSetsEvents", "Effect": "Allow",
        "Principal": {"Service": "ses.amazonaws.com"}, "Action": "sns:Publish", "Resource": topic_arn,
        "Condition": {"StringEquals": {"aws:SourceAccount": account,
                                       "aws:SourceArn": configuration_set_arn(region, account, config_set)}},
    }]}


def smtp_credentials_document(username: str, password: str) -> str:
    """The SSM parameter's value: {"username": <access key id>, "password": <SMTP password>}, compact."""
    return json.dumps({"username": username, "password": password}, separators=(",", ":"))


def dkim_private_key_b64(private_key_pem: str) -> str:
    """A PEM private key as SES's BYODKIM takes it: the base64 body, without the BEGIN/END lines and line breaks."""
    lines = [ln.strip() for ln in private_key_pem.strip().splitlines()]
    if len(lines) < 3 or not lines[0].startswith("-----BEGIN ") or not lines[-1].startswith("-----END "):
        raise ValueError("expected a PEM private key block")
    return "".join(lines[1:-1])


def key_name(name: str, generation: int) -> str:
    """The access key of one generation: a new generation is a new resource, created before the old one goes."""
    return f"{name}-smtp-key-{generation}"


@dataclass(frozen=True)
class SesArgs:
    """What the SES relay takes from the rest of the stack."""

    dkim_private_key_pem: pulumi.Output[str]  # the signing selector's key (Secrets)
    permissions_boundary: str  # the account's boundary policy ARN (components/boundary.py)
    # SES looks the BYODKIM key up in DNS and the MAIL FROM MX too: the identities follow their records.
    dkim_records: Sequence[pulumi.Resource] = field(default_factory=tuple)
    mail_from_records: Sequence[pulumi.Resource] = field(default_factory=tuple)
    alarm_topic_arn: pulumi.Output[str] | None = None  # the stack's alarm topic (Backup), in the stack's region
    # The SMTP credentials' parameter: by default <ssm path>/ses/smtp (the mailbox host reads the whole path);
    # a cluster's under the relays' own path, since they send.
    smtp_parameter_name: str | None = None


class Ses(pulumi.ComponentResource):
    smtp_parameter: aws.ssm.Parameter
    user_policy: pulumi.Output[str]

    def __init__(self, name: str, settings: Settings, args: SesArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:Ses", name, None, opts)
        o = settings.outbound
        assert o.ses and o.ses_region is not None, "Ses without outbound.relay: ses"
        region = o.ses_region
        tags = {"orgmail:stack": settings.stack}
        # SES, its topic and alarms live in the SES region. The access key too: its SMTP password is derived
        # (SigV4) for the provider's region. The SSM parameter stays in the stack's region with the others.
        provider = None if region == settings.region else aws.Provider(
            f"{name}-aws-{region}", region=region, opts=pulumi.ResourceOptions(parent=self))
        ses = pulumi.ResourceOptions(parent=self, provider=provider)
        account = aws.get_caller_identity_output(opts=pulumi.InvokeOptions(parent=self)).account_id

        cs_name = configuration_set_name(settings)
        config_set = aws.sesv2.ConfigurationSet(
            f"{name}-configuration-set", configuration_set_name=cs_name,
            reputation_options={"reputation_metrics_enabled": True}, sending_options={"sending_enabled": True},
            tags=tags, opts=ses)
        topic = aws.sns.Topic(f"{name}-events", tags=tags, opts=ses)
        topic_policy = aws.sns.TopicPolicy(
            f"{name}-events-policy", arn=topic.arn,
            policy=pulumi.Output.all(topic.arn, account).apply(
                lambda a: json.dumps(events_topic_policy(a[0], a[1], region, cs_name))), opts=ses)
        aws.sesv2.ConfigurationSetEventDestination(
            f"{name}-events", configuration_set_name=config_set.configuration_set_name,
            event_destination_name=EVENT_DESTINATION_NAME,
            event_destination={"enabled": True, "matching_event_types": list(SES_EVENT_TYPES),
                               "sns_destination": {"topic_arn": topic.arn}},
            opts=pulumi.ResourceOptions(parent=self, provider=provider, depends_on=[topic_policy]))

        private_key: pulumi.Output[str] = pulumi.Output.secret(args.dkim_private_key_pem.apply(dkim_private_key_b64))
        self.identities: dict[str, aws.sesv2.EmailIdentity] = {}
        for d in settings.domains:
            slug = d.name.replace(".", "-")
            identity = aws.sesv2.EmailIdentity(
                f"{name}-identity-{slug}", email_identity=d.name,
                configuration_set_name=config_set.configuration_set_name,
                dkim_signing_attributes={"domain_signing_private_key": private_key,
                                         "domain_signing_selector": settings.dkim_selector},
                tags=tags, opts=pulumi.ResourceOptions(parent=self, provider=provider,
                                                       depends_on=list(args.dkim_records)))
            aws.sesv2.EmailIdentityMailFromAttributes(
                f"{name}-mail-from-{slug}", email_identity=identity.email_identity,
                mail_from_domain=ses_mail_from_domain(d.name), behavior_on_mx_failure=MAIL_FROM_MX_FAILURE,
                opts=pulumi.ResourceOptions(parent=self, provider=provider, depends_on=list(args.mail_from_records)))
            self.identities[d.name] = identity

        alarm_topic = args.alarm_topic_arn if region == settings.region else None
        if alarm_topic is None and settings.backup.alarm_email:
            # CloudWatch notifies topics of its own region only: the SES region gets a topic of its own.
            own = aws.sns.Topic(f"{name}-alarms", tags=tags, opts=ses)
            aws.sns.TopicSubscription(f"{name}-alarms-admin", topic=own.arn, protocol="email",
                                      endpoint=settings.admin.email, opts=ses)
            alarm_topic = own.arn
        actions = [alarm_topic] if alarm_topic is not None else []
        for metric, threshold, meaning in REPUTATION_ALARMS:
            aws.cloudwatch.MetricAlarm(
                f"{name}-{metric.split('.', 1)[1].lower().removesuffix('rate')}-rate",
                namespace="AWS/SES", metric_name=metric, statistic="Maximum", period=3600, evaluation_periods=1,
                comparison_operator="GreaterThanOrEqualToThreshold", threshold=threshold,
                treat_missing_data="notBreaching", alarm_actions=actions, ok_actions=actions,
                alarm_description=f"orgmail {settings.namespace}: SES {meaning}", tags=tags, opts=ses)

        user = aws.iam.User(f"{name}-smtp-user", path=IAM_PATH, permissions_boundary=args.permissions_boundary,
                            tags=tags, opts=ses)
        self.user_policy = account.apply(lambda a: json.dumps(smtp_user_policy(settings, a)))
        aws.iam.UserPolicy(f"{name}-smtp-send", user=user.name, policy=self.user_policy, opts=ses)
        keys = {g: aws.iam.AccessKey(key_name(name, g), user=user.name, opts=ses) for g in o.ses_key_generations}
        current = keys[o.ses_key_generation]
        credentials: pulumi.Output[str] = pulumi.Output.secret(pulumi.Output.all(current.id, current.ses_smtp_password_v4).apply(
            lambda a: smtp_credentials_document(a[0], a[1])))
        # Read by the host that sends: the mailbox host (its role reads the whole stack path; a backup MX's never
        # this name), or a cluster's outbound relays (their own path, which no other role reads).
        # Not a boot dependency: orgmail-sync applies it, as it applies every day-2 setting.
        self.smtp_parameter = aws.ssm.Parameter(
            f"{name}-smtp-credentials", name=args.smtp_parameter_name or f"{settings.ssm_path}/{SES_SMTP_PARAMETER}",
            type="SecureString",
            value=credentials, description=f"SES SMTP credentials (key generation {o.ses_key_generation})",
            tags=tags, opts=pulumi.ResourceOptions(parent=self))
        self.register_outputs({"configurationSet": cs_name})
