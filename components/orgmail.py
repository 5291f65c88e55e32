"""OrgMail: the whole stack for one organisation, wiring the components together."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

import pulumi
import pulumi_command as command
import yaml

from components.acme import AcmeChallenges
from components.alerts import health_alarms
from components.backup import Backup
from components.dns import Dns
from components.firewall import Firewall
from components.names import host_names, legacy_host_name
from components.network import Network
from components.secrets import Secrets
from components.server import HostPlacement, MailHost, debian_image
from components.ses import Ses, SesArgs
from components.settings import Settings
from components.userdata import client_settings
from components.web import Web
from components.webmail import Webmail, WebmailArgs

PROJECT_DIR = Path(__file__).resolve().parent.parent


def project_python(project_file: Path = PROJECT_DIR / "Pulumi.yaml") -> str:
    """The project's interpreter, relative to the project directory: the virtualenv Pulumi.yaml names
    (where `pulumi up` installed requirements.txt), else `python3` from PATH.

    Relative on purpose: the command is a resource input, and an absolute path (this checkout, this
    machine) would replace the resource and rerun the verifier whenever another checkout deploys.
    pulumi-command runs commands in the directory `pulumi` runs in, the project directory.
    """
    runtime = (yaml.safe_load(project_file.read_text()) or {}).get("runtime")
    options = runtime.get("options") if isinstance(runtime, dict) else None
    venv = options.get("virtualenv") if isinstance(options, dict) else None
    if isinstance(venv, str) and venv and not Path(venv).is_absolute() and ".." not in Path(venv).parts:
        return f"{venv.rstrip('/')}/bin/python"
    return "python3"


def verify_command(settings: Settings, python: str) -> str:
    """The verifier run after `pulumi up`; it reads the deployed outputs on stdin."""
    flags = " --skip-host" if settings.verify.skip_host else ""
    flags += "" if settings.verify.fail_deploy else " --no-fail"
    # Waits up to 15 minutes for DNS to propagate before it reports.
    return f"{shlex.quote(python)} -m tools.verify Pulumi.{settings.stack}.yaml --outputs - --retry-for 900{flags}"


def verify_after_deploy(parent: pulumi.Resource, settings: Settings, hosts: dict[str, MailHost], dns: Dns,
                        secrets: Secrets, after: list[pulumi.Resource]) -> None:
    outputs = pulumi.Output.json_dumps({
        "hostIps": pulumi.Output.all(**{h: s.public_ip for h, s in hosts.items()}),
        "dkimPublicKey": secrets.dkim_public_key_pem,
        "dkimRetiring": dkim_retiring_output(settings, secrets),
        "dnsRecords": dns.records,
    })
    command.local.Command(
        "verify", create=verify_command(settings, project_python()), stdin=outputs, triggers=[outputs],
        opts=pulumi.ResourceOptions(parent=parent, depends_on=[*after, *hosts.values()]))


def dkim_retiring_output(settings: Settings, secrets: Secrets) -> dict[str, Any]:
    """orgmail:dkimRetiring with each key, for the verifier: selector -> {until, publicKey}."""
    return {sel: {"until": until, "publicKey": secrets.dkim_retiring_keys_pem[sel]}
            for sel, until in settings.dkim_retiring.items()}


class OrgMail(pulumi.ComponentResource):
    outputs: dict[str, Any]

    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None, *,
                 permissions_boundary: str) -> None:
        super().__init__("orgmail:index:OrgMail", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        if settings.cluster is not None:  # the ISP tier as a cluster: components/cluster.py
            from components.cluster import ClusterMail

            self.outputs = ClusterMail("cluster", settings, child, permissions_boundary=permissions_boundary).outputs
            self.register_outputs({})
            return

        network = Network("network", settings, child)
        firewall = Firewall("firewall", settings, network.vpc_id, child)
        # Every IAM role and user below carries the account's permissions boundary (components/boundary.py).
        backup = Backup("backup", settings, child, permissions_boundary=permissions_boundary)
        secrets = Secrets("secrets", settings, child, backup_bucket_arn=backup.bucket_arn,
                          permissions_boundary=permissions_boundary)
        acme = AcmeChallenges("acme", settings, child)
        image = debian_image(self, settings)
        webmail = Webmail("webmail", WebmailArgs.from_settings(settings), child) if settings.webmail else None
        placement = HostPlacement(
            subnet_id=network.subnet_id, availability_zone=network.availability_zone,
            security_group_id=firewall.security_group_id, instance_profile=secrets.instance_profile_name,
            ami_id=image.id, backup_bucket=backup.bucket_name, internet_ready=network.internet_ready,
            boot_dependencies=[*secrets.boot_dependencies, *backup.boot_dependencies, *acme.parameters,
                               *([webmail.token_parameter, webmail.des_key_parameter] if webmail else [])])

        hosts: dict[str, MailHost] = {}
        # Named by role (mail, mx2, ...), never by host name: a renamed host keeps its resources.
        for hostname, stable in host_names(settings).items():
            role = "mailbox" if hostname == settings.mail_host else "relay"
            own = dataclasses.replace(placement, instance_profile=secrets.instance_profile_names[role])
            previous = hosts[settings.mx_hosts[len(hosts) - 1]] if hosts else None
            hosts[hostname] = MailHost(stable, settings, hostname, role, own, child, after=previous,
                                       legacy_name=legacy_host_name(hostname))
            backup.watch_host(stable, hostname, hosts[hostname].instance_id, legacy_name=legacy_host_name(hostname))
            if role == "mailbox":
                health_alarms(settings.namespace, stable, hostname, backup.alarm_topic_arn,
                              {"orgmail:stack": settings.stack}, pulumi.ResourceOptions(parent=backup))
        secrets.publish_relay_addresses(settings, {h: hosts[h].public_ip for h in settings.relay_hosts})

        web = Web("web", settings, child)
        dns = Dns("dns", settings, {h: s.public_ip for h, s in hosts.items()},
                  {h: s.allocation_id for h, s in hosts.items()}, secrets.dkim_public_key_pem,
                  policy_server=web.script, opts=child, dkim_retiring_keys_pem=secrets.dkim_retiring_keys_pem)
        if settings.outbound.ses:
            Ses("ses", settings, SesArgs(
                dkim_private_key_pem=secrets.dkim_private_key_pem, dkim_records=dns.signing_dkim_records,
                mail_from_records=dns.ses_records, alarm_topic_arn=backup.alarm_topic_arn,
                permissions_boundary=permissions_boundary), child)
        if settings.verify.enabled:
            verify_after_deploy(self, settings, hosts, dns, secrets, [dns, web])

        primary = hosts[settings.mail_host]
        self.outputs = {
            "publicIp": primary.public_ip,
            "mailHost": settings.mail_host,
            "mxHosts": list(settings.mx_hosts),
            "hostIps": pulumi.Output.all(**{h: s.public_ip for h, s in hosts.items()}),
            # For Session Manager: aws ssm start-session --target "$(pulumi stack output instanceId)"
            "instanceId": primary.instance_id,
            "instanceIds": pulumi.Output.all(**{h: s.instance_id for h, s in hosts.items()}),
            "dkimSelector": settings.dkim_selector,
            "dkimPublicKey": secrets.dkim_public_key_pem,
            "dkimRetiring": dkim_retiring_output(settings, secrets),
            "dnsRecords": dns.records,
            "amiId": image.id,
            "amiSource": image.source_ami_id,
            "ssmPath": settings.ssm_path,
            "outbound": settings.outbound.relay,
            "backupBucket": backup.bucket_name,
            "clientSettings": client_settings(settings.mail_host),
            "initialPasswords": secrets.initial_passwords,
            "webmailUrl": f"https://{settings.webmail.hostname}/" if settings.webmail else None,
        }
        self.register_outputs({})
