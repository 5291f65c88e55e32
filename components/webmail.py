"""Webmail: Roundcube on the mailbox host's loopback, published through a Cloudflare Tunnel.

No web port opens anywhere: `cloudflared` on the host connects out to Cloudflare (TCP/UDP 7844) and carries
the requests for the webmail name to nginx on 127.0.0.1. Pulumi makes the tunnel, its ingress rule, the
proxied CNAME that points the name at it, the token the host runs it with (SSM SecureString, read by
orgmail-sync) and, when `orgmail:webmail.access` is set, a Cloudflare Access application that puts the
organisation's identity provider in front of the Roundcube login.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_cloudflare as cloudflare
import pulumi_random as random

from components.settings import Settings, WebmailAccess, zone_of

# nginx on the mailbox host, loopback only (cloud-init/files/webmail/nginx-site.conf).
WEBMAIL_ORIGIN = "http://127.0.0.1:8080"
TOKEN_PARAMETER = "webmail/tunnel-token"  # under the stack's SSM path
DES_KEY_PARAMETER = "webmail/des-key"  # Roundcube's session encryption key (24 characters)
# cloudflared is not in Debian: orgmail-sync downloads this release and installs it only if its SHA-256 is
# the one pinned here. Checksums as published for the release's assets, read from
# cashapp/hermit-packages cloudflared.hcl at f0517fd7532fc6adfd910cfba3ef2b4c59f662db (hermit hashes the
# downloads); to move on, change all three together (README, "Webmail").
CLOUDFLARED_VERSION = "2026.8.2"
CLOUDFLARED_URL = "https://github.com/cloudflare/cloudflared/releases/download/{version}/cloudflared-linux-{arch}"
CLOUDFLARED_SHA256 = {
    "amd64": "fcfb02b575a52ca1af2e3267af4e1517bcdeb30ac48c834c69abaed3c0576ad2",
    "arm64": "7747d94570fb390cf47dcb4f9555c193c6355cda9793f0d878d9049e5d6a7790",
}
# The tunnel's DNS record: a proxied CNAME to <tunnel id>.cfargotunnel.com (ttl 1: Cloudflare's "automatic").
TUNNEL_DOMAIN = "cfargotunnel.com"


@dataclass(frozen=True)
class WebmailArgs:
    """What the webmail component needs of the settings."""

    namespace: str  # names the tunnel and the Access objects in the account
    account_id: str
    zone_id: str  # the zone holding the webmail name
    hostname: str
    ssm_path: str
    access: WebmailAccess | None
    tags: dict[str, str]

    @classmethod
    def from_settings(cls, settings: Settings) -> WebmailArgs:
        if settings.webmail is None:
            raise ValueError("orgmail:webmail is not set")
        zone = zone_of(settings.webmail.hostname, settings.domains)
        if zone is None:
            raise ValueError(f"{settings.webmail.hostname} is in no configured zone")
        return cls(namespace=settings.namespace, account_id=settings.publishing.cloudflare_account_id,
                   zone_id=zone.zone_id, hostname=settings.webmail.hostname, ssm_path=settings.ssm_path,
                   access=settings.webmail.access, tags={"orgmail:stack": settings.stack})


def webmail_host_config(settings: Settings) -> dict[str, Any] | None:
    """What orgmail-sync needs to run webmail (the host config's `webmail`), or None without webmail."""
    w = settings.webmail
    if w is None:
        return None
    return {"hostname": w.hostname, "requirePasswordChange": w.require_password_change,
            "productName": f"{settings.organization} Mail",
            "cloudflared": {"version": CLOUDFLARED_VERSION, "url": CLOUDFLARED_URL, "sha256": dict(CLOUDFLARED_SHA256)}}


def tunnel_ingress(hostname: str) -> list[dict[str, str]]:
    """The tunnel's rules: the webmail name to nginx; anything else (the tunnel's own name, a stray Host
    header) gets a 404 and never reaches the host. cloudflared requires the last rule to match everything."""
    return [{"hostname": hostname, "service": WEBMAIL_ORIGIN}, {"service": "http_status:404"}]


def access_includes(access: WebmailAccess) -> list[dict[str, Any]]:
    """Who passes Access: anyone whose identity provider vouches for an address in these domains, or one
    of these addresses."""
    return ([{"email_domain": {"domain": d}} for d in access.email_domains]
            + [{"email": {"email": e}} for e in access.emails])


def include_args(rule: dict[str, Any]) -> cloudflare.ZeroTrustAccessPolicyIncludeArgs:
    if "email_domain" in rule:
        return cloudflare.ZeroTrustAccessPolicyIncludeArgs(
            email_domain=cloudflare.ZeroTrustAccessPolicyIncludeEmailDomainArgs(**rule["email_domain"]))
    return cloudflare.ZeroTrustAccessPolicyIncludeArgs(email=cloudflare.ZeroTrustAccessPolicyIncludeEmailArgs(**rule["email"]))


class Webmail(pulumi.ComponentResource):
    token_parameter: aws.ssm.Parameter
    des_key_parameter: aws.ssm.Parameter
    tunnel_id: pulumi.Output[str]

    def __init__(self, name: str, args: WebmailArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:Webmail", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        # A remotely managed tunnel: its ingress lives in Cloudflare (below), the host needs only the token.
        secret = random.RandomBytes(f"{name}-tunnel-secret", length=32, opts=child)
        tunnel_secret: pulumi.Output[str] = pulumi.Output.secret(secret.base64)
        tunnel = cloudflare.ZeroTrustTunnelCloudflared(
            f"{name}-tunnel", account_id=args.account_id, name=f"orgmail-{args.namespace}-webmail",
            config_src="cloudflare", tunnel_secret=tunnel_secret, opts=child)
        ingresses = [cloudflare.ZeroTrustTunnelCloudflaredConfigConfigIngressArgs(service=r["service"],
                                                                                   hostname=r.get("hostname"))
                     for r in tunnel_ingress(args.hostname)]
        cloudflare.ZeroTrustTunnelCloudflaredConfig(
            f"{name}-tunnel-config", account_id=args.account_id, tunnel_id=tunnel.id,
            config=cloudflare.ZeroTrustTunnelCloudflaredConfigConfigArgs(ingresses=ingresses), opts=child)
        cloudflare.DnsRecord(
            f"{name}-record", zone_id=args.zone_id, name=args.hostname, type="CNAME",
            content=tunnel.id.apply(lambda i: f"{i}.{TUNNEL_DOMAIN}"), proxied=True, ttl=1,
            comment="orgmail: webmail through the Cloudflare Tunnel", opts=child)
        token = cloudflare.get_zero_trust_tunnel_cloudflared_token_output(
            account_id=args.account_id, tunnel_id=tunnel.id, opts=pulumi.InvokeOptions(parent=self))
        self.token_parameter = aws.ssm.Parameter(
            f"{name}-tunnel-token", name=f"{args.ssm_path}/{TOKEN_PARAMETER}", type="SecureString",
            value=pulumi.Output.secret(token.token), description="Cloudflare Tunnel token (cloudflared on the mailbox host)",
            tags=args.tags, opts=child)
        des_key = random.RandomPassword(f"{name}-des-key", length=24, special=False, opts=child)
        self.des_key_parameter = aws.ssm.Parameter(
            f"{name}-des-key", name=f"{args.ssm_path}/{DES_KEY_PARAMETER}", type="SecureString", value=des_key.result,
            description="Roundcube's session encryption key", tags=args.tags, opts=child)
        if args.access is not None:
            a = args.access
            policy = cloudflare.ZeroTrustAccessPolicy(
                f"{name}-access-policy", account_id=args.account_id, name=f"orgmail {args.namespace} webmail users",
                decision="allow", includes=[include_args(i) for i in access_includes(a)],
                session_duration=a.session_duration, opts=child)
            cloudflare.ZeroTrustAccessApplication(
                f"{name}-access", account_id=args.account_id, name=f"orgmail {args.namespace} webmail",
                type="self_hosted", destinations=[cloudflare.ZeroTrustAccessApplicationDestinationArgs(
                    type="public", uri=args.hostname)], allowed_idps=list(a.identity_provider_ids),
                # One provider: straight to it, no Cloudflare chooser page in between.
                auto_redirect_to_identity=len(a.identity_provider_ids) == 1,
                session_duration=a.session_duration, app_launcher_visible=False,
                policies=[cloudflare.ZeroTrustAccessApplicationPolicyArgs(id=policy.id, precedence=1)], opts=child)
        self.tunnel_id = tunnel.id
        self.register_outputs({"tunnelId": tunnel.id})
