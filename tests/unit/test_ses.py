"""Issue 14, the Pulumi side: orgmail:outbound.relay ses relays outside mail through Amazon SES.

On the mock engine: what `ses` creates and `direct` does not, the SMTP user's only permission and its
From-address condition, the SMTP credentials readable by the mailbox host's role alone, the MAIL FROM
records, key rotation without a gap, and no instance input changed by switching relay."""

from __future__ import annotations

import base64
import copy
import fnmatch
import functools
import json
from typing import Any

import pytest

from components.dns_records import all_records, quote_txt, ses_records
from components.secrets import host_config
from components.ses import (
    BOUNCE_ALARM_RATE,
    COMPLAINT_ALARM_RATE,
    SES_BOUNCE_REVIEW_RATE,
    SES_COMPLAINT_REVIEW_RATE,
    dkim_private_key_b64,
    smtp_user_policy,
)
from components.settings import ConfigError, Settings, load_settings
from tests.unit.conftest import raw_config, run_stack, stack_config
from tests.unit.test_roles import allowed, parameter_arn, policies
from tools.deploy_checks import check_run
from tools.mockengine import PLACEHOLDER_ACCOUNT, MockRun, run_program
from tools.plan import stored_value

SES_TYPES = ("aws:sesv2/", "aws:iam/user:", "aws:iam/userPolicy:", "aws:iam/accessKey:")
IDENTITY = "aws:sesv2/emailIdentity:EmailIdentity"
MAIL_FROM = "aws:sesv2/emailIdentityMailFromAttributes:EmailIdentityMailFromAttributes"
PARAMETER = "aws:ssm/parameter:Parameter"
INSTANCE = "aws:ec2/instance:Instance"
RECORD = "cloudflare:index/dnsRecord:DnsRecord"


def with_outbound(stack: str, outbound: dict[str, Any] | None) -> dict[str, Any]:
    config = copy.deepcopy(stack_config(stack))
    if outbound is None:
        config.pop("orgmail:outbound", None)
    else:
        config["orgmail:outbound"] = outbound
    return config


@functools.cache
def ses_run(stack: str = "dev", region: str | None = None, generation: int = 1, retiring: int | None = None) -> MockRun:
    outbound: dict[str, Any] = {"relay": "ses"}
    if region:
        outbound["sesRegion"] = region
    if generation != 1:
        outbound["sesKeyGeneration"] = generation
    if retiring is not None:
        outbound["sesKeyRetiring"] = retiring
    return run_program(with_outbound(stack, outbound), stack)


def ses_settings(stack: str = "dev", **outbound: Any) -> Settings:
    raw = raw_config(stack)
    raw["outbound"] = {"relay": "ses", **outbound}
    return load_settings(raw, stack)


def problems(outbound: Any) -> list[str]:
    raw = raw_config()
    raw["outbound"] = outbound
    with pytest.raises(ConfigError) as e:
        load_settings(raw, "dev")
    return e.value.problems


# --- settings ---------------------------------------------------------------------------------------


def test_direct_is_the_default_and_makes_nothing_of_ses() -> None:
    settings = load_settings(raw_config(), "dev")
    assert settings.outbound.relay == "direct" and settings.outbound.ses_region is None
    assert host_config(settings)["outbound"] == {"relay": "direct"}
    run = run_stack("dev")
    assert not [r for r in run.resources if r.type.startswith(SES_TYPES)]
    assert not [r for r in run.of_type(PARAMETER) if "/ses/" in r.inputs["name"]]
    assert not [r for r in run.of_type(RECORD) if r.inputs["name"].startswith("bounce.")]
    assert run.outputs["outbound"] == "direct"
    # Written out, direct is the same stack.
    explicit = run_program(with_outbound("dev", {"relay": "direct"}), "dev")
    def graph(r: MockRun) -> list[tuple[str, str]]:
        return sorted((x.type, x.name) for x in r.resources)

    def config(r: MockRun) -> list[str]:
        return [x.inputs["value"] for x in r.of_type(PARAMETER) if x.inputs["name"].startswith("/orgmail/dev/config/")]

    assert graph(explicit) == graph(run) and config(explicit) == config(run)


