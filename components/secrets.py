"""Secrets and who may read them: the DKIM key, mailbox password hashes,
the host configuration in SSM under /orgmail/<stack>, and the instance role limited to that path.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_random as random
import pulumi_tls as tls

from components.acme import acme_url
from components.backup import REPORT_STATEMENT, backup_keep, bucket_statements
from components.boundary import IAM_PATH
from components.dns_records import ses_smtp_host
from components.names import password_name
from components.parameters import stored_in_parts
from components.server import staggered_reboot_time
from components.settings import Settings
from components.userdata import relay_parameters, ssm_files
from components.webmail import webmail_host_config

# What SSM Session Manager needs, and nothing more (AmazonSSMManagedInstanceCore would also
# allow reading every parameter in the account).
SESSION_MANAGER_ACTIONS = (
    "ssm:UpdateInstanceInformation",
    "ssmmessages:CreateControlChannel",
    "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
)
# What a compromised mailbox host must never do to its backups (explicit deny: no later grant undoes it).
BACKUP_GUARD_ACTIONS = (
    "s3:DeleteObjectVersion", "s3:DeleteBucket", "s3:DeleteBucketPolicy", "s3:PutBucketPolicy",
    "s3:PutBucketVersioning", "s3:PutLifecycleConfiguration", "s3:PutBucketObjectLockConfiguration",
    "s3:BypassGovernanceRetention", "s3:PutObjectRetention", "s3:PutObjectLegalHold",
)
SES_SMTP_PORT = 587  # SES's SMTP interface with STARTTLS
SES_SMTP_PARAMETER = "ses/smtp"  # {"username", "password"}: under the stack's SSM path (the mailbox host), a cluster's relay/
PARAMETER_READ_ACTIONS = ("ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath")


def host_config(settings: Settings) -> dict[str, Any]:
    """The non-secret configuration every host applies (orgmail-sync), as JSON-ready data."""
    senders: dict[str, list[str]] = {}
    for m in settings.mailboxes:
        # A shared mailbox has no login: its users send as it (and as its aliases).
        for address in (m.address, *m.aliases):
            senders.setdefault(address, []).extend(m.shared_with or (m.address,))
    mailbox_set = {m.address for m in settings.mailboxes}
    for alias, targets in settings.aliases.items():
        logins = sorted(t for t in targets if t in mailbox_set)
        if logins:
            senders[alias] = logins
    aliases = {m_alias: [m.address] for m in settings.mailboxes for m_alias in m.aliases}
    # Copy-forwarding: Postfix delivers an address that an alias maps to itself, and the copies go out like
    # any alias's outside target (SRS, ARC).
    aliases.update({m.address: [m.address, *m.forward_copy_to] for m in settings.mailboxes if m.forward_copy_to})
    aliases.update({a: list(t) for a, t in settings.aliases.items()})
    r = settings.rate_limits
    return {
        "mailHost": settings.mail_host,
        "domains": [d.name for d in settings.domains],
        "mailboxes": [{"address": m.address, "quota": m.quota, **({"sharedWith": list(m.shared_with)} if m.shared_with
                                                                  else {})} for m in settings.mailboxes],
        "aliases": dict(sorted(aliases.items())),
        "senders": {k: sorted(v) for k, v in sorted(senders.items())},
        "recipients": list(settings.recipients),
        "acmeUrl": acme_url(settings),
        "trustedNetworks": list(settings.admin.trusted_networks),  # fail2ban ignoreip, with the hosts
        "relayHosts": list(settings.relay_hosts),
        "postfixLimits": {
            "smtpd_client_connection_rate_limit": r.connections_per_minute,
            "smtpd_client_message_rate_limit": r.messages_per_minute,
            "smtpd_client_recipient_rate_limit": r.recipients_per_minute,
            "smtpd_client_auth_rate_limit": r.auth_per_minute,
            "smtpd_recipient_limit": r.recipients_per_message,
            "message_size_limit": r.message_size_mb * 1024 * 1024,
            # local(8) and virtual(8) refuse to deliver at all when their mailbox limit is below
            # message_size_limit (default 51200000). No mbox or virtual(8) mailbox exists here: every
            # local name is an alias to a Dovecot mailbox, whose quota is Dovecot's.
            "mailbox_size_limit": r.message_size_mb * 1024 * 1024,
            "virtual_mailbox_limit": r.message_size_mb * 1024 * 1024,
        },
        # rspamd's buckets per login on 465/587 (sync.py user_rates); Postfix limits those ports only by AUTH.
        "userLimits": {"messagesPerUserHour": r.messages_per_user_hour,
                       "recipientsPerUserHour": r.recipients_per_user_hour},
        # Day-2 settings once in user-data (a change replaced every host): sync.py apply_admin.
        "admin": {"email": settings.admin.email, "sshCidrs": list(settings.admin.ssh_cidrs),
                  "ssmSessionManager": settings.admin.ssm_session_manager},
        "upgrades": {"autoReboot": settings.upgrades.auto_reboot,
                     "rebootTimes": {host: staggered_reboot_time(settings.upgrades.reboot_time, i)
                                     for i, host in enumerate(settings.mx_hosts)}},
        "backup": backup_keep(settings),
        # Outside mail: sent by the host itself, or relayed through SES with the SMTP credentials in
        # <ssm_path>/ses/smtp (a day-2 change: never in user-data).
        "outbound": outbound_config(settings),
        # Roundcube and its tunnel (components/webmail.py); absent: none, and a host that had it stops it.
        **({"webmail": webmail_host_config(settings)} if settings.webmail else {}),
    }


def outbound_config(settings: Settings) -> dict[str, Any]:
    """{"relay": "direct"} or {"relay": "ses", "host": "email-smtp.<sesRegion>.amazonaws.com", "port": 587}."""
    o = settings.outbound
    if not o.ses or o.ses_region is None:
        return {"relay": "direct"}
    return {"relay": "ses", "host": ses_smtp_host(o.ses_region), "port": SES_SMTP_PORT}


def relay_addresses_document(addresses: dict[str, str]) -> str:
    """{"mx2.example.org": "198.51.100.2", ...}, sorted: one line of JSON, no whitespace."""
    return json.dumps(dict(sorted(addresses.items())), separators=(",", ":"))


def instance_policy(settings: Settings, account_id: str, role: str = "mailbox",
                    backup_bucket_arn: str | None = None) -> dict[str, Any]:
    """IAM policy of a host role. The mailbox host reads this stack's parameters and uses the
    backup bucket (restic's repository); a backup-MX relay reads only its config and its own ACME
    challenge key (relay_parameters), so a compromised relay holds no DKIM key, password hash,
    restic password, backup or other host's key."""
    base = f"arn:aws:ssm:{settings.region}:{account_id}:parameter{settings.ssm_path}"
    if role == "mailbox":
        resources = [base, f"{base}/*"]
    elif role == "relay":
        names = sorted({name for host in settings.relay_hosts for name in relay_parameters(host)})
        resources = [arn for name in names for arn in (f"{base}/{name}", f"{base}/{name}/*")]
    else:
        raise ValueError(f"unknown host role {role!r}")
    statements: list[dict[str, Any]] = [{
        "Sid": "ReadThisStacksParameters" if role == "mailbox" else "ReadTheRelaysParameters",
        "Effect": "Allow",
        "Action": list(PARAMETER_READ_ACTIONS),
        "Resource": resources,
    }]
    statements.append(REPORT_STATEMENT)
    if backup_bucket_arn is not None and role == "mailbox":
        statements += bucket_statements(backup_bucket_arn)
        statements.append({
            # restic may add and delete objects, which on the versioned bucket only adds delete markers;
            # whoever holds this role cannot remove a version, turn versioning off or shorten retention.
            "Sid": "BackupsOutliveTheHost", "Effect": "Deny", "Action": list(BACKUP_GUARD_ACTIONS),
            "Resource": [backup_bucket_arn, f"{backup_bucket_arn}/*"],
        })
    if settings.admin.ssm_session_manager:
        statements.append({
            "Sid": "SessionManager",
            "Effect": "Allow",
            "Action": list(SESSION_MANAGER_ACTIONS),
            "Resource": "*",
        })
    return {"Version": "2012-10-17", "Statement": statements}


ASSUME_ROLE_POLICY = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
})


