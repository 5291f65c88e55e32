"""The ISP cluster's edges: an Auto Scaling group across the zones behind the load balancer, each edge
Postfix (postscreen, rspamd) and Dovecot as proxy only, routing each user to their shard from the directory.

An edge holds no mailbox; what it holds for a while is its Postfix queue (mail for a shard that is down, or
for the relays). Leaving the group, it is first taken out of the load balancer's target groups (no new
connection; open ones may run DEREGISTRATION_DELAY_SECONDS, components/load_balancer.py), then held by the
lifecycle hook in Terminating:Wait: the edge sees that in its instance metadata
(`autoscaling/target-lifecycle-state` is `Terminated`), stops accepting, flushes its queue, and completes
the action itself (`aws autoscaling complete-lifecycle-action`; its role may do that on this group only).
DRAIN_HEARTBEAT_SECONDS is the time it has before the group goes on without it; it may ask for more
(RecordLifecycleActionHeartbeat) up to Auto Scaling's 48 hours.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from components.directory import EDGE_PASSDB, POSTFIX_QUERIES, SENDER_LOGINS_EXPORT, for_edge
from components.directory_db import DATABASE_NAME
from components.edge_cache import CACHE_HOST_PARAMETER, CACHE_TOKEN_PARAMETER, CACHE_TUNNEL_PORT
from components.firewall import CACHE_PORT
from components.settings import DEFAULT_RATE_LIMITS, RateLimits
from components.tiers import INSTANCE_SPECS
from components.userdata import (
    MAIL_PORTS,
    ClusterHost,
    RenderedFile,
    cluster_files,
    cluster_user_data,
    render_template,
    role_bundle,
    user_data_base64,
)

DRAIN_HEARTBEAT_SECONDS = 3600  # Auto Scaling allows 30-7200
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
DRAIN_HOOK = "drain-queue"
# The first boot installs packages and fetches its configuration: no health verdict before this.
HEALTH_CHECK_GRACE_SECONDS = 900
ROOT_DEVICE = "/dev/xvda"  # the Debian AMI's root device name
ROOT_VOLUME_GB = 30  # the queue lives on the root volume: an edge's mail is drained, never kept


def group_name(namespace: str) -> str:
    """The Auto Scaling group's name, fixed so the edges' role can name the group before it exists."""
    return f"orgmail-{namespace}-edges"


@dataclass(frozen=True)
class EdgeArgs:
    stack: str
    namespace: str
    region: str
    ssm_path: str  # the edges read <ssm_path>/edge only
    mail_host: str  # the name clients and MX senders use (the load balancer's)
    instance_type: str
    min_size: int
    max_size: int
    desired: int
    subnet_ids: Sequence[pulumi.Input[str]]  # a host subnet in each zone
    security_group_id: pulumi.Input[str]
    instance_profile: pulumi.Input[str]
    ami_id: pulumi.Input[str]
    target_group_arns: Sequence[pulumi.Input[str]]
    lb_cidrs: tuple[str, ...]  # Dovecot's haproxy_trusted_networks, Postfix's PROXY peers
    domains: tuple[str, ...] = ()  # DKIM: the domains the edges sign for
    admin_email: str = ""  # root's mail (cron, upgrades, bounces of the edge's own) goes there
    dkim_selector: str = "mail"
    ssm_agent: bool = False  # admin.ssmSessionManager
    boot_dependencies: list[pulumi.Resource] = field(default_factory=list)


@dataclass(frozen=True)
class EdgeHost:
    """What an edge's configuration is rendered from: plain values, no user, no secret."""

    stack: str
    region: str
    ssm_path: str  # the edges' own sub-path, <stack path>/edge
    mail_host: str
    lb_networks: tuple[str, ...]  # the only sources of 25, 465, 587, 993, 995 (each with a PROXY v2 header)
    domains: tuple[str, ...]
    admin_email: str
    dkim_selector: str
    autoscaling_group: str  # the group whose drain hook orgmail-drain completes (group_name)
    ssm_agent: bool = False  # admin.ssmSessionManager
    # Test overrides (tests/e2e/test_cluster.py):
    install_packages: bool = True
    dnssec_validation: bool = True  # False: unbound does not validate (a test world's root is unsigned)
    aws_environment: tuple[tuple[str, str], ...] = ()
    directory_ca_url: str = ""  # "": RDS's CA bundle of the region; a test's CA otherwise

    def __post_init__(self) -> None:
        if not self.lb_networks:
            raise ValueError("an edge needs the load balancer's subnets (its only mail sources)")
        if not ADMIN_EMAIL_RE.fullmatch(self.admin_email):
            raise ValueError(f"admin email {self.admin_email!r}: an address (root's mail on the edge goes there)")
        for cidr in self.lb_networks:
            if ipaddress.ip_network(cidr).version != 4:
                raise ValueError(f"load balancer subnet {cidr!r}: IPv4 only (the listeners are IPv4)")
        if not GROUP_NAME_RE.fullmatch(self.autoscaling_group):
            raise ValueError(f"Auto Scaling group {self.autoscaling_group!r}: letters, digits, '.', '_' and '-' "
                             "(orgmail-drain names it in an aws command)")


