"""ACME DNS-01 without a zone-wide DNS token on any mail host.

certbot proves control of a host name with a TXT record `_acme-challenge.<host>`. A Cloudflare API
token cannot be limited to single records, so a token on the host could rewrite the whole zone:
the organisation's web site and MX. Here a Cloudflare Worker holds the DNS-edit token (a secret
binding, never on a host) and each host holds only a key of its own (SSM, readable by that host's
role), with which it may ask the Worker to publish or remove `_acme-challenge.<its own name>` and
nothing else. Certificates are still issued on the hosts, renewed by their own timers.
See docs/acme.md for the choice.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws
import pulumi_cloudflare as cloudflare
import pulumi_random as random

from components.names import aliases, host_names, legacy_host_name
from components.settings import Settings
from components.web import COMPATIBILITY_DATE, web_templates

KEY_LENGTH = 43
# Cloudflare's fixed API-token permission group ids ("Zone Read", "DNS Write"), as listed by
# GET /user/tokens/permission_groups.
CF_ZONE_READ = "c8fed203ed3043cba015a93ad1616f1f"
CF_DNS_WRITE = "4755a26eedb94da69e1066d98aa820be"


def acme_hostname(settings: Settings) -> str:
    """Where the hosts reach the Worker (a Worker custom domain in the mail host's zone)."""
    return f"orgmail-acme-{settings.namespace}.{settings.primary_domain.name}"


def acme_url(settings: Settings) -> str:
    return f"https://{acme_hostname(settings)}/v1/challenge"


def key_parameter(settings: Settings, host: str) -> str:
    """A host's key; in a cluster under the relays' sub-path (each cluster role reads only its own): each relay's
    for its own name, and the MX name's for the first relay, which keeps the edges' certificate (the edges come
    and go with their group and order none)."""
    if settings.cluster is not None:
        return f"{settings.ssm_path}/relay/certbot/{host}/key"
    return f"{settings.ssm_path}/certbot/{host}/key"


def render_acme_worker(settings: Settings) -> str:
    return web_templates(autoescape=False).get_template("acme.js.j2").render(stack=settings.stack, zone_id=settings.primary_domain.zone_id)


def token_resources(settings: Settings) -> str:
    """The Worker's token may edit DNS in the zone of the mail host names, and no other zone."""
    return json.dumps({f"com.cloudflare.api.account.zone.{settings.primary_domain.zone_id}": "*"})


class AcmeChallenges(pulumi.ComponentResource):
    """The challenge Worker, its DNS token and one key per mail host (in SSM)."""

    parameters: list[pulumi.Resource]

    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:AcmeChallenges", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        account = settings.publishing.cloudflare_account_id
        tags = {"orgmail:stack": settings.stack}
        token = cloudflare.ApiToken(
            f"{name}-dns-token", name=f"orgmail-{settings.namespace}-acme-dns01",
            policies=[cloudflare.ApiTokenPolicyArgs(
                effect="allow",
                permission_groups=[cloudflare.ApiTokenPolicyPermissionGroupArgs(id=CF_ZONE_READ),
                                   cloudflare.ApiTokenPolicyPermissionGroupArgs(id=CF_DNS_WRITE)],
                resources=token_resources(settings))],
            opts=child)
        keys: dict[str, pulumi.Output[str]] = {}
        self.parameters = []
        for host, role in host_names(settings).items():
            # Named by role: a renamed host keeps its key (the parameter moves to the new name's path).
            named = pulumi.ResourceOptions(parent=self, aliases=aliases(
                f"{name}-key-{legacy_host_name(host)}", new=f"{name}-key-{role}"))
            key = random.RandomPassword(f"{name}-key-{role}", length=KEY_LENGTH, special=False, opts=named)
            keys[host] = key.result
            self.parameters.append(aws.ssm.Parameter(
                f"{name}-key-{role}", name=key_parameter(settings, host), type="SecureString", value=key.result,
                description=f"{host}: key for the ACME challenge Worker (its own _acme-challenge record only)",
                tags=tags, opts=named))
        script_name = f"orgmail-{settings.namespace}-acme"
        script = cloudflare.WorkersScript(
            f"{name}-worker", account_id=account, script_name=script_name, content=render_acme_worker(settings),
            main_module="acme.js", compatibility_date=COMPATIBILITY_DATE,
            bindings=[
                cloudflare.WorkersScriptBindingArgs(name="CF_TOKEN", type="secret_text", text=token.value),
                cloudflare.WorkersScriptBindingArgs(
                    name="HOST_KEYS", type="secret_text",
                    text=pulumi.Output.secret(pulumi.Output.all(**keys).apply(
                        lambda k: json.dumps(dict(sorted(k.items())), separators=(",", ":"))))),
            ],
            opts=child)
        cloudflare.WorkersCustomDomain(
            f"{name}-domain", account_id=account, hostname=acme_hostname(settings), service=script_name,
            zone_id=settings.primary_domain.zone_id, opts=pulumi.ResourceOptions(parent=self, depends_on=[script]))
        self.register_outputs({"url": acme_url(settings)})
