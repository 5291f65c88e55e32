"""The ISP tier as a cluster (orgmail:cluster): the wiring of its parts.

    internet -> Network Load Balancer (one Elastic IP per zone, PROXY v2)      components/load_balancer.py
             -> edges, an Auto Scaling group across the zones                  components/edge.py
             -> shards (one user on exactly one), and outbound relays          components/shard.py, outbound_relay.py
    edges, shards -> directory: RDS for PostgreSQL, Multi-AZ                   components/directory_db.py
    edges -> their shared rspamd store: ElastiCache (Valkey), Multi-AZ, TLS     components/edge_cache.py

Each role has its own security group (components/firewall.py, cluster_rules) and its own IAM role, which reads
only its own SSM sub-path `<ssm path>/<role>` (role_policy) and carries the account's permissions boundary.
Users live in the directory, so nothing here grows with their number (docs/cluster.md).
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_random as random
import pulumi_tls as tls

from components.acme import AcmeChallenges, acme_url
from components.backup import REPORT_STATEMENT, Backup, backup_keep, bucket_statements
from components.boundary import IAM_PATH
from components.directory_db import Directory, DirectoryArgs
from components.dns import Dns
from components.edge import EdgeArgs, EdgeFleet, edge_bundle, edge_certificate_parameter, group_name
from components.edge_cache import CACHE_HOST_PARAMETER, CACHE_TOKEN_PARAMETER, EdgeCache, EdgeCacheArgs
from components.firewall import ClusterFirewall, cluster_firewall_args
from components.load_balancer import LoadBalancer, LoadBalancerArgs
from components.names import host_names
from components.network import ClusterNetwork, cluster_network_args, host_subnet_cidr
from components.outbound_relay import relay_spec
from components.parameters import stored_in_parts
from components.secrets import (
    ASSUME_ROLE_POLICY,
    BACKUP_GUARD_ACTIONS,
    PARAMETER_READ_ACTIONS,
    SES_SMTP_PARAMETER,
    SESSION_MANAGER_ACTIONS,
    outbound_config,
)
from components.secrets import host_config as mailbox_host_config
from components.server import HostPlacement, MailHost, debian_image, staggered_reboot_time
from components.ses import Ses, SesArgs
from components.settings import Settings
from components.shard import shard_spec
from components.tiers import TIERS
from components.userdata import client_settings
from components.web import Web

CLUSTER_ROLES = ("edge", "shard", "relay")
LIFECYCLE_ACTIONS = ("autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat")


def role_path(settings: Settings, role: str) -> str:
    """The SSM sub-path a cluster role reads, and only it: <ssm path>/<role>."""
    return f"{settings.ssm_path}/{role}"


def role_policy(settings: Settings, role: str, account_id: str, backup_bucket_arn: str | None = None) -> dict[str, Any]:
    """IAM policy of a cluster role: its own SSM sub-path; its reports; Session Manager if enabled; the edges
    may complete (and extend) the drain lifecycle action of their own group; the shards use the backup bucket
    (restic) and can never remove a version of it."""
    if role not in CLUSTER_ROLES:
        raise ValueError(f"unknown cluster role {role!r}")
    base = f"arn:aws:ssm:{settings.region}:{account_id}:parameter{role_path(settings, role)}"
    statements: list[dict[str, Any]] = [
        {"Sid": "ReadItsOwnParameters", "Effect": "Allow", "Action": list(PARAMETER_READ_ACTIONS),
         "Resource": [base, f"{base}/*"]},
        REPORT_STATEMENT,
    ]
    if role == "edge":
        statements.append({
            "Sid": "DrainBeforeTermination", "Effect": "Allow", "Action": list(LIFECYCLE_ACTIONS),
            "Resource": f"arn:aws:autoscaling:{settings.region}:{account_id}:autoScalingGroup:*:"
                        f"autoScalingGroupName/{group_name(settings.namespace)}"})
    if role == "relay":
        # The first relay renews the MX name's certificate and publishes it for the edges: that one parameter.
        statements.append({
            "Sid": "PublishTheEdgesCertificate", "Effect": "Allow", "Action": ["ssm:PutParameter"],
            "Resource": f"arn:aws:ssm:{settings.region}:{account_id}:parameter"
                        f"{edge_certificate_parameter(settings.ssm_path)}"})
    if role == "shard" and backup_bucket_arn is not None:
        statements += bucket_statements(backup_bucket_arn)
        statements.append({"Sid": "BackupsOutliveTheHost", "Effect": "Deny", "Action": list(BACKUP_GUARD_ACTIONS),
                           "Resource": [backup_bucket_arn, f"{backup_bucket_arn}/*"]})
    if settings.admin.ssm_session_manager:
        statements.append({"Sid": "SessionManager", "Effect": "Allow", "Action": list(SESSION_MANAGER_ACTIONS),
                           "Resource": "*"})
    return {"Version": "2012-10-17", "Statement": statements}


def role_config(settings: Settings, role: str, lb_cidrs: tuple[str, ...]) -> dict[str, Any]:
    """The non-secret configuration of a cluster role (its sub-path's `config`): no user, ever."""
    c = settings.cluster
    assert c is not None
    common = {"mailHost": settings.mail_host, "domains": [d.name for d in settings.domains],
              "shards": list(settings.shard_hosts), "relays": list(settings.outbound_relays)}
    if role == "edge":
        config = mailbox_host_config(settings)
        return {**config, **common, "loadBalancerNetworks": list(lb_cidrs), "drainHook": "drain-queue",
                "autoScalingGroup": group_name(settings.namespace)}
    # Shards, then relays, each at its own time (upgrades.rebootTime, then 30 minutes apart, around the clock):
    # never all at once. Edges are not rebooted: Auto Scaling replaces them (orgmail-sync --cluster).
    shards, relays = settings.shard_hosts, settings.outbound_relays
    times = {h: staggered_reboot_time(settings.upgrades.reboot_time, i) for i, h in enumerate([*shards, *relays])}
    config = {**common, "admin": {"email": settings.admin.email, "sshCidrs": list(settings.admin.ssh_cidrs),
                                  "ssmSessionManager": settings.admin.ssm_session_manager},
              "upgrades": {"autoReboot": settings.upgrades.auto_reboot, "rebootTime": settings.upgrades.reboot_time,
                           "rebootTimes": {h: times[h] for h in (shards if role == "shard" else relays)}}}
    if role == "relay":
        # The relays send outside mail: direct, or through SES (orgmail-sync --outbound applies it).
        config["outbound"] = outbound_config(settings)
    return config


def _policy_json(settings: Settings, role: str, args: list[Any]) -> str:
    return json.dumps(role_policy(settings, role, args[0], args[1]))


def _document(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class ClusterMail(pulumi.ComponentResource):
    """Every resource of a cluster stack; `outputs` are the stack's outputs."""

    outputs: dict[str, Any]

    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None, *,
                 permissions_boundary: str) -> None:
        super().__init__("orgmail:index:Cluster", name, None, opts)
        c = settings.cluster
        assert c is not None
        child = pulumi.ResourceOptions(parent=self)
        tags = {"orgmail:stack": settings.stack}

        network = ClusterNetwork("network", cluster_network_args(settings), child)
        firewall = ClusterFirewall("firewall", cluster_firewall_args(settings, network.vpc_id, network.lb_cidrs), child)
        backup = Backup("backup", settings, child, permissions_boundary=permissions_boundary)
        acme = AcmeChallenges("acme", settings, child)
        image = debian_image(self, settings)

        # --- the roles' parameters, each under its own sub-path --------------------------------------------
        parameters: dict[str, list[pulumi.Resource]] = {role: [] for role in CLUSTER_ROLES}

        def parameter(role: str, suffix: str, value: pulumi.Input[str], secret: bool, description: str,
                      boot: bool = True) -> aws.ssm.Parameter:
            res = aws.ssm.Parameter(
                f"{name}-{role}-{suffix.replace('/', '-')}", name=f"{role_path(settings, role)}/{suffix}",
                type="SecureString" if secret else "String", value=value, description=description, tags=tags,
                opts=child)
            if boot:
                parameters[role].append(res)
            return res

        # DKIM: the edges sign (rspamd). One key per published selector, as in the single-host stacks.
        keys = {sel: tls.PrivateKey(f"{name}-dkim-{sel}", algorithm="RSA", rsa_bits=2048,
                                    opts=pulumi.ResourceOptions(parent=self, protect=sel == settings.dkim_selector))
                for sel in settings.dkim_selectors}
        parameter("edge", f"dkim/{settings.dkim_selector}", keys[settings.dkim_selector].private_key_pem, True,
                  "DKIM signing key (RSA 2048)")
        # The edges' certificate of the MX name: written by the first relay (its value is not Pulumi's), read
        # by every edge. Advanced tier: an RSA chain and its key are about 6 KB, above a standard parameter's 4 KB.
        parameters["edge"].append(aws.ssm.Parameter(
            f"{name}-edge-tls-certificate", name=edge_certificate_parameter(settings.ssm_path), type="SecureString",
            tier="Advanced", value="none", tags=tags,
            description=f"certificate and key of {settings.mail_host} for the edges (the first relay renews it)",
            opts=pulumi.ResourceOptions(parent=self, ignore_changes=["value"])))
        srs = random.RandomPassword(f"{name}-srs-secret", length=32, special=False, opts=child)
        parameter("edge", "srs-secret", srs.result, True, "postsrsd key (SRS envelope senders of forwarded mail)")
        if settings.spamhaus_dqs_key:
            parameter("edge", "spamhaus/dqs-key", pulumi.Output.secret(settings.spamhaus_dqs_key), True,
                      "Spamhaus DQS key")
        for role in CLUSTER_ROLES:
            # In numbered parts (components/parameters.py): many domains make more than one parameter's 4 KB.
            config = _document(role_config(settings, role, network.lb_cidrs))
            parameters[role] += stored_in_parts(
                f"{name}-{role}-config", f"{role_path(settings, role)}/config", pulumi.Output.from_input(config),
                len(config), "String", f"configuration of the cluster's {role}s (no users: they live in the directory)",
                tags, self)
        parameter("shard", "backup-bucket", backup.bucket_name, False, "the restic repository's bucket")
        # Read by orgmail-backup before each nightly run: a change takes effect without replacing a shard.
        parameter("shard", "backup/keep", _document(backup_keep(settings)), False,
                  "the shards' restic retention (snapshots kept per day, week and month)", boot=False)
        doveadm = random.RandomPassword(f"{name}-doveadm-secret", length=32, special=False, opts=child)
        parameter("shard", "doveadm-secret", doveadm.result, True, "the shards' doveadm_password (doveadm over TCP)")
        # The hosts' subnets in every zone: the edges' addresses, which shards and relays take mail and logins from.
        edge_networks = tuple(host_subnet_cidr(n) for n in range(1, c.zones + 1))

        # --- one IAM role per cluster role ------------------------------------------------------------------
        account = aws.get_caller_identity_output(opts=pulumi.InvokeOptions(parent=self))
        profiles: dict[str, pulumi.Output[str]] = {}
        policies: dict[str, aws.iam.RolePolicy] = {}
        for role in CLUSTER_ROLES:
            iam_role = aws.iam.Role(f"{name}-{role}-role", assume_role_policy=ASSUME_ROLE_POLICY, path=IAM_PATH,
                                    permissions_boundary=permissions_boundary,
                                    description=f"orgmail {settings.stack} cluster {role}s", tags=tags, opts=child)
            document = pulumi.Output.all(account.account_id, backup.bucket_arn).apply(
                functools.partial(_policy_json, settings, role))
            policies[role] = aws.iam.RolePolicy(f"{name}-{role}-policy", role=iam_role.id, policy=document, opts=child)
            profiles[role] = aws.iam.InstanceProfile(f"{name}-{role}-profile", role=iam_role.name, tags=tags,
                                                     opts=child).name
        acme_keys = list(acme.parameters)

        def bundle(role: str, text: str) -> None:
            # The role's files beyond its user-data (components/userdata.py): read by every first boot.
            parameters[role].extend(stored_in_parts(
                f"{name}-{role}-bundle", f"{role_path(settings, role)}/bundle", pulumi.Output.from_input(text),
                len(text), "String", f"files of the cluster's {role}s (each first boot writes them)", tags, self))

        def boot(role: str) -> list[pulumi.Resource]:
            return [policies[role], *parameters[role], *acme_keys] + (
                backup.boot_dependencies if role == "shard" else [])

        # --- the directory ----------------------------------------------------------------------------------
        directory = Directory("directory", DirectoryArgs(
            stack=settings.stack, namespace=settings.namespace, instance_class=c.directory_instance_class,
            storage_gb=c.directory_storage_gb, subnet_ids=network.private_subnet_ids,
            security_group_id=firewall.group_ids["directory"]), child)
        for role in ("edge", "shard"):
            # Written once the directory exists: the hosts wait for it (they boot without it).
            parameter(role, "directory-host", directory.endpoint, False, "the directory's address (PostgreSQL)",
                      boot=False)

        # --- the edges' shared rspamd store (greylisting, rate limits, Bayes) ------------------------------
        token = random.RandomPassword(f"{name}-cache-auth-token", length=64, special=False, opts=child)
        parameter("edge", CACHE_TOKEN_PARAMETER, token.result, True, "AUTH token of the edges' shared rspamd store")
        cache = EdgeCache("edge-cache", EdgeCacheArgs(
            stack=settings.stack, namespace=settings.namespace, node_type=c.cache_node_type,
            subnet_ids=network.private_subnet_ids, security_group_id=firewall.group_ids["cache"],
            auth_token=token.result), child)
        # Written once the store exists (its creation takes minutes): the edges wait for it, as for the directory.
        parameter("edge", CACHE_HOST_PARAMETER, cache.endpoint, False, "the edges' shared rspamd store (its primary "
                  "endpoint, TLS)", boot=False)

        # --- load balancer and edges --------------------------------------------------------------------
        lb = LoadBalancer("lb", LoadBalancerArgs(
            stack=settings.stack, vpc_id=network.vpc_id, subnet_ids=network.lb_subnet_ids,
            security_group_id=firewall.group_ids["lb"], internet_ready=network.internet_ready), child)
        edge_args = EdgeArgs(
            stack=settings.stack, namespace=settings.namespace, region=settings.region, ssm_path=settings.ssm_path,
            mail_host=settings.mail_host, instance_type=c.edge_instance_type, min_size=c.edges_min,
            max_size=c.edges_max, desired=c.edges_desired, subnet_ids=network.host_subnet_ids,
            security_group_id=firewall.group_ids["edge"], instance_profile=profiles["edge"], ami_id=image.id,
            target_group_arns=lb.target_group_arns, lb_cidrs=network.lb_cidrs,
            domains=tuple(d.name for d in settings.domains), admin_email=settings.admin.email,
            dkim_selector=settings.dkim_selector,
            ssm_agent=settings.admin.ssm_session_manager, boot_dependencies=[])
        bundle("edge", edge_bundle(edge_args))
        edges = EdgeFleet("edges", replace(edge_args, boot_dependencies=[*network.internet_ready, *boot("edge")]),
                          child)

        # --- shards and relays: hosts of their own (MailHost), spread over the zones -------------------------
        def placement(role: str, index: int) -> HostPlacement:
            zone = index % c.zones
            return HostPlacement(
                subnet_id=network.host_subnet_ids[zone], availability_zone=network.zones[zone],
                security_group_id=firewall.group_ids[role], instance_profile=profiles[role], ami_id=image.id,
                backup_bucket=backup.bucket_name if role == "shard" else None,
                internet_ready=network.internet_ready, boot_dependencies=boot(role))

        shard_specs = [shard_spec(c.shard_instance_type, c.shard_volume_gb, c.shard_volume_iops,
                                  c.shard_volume_throughput, settings.namespace, settings.region, settings.ssm_path,
                                  host, edge_networks, settings.admin.ssm_session_manager)
                       for host in settings.shard_hosts]
        relay_type = TIERS[settings.tier].relay_instance_type
        relay_specs = [relay_spec(relay_type, c.relay_queue_volume_gb, settings.namespace, settings.region,
                                  settings.ssm_path, host, settings.mail_host, edge_networks,
                                  keeps_edge_certificate=i == 0, acme_url=acme_url(settings),
                                  ssm_agent=settings.admin.ssm_session_manager)
                       for i, host in enumerate(settings.outbound_relays)]
        for role, specs in (("shard", shard_specs), ("relay", relay_specs)):
            assert len({spec.bundle for spec in specs}) == 1, f"every {role} has its role's one bundle"
            bundle(role, specs[0].bundle)
        shards: dict[str, MailHost] = {}
        for i, (host, spec) in enumerate(zip(settings.shard_hosts, shard_specs, strict=True)):
            slug = f"shard{i + 1}"
            previous = shards[settings.shard_hosts[i - 1]] if i else None
            shards[host] = MailHost(slug, settings, host, "shard", placement("shard", i), child, after=previous,
                                    spec=spec)
            backup.watch_host(slug, host, shards[host].instance_id)
            backup.watch_backups_of(slug, host)
        relays: dict[str, MailHost] = {}
        stable = host_names(settings)
        for i, (host, spec) in enumerate(zip(settings.outbound_relays, relay_specs, strict=True)):
            previous = relays[settings.outbound_relays[i - 1]] if i else None
            relays[host] = MailHost(stable[host], settings, host, "relay", placement("relay", i), child,
                                    after=previous, spec=spec)
            backup.watch_host(stable[host], host, relays[host].instance_id)
        relay_ips = {h: r.public_ip for h, r in relays.items()}
        # The relays' addresses for the edges (which hand them outside mail) once they exist.
        parameter("edge", "relay-addresses", pulumi.Output.all(**relay_ips).apply(_document), False,
                  "the outbound relays' Elastic IPs", boot=False)
        # ...and their private addresses, which the edges hand mail to (inside the VPC, where the relays'
        # security group knows the edges' group), in the relays' order.
        parameter("edge", "relay-hosts", pulumi.Output.all(*[r.private_ip for r in relays.values()]).apply(_document),
                  False, "the outbound relays' private addresses (the edges' relayhost)", boot=False)

        # --- DNS: the MX name on the load balancer's addresses, the relays on theirs ---------------------------
        addresses: dict[str, pulumi.Output[str]] = {}
        allocations: dict[str, pulumi.Output[str]] = {}
        for n, (ip, allocation) in enumerate(zip(lb.public_ips, lb.allocation_ids, strict=True), start=1):
            addresses[f"{settings.mail_host}#lb{n}"] = ip
            allocations[f"{settings.mail_host}#lb{n}"] = allocation
        for host, relay in relays.items():
            addresses[host] = relay.public_ip
            allocations[host] = relay.allocation_id
        web = Web("web", settings, child)
        dkim_public = keys[settings.dkim_selector].public_key_pem
        dns = Dns("dns", settings, addresses, allocations, dkim_public, policy_server=web.script, opts=child,
                  dkim_retiring_keys_pem={s: k.public_key_pem for s, k in keys.items() if s != settings.dkim_selector})
        if settings.outbound.ses:
            # The relays hand outside mail to SES: its SMTP credentials under their path, which they alone read.
            Ses("ses", settings, SesArgs(
                dkim_private_key_pem=keys[settings.dkim_selector].private_key_pem,
                dkim_records=dns.signing_dkim_records, mail_from_records=dns.ses_records,
                alarm_topic_arn=backup.alarm_topic_arn, permissions_boundary=permissions_boundary,
                smtp_parameter_name=f"{role_path(settings, 'relay')}/{SES_SMTP_PARAMETER}"), child)

        self.outputs = {
            "mailHost": settings.mail_host,
            "mxHosts": list(settings.mx_hosts),
            "loadBalancerIps": lb.public_ips,
            # The hosts with an address of their own and a PTR (the relays); shards publish none.
            "hostIps": pulumi.Output.all(**relay_ips),
            "shardInstanceIds": pulumi.Output.all(**{h: s.instance_id for h, s in shards.items()}),
            "relayInstanceIds": pulumi.Output.all(**{h: r.instance_id for h, r in relays.items()}),
            "edgeGroup": edges.group_name,
            "directoryHost": directory.endpoint,
            "edgeCacheHost": cache.endpoint,
            # The master password lives in Secrets Manager (RDS manages and rotates it): its ARN, never a value.
            "directoryMasterSecret": directory.master_secret_arn,
            "dkimSelector": settings.dkim_selector,
            "dkimPublicKey": dkim_public,
            "dnsRecords": dns.records,
            "amiId": image.id,
            "amiSource": image.source_ami_id,
            "ssmPath": settings.ssm_path,
            "outbound": settings.outbound.relay,
            "backupBucket": backup.bucket_name,
            "clientSettings": client_settings(settings.mail_host),
        }
        self.register_outputs({})

