"""Layer 0: every value sent to AWS and Cloudflare checked against the providers' own constraints.

The example stacks and generated edge cases (longest stack name, longest names the settings
accept) must produce no problem; every resource type and input must be mapped; and each rule
class must catch the defect it exists for (the DLM schedule name among them).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest

from components.backup import bucket_prefix, schedule_name
from components.settings import ConfigError, load_settings
from tests.unit.conftest import STACKS, run_stack, stack_config
from tools import deploy_checks as dc
from tools.mockengine import MockRun, Registered, run_program

LONGEST_STACK = "s" + "-x" * 19 + "9"  # 40 characters, the most the settings allow


def longest_domain(length: int, tld: str = "org") -> str:
    """A valid domain of exactly `length` characters made of labels of up to 63 characters."""
    labels: list[str] = []
    budget = length - len(tld)  # each label takes its size plus one dot
    while budget > 0:
        if budget == 1:  # no room for a label and its dot: borrow one character from the previous label
            labels[-1] = labels[-1][:-1]
            budget += 1
        size = min(63, budget - 1)
        labels.append(chr(ord("a") + len(labels)) * size)
        budget -= size + 1
    domain = ".".join([*labels, tld])
    assert len(domain) == length
    return domain


def edge_config(tier: str, extra: int = 0) -> dict[str, Any]:
    """A stack whose names are as long as the settings accept: selector, host, domain, addresses
    (`extra` characters more on the domain: then one record name no longer fits DNS)."""
    cfg = copy.deepcopy(stack_config("isp-single" if tier == "isp" else "large"))
    selector = "k" * 63
    # <selector>._domainkey.<domain> is the longest name a domain needs: 253 characters at most.
    domain = longest_domain(253 - len(selector) - len("._domainkey.") + extra)
    zone = cfg["orgmail:domains"][0]["zoneId"]
    local = "l" * 64
    cfg.update({
        "orgmail:tier": tier,
        "orgmail:organization": "O" * 64,
        "orgmail:domains": [{"name": domain, "zoneId": zone}],
        "orgmail:mailHost": f"{'m' * 63}.{domain}"[:253] if len(domain) <= 189 else f"mail.{domain}",
        "orgmail:dkimSelector": selector,
        "orgmail:mailboxes": [{"address": f"{local}@{domain}", "quota": "1T", "aliases": [f"postmaster@{domain}"]}],
        "orgmail:aliases": {f"dmarc@{domain}": [f"{local}@{domain}"]},
        "orgmail:admin": {"email": f"{local}@{domain}", "ssm": True},
        "orgmail:dmarc": {"policy": "reject", "reportAddress": f"dmarc@{domain}"},
        "orgmail:tlsRpt": {"reportAddress": f"dmarc@{domain}"},
        "orgmail:caa": {"iodef": f"{local}@{domain}"},
        "orgmail:backup": {"alarmEmail": True, "snapshotDays": 1000},
        # The SES relay in another region (its own provider), with a retiring key: every SES input is checked.
        "orgmail:outbound": {"relay": "ses", "sesRegion": "ap-southeast-2", "sesKeyGeneration": 1000000,
                             "sesKeyRetiring": 999999},
        # Webmail behind Access, its name and the people Access admits as long as they come.
        "orgmail:webmail": {"hostname": f"{'w' * 63}.{domain}" if len(domain) <= 189 else f"webmail.{domain}",
                            "access": {"identityProviderIds": ["4f0e2c1a-8b7d-4e6f-9a5b-3c2d1e0f9a8b"],
                                       "emailDomains": [domain], "emails": [f"{local}@{domain}"],
                                       "sessionDuration": "9999h"}},
    })
    return cfg


@functools.cache
def edge_run(tier: str) -> MockRun:
    return run_program(edge_config(tier), LONGEST_STACK)


@pytest.mark.parametrize("stack", STACKS)
def test_example_stacks_meet_every_provider_constraint(stack: str) -> None:
    problems = dc.check_run(run_stack(stack))
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize("tier", ["small", "isp"])
def test_longest_names_meet_every_provider_constraint(tier: str) -> None:
    run = edge_run(tier)
    assert any(r.inputs.get("name") == f"/orgmail/{LONGEST_STACK}/config/part-000" for r in run.resources)
    problems = dc.check_run(run)
    assert problems == [], "\n".join(map(str, problems))


def test_one_character_more_is_refused_before_any_resource() -> None:
    cfg = {k.split(":", 1)[1]: v for k, v in edge_config("small", extra=1).items() if k.startswith("orgmail:")}
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, LONGEST_STACK)
    [problem] = err.value.problems
    assert problem.startswith("orgmail:domains[0].name: ") and "would be 254 characters" in problem
    assert "orgmail:dkimSelector" in problem


def test_the_acme_worker_host_name_is_checked_too() -> None:
    """With a short selector the longest name is orgmail-acme-<stack>.<zone>."""
    cfg = {k.split(":", 1)[1]: v for k, v in edge_config("small").items() if k.startswith("orgmail:")}
    cfg["dkimSelector"] = "s"
    cfg.pop("webmail")  # its name is in the old domain
    domain = longest_domain(253 - len(f"orgmail-acme-{LONGEST_STACK}.") + 1)
    zone = cfg["domains"][0]["zoneId"]
    cfg.update(domains=[{"name": domain, "zoneId": zone}], mailHost=f"mail.{domain}",
               mailboxes=[{"address": f"ann@{domain}"}], aliases={}, admin={"email": f"ann@{domain}"},
               dmarc={"reportAddress": f"ann@{domain}"}, tlsRpt={"reportAddress": f"ann@{domain}"}, caa={})
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, LONGEST_STACK)
    assert any(f"orgmail-acme-{LONGEST_STACK}.{domain} would be 254" in p for p in err.value.problems)


def test_cross_domain_report_names_are_checked_too() -> None:
    cfg = {k.split(":", 1)[1]: v for k, v in stack_config("large").items() if k.startswith("orgmail:")}
    first, second = longest_domain(120), longest_domain(120, tld="net")
    zone = cfg["domains"][0]["zoneId"]
    cfg.update(domains=[{"name": first, "zoneId": zone}, {"name": second, "zoneId": "f" * 32}],
               mailHost=f"mail.{first}", mailboxes=[{"address": f"ann@{first}"}], aliases={},
               admin={"email": f"ann@{first}"}, dmarc={"reportAddress": f"ann@{first}"}, caa={})
    cfg.pop("tlsRpt", None)
    cfg.pop("webmail")  # its name is in the old domain
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, "large")
    assert any(f"{second}._report._dmarc.{first} would be" in p for p in err.value.problems), err.value.problems


def test_a_domain_inside_another_needs_that_zone() -> None:
    """Cloudflare serves a zone under another zone only with a subdomain entitlement (Enterprise)."""
    cfg = {k.split(":", 1)[1]: v for k, v in stack_config("isp-single").items() if k.startswith("orgmail:")}
    assert cfg["domains"][1]["name"].endswith("." + cfg["domains"][0]["name"])
    assert load_settings(cfg, "isp-single").domains[1].zone_id == cfg["domains"][0]["zoneId"]
    cfg["domains"][1]["zoneId"] = "6f7a8b9c0d1e6f7a8b9c0d1e6f7a8b9c"
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, "isp-single")
    assert any(p.startswith("orgmail:domains[1].zoneId: ") and "subdomain entitlement" in p
               for p in err.value.problems)


def test_every_created_type_and_input_is_mapped() -> None:
    runs = [run_stack(s) for s in (*STACKS, "isp")] + [edge_run("isp")]
    types = {r.type for run in runs for r in run.resources if r.custom}
    assert types <= set(dc.INPUTS), f"unmapped resource types: {sorted(types - set(dc.INPUTS))}"
    unmapped = [p for run in runs for p in dc.check_run(run) if p.source == "unmapped"]
    assert unmapped == []


def test_an_unmapped_type_or_input_is_a_problem() -> None:
    stray = Registered(type="aws:ec2/natGateway:NatGateway", name="nat", urn="u", id="i", parent="", custom=True,
                       protect=False, dependencies=[], ignore_changes=[], raw_inputs={"subnetId": "subnet-1"})
    assert [p.source for p in dc.check_resource(stray)] == ["unmapped"]
    vol = resource("aws:ebs/volume:Volume", {"type": "gp3", "size": 50, "multiAttachEnabled": True})
    assert [(p.path, p.source) for p in dc.check_resource(vol)] == [("multiAttachEnabled", "unmapped")]


def test_every_api_rule_names_a_member_of_the_model() -> None:
    rules = [rule for table in dc.INPUTS.values() for rules in table.values()
             for rule in (rules if isinstance(rules, tuple) else (rules,))] + list(dc.AUTONAMED.values())
    apis = [r for r in rules if isinstance(r, dc.Api)]
    assert len(apis) > 40
    for rule in apis:
        assert dc.api_shape(rule) is not None, rule


def resource(type_: str, inputs: dict[str, Any], name: str = "r") -> Registered:
    return Registered(type=type_, name=name, urn="u", id="i", parent="", custom=True, protect=False,
                      dependencies=[], ignore_changes=[], raw_inputs=inputs)


def problems_of(type_: str, inputs: dict[str, Any], name: str = "r") -> list[str]:
    return [f"{p.path}: {p.message}" for p in dc.check_resource(resource(type_, inputs, name))]


DLM_INPUTS: dict[str, Any] = {"description": "orgmail dev daily mail-data snapshots", "state": "ENABLED",
              "executionRoleArn": "arn:aws:iam::123456789012:role/x",
              "policyDetails": {"resourceTypes": ["VOLUME"], "targetTags": {"orgmail:snapshot": "orgmail-dev"},
                                "schedules": [{"name": "daily, kept 7 days", "copyTags": True,
                                               "createRule": {"interval": 24, "intervalUnit": "HOURS", "times": "03:30"},
                                               "retainRule": {"count": 7}}]}}


def test_catches_the_dlm_schedule_name_the_program_used_to_send() -> None:
    found = problems_of("aws:dlm/lifecyclePolicy:LifecyclePolicy", DLM_INPUTS)
    assert len(found) == 1 and "policyDetails.schedules[].name" in found[0] and "[0-9A-Za-z _-]+" in found[0]
    fixed = copy.deepcopy(DLM_INPUTS)
    fixed["policyDetails"]["schedules"][0]["name"] = schedule_name(7)
    assert problems_of("aws:dlm/lifecyclePolicy:LifecyclePolicy", fixed) == []


@pytest.mark.parametrize("days", [1, 7, 1000])
def test_schedule_names_match_the_dlm_model(days: int) -> None:
    shape = dc.api_shape(dc.Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.Schedules[].Name"))
    assert dc.check_shape(shape, schedule_name(days)) == []


def test_bucket_prefix_fits_for_every_allowed_stack_name_and_keeps_short_ones() -> None:
    assert bucket_prefix("dev") == "orgmail-dev-backup-"  # unchanged: existing buckets are not replaced
    for n in range(1, 41):
        stack = ("a-" * 20)[:n].rstrip("-") or "a"
        prefix = bucket_prefix(stack)
        assert dc.bucket_prefix(prefix) is None, (stack, prefix)
    assert dc.bucket_prefix("orgmail-" + "a" * 40 + "-backup-")  # what a 40-character stack used to send


@pytest.mark.parametrize(("type_", "inputs", "expected"), [
    ("cloudflare:index/dnsRecord:DnsRecord",
     {"zoneId": "0" * 32, "name": "_imaps._tcp.example.org", "type": "SRV", "ttl": 300, "proxied": False,
      "data": {"priority": 0, "weight": 1, "port": 993, "target": "mail.example.org"}},
     "top-level priority"),
    ("cloudflare:index/workersCustomDomain:WorkersCustomDomain",
     {"accountId": "0" * 32, "zoneId": "0" * 32, "hostname": "mta-sts.example.org", "service": "orgmail-dev",
      "environment": "production"}, "deprecated"),
    ("aws:s3/bucket:Bucket", {"bucketPrefix": "orgmail-" + "a" * 40 + "-backup-"}, "at most 37"),
    ("aws:ebs/volume:Volume", {"type": "gp3", "size": 10, "iops": 6000, "throughput": 125}, "500 per GiB"),
    ("aws:ebs/volume:Volume", {"type": "gp3", "size": 100, "iops": 3000, "throughput": 1000}, "0.25 MiB/s"),
    ("aws:ssm/parameter:Parameter", {"name": "/orgmail/dev/x", "type": "String", "value": "x" * 4097}, "4096"),
    ("aws:ssm/parameter:Parameter", {"name": "/orgmail/dev/x", "type": "Secure", "value": "x"}, "SecureString"),
    ("aws:ec2/securityGroup:SecurityGroup", {"vpcId": "vpc-1", "description": "mail ports only — ünïcode"}, "made of"),
    ("aws:ec2/instance:Instance", {"instanceType": "t3.gigantic"}, "not one of InstanceType"),
    ("aws:ec2/eip:Eip", {"domain": "vpc", "tags": {"aws:stack": "x"}}, "reserved aws: prefix"),
    ("aws:cloudwatch/metricAlarm:MetricAlarm",
     {"alarmActions": [f"arn:aws:sns:eu-west-1:123456789012:t{i}" for i in range(6)]}, "at most 5"),
    ("cloudflare:index/dnsRecord:DnsRecord",
     {"zoneId": "0" * 32, "name": "x.example.org", "type": "TXT", "ttl": 30, "proxied": False, "content": '"a"'},
     "60-86400"),
    ("cloudflare:index/dnsRecord:DnsRecord",
     {"zoneId": "0" * 32, "name": "x.example.org", "type": "TXT", "ttl": 300, "proxied": False,
      "content": '"' + "a" * 300 + '"'}, "at most 255"),
    ("cloudflare:index/dnsRecord:DnsRecord",
     {"zoneId": "0" * 32, "name": ("a" * 63 + ".") * 4 + "org", "type": "A", "ttl": 300, "proxied": False,
      "content": "192.0.2.1"}, "at most 253"),
    ("cloudflare:index/workersScript:WorkersScript",
     {"accountId": "0" * 32, "scriptName": "Orgmail_Dev", "content": "x", "mainModule": "worker.js",
      "compatibilityDate": "2026-11-01"}, "a Worker name"),
    ("cloudflare:index/dnsRecord:DnsRecord",
     {"zoneId": "0" * 32, "name": "mail.example.org", "type": "A", "ttl": 300, "proxied": True,
      "content": "192.0.2.1"}, "mail records never are"),
    ("cloudflare:index/dnsRecord:DnsRecord",
     {"zoneId": "0" * 32, "name": "webmail.example.org", "type": "CNAME", "ttl": 1, "proxied": False,
      "content": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b.cfargotunnel.com"}, "only through Cloudflare's proxy"),
    ("cloudflare:index/dnsRecord:DnsRecord",
     {"zoneId": "0" * 32, "name": "webmail.example.org", "type": "CNAME", "ttl": 1, "proxied": True,
      "content": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b.cfargotunnel.com"}, None),
    ("cloudflare:index/zeroTrustTunnelCloudflared:ZeroTrustTunnelCloudflared",
     {"accountId": "0" * 32, "name": "t", "configSrc": "cloudflare", "tunnelSecret": "c2hvcnQ="}, "at least 32"),
    ("cloudflare:index/zeroTrustTunnelCloudflaredConfig:ZeroTrustTunnelCloudflaredConfig",
     {"accountId": "0" * 32, "tunnelId": "x", "config": {"ingresses": [
         {"service": "http_status:404"}, {"hostname": "webmail.example.org", "service": "http://127.0.0.1:8080"}]}},
     "the last rule, and only it"),
    ("cloudflare:index/zeroTrustAccessApplication:ZeroTrustAccessApplication",
     {"accountId": "0" * 32, "name": "w", "type": "self_hosted", "autoRedirectToIdentity": True,
      "allowedIdps": ["0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b", "1f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"]},
     "exactly one allowedIdps"),
    ("cloudflare:index/zeroTrustAccessPolicy:ZeroTrustAccessPolicy",
     {"accountId": "0" * 32, "name": "p", "decision": "allow", "sessionDuration": "1 day"}, "a duration"),
    ("aws:iam/role:Role", {"assumeRolePolicy": "{}", "description": "x"}, None),
])
def test_each_rule_class_catches_its_defect(type_: str, inputs: dict[str, Any], expected: str | None) -> None:
    found = problems_of(type_, inputs)
    if expected is None:
        assert found == []
    else:
        assert any(expected in p for p in found), found


def test_auto_names_are_checked_at_their_final_length() -> None:
    assert problems_of("aws:iam/role:Role", {"assumeRolePolicy": "{}"}, name="r" * 56) == []
    found = problems_of("aws:iam/role:Role", {"assumeRolePolicy": "{}"}, name="r" * 57)
    assert any("(auto-name)" in p and "at most 64" in p for p in found)


def test_java_surrogate_pair_ranges_are_read_as_supplementary_code_points() -> None:
    """Auto Scaling's XmlString patterns end in Java's UTF-16 pair range \\uD800\\uDC00-\\uDBFF\\uDFFF: read
    literally by `regex` it is a bad range (the check crashed on the cluster's group name)."""
    shape = dc.api_shape(dc.Api("autoscaling", "CreateAutoScalingGroup", "AutoScalingGroupName"))
    assert r"\uD800\uDC00-\uDBFF\uDFFF" in shape.metadata["pattern"]
    assert dc.check_shape(shape, "orgmail-isp-edges") == []
    assert dc.check_shape(shape, "edges \U0001F4EC") == []  # U+1F4EC: a supplementary character is allowed
    assert any("does not match" in p for p in dc.check_shape(shape, "edges\x01"))
