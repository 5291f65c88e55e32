"""The ISP cluster's mailbox backends ("shards"): Dovecot hosts, each the only home of its users' mail.

A shard is today's mailbox host without its internet face: its own encrypted, protected gp3 mail-data volume
(found by volume id), EC2 auto-recovery and reboot alarms, daily DLM snapshots and the nightly restic backup
to the stack's bucket, all through components/server.py's MailHost. Only the edges reach it (SHARD_PORTS,
components/firewall.py): LMTP from the edges' Postfix, IMAP and POP3 behind the edges' Dovecot proxy, and
doveadm for moving a user between shards. Its Elastic IP serves its own egress (packages, SSM, S3); nothing
from the internet reaches it. If a shard is down, LMTP to it is to temp-fail (4xx) and its mail to wait in
the edges' queues (the edge role's behaviour, not built yet).
"""

from __future__ import annotations

from dataclasses import dataclass

from components.firewall import SHARD_PORTS
from components.server import HostSpec
from components.tiers import INSTANCE_SPECS

__all__ = ["SHARD_PORTS", "ShardArgs", "shard_spec", "shard_user_data"]


@dataclass(frozen=True)
class ShardArgs:
    stack: str  # the namespace the host reports under
    region: str
    ssm_path: str  # the shards read <ssm_path>/shard only
    hostname: str
    data_volume_id: str
    backup_bucket_parameter: str  # where the shard finds its restic repository (SSM, under its sub-path)


def shard_user_data(args: ShardArgs) -> str:
    """The shard's cloud-init user-data: rendered by the shard role (not yet built).

    A placeholder until then: it names the shard's settings (its data volume by id, as every host finds its
    volume) and installs nothing. The lead replaces it with the shard's bootstrap (Dovecot backend with its
    userdb from the directory, LMTP, doveadm, restic), under EC2's 16 KB like every host's.
    """
    return "\n".join([
        "#cloud-config",
        "# orgmail shard: placeholder user-data (the shard role is not yet built)",
        f"hostname: {args.hostname.split('.')[0]}",
        f"fqdn: {args.hostname}",
        "write_files:",
        "  - path: /etc/orgmail/shard.env",
        "    permissions: '0644'",
        "    content: |",
        f"      STACK={args.stack}",
        f"      REGION={args.region}",
        f"      SSM_PATH={args.ssm_path}/shard",
        f"      HOSTNAME={args.hostname}",
        f"      DATA_DEVICE=/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{args.data_volume_id.replace('-', '')}",
        f"      BACKUP_BUCKET_PARAMETER={args.backup_bucket_parameter}",
        "",
    ])


def shard_spec(instance_type: str, volume_gb: int, iops: int, throughput: int, stack: str, region: str,
               ssm_path: str, hostname: str) -> HostSpec:
    """A shard as MailHost builds it: the cluster's shard size, a mail-data volume, shard_user_data."""
    spec = INSTANCE_SPECS.get(instance_type)

    def user_data(volume_id: str) -> str:
        return shard_user_data(ShardArgs(stack=stack, region=region, ssm_path=ssm_path, hostname=hostname,
                                         data_volume_id=volume_id,
                                         backup_bucket_parameter=f"{ssm_path}/shard/backup-bucket"))

    return HostSpec(instance_type=instance_type, burstable=spec.burstable if spec else instance_type.startswith("t"),
                    volume_gb=volume_gb, volume_iops=iops, volume_throughput=throughput, keeps_mail=True,
                    user_data=user_data)