def test_ses_host_config_names_the_regions_smtp_endpoint() -> None:
    assert host_config(ses_settings())["outbound"] == {
        "relay": "ses", "host": "email-smtp.eu-central-1.amazonaws.com", "port": 587}
    assert host_config(ses_settings(sesRegion="us-east-1"))["outbound"] == {
        "relay": "ses", "host": "email-smtp.us-east-1.amazonaws.com", "port": 587}
    # The mailbox host applies it from the config parameter, like every day-2 setting.
    [config] = [r for r in ses_run().of_type(PARAMETER) if r.inputs["name"] == "/orgmail/dev/config/part-000"]
    assert '"outbound":{"relay":"ses","host":"email-smtp.eu-central-1.amazonaws.com","port":587}' in config.inputs["value"]


@pytest.mark.parametrize(("outbound", "expected"), [
    ({"relay": "SES"}, ["orgmail:outbound.relay: must be one of direct, ses (direct: the host sends on port 25 itself; "
                        "ses: through Amazon SES on 587), got 'SES'"]),
    ({"relay": None}, ["orgmail:outbound.relay: must be one of direct, ses (direct: the host sends on port 25 itself; "
                       "ses: through Amazon SES on 587), got None"]),
    ("ses", ["orgmail:outbound: must be an object with keys relay, sesRegion, sesKeyGeneration, sesKeyRetiring"]),
    ({"relay": "direct", "sesRegion": "eu-west-1"},
     ["orgmail:outbound.sesRegion: is valid only with outbound.relay: ses (relay is direct); remove it or set relay to ses"]),
    ({"sesKeyGeneration": 2},
     ["orgmail:outbound.sesKeyGeneration: is valid only with outbound.relay: ses (relay is direct); remove it or set "
      "relay to ses"]),
    ({"relay": "ses", "sesRegion": "Europe"},
     ["orgmail:outbound.sesRegion: must be an AWS region where Amazon SES runs, like eu-central-1 (or unset for the "
      "stack's region eu-central-1), got 'Europe'"]),
    ({"relay": "ses", "sesRegion": "eu-west-1\n"},
     ["orgmail:outbound.sesRegion: contains a line break (\\n) at character 10; remove it",
      "orgmail:outbound.sesRegion: must be an AWS region where Amazon SES runs, like eu-central-1 (or unset for the "
      "stack's region eu-central-1), got 'eu-west-1\\n'"]),
    ({"relay": "ses", "sesKeyGeneration": 0},
     ["orgmail:outbound.sesKeyGeneration: must be a whole number from 1 to 1000000, got 0"]),
    ({"relay": "ses", "sesKeyGeneration": "two"},
     ["orgmail:outbound.sesKeyGeneration: must be a whole number from 1 to 1000000, got 'two'"]),
    ({"relay": "ses", "sesKeyGeneration": 2, "sesKeyRetiring": 2},
     ["orgmail:outbound.sesKeyRetiring: 2 is outbound.sesKeyGeneration, the key the host uses; give the previous "
      "generation (its key stays active until you remove sesKeyRetiring)"]),
    ({"relay": "ses", "sesKeyRetiring": -1},
     ["orgmail:outbound.sesKeyRetiring: must be a whole number from 1 to 1000000, got -1"]),
    ({"relay": "ses", "smarthost": "smtp.example.net"},
     ["orgmail:outbound.smarthost: unknown setting; valid keys are relay, sesRegion, sesKeyGeneration, sesKeyRetiring"]),
    ({"relay": "ses", "sesregion": "eu-west-1"},
     ["orgmail:outbound.sesregion: unknown setting; did you mean sesRegion? (the rest was checked as if it were)"]),
])
def test_outbound_errors_name_the_setting_and_what_is_valid(outbound: Any, expected: list[str]) -> None:
    assert problems(outbound) == expected