class Secrets(pulumi.ComponentResource):
    dkim_public_key_pem: pulumi.Output[str]
    dkim_retiring_keys_pem: dict[str, pulumi.Output[str]]
    instance_profile_name: pulumi.Output[str]
    initial_passwords: pulumi.Output[dict[str, str]]

    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None,
                 backup_bucket_arn: pulumi.Input[str] | None = None, *, permissions_boundary: str) -> None:
        super().__init__("orgmail:index:Secrets", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        # What a host's first boot reads: every parameter and the role's policy.
        self.boot_dependencies: list[pulumi.Resource] = []
        path = settings.ssm_path
        tags = {"orgmail:stack": settings.stack}
        self._name, self._tags = name, tags

        # One key per published selector. The signing selector's key is protected: a deploy that drops it
        # without listing it in orgmail:dkimRetiring fails instead of unpublishing mail in flight.
        keys = {sel: tls.PrivateKey(f"{name}-dkim-{sel}", algorithm="RSA", rsa_bits=2048,
                                    opts=pulumi.ResourceOptions(parent=self, protect=sel == settings.dkim_selector))
                for sel in settings.dkim_selectors}
        dkim = keys[settings.dkim_selector]
        self.dkim_public_key_pem = dkim.public_key_pem
        self.dkim_private_key_pem: pulumi.Output[str] = pulumi.Output.secret(dkim.private_key_pem)  # SES BYODKIM
        self.dkim_retiring_keys_pem = {sel: k.public_key_pem for sel, k in keys.items() if sel != settings.dkim_selector}
        self.boot_dependencies.append(aws.ssm.Parameter(f"{name}-dkim-key", name=f"{path}/dkim/{settings.dkim_selector}", type="SecureString",
                          value=dkim.private_key_pem, description="DKIM signing key (RSA 2048)", tags=tags, opts=child))

        if settings.spamhaus_dqs_key:  # read by every host role (postscreen and rspamd)
            self.boot_dependencies.append(aws.ssm.Parameter(
                f"{name}-spamhaus-dqs-key", name=f"{path}/spamhaus/dqs-key", type="SecureString",
                value=pulumi.Output.secret(settings.spamhaus_dqs_key), description="Spamhaus DQS key",
                tags=tags, opts=child))
        # postsrsd's key: from SSM, so a replaced host still reverses bounces to SRS addresses it made.
        srs = random.RandomPassword(f"{name}-srs-secret", length=32, special=False, opts=child)
        self.boot_dependencies.append(aws.ssm.Parameter(
            f"{name}-srs-secret", name=f"{path}/srs-secret", type="SecureString", value=srs.result,
            description="postsrsd key (SRS envelope senders of forwarded mail)", tags=tags, opts=child))

        hashes: dict[str, pulumi.Output[str]] = {}
        initial: dict[str, pulumi.Output[str]] = {}
        for m in settings.mailboxes:
            if m.shared_with:
                continue  # no login of its own
            if m.address in settings.password_hashes:
                hashes[m.address] = pulumi.Output.secret(settings.password_hashes[m.address])
                continue
            pw = random.RandomPassword(f"{name}-{password_name(m.address)}", length=24, special=False, opts=child)
            hashes[m.address] = pw.bcrypt_hash.apply(lambda h: "{BLF-CRYPT}" + h)
            initial[m.address] = pw.result
        self.initial_passwords = pulumi.Output.secret(pulumi.Output.all(**initial))

        def hashes_document(h: dict[str, str]) -> str:
            return json.dumps(dict(sorted(h.items())), separators=(",", ":"))

        hashes_json: pulumi.Output[str] = pulumi.Output.secret(pulumi.Output.all(**hashes).apply(hashes_document))
        hint = 2 + sum(len(m.address) + 8 + len(settings.password_hashes.get(m.address, "{BLF-CRYPT}" + "x" * 60))
                       for m in settings.mailboxes if not m.shared_with)
        self._parts(f"{name}-passwords", f"{path}/mailbox-passwords", hashes_json, hint,
                    "SecureString", "Dovecot password hashes", tags)

        for role_name in settings.host_roles:
            files_json = json.dumps(ssm_files(role_name), separators=(",", ":"), sort_keys=True)
            self._parts(f"{name}-files-{role_name}", f"{path}/files/{role_name}",
                        pulumi.Output.from_input(files_json), len(files_json), "String",
                        f"host files of the {role_name} role (orgmail-sync writes them)", tags)

        config_json = json.dumps(host_config(settings), separators=(",", ":"))
        self._parts(f"{name}-config", f"{path}/config", pulumi.Output.from_input(config_json), len(config_json),
                    "String", "mail domains, mailboxes, aliases, limits (no secrets)", tags)

        account = aws.get_caller_identity_output(opts=pulumi.InvokeOptions(parent=self))
        # One role per host role: a relay facing the internet must not reach the mailbox host's secrets.
        self.instance_profile_names: dict[str, pulumi.Output[str]] = {}
        for role_name in settings.host_roles:
            # The mailbox host's resources keep their first names, so existing stacks keep that role.
            prefix = f"{name}-host" if role_name == "mailbox" else f"{name}-relay"
            # Under /orgmail/ (the only path the deploy role may pass to EC2) and capped by the boundary.
            role = aws.iam.Role(f"{prefix}-role", assume_role_policy=ASSUME_ROLE_POLICY, path=IAM_PATH,
                                permissions_boundary=permissions_boundary,
                                description=f"orgmail {settings.stack} {role_name} hosts", tags=tags, opts=child)
            policy = pulumi.Output.all(account.account_id, backup_bucket_arn).apply(
                functools.partial(self._policy_document, settings, role_name))
            self.boot_dependencies.append(
                aws.iam.RolePolicy(f"{prefix}-policy", role=role.id, policy=policy, opts=child))
            profile = aws.iam.InstanceProfile(f"{prefix}-profile", role=role.name, tags=tags, opts=child)
            self.instance_profile_names[role_name] = profile.name
        self.instance_profile_name = self.instance_profile_names["mailbox"]
        self.register_outputs({"instanceProfile": self.instance_profile_name, "dkimPublicKey": self.dkim_public_key_pem})

    def publish_relay_addresses(self, settings: Settings, addresses: dict[str, pulumi.Output[str]]) -> None:
        """The relays' Elastic IPs for the mailbox host's exemptions (orgmail-sync relay_addresses).
        A parameter of its own, written once the addresses exist, so the mailbox host's boot does not
        wait for the relays' addresses and its config parameter stays free of provider values."""
        if not addresses:
            return
        value = pulumi.Output.all(**addresses).apply(relay_addresses_document)
        aws.ssm.Parameter(f"{self._name}-relay-addresses", name=f"{settings.ssm_path}/relay-addresses", type="String",
                          value=value, description="Elastic IPs of the backup MX relays (orgmail-sync)", tags=self._tags,
                          opts=pulumi.ResourceOptions(parent=self))

    @staticmethod
    def _policy_document(settings: Settings, role: str, args: list[Any]) -> str:
        return json.dumps(instance_policy(settings, args[0], role, args[1]))

    def _parts(self, name: str, path: str, value: pulumi.Output[str], size_hint: int, kind: str,
               description: str, tags: dict[str, str]) -> None:
        self.boot_dependencies += stored_in_parts(name, path, value, size_hint, kind, description, tags, self)