GROUP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
ADMIN_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")

# rspamd's Redis is the edges' shared store (components/edge_cache.py), through stunnel (Debian's stunnel@.service
# with /etc/stunnel/<name>.conf), which the bootstrap configures with rspamd's redis.conf from SSM.
CACHE_TUNNEL = "orgmail-cache"
EDGE_PACKAGES = ("postfix", "postfix-pgsql", "dovecot-imapd", "dovecot-pop3d", "dovecot-lmtpd", "dovecot-pgsql",
                 "rspamd", "stunnel4", "unbound", "fail2ban", "postsrsd", "python3-systemd", "nftables",
                 "unattended-upgrades", "awscli", "curl", "openssl", "logrotate")
EDGE_SERVICES = (f"stunnel@{CACHE_TUNNEL}.service", "rspamd.service", "postsrsd.service", "postfix.service", "dovecot.service",
                 "fail2ban.service", "orgmail-senders.timer", "orgmail-drain.service", "orgmail-authflush.service",
                 "orgmail-edge-tls.timer")
PGSQL_MAPS = "/etc/postfix/orgmail/pgsql"
# The MX name's certificate and key for every edge (JSON {"fullchain", "privkey"}), under the edges' path:
# the first outbound relay renews it and writes it there (orgmail-edge-cert-publish), the edges install it
# (orgmail-edge-tls). "none" until the relay has one.
EDGE_CERTIFICATE = "tls/certificate"


def edge_certificate_parameter(ssm_path: str) -> str:
    """The parameter's full name, from the stack's SSM path."""
    return f"{ssm_path}/edge/{EDGE_CERTIFICATE}"


# rspamd's From: check (lua.local.d/orgmail_from.lua, the single host's) reads SENDERS_MAP; orgmail-senders
# writes it from the directory with SENDERS_QUERY, at every start of rspamd and every minute (its timer).
SENDERS_MAP = "/etc/postfix/orgmail/senders"
SENDERS_QUERY = "/etc/orgmail/senders.sql"