def test_the_flat_dotted_form_is_read_as_nested() -> None:
    raw = raw_config()
    raw["outbound.relay"] = "ses"
    with pytest.raises(ConfigError) as e:
        load_settings(raw, "dev")
    assert e.value.problems == ['orgmail:outbound.relay: write it nested: `orgmail:outbound:` with `relay: "ses"` '
                                "indented under it (or `pulumi config set --path 'orgmail:outbound.relay' ...`)"]


def test_a_bad_outbound_setting_fails_before_any_resource() -> None:
    with pytest.raises(ConfigError):
        run_program(with_outbound("dev", {"relay": "postfix"}), "dev")


# --- the resource graph -----------------------------------------------------------------------------


def test_ses_creates_an_identity_and_mail_from_domain_per_mail_domain() -> None:
    for stack in ("dev", "medium"):
        run = ses_run(stack)
        settings = ses_settings(stack)
        domains = [d.name for d in settings.domains]
        identities = {r.inputs["emailIdentity"]: r for r in run.of_type(IDENTITY)}
        assert sorted(identities) == sorted(domains)
        mail_from = {r.inputs["emailIdentity"]: r.inputs for r in run.of_type(MAIL_FROM)}
        assert mail_from == {d: {"emailIdentity": d, "mailFromDomain": f"bounce.{d}",
                                 "behaviorOnMxFailure": "USE_DEFAULT_VALUE"} for d in domains}
        for identity in identities.values():
            # BYODKIM with the stack's own key and selector; the configuration set is the identity's default.
            assert identity.inputs["configurationSetName"] == f"orgmail-{stack}"
            assert identity.inputs["dkimSigningAttributes"]["domainSigningSelector"] == settings.dkim_selector
            assert identity.raw_inputs["dkimSigningAttributes"] != identity.inputs["dkimSigningAttributes"], \
                "the private key must travel as a secret"
        [cs] = run.of_type("aws:sesv2/configurationSet:ConfigurationSet")
        assert cs.inputs["configurationSetName"] == f"orgmail-{stack}"
        assert cs.inputs["reputationOptions"] == {"reputationMetricsEnabled": True}
        assert check_run(run) == []


def test_ses_signs_with_the_key_the_host_signs_with() -> None:
    run = ses_run()
    [key_parameter] = [r for r in run.of_type(PARAMETER) if r.inputs["name"] == "/orgmail/dev/dkim/s2026"]
    [identity] = run.of_type(IDENTITY)
    sent = identity.inputs["dkimSigningAttributes"]["domainSigningPrivateKey"]
    assert sent == dkim_private_key_b64(key_parameter.inputs["value"])
    base64.b64decode(sent, validate=True)
    # Published under the selector SES is given: no DNS record of SES's own for DKIM.
    assert not [r for r in run.of_type(RECORD) if r.inputs["type"] == "CNAME"]


def test_the_pem_body_is_what_byodkim_takes() -> None:
    assert dkim_private_key_b64("-----BEGIN PRIVATE KEY-----\nAAAA\nBBB=\n-----END PRIVATE KEY-----\n") == "AAAABBB="
    assert dkim_private_key_b64("-----BEGIN RSA PRIVATE KEY-----\nQUJD\n-----END RSA PRIVATE KEY-----") == "QUJD"
    with pytest.raises(ValueError):
        dkim_private_key_b64("QUJD")


