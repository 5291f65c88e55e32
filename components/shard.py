"""The ISP cluster's mailbox backends ("shards"): Dovecot hosts, each the only home of its users' mail.

A shard is today's mailbox host without its internet face: its own encrypted, protected gp3 mail-data volume
(found by volume id), EC2 auto-recovery and reboot alarms, daily DLM snapshots and the nightly restic backup
to the stack's bucket, all through components/server.py's MailHost. Only the edges reach it (SHARD_PORTS,
components/firewall.py): LMTP from the edges' Postfix, IMAP and POP3 behind the edges' Dovecot proxy; and the
other shards its doveadm (DOVEADM_PORT), for moving a user between shards (`orgmail-users move`). Its Elastic IP serves its own egress (packages, SSM, S3); nothing
from the internet reaches it. If a shard is down, LMTP to it is to temp-fail (4xx) and its mail to wait in
the edges' queues: the edges' Dovecot LMTP proxy answers 451 4.4.0 for a shard it cannot reach.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from components.directory import SHARD_ITERATE, SHARD_NAME_RE, SHARD_PASSDB, SHARD_USERDB, for_shard
from components.directory_db import DATABASE_NAME
from components.firewall import DOVEADM_PORT, SHARD_PORTS
from components.server import PLACEHOLDER_VOLUME_ID, HostSpec
from components.tiers import INSTANCE_SPECS
from components.userdata import ClusterHost, RenderedFile, cluster_files, cluster_user_data, role_bundle

__all__ = ["DOVEADM_PORT", "SHARD_PORTS", "ShardArgs", "render_shard_files", "shard_spec", "shard_user_data"]


@dataclass(frozen=True)
class ShardArgs:
    """What a shard's configuration is rendered from: plain values, no user, no secret."""

    stack: str  # the namespace the host reports under
    region: str
    ssm_path: str  # the stack's path: the shards read <ssm_path>/shard only
    hostname: str
    data_volume_id: str
    edge_networks: tuple[str, ...]  # the only sources of SHARD_PORTS (and Dovecot's login_trusted_networks)
    ssm_agent: bool = False  # admin.ssmSessionManager (orgmail-users runs on a shard, through Session Manager)
    # Test overrides (tests/e2e/test_cluster.py):
    install_packages: bool = True
    aws_environment: tuple[tuple[str, str], ...] = ()
    directory_ca_url: str = ""  # "": RDS's CA bundle of the region; a test's CA otherwise

    @property
    def shard(self) -> str:
        """The shard's name in the directory (`orgmail-users shard add <name> <address>`): its host name's
        first label."""
        return self.hostname.split(".")[0]

    def __post_init__(self) -> None:
        if not SHARD_NAME_RE.fullmatch(self.shard):
            raise ValueError(f"shard host name {self.hostname!r}: its first label is the directory's shard name, "
                             "1-32 of a-z, 0-9 and inner '-'")
        if not self.edge_networks:
            raise ValueError("a shard needs the edges' subnets (its only clients)")
        for cidr in self.edge_networks:
            if ipaddress.ip_network(cidr).version != 4:
                raise ValueError(f"edge subnet {cidr!r}: IPv4 only")


SHARD_PACKAGES = ("dovecot-imapd", "dovecot-pop3d", "dovecot-lmtpd", "dovecot-pgsql", "dovecot-sieve", "nftables",
                  "unattended-upgrades", "awscli", "curl", "openssl", "restic", "logrotate",
                  # orgmail-users, which the administrator runs on a shard (move needs the shards' doveadm secret)
                  "python3-psycopg", "python3-bcrypt")

SHARD_SERVICES = ("dovecot.service", "orgmail-authflush.service")