# (template under cloud-init/files, path on the edge, mode): shared with the single host where they agree. Every
# edge is alike (one launch template): all of them travel in the edges' bundle (components/userdata.py).
EDGE_FILES: tuple[tuple[str, str, str], ...] = (
    ("cluster/edge-main.cf.j2", "/etc/postfix/main.cf", "0644"),
    ("cluster/edge-master.cf.j2", "/etc/postfix/master.cf", "0644"),
    ("postfix/submission_header_checks", "/etc/postfix/submission_header_checks", "0644"),
    ("postfix/srs-only.regexp", "/etc/postfix/srs-only.regexp", "0644"),
    ("cluster/edge-dovecot.conf.j2", "/etc/dovecot/dovecot.conf", "0644"),
    ("dovecot/orgmail-dovecot.tmpfiles", "/etc/tmpfiles.d/orgmail-dovecot.conf", "0644"),
    ("dovecot/orgmail-dovecot.logrotate", "/etc/logrotate.d/orgmail-dovecot", "0644"),
    ("rspamd/worker-proxy.inc.j2", "/etc/rspamd/local.d/worker-proxy.inc", "0644"),
    ("rspamd/worker-normal.inc.j2", "/etc/rspamd/local.d/worker-normal.inc", "0644"),
    ("systemd/rspamd-workers.conf.j2", "/etc/systemd/system/rspamd.service.d/orgmail.conf", "0644"),
    ("rspamd/actions.conf.j2", "/etc/rspamd/local.d/actions.conf", "0644"),
    ("rspamd/options.inc.j2", "/etc/rspamd/local.d/options.inc", "0644"),
    ("rspamd/milter_headers.conf.j2", "/etc/rspamd/local.d/milter_headers.conf", "0644"),
    ("rspamd/dkim_signing.conf.j2", "/etc/rspamd/local.d/dkim_signing.conf", "0644"),
    ("rspamd/arc.conf", "/etc/rspamd/local.d/arc.conf", "0644"),
    ("rspamd/ratelimit.conf", "/etc/rspamd/local.d/ratelimit.conf", "0644"),
    ("rspamd/orgmail_from.lua", "/etc/rspamd/lua.local.d/orgmail_from.lua", "0644"),
    ("orgmail/orgmail_libpq.py", "/usr/local/lib/orgmail/orgmail_libpq.py", "0644"),
    ("orgmail/senders.py", "/usr/local/sbin/orgmail-senders", "0755"),
    ("cluster/orgmail-senders.service", "/etc/systemd/system/orgmail-senders.service", "0644"),
    ("cluster/orgmail-senders.timer", "/etc/systemd/system/orgmail-senders.timer", "0644"),
    ("orgmail/drain.py", "/usr/local/sbin/orgmail-drain", "0755"),
    ("cluster/orgmail-drain.service", "/etc/systemd/system/orgmail-drain.service", "0644"),
    ("orgmail/authflush.py", "/usr/local/sbin/orgmail-authflush", "0755"),
    ("cluster/orgmail-authflush.service", "/etc/systemd/system/orgmail-authflush.service", "0644"),
    ("orgmail/edgetls.py", "/usr/local/sbin/orgmail-edge-tls", "0755"),
    ("cluster/orgmail-edge-tls.service", "/etc/systemd/system/orgmail-edge-tls.service", "0644"),
    ("cluster/orgmail-edge-tls.timer", "/etc/systemd/system/orgmail-edge-tls.timer", "0644"),
    ("unbound/orgmail.conf.j2", "/etc/unbound/unbound.conf.d/orgmail.conf", "0644"),
    ("postsrsd/postsrsd.default", "/etc/default/postsrsd", "0644"),
    ("fail2ban/jail.local.j2", "/etc/fail2ban/jail.local", "0644"),
    ("fail2ban/orgmail-dovecot.conf", "/etc/fail2ban/filter.d/orgmail-dovecot.conf", "0644"),
    ("fail2ban/postfix.local", "/etc/fail2ban/filter.d/postfix.local", "0644"),
    ("cluster/fail2ban-postfix-ban.conf", "/etc/fail2ban/action.d/orgmail-postfix-ban.conf", "0644"),
)