def test_the_identities_follow_their_dns_records() -> None:
    run = ses_run("medium")
    urns = {r.name: r.urn for r in run.of_type(RECORD)}
    settings = ses_settings("medium")
    for identity in run.of_type(IDENTITY):
        domain = identity.inputs["emailIdentity"]
        assert urns[f"dns-txt-{settings.dkim_selector}-domainkey-{domain.replace('.', '-')}"] in identity.dependencies
    for mail_from in run.of_type(MAIL_FROM):
        slug = mail_from.inputs["mailFromDomain"].replace(".", "-")
        assert {urns[f"dns-mx-{slug}-10"], urns[f"dns-txt-{slug}"]} <= set(mail_from.dependencies)


def test_bounce_and_complaint_events_go_to_sns_and_alarms_fire_below_ses_review() -> None:
    run = ses_run()
    [destination] = run.of_type("aws:sesv2/configurationSetEventDestination:ConfigurationSetEventDestination")
    topic = run.one("aws:sns/topic:Topic", "ses-events")
    assert destination.inputs["eventDestination"] == {
        "enabled": True, "matchingEventTypes": ["BOUNCE", "COMPLAINT"],
        "snsDestination": {"topicArn": topic.outputs["arn"]}}
    [policy] = run.of_type("aws:sns/topicPolicy:TopicPolicy")
    assert policy.urn in destination.dependencies
    statement = json.loads(policy.inputs["policy"])["Statement"][0]
    assert statement["Principal"] == {"Service": "ses.amazonaws.com"} and statement["Action"] == "sns:Publish"
    assert statement["Condition"]["StringEquals"] == {
        "aws:SourceAccount": PLACEHOLDER_ACCOUNT,
        "aws:SourceArn": f"arn:aws:ses:eu-central-1:{PLACEHOLDER_ACCOUNT}:configuration-set/orgmail-dev"}
    alarms = {r.inputs["metricName"]: r.inputs for r in run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
              if r.inputs["namespace"] == "AWS/SES"}
    assert alarms["Reputation.BounceRate"]["threshold"] == BOUNCE_ALARM_RATE < SES_BOUNCE_REVIEW_RATE
    assert alarms["Reputation.ComplaintRate"]["threshold"] == COMPLAINT_ALARM_RATE < SES_COMPLAINT_REVIEW_RATE
    assert all(a["comparisonOperator"] == "GreaterThanOrEqualToThreshold" and "dimensions" not in a
               for a in alarms.values()), "account-wide: SES enforces on the account's rates"


