"""Web: a Cloudflare Worker serving the MTA-STS policy and mail client autoconfig per domain.

The mail hosts open no web port; the Worker answers at mta-sts.<domain> and autoconfig.<domain>.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import pulumi
import pulumi_cloudflare as cloudflare

from components.dns_records import mta_sts_policy, web_hosts, worker_name
from components.names import web_host_name
from components.settings import Settings

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
COMPATIBILITY_DATE = "2026-11-01"


def web_templates(autoescape: bool) -> jinja2.Environment:
    """The templates under web/ (the Workers and what they serve)."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(WEB_DIR)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=autoescape)


def autoconfig_xml(settings: Settings, domain: str) -> str:
    """Thunderbird autoconfig (config-v1.1) for one domain."""
    return web_templates(autoescape=True).get_template("autoconfig.xml.j2").render(
        domain=domain, organization=settings.organization, mail_host=settings.mail_host)


def render_worker(settings: Settings) -> str:
    p = settings.publishing
    return web_templates(autoescape=False).get_template("worker.js.j2").render(
        stack=settings.stack,
        domains=[d.name for d in settings.domains],
        policy=mta_sts_policy(settings),
        autoconfig={d.name: autoconfig_xml(settings, d.name) for d in settings.domains} if p.autoconfig else {},
    )


class Web(pulumi.ComponentResource):
    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:Web", name, None, opts)
        account = settings.publishing.cloudflare_account_id
        zones = {d.name: d.zone_id for d in settings.domains}
        script_name = worker_name(settings)
        script = cloudflare.WorkersScript(
            f"{name}-worker", account_id=account, script_name=script_name, content=render_worker(settings),
            main_module="worker.js", compatibility_date=COMPATIBILITY_DATE,
            opts=pulumi.ResourceOptions(parent=self))
        for zone, host in web_hosts(settings):
            # Cloudflare creates the (proxied, HTTPS) DNS record of a Worker custom domain itself.
            cloudflare.WorkersCustomDomain(
                f"{name}-{web_host_name(host)}", account_id=account, hostname=host, service=script_name,
                zone_id=zones[zone],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[script]))
        self.script = script  # the _mta-sts TXT records depend on it: new policy served before its new id
        self.register_outputs({"worker": script_name})