def user_rates(limits: RateLimits) -> str:
    """rspamd's per-login buckets (/etc/rspamd/orgmail/user_rates.inc, which local.d/ratelimit.conf includes): the
    text the single host's orgmail-sync writes (sync.py user_rates; tests/unit/test_edge.py keeps them equal)."""
    rows = []
    for kind, setting, n in (("messages", "messagesPerUserHour", limits.messages_per_user_hour),
                             ("recipients", "recipientsPerUserHour", limits.recipients_per_user_hour)):
        rows.append(f'user_{kind} {{ selector = "id(\'{kind}\');user.lower"; bucket {{ burst = {n}; rate = "{n} / 1h"; '
                    f'skip_recipients = {str(kind == "messages").lower()}; message = "Limit of {n} {kind} per user '
                    f'an hour reached (rateLimits.{setting})"; }} }}')
    return "".join(f"{row}\n" for row in rows)


def edge_cluster_host(host: EdgeHost) -> ClusterHost:
    return ClusterHost(stack=host.stack, role="edge", region=host.region, ssm_path=f"{host.ssm_path}/edge",
                       hostname="", packages=EDGE_PACKAGES, services=EDGE_SERVICES,
                       tls_units=("postfix", "dovecot"), ssm_agent=host.ssm_agent, install_packages=host.install_packages,
                       aws_environment=host.aws_environment, directory_ca_url=host.directory_ca_url)


def render_edge_files(host: EdgeHost) -> list[RenderedFile]:
    """Every file an edge gets: its boot files (user-data), the rest in the edges' bundle."""
    context: dict[str, object] = {
        "mail_host": host.mail_host, "lb_networks": host.lb_networks, "passdb_query": EDGE_PASSDB,
        "mail_ports": MAIL_PORTS, "mail_sources": host.lb_networks, "mail_sources_name": "the load balancer's subnets",
        "dnssec_validation": host.dnssec_validation, "dkim_selector": host.dkim_selector, "database": DATABASE_NAME,
        # rateLimits (Postfix's per client address, rspamd's per login) and messageSizeMb: orgmail's defaults in the
        # bundle, so a change of them replaces no edge; orgmail-sync --cluster applies the stack's from the config.
        "tls_name": host.mail_host, "message_size_limit": DEFAULT_RATE_LIMITS.message_size_mb * 1024 * 1024,
        "data_volume_id": "",
        "autoscaling_group": host.autoscaling_group, "drain_hook": DRAIN_HOOK,
        "drain_heartbeat_seconds": DRAIN_HEARTBEAT_SECONDS, "rate_limits": DEFAULT_RATE_LIMITS,
        "cache_host_parameter": CACHE_HOST_PARAMETER, "cache_token_parameter": CACHE_TOKEN_PARAMETER,
        "cache_tunnel_port": CACHE_TUNNEL_PORT, "cache_port": CACHE_PORT}
    extra = []
    for name, query in POSTFIX_QUERIES.items():
        text = render_template("files/cluster/pgsql-map.cf.j2",
                               {"name": name, "query": for_edge(query, host.mail_host), "database": DATABASE_NAME})
        extra.append(RenderedFile(f"{PGSQL_MAPS}/{name}.cf.in", "0644", text))
    # The edge's own role addresses to root, root to the administrator (as the single host's orgmail-sync
    # writes them); `newaliases` at boot builds the map.
    extra.append(RenderedFile("/etc/aliases", "0644", f"postmaster: root\nabuse: root\nMAILER-DAEMON: postmaster\n"
                                                       f"root: {host.admin_email}\n"))
    extra.append(RenderedFile(SENDERS_QUERY, "0644", SENDER_LOGINS_EXPORT + "\n"))
    selectors = "".join(f"{domain} {host.dkim_selector}\n" for domain in host.domains)
    extra.append(RenderedFile("/etc/rspamd/orgmail/dkim_selectors.map", "0644", selectors))
    extra.append(RenderedFile("/etc/rspamd/orgmail/user_rates.inc", "0644", user_rates(DEFAULT_RATE_LIMITS)))
    return cluster_files(edge_cluster_host(host), context, list(EDGE_FILES), extra=extra)