def test_alarm_mail_reaches_the_admin_in_the_ses_region() -> None:
    config = with_outbound("dev", {"relay": "ses"})
    config["orgmail:backup"] = {"alarmEmail": True}
    run = run_program(config, "dev")
    backup_topic = run.one("aws:sns/topic:Topic", "backup-alarms").outputs["arn"]
    ses_alarms = [r for r in run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm") if r.inputs["namespace"] == "AWS/SES"]
    assert ses_alarms and all(r.inputs["alarmActions"] == [backup_topic] for r in ses_alarms)
    # Another region: CloudWatch notifies only topics of its own region, so the SES region has its own.
    config["orgmail:outbound"] = {"relay": "ses", "sesRegion": "us-east-1"}
    run = run_program(config, "dev")
    own = run.one("aws:sns/topic:Topic", "ses-alarms").outputs["arn"]
    assert run.one("aws:sns/topicSubscription:TopicSubscription", "ses-alarms-admin").inputs["endpoint"] == "ann@example.org"
    assert all(r.inputs["alarmActions"] == [own] for r in run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
               if r.inputs["namespace"] == "AWS/SES")


def test_another_ses_region_gets_its_own_provider_endpoint_and_feedback_mx() -> None:
    run = ses_run("dev", "us-east-1")
    providers = {r.name: r.inputs.get("region") for r in run.resources if r.type == "pulumi:providers:aws"}
    assert providers == {"aws": "eu-central-1", "ses-aws-us-east-1": "us-east-1"}
    mx = [r.inputs for r in run.of_type(RECORD) if r.inputs["name"] == "bounce.example.org" and r.inputs["type"] == "MX"]
    assert [m["content"] for m in mx] == ["feedback-smtp.us-east-1.amazonses.com"]
    assert check_run(run) == []
    # Same region: no second provider.
    assert [r.name for r in ses_run().resources if r.type == "pulumi:providers:aws"] == ["aws"]


def test_the_security_group_lets_the_host_reach_ses_on_587_only_with_ses() -> None:
    def egress(run: MockRun) -> set[tuple[Any, ...]]:
        return {(r.inputs["ipProtocol"], r.inputs["fromPort"], r.inputs.get("cidrIpv4"), r.inputs.get("cidrIpv6"))
                for r in run.of_type("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")}

    added = egress(ses_run()) - egress(run_stack("dev"))
    assert added == {("tcp", 587, "0.0.0.0/0", None)}
    assert not egress(run_stack("dev")) - egress(ses_run())


def test_a_domain_named_like_a_mail_from_domain_is_refused_with_ses() -> None:
    raw = raw_config()
    raw["domains"].append({"name": "bounce.example.org", "zoneId": raw["domains"][0]["zoneId"]})
    load_settings(raw, "dev")  # fine with direct
    raw["outbound"] = {"relay": "ses"}
    with pytest.raises(ConfigError, match="the same name 'mx-bounce-example-org-10'"):
        load_settings(raw, "dev")


def test_more_domains_than_the_smtp_policy_can_name_are_refused() -> None:
    raw = raw_config()
    raw["domains"] += [{"name": f"customer{i:02d}-brand.example", "zoneId": f"{i + 1:032x}"} for i in range(12)]
    raw["outbound"] = {"relay": "ses"}
    settings = load_settings(raw, "dev")  # 13 short domains fit
    size = len(json.dumps(smtp_user_policy(settings, PLACEHOLDER_ACCOUNT)).replace(" ", ""))
    assert size <= 2048
    raw["domains"].append({"name": "customer99-brand.example", "zoneId": f"{99:032x}"})
    with pytest.raises(ConfigError) as e:
        load_settings(raw, "dev")
    [problem] = e.value.problems
    assert problem.startswith("orgmail:outbound.relay: ses for these 14 domains needs an SMTP user policy of ")
    assert "IAM allows 2048 in a user's inline policies" in problem
    raw["outbound"] = {"relay": "direct"}
    load_settings(raw, "dev")


# --- IAM: the SMTP user -----------------------------------------------------------------------------


def _condition_allows(statement: dict[str, Any], from_address: str) -> bool:
    """IAM's StringLike on a single-valued key: any pattern matches (case-sensitive, * and ?)."""
    patterns = statement["Condition"]["StringLike"]["ses:FromAddress"]
    return any(fnmatch.fnmatchcase(from_address, p) for p in patterns)


def test_the_smtp_user_may_only_send_raw_email_as_the_stacks_domains() -> None:
    run = ses_run("medium")
    [policy_resource] = run.of_type("aws:iam/userPolicy:UserPolicy")
    policy = json.loads(policy_resource.inputs["policy"])
    assert policy == smtp_user_policy(ses_settings("medium"), PLACEHOLDER_ACCOUNT)
    [statement] = policy["Statement"]
    assert statement["Effect"] == "Allow" and statement["Action"] == "ses:SendRawEmail"
    arn = f"arn:aws:ses:eu-central-1:{PLACEHOLDER_ACCOUNT}"
    assert statement["Resource"] == [f"{arn}:identity/medium.example", f"{arn}:identity/medium-brand.example",
                                     f"{arn}:configuration-set/orgmail-medium"]
    unconditioned = {**policy, "Statement": [{k: v for k, v in statement.items() if k != "Condition"}]}
    assert allowed(unconditioned, "ses:SendRawEmail", f"{arn}:identity/medium.example")
    for action in ("ses:SendEmail", "ses:SendBulkEmail", "ses:CreateEmailIdentity", "iam:CreateAccessKey", "ses:*"):
        assert not allowed(unconditioned, action, f"{arn}:identity/medium.example"), action
    assert not allowed(unconditioned, "ses:SendRawEmail", f"{arn}:identity/other.example")
    assert not allowed(unconditioned, "ses:SendRawEmail", f"arn:aws:ses:us-east-1:{PLACEHOLDER_ACCOUNT}:identity/medium.example")
    for sender in ("ann@medium.example", "MAILER-DAEMON@mail.medium.example", "info@medium-brand.example",
                   "root@mx2.medium-brand.example"):
        assert _condition_allows(statement, sender), sender
    for sender in ("ann@other.example", "ann@medium.example.evil", "ann@evilmedium.example", "medium.example",
                   "ann@notmedium-brand.example", ""):
        assert not _condition_allows(statement, sender), sender


def test_the_key_is_the_users_and_its_smtp_password_goes_to_ssm_as_a_secure_string() -> None:
    run = ses_run()
    [user] = run.of_type("aws:iam/user:User")
    [key] = run.of_type("aws:iam/accessKey:AccessKey")
    assert key.inputs["user"] == user.outputs["name"] and key.name == "ses-smtp-key-1"
    [parameter] = [r for r in run.of_type(PARAMETER) if r.inputs["name"] == "/orgmail/dev/ses/smtp"]
    assert parameter.inputs["type"] == "SecureString"
    assert parameter.raw_inputs["value"] != parameter.inputs["value"], "the value must be a Pulumi secret"
    assert parameter.inputs["value"] == json.dumps(
        {"username": key.id, "password": key.outputs["sesSmtpPasswordV4"]}, separators=(",", ":"))
    assert key.id.startswith("AKIA")


def test_the_smtp_credentials_are_not_a_boot_dependency() -> None:
    run = ses_run()
    [parameter] = [r for r in run.of_type(PARAMETER) if r.inputs["name"] == "/orgmail/dev/ses/smtp"]
    for instance in run.of_type(INSTANCE):
        assert parameter.urn not in instance.dependencies


@pytest.mark.parametrize("stack", ["large", "isp-single"])
def test_only_the_mailbox_hosts_role_reads_the_smtp_credentials(stack: str) -> None:
    run = ses_run(stack)
    region = ses_settings(stack).region
    arn = parameter_arn(run, region, f"/orgmail/{stack}/ses/smtp")
    roles = policies(run)
    assert allowed(roles["secrets-host-policy"], "ssm:GetParameter", arn)
    assert not allowed(roles["secrets-relay-policy"], "ssm:GetParameter", arn)
    assert not allowed(roles["secrets-relay-policy"], "ssm:GetParametersByPath", arn)


def test_rotation_keeps_the_retiring_key_until_it_is_removed() -> None:
    one = {r.name: r.id for r in ses_run().of_type("aws:iam/accessKey:AccessKey")}
    both = {r.name: r.id for r in ses_run("dev", None, 2, 1).of_type("aws:iam/accessKey:AccessKey")}
    two = {r.name: r.id for r in ses_run("dev", None, 2).of_type("aws:iam/accessKey:AccessKey")}
    # Step 1: generation 1's key keeps its resource (so it stays active); generation 2's is new.
    assert one == {"ses-smtp-key-1": one["ses-smtp-key-1"]}
    assert both == {**one, "ses-smtp-key-2": both["ses-smtp-key-2"]} and len(both) == 2  # IAM: two keys a user
    assert two == {"ses-smtp-key-2": both["ses-smtp-key-2"]}  # step 2: the retiring key goes
    for run, generation in ((ses_run("dev", None, 2, 1), 2), (ses_run("dev", None, 2), 2)):
        [parameter] = [r for r in run.of_type(PARAMETER) if r.inputs["name"] == "/orgmail/dev/ses/smtp"]
        assert json.loads(parameter.inputs["value"])["username"] == both[f"ses-smtp-key-{generation}"]


# --- no host change when switching --------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["dev", "large"])
def test_switching_relay_never_changes_an_instance(stack: str) -> None:
    def instances(run: MockRun) -> dict[str, Any]:
        urns = {r.urn: (r.type, r.name) for r in run.resources}
        return {r.name: (r.inputs, sorted(urns[u] for u in r.dependencies)) for r in run.of_type(INSTANCE)}

    direct = instances(run_stack(stack))
    assert direct
    for run in (ses_run(stack), ses_run(stack, "us-east-1"), ses_run(stack, None, 2, 1)):
        assert instances(run) == direct


# --- DNS records (pure) -------------------------------------------------------------------------------


def test_ses_records_exact() -> None:
    settings = ses_settings("medium")
    assert [(r.zone, r.type, r.name, r.content, r.priority) for r in ses_records(settings)] == [
        ("medium.example", "MX", "bounce.medium.example", "feedback-smtp.eu-central-1.amazonses.com", 10),
        ("medium.example", "TXT", "bounce.medium.example", '"v=spf1 include:amazonses.com -all"', None),
        ("medium-brand.example", "MX", "bounce.medium-brand.example", "feedback-smtp.eu-central-1.amazonses.com", 10),
        ("medium-brand.example", "TXT", "bounce.medium-brand.example", quote_txt("v=spf1 include:amazonses.com -all"), None),
    ]
    assert ses_records(load_settings(raw_config("medium"), "medium")) == []
    placeholder = "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----"
    records = all_records(settings, {h: "192.0.2.1" for h in settings.mx_hosts}, placeholder)
    assert set(ses_records(settings)) <= set(records)
    # The domains' own SPF stays strict: SES sends under the MAIL FROM subdomain only.
    assert {r.content for r in records if r.type == "TXT" and r.name in ("medium.example", "medium-brand.example")} == {
        '"v=spf1 mx -all"'}


def test_the_ses_records_reach_cloudflare_unproxied() -> None:
    run = ses_run("medium")
    found = sorted((r.inputs["type"], r.inputs["name"], r.inputs["content"], r.inputs.get("priority"), r.inputs["proxied"])
                   for r in run.of_type(RECORD) if r.inputs["name"].startswith("bounce."))
    assert found == sorted([
        ("MX", "bounce.medium.example", "feedback-smtp.eu-central-1.amazonses.com", 10, False),
        ("TXT", "bounce.medium.example", '"v=spf1 include:amazonses.com -all"', None, False),
        ("MX", "bounce.medium-brand.example", "feedback-smtp.eu-central-1.amazonses.com", 10, False),
        ("TXT", "bounce.medium-brand.example", '"v=spf1 include:amazonses.com -all"', None, False),
    ])


def test_the_deploy_checks_would_refuse_what_ses_refuses() -> None:
    """The constraint layer covers the SES and IAM inputs: a broken value of each kind is a problem."""
    import dataclasses

    from tools.deploy_checks import check_resource

    run = ses_run()

    def problems(type_: str, **inputs: Any) -> list[str]:
        [r] = run.of_type(type_)
        changed = dataclasses.replace(r, raw_inputs={**r.raw_inputs, **inputs})
        return [f"{p.path}: {p.message}" for p in check_resource(changed)]

    assert any(p.startswith("configurationSetName:") for p in problems(
        "aws:sesv2/configurationSet:ConfigurationSet", configurationSetName="orgmail.dev"))
    assert any(p.startswith("dkimSigningAttributes.domainSigningSelector:") for p in problems(
        IDENTITY, dkimSigningAttributes={"domainSigningSelector": "-bad-", "domainSigningPrivateKey": "QUJD"}))
    assert any(p.startswith("dkimSigningAttributes.domainSigningPrivateKey:") for p in problems(
        IDENTITY, dkimSigningAttributes={"domainSigningSelector": "s1", "domainSigningPrivateKey": "-----BEGIN"}))
    assert any(p.startswith("behaviorOnMxFailure:") for p in problems(MAIL_FROM, behaviorOnMxFailure="BOUNCE"))
    big = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ses:SendRawEmail",
                                                                "Resource": ["x" * 2100]}]})
    assert any("IAM allows 2048" in p for p in problems("aws:iam/userPolicy:UserPolicy", policy=big))
    assert any(p.startswith("eventDestination.matchingEventTypes[]:") for p in problems(
        "aws:sesv2/configurationSetEventDestination:ConfigurationSetEventDestination",
        eventDestination={"enabled": True, "matchingEventTypes": ["BOUNCES"], "snsDestination": {"topicArn": "arn"}}))
    assert check_run(run) == []