# Its Dovecot configuration names the shard (its directory queries): in its own user-data.
SHARD_HOST_FILES: tuple[tuple[str, str, str], ...] = (
    ("cluster/shard-dovecot.conf.j2", "/etc/dovecot/dovecot.conf", "0644"),
)
# The same on every shard: in the shards' bundle (components/userdata.py).
SHARD_FILES: tuple[tuple[str, str, str], ...] = (
    ("dovecot/spam-to-junk.sieve", "/etc/dovecot/sieve/spam-to-junk.sieve", "0644"),
    ("dovecot/quota-warning", "/usr/local/lib/orgmail/quota-warning", "0755"),
    ("dovecot/convert-maildir.py", "/usr/local/sbin/orgmail-convert-maildir", "0755"),
    ("systemd/orgmail-mail-format.service", "/etc/systemd/system/orgmail-mail-format.service", "0644"),
    ("orgmail/volume.py", "/usr/local/sbin/orgmail-volume", "0755"),
    ("systemd/orgmail-volume.service", "/etc/systemd/system/orgmail-volume.service", "0644"),
    ("orgmail/orgmail_libpq.py", "/usr/local/lib/orgmail/orgmail_libpq.py", "0644"),
    ("orgmail/authflush.py", "/usr/local/sbin/orgmail-authflush", "0755"),
    ("cluster/orgmail-authflush.service", "/etc/systemd/system/orgmail-authflush.service", "0644"),
    ("orgmail/users.py", "/usr/local/sbin/orgmail-users", "0755"),
    ("orgmail/directory.sql", "/usr/local/share/orgmail/directory.sql", "0644"),
    # The mailbox host's nightly restic backup and its restores (docs/backups.md), to the stack's bucket.
    ("backup/orgmail-backup.py", "/usr/local/sbin/orgmail-backup", "0755"),
    ("backup/orgmail-restore.sh", "/usr/local/sbin/orgmail-restore", "0755"),
    ("backup/orgmail-backup.service.j2", "/etc/systemd/system/orgmail-backup.service", "0644"),
    ("backup/orgmail-backup.timer.j2", "/etc/systemd/system/orgmail-backup.timer", "0644"),
)


def shard_cluster_host(args: ShardArgs) -> ClusterHost:
    return ClusterHost(stack=args.stack, role="shard", region=args.region, ssm_path=f"{args.ssm_path}/shard",
                       hostname=args.hostname, packages=SHARD_PACKAGES, services=SHARD_SERVICES, tls_units=(),
                       ssm_agent=args.ssm_agent, install_packages=args.install_packages,
                       aws_environment=args.aws_environment, directory_ca_url=args.directory_ca_url)


def render_shard_files(args: ShardArgs) -> list[RenderedFile]:
    """Every file a shard gets: its boot files and Dovecot's configuration (user-data), the rest in the shards'
    bundle."""
    context: dict[str, object] = {
        "shard": args.shard, "edge_networks": args.edge_networks,
        "passdb_query": for_shard(SHARD_PASSDB, args.shard), "userdb_query": for_shard(SHARD_USERDB, args.shard),
        "iterate_query": for_shard(SHARD_ITERATE, args.shard), "doveadm_port": DOVEADM_PORT,
        "mail_ports": SHARD_PORTS, "mail_sources": args.edge_networks,
        # The hosts' subnets hold edges and shards alike: nftables cannot tell them apart, the security group does
        # (the edges to LMTP, IMAP and POP3, the other shards to doveadm).
        "mail_sources_name": "the hosts' subnets (edges, and shards for doveadm)",
        "database": DATABASE_NAME, "data_volume_id": args.data_volume_id, "tls_name": ""}
    return cluster_files(shard_cluster_host(args), context, list(SHARD_FILES), list(SHARD_HOST_FILES))


def shard_user_data(args: ShardArgs) -> str:
    """The shard's cloud-init user-data: Dovecot backend of the directory's users on this shard."""
    return cluster_user_data(shard_cluster_host(args), render_shard_files(args))


def shard_spec(instance_type: str, volume_gb: int, iops: int, throughput: int, stack: str, region: str,
               ssm_path: str, hostname: str, edge_networks: tuple[str, ...], ssm_agent: bool) -> HostSpec:
    """A shard as MailHost builds it: the cluster's shard size, a mail-data volume, shard_user_data."""
    spec = INSTANCE_SPECS.get(instance_type)

    def args(volume_id: str) -> ShardArgs:
        return ShardArgs(stack=stack, region=region, ssm_path=ssm_path, hostname=hostname, data_volume_id=volume_id,
                         edge_networks=edge_networks, ssm_agent=ssm_agent)

    return HostSpec(instance_type=instance_type, burstable=spec.burstable if spec else instance_type.startswith("t"),
                    volume_gb=volume_gb, volume_iops=iops, volume_throughput=throughput, keeps_mail=True,
                    user_data=lambda volume_id: shard_user_data(args(volume_id)),
                    bundle=role_bundle(render_shard_files(args(PLACEHOLDER_VOLUME_ID))))
