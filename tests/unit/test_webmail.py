"""orgmail:webmail: its settings, and the tunnel, DNS record, token and Access graph it makes (issue 18)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest

from components.firewall import TUNNEL_PORT, firewall_rules
from components.settings import ConfigError, Webmail, load_settings
from components.webmail import WEBMAIL_ORIGIN, access_includes, tunnel_ingress
from tests.unit.conftest import raw_config, run_stack, stack_config
from tools.mockengine import PLACEHOLDER_TUNNEL_TOKEN, MockRun, run_program

IDP = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
TUNNEL = "cloudflare:index/zeroTrustTunnelCloudflared:ZeroTrustTunnelCloudflared"
TUNNEL_CONFIG = "cloudflare:index/zeroTrustTunnelCloudflaredConfig:ZeroTrustTunnelCloudflaredConfig"
APPLICATION = "cloudflare:index/zeroTrustAccessApplication:ZeroTrustAccessApplication"
POLICY = "cloudflare:index/zeroTrustAccessPolicy:ZeroTrustAccessPolicy"
RECORD = "cloudflare:index/dnsRecord:DnsRecord"
PARAMETER = "aws:ssm/parameter:Parameter"
INSTANCE = "aws:ec2/instance:Instance"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"


def without_webmail() -> dict[str, Any]:
    """The medium example (which shows webmail) without it."""
    raw = raw_config("medium")
    raw.pop("webmail")
    return raw


def settings_with(webmail: Any, stack: str = "medium") -> Any:
    raw = raw_config(stack)
    raw["webmail"] = webmail
    return load_settings(raw, stack)


@functools.cache
def plain_run() -> MockRun:
    config = copy.deepcopy(stack_config("medium"))
    config.pop("orgmail:webmail")
    return run_program(config, "medium")


def problems(webmail: Any, stack: str = "medium") -> list[str]:
    with pytest.raises(ConfigError) as e:
        settings_with(webmail, stack)
    return e.value.problems


@functools.cache
def webmail_run(access: bool) -> MockRun:
    config = copy.deepcopy(stack_config("medium"))
    config["orgmail:webmail"] = {"access": {"identityProviderIds": [IDP], "emailDomains": ["medium.example"],
                                            "emails": ["contractor@partner.example"]}} if access else True
    return run_program(config, "medium")


# --- settings ---------------------------------------------------------------------------------------


def test_webmail_is_off_unless_set_and_defaults_to_webmail_of_the_first_domain() -> None:
    assert load_settings(without_webmail(), "medium").webmail is None
    assert settings_with(False).webmail is None
    on = settings_with(True).webmail
    assert on == Webmail(hostname="webmail.medium.example", require_password_change=True, access=None)
    assert settings_with({"hostname": "mail-web.medium.example", "requirePasswordChange": False}).webmail == \
        Webmail(hostname="mail-web.medium.example", require_password_change=False, access=None)


@pytest.mark.parametrize(("webmail", "expected"), [
    ({"hostname": "webmail.elsewhere.example"},
     "webmail.hostname: webmail.elsewhere.example is outside every configured zone"),
    ({"hostname": "Webmail.medium.example"}, "webmail.hostname: must be a host name like webmail.example.org"),
    ({"hostname": "webmail.medium.example\n"}, "webmail.hostname: must be a host name like webmail.example.org"),
    ({"hostname": "medium.example"}, "webmail.hostname: medium.example is the mail host or a mail domain"),
    ({"requirePasswordChange": "sometimes"}, "webmail.requirePasswordChange: must be true or false"),
    ({"hostnme": "webmail.medium.example"}, "webmail.hostnme: unknown setting; did you mean hostname?"),
    ({"access": {"emailDomains": ["medium.example"]}}, "webmail.access.identityProviderIds: required"),
    ({"access": {"identityProviderIds": [IDP]}}, "webmail.access: names nobody"),
    ({"access": {"identityProviderIds": ["google"], "emails": ["ann@medium.example"]}},
     "webmail.access.identityProviderIds[0]: must be an Access identity provider id"),
    ({"access": {"identityProviderIds": [IDP], "emails": ["ann@medium.example\n"]}},
     "webmail.access.emails[0]: must be an address such as ann@example.org"),
    ({"access": {"identityProviderIds": [IDP], "emailDomains": ["medium.example", "medium.example"]}},
     "webmail.access.emailDomains: lists an entry twice"),
    ({"access": {"identityProviderIds": [IDP], "emails": ["a@medium.example"], "sessionDuration": "1d"}},
     "webmail.access.sessionDuration: must be minutes or hours like 30m or 24h"),
    ({"access": "google"}, "webmail.access: must be an object with keys"),
])
def test_webmail_errors_name_the_setting_and_what_is_valid(webmail: Any, expected: str) -> None:
    found = problems(webmail)
    assert any(expected in p for p in found), found


def test_the_webmail_name_may_not_be_a_name_the_stack_already_uses() -> None:
    found = problems({"hostname": "mta-sts.medium.example"})
    assert any(p.startswith("orgmail:webmail.hostname: mta-sts.medium.example is claimed by") for p in found), found


def test_a_cluster_refuses_webmail() -> None:
    raw = raw_config("isp")
    raw["webmail"] = True
    with pytest.raises(ConfigError) as e:
        load_settings(raw, "isp")
    assert any(p.startswith("orgmail:webmail: webmail runs on the single mailbox host") for p in e.value.problems)


def test_a_bad_webmail_setting_fails_before_any_resource() -> None:
    config = copy.deepcopy(stack_config("medium"))
    config["orgmail:webmail"] = {"hostname": "webmail.elsewhere.example"}
    with pytest.raises(ConfigError):
        run_program(config, "medium")


# --- the resource graph -----------------------------------------------------------------------------


def test_without_webmail_nothing_of_it_is_made_and_no_tunnel_port_is_allowed() -> None:
    run = plain_run()
    assert not [r for r in run.resources if r.type in (TUNNEL, TUNNEL_CONFIG, APPLICATION, POLICY)]
    assert not [r for r in run.of_type(PARAMETER) if "/webmail/" in r.inputs["name"]]
    assert not [r for r in run.of_type(EGRESS) if r.inputs["fromPort"] == TUNNEL_PORT]
    assert run.outputs["webmailUrl"] is None


def test_the_tunnel_carries_only_the_webmail_name_to_loopback_nginx() -> None:
    run = webmail_run(access=False)
    [tunnel] = run.of_type(TUNNEL)
    assert tunnel.inputs["configSrc"] == "cloudflare" and tunnel.inputs["name"] == "orgmail-medium-webmail"
    assert tunnel.raw_inputs["tunnelSecret"] != tunnel.inputs["tunnelSecret"], "the tunnel secret travels as a secret"
    [config] = run.of_type(TUNNEL_CONFIG)
    assert config.inputs["tunnelId"] == f"{tunnel.name}-id"
    assert config.inputs["config"] == {"ingresses": [
        {"hostname": "webmail.medium.example", "service": "http://127.0.0.1:8080"}, {"service": "http_status:404"}]}
    assert WEBMAIL_ORIGIN.startswith("http://127.0.0.1:")
    [record] = [r for r in run.of_type(RECORD) if r.inputs["name"] == "webmail.medium.example"]
    assert record.inputs["type"] == "CNAME" and record.inputs["proxied"] is True
    assert record.inputs["content"] == f"{tunnel.name}-id.cfargotunnel.com"
    assert run.outputs["webmailUrl"] == "https://webmail.medium.example/"


def test_the_token_is_a_secret_parameter_the_mailbox_host_waits_for() -> None:
    run = webmail_run(access=False)
    [token] = [r for r in run.of_type(PARAMETER) if r.inputs["name"] == "/orgmail/medium/webmail/tunnel-token"]
    assert token.inputs["type"] == "SecureString" and token.inputs["value"] == PLACEHOLDER_TUNNEL_TOKEN
    assert token.raw_inputs["value"] != token.inputs["value"], "the token must travel as a secret"
    [mailbox] = [r for r in run.of_type(INSTANCE) if r.name == "mail-instance"]
    assert token.urn in mailbox.dependencies


def test_no_web_port_opens_only_the_tunnels_way_out() -> None:
    plain, web = plain_run(), webmail_run(access=False)

    def rules(run: MockRun, kind: str) -> set[tuple[Any, ...]]:
        return {(r.inputs["ipProtocol"], r.inputs["fromPort"], r.inputs.get("cidrIpv4") or r.inputs.get("cidrIpv6"))
                for r in run.of_type(kind)}

    assert rules(web, INGRESS) == rules(plain, INGRESS)
    assert rules(web, EGRESS) - rules(plain, EGRESS) == {
        (p, TUNNEL_PORT, cidr) for p in ("tcp", "udp") for cidr in ("0.0.0.0/0", "::/0")}
    settings = settings_with(True)
    assert [r for r in firewall_rules(settings) if r.direction == "ingress"] == \
        [r for r in firewall_rules(load_settings(without_webmail(), "medium")) if r.direction == "ingress"]


def test_the_examples_show_webmail_and_access() -> None:
    assert run_stack("medium").outputs["webmailUrl"] == "https://webmail.medium.example/"
    large = run_stack("large")
    assert large.outputs["webmailUrl"] == "https://mail-web.large.example/" and large.of_type(APPLICATION)


def test_access_puts_the_identity_providers_in_front_for_the_named_people_only() -> None:
    assert not webmail_run(access=False).of_type(APPLICATION)
    run = webmail_run(access=True)
    [policy] = run.of_type(POLICY)
    assert policy.inputs["decision"] == "allow"
    assert policy.inputs["includes"] == [{"emailDomain": {"domain": "medium.example"}},
                                         {"email": {"email": "contractor@partner.example"}}]
    [app] = run.of_type(APPLICATION)
    assert app.inputs["type"] == "self_hosted"
    assert app.inputs["destinations"] == [{"type": "public", "uri": "webmail.medium.example"}]
    assert app.inputs["allowedIdps"] == [IDP] and app.inputs["autoRedirectToIdentity"] is True
    assert app.inputs["policies"] == [{"id": f"{policy.name}-id", "precedence": 1}]
    access = settings_with({"access": {"identityProviderIds": [IDP], "emails": ["a@medium.example"]}}).webmail
    assert access is not None and access.access is not None
    assert access_includes(access.access) == [{"email": {"email": "a@medium.example"}}]
    assert tunnel_ingress("w.example")[-1] == {"service": "http_status:404"}