# --- the cluster: its outbound relays send through SES ----------------------------------------------------


def test_a_clusters_relays_hold_the_smtp_credentials_and_its_config_names_ses() -> None:
    """With orgmail:cluster the outbound relays send (edges hand them outside mail): SES's SMTP credentials
    go under the relays' own path, which only their role reads, and the relays' config names the endpoint."""
    run, s = ses_run("isp"), ses_settings("isp")
    names = {r.inputs["name"]: r for r in run.of_type(PARAMETER)}
    parameter = names["/orgmail/isp/relay/ses/smtp"]
    assert "/orgmail/isp/ses/smtp" not in names
    assert parameter.inputs["type"] == "SecureString" and parameter.raw_inputs["value"] != parameter.inputs["value"]
    [key] = run.of_type("aws:iam/accessKey:AccessKey")
    assert json.loads(parameter.inputs["value"])["username"] == key.id
    arn = parameter_arn(run, s.region, "/orgmail/isp/relay/ses/smtp")
    readers = {role for role in ("edge", "shard", "relay") if allowed(json.loads(run.one(
        "aws:iam/rolePolicy:RolePolicy", f"cluster-{role}-policy").inputs["policy"]), "ssm:GetParameter", arn)}
    assert readers == {"relay"}
    config = json.loads(stored_value(run, "/orgmail/isp/relay/config") or "{}")
    assert config["outbound"] == {"relay": "ses", "host": f"email-smtp.{s.region}.amazonaws.com", "port": 587}
    assert json.loads(stored_value(run_stack("isp"), "/orgmail/isp/relay/config") or "{}")["outbound"] == {
        "relay": "direct"}
    # Identities, their MAIL FROM domains and records as on a single host.
    assert {r.inputs["emailIdentity"] for r in run.of_type(IDENTITY)} == {d.name for d in s.domains}
    records = {(r.inputs["type"], r.inputs["name"]) for r in run.of_type(RECORD)}
    assert {("MX", f"bounce.{d.name}") for d in s.domains} | {("TXT", f"bounce.{d.name}") for d in s.domains} <= records
    # Not a boot dependency of any relay: orgmail-sync --outbound applies it when it comes.
    for instance in run.of_type(INSTANCE):
        assert parameter.urn not in instance.dependencies


def test_switching_a_clusters_relay_changes_no_host() -> None:
    """Day 2 on the cluster too: the instances, the edges' launch template and every role's bundle stay."""
    def hosts(run: MockRun) -> dict[str, Any]:
        kinds = (INSTANCE, "aws:ec2/launchTemplate:LaunchTemplate")
        out = {r.name: r.inputs for kind in kinds for r in run.of_type(kind)}
        out |= {r.inputs["name"]: r.inputs["value"] for r in run.of_type(PARAMETER) if "/bundle/" in r.inputs["name"]}
        return out

    direct = hosts(run_stack("isp"))
    assert direct
    assert hosts(ses_run("isp")) == direct and hosts(ses_run("isp", None, 2, 1)) == direct