def edge_host(args: EdgeArgs) -> EdgeHost:
    return EdgeHost(stack=args.namespace, region=args.region, ssm_path=args.ssm_path, mail_host=args.mail_host,
                    lb_networks=args.lb_cidrs, domains=args.domains, admin_email=args.admin_email,
                    dkim_selector=args.dkim_selector, autoscaling_group=group_name(args.namespace),
                    ssm_agent=args.ssm_agent)


def edge_user_data(args: EdgeArgs) -> str:
    """The edges' cloud-init user-data (one launch template, every edge alike)."""
    host = edge_host(args)
    return cluster_user_data(edge_cluster_host(host), render_edge_files(host))


def edge_bundle(args: EdgeArgs) -> str:
    """The edges' bundle (components/userdata.py role_bundle), whose SHA-256 their user-data names."""
    return role_bundle(render_edge_files(edge_host(args)))


class EdgeFleet(pulumi.ComponentResource):
    group_name: pulumi.Output[str]

    def __init__(self, name: str, args: EdgeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:EdgeFleet", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"Name": f"{args.mail_host} edge", "orgmail:stack": args.stack, "orgmail:role": "edge"}
        spec = INSTANCE_SPECS.get(args.instance_type)
        burstable = spec.burstable if spec is not None else args.instance_type.startswith("t")
        template = aws.ec2.LaunchTemplate(
            f"{name}-template", description=f"orgmail {args.stack}: edge (Postfix, rspamd, Dovecot proxy)",
            image_id=args.ami_id, instance_type=args.instance_type,
            iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(name=args.instance_profile),
            user_data=user_data_base64(edge_user_data(args)),
            metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=1,
                instance_metadata_tags="disabled"),
            block_device_mappings=[aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                device_name=ROOT_DEVICE, ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                    volume_type="gp3", volume_size=ROOT_VOLUME_GB, encrypted="true", delete_on_termination="true"))],
            # A public IPv4 address for egress only (packages, SSM, certificates): no NAT gateway, and the
            # edges' security group admits nothing from the internet.
            network_interfaces=[aws.ec2.LaunchTemplateNetworkInterfaceArgs(
                device_index=0, associate_public_ip_address="true", delete_on_termination="true",
                security_groups=[args.security_group_id])],
            credit_specification=aws.ec2.LaunchTemplateCreditSpecificationArgs(cpu_credits="standard")
            if burstable else None,
            tag_specifications=[aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type=kind, tags=tags)
                                for kind in ("instance", "volume")],
            update_default_version=True, tags={"orgmail:stack": args.stack}, opts=child)
        group = aws.autoscaling.Group(
            f"{name}-group", name=group_name(args.namespace), min_size=args.min_size, max_size=args.max_size,
            desired_capacity=args.desired, vpc_zone_identifiers=args.subnet_ids,
            launch_template=aws.autoscaling.GroupLaunchTemplateArgs(id=template.id, version=template.latest_version.apply(str)),
            target_group_arns=args.target_group_arns, health_check_type="ELB",
            health_check_grace_period=HEALTH_CHECK_GRACE_SECONDS,
            # A new launch template (new user-data, new image) replaces the edges one at a time.
            instance_refresh=aws.autoscaling.GroupInstanceRefreshArgs(
                strategy="Rolling", preferences=aws.autoscaling.GroupInstanceRefreshPreferencesArgs(
                    min_healthy_percentage=50)),
            tags=[aws.autoscaling.GroupTagArgs(key=k, value=v, propagate_at_launch=True) for k, v in tags.items()],
            opts=pulumi.ResourceOptions(parent=self, depends_on=args.boot_dependencies))
        aws.autoscaling.LifecycleHook(
            f"{name}-drain", name=DRAIN_HOOK, autoscaling_group_name=group.name, lifecycle_transition=TERMINATING,
            heartbeat_timeout=DRAIN_HEARTBEAT_SECONDS, default_result="CONTINUE", opts=child)
        self.group_name = group.name
        self.register_outputs({"groupName": group.name})
