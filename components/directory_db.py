"""The ISP cluster's directory: domains, mailboxes (password hash, quota, shard), aliases and shards, in
Amazon RDS for PostgreSQL, Multi-AZ. Postfix reads it through proxy:pgsql maps, Dovecot through its SQL
passdb/userdb (auth cache on); users are provisioned with the CLI against it, never through Pulumi config.

What it is made of, and why:
* Multi-AZ (a synchronous standby in another zone, failover by RDS), encrypted storage, not publicly
  accessible, in the private subnets (no route out) through a DB subnet group over every zone;
* deletion protection, `protect` in Pulumi, a final snapshot, and automated backups kept BACKUP_RETENTION_DAYS;
* the master password managed by RDS in AWS Secrets Manager (manage_master_user_password): no database
  password is in the stack config, the Pulumi state or any output;
* TLS required of every client (rds.force_ssl in its parameter group);
* the engine's major version from DIRECTORY_ENGINE (minor versions upgrade in the maintenance window).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from components.firewall import DIRECTORY_PORT

# PostgreSQL 17: Debian 13's (postgresql-17), which the booted cluster tests run, so the directory's schema
# and queries are proven on the major version RDS runs. The parameter group family follows the major version.
DIRECTORY_ENGINE = {"engine": "postgres", "version": "17", "family": "postgres17"}
# Server parameters (name -> (value, apply method)): clients must use TLS; connections are logged.
DIRECTORY_PARAMETERS: dict[str, tuple[str, str]] = {
    "rds.force_ssl": ("1", "pending-reboot"),
    "log_connections": ("1", "immediate"),
}
BACKUP_RETENTION_DAYS = 14  # RDS allows 0-35; point-in-time restore within them
BACKUP_WINDOW = "01:00-01:30"  # UTC, before the shards' restic run (02:15) and snapshots (03:30)
MAINTENANCE_WINDOW = "sun:05:00-sun:05:30"  # after the hosts' reboot window (04:30 + 30 min per host)
MASTER_USERNAME = "orgmail_admin"
DATABASE_NAME = "orgmail"
STORAGE_GROWTH_FACTOR = 4  # RDS storage autoscaling may grow the volume to this many times its size
STORAGE_MAX_GB = 65536  # RDS for PostgreSQL on gp3


def max_storage(storage_gb: int) -> int | None:
    """Storage autoscaling's ceiling: STORAGE_GROWTH_FACTOR times the size, at most RDS's largest; None (no
    autoscaling) when the volume is already the largest."""
    ceiling = min(storage_gb * STORAGE_GROWTH_FACTOR, STORAGE_MAX_GB)
    return ceiling if ceiling > storage_gb else None


def final_snapshot_identifier(namespace: str) -> str:
    """RDS identifiers: letters, digits and single hyphens, starting with a letter, not ending with '-'."""
    return re.sub(r"-+", "-", f"orgmail-{namespace}-directory-final").strip("-")


@dataclass(frozen=True)
class DirectoryArgs:
    stack: str
    namespace: str
    instance_class: str
    storage_gb: int
    subnet_ids: Sequence[pulumi.Input[str]]  # the private subnet of each zone
    security_group_id: pulumi.Input[str]


class Directory(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]
    master_secret_arn: pulumi.Output[str]

    def __init__(self, name: str, args: DirectoryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:Directory", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"orgmail:stack": args.stack, "orgmail:role": "directory"}
        subnets = aws.rds.SubnetGroup(f"{name}-subnets", subnet_ids=args.subnet_ids,
                                      description=f"orgmail {args.stack} directory: private subnets of every zone",
                                      tags=tags, opts=child)
        parameters = aws.rds.ParameterGroup(
            f"{name}-parameters", family=DIRECTORY_ENGINE["family"],
            description=f"orgmail {args.stack} directory: TLS required",
            parameters=[aws.rds.ParameterGroupParameterArgs(name=k, value=v, apply_method=m)
                        for k, (v, m) in DIRECTORY_PARAMETERS.items()],
            tags=tags, opts=child)
        db = aws.rds.Instance(
            name, engine=DIRECTORY_ENGINE["engine"], engine_version=DIRECTORY_ENGINE["version"],
            instance_class=args.instance_class, allocated_storage=args.storage_gb,
            max_allocated_storage=max_storage(args.storage_gb), storage_type="gp3", storage_encrypted=True,
            multi_az=True, publicly_accessible=False, db_subnet_group_name=subnets.name,
            vpc_security_group_ids=[args.security_group_id], port=DIRECTORY_PORT, parameter_group_name=parameters.name,
            db_name=DATABASE_NAME, username=MASTER_USERNAME, manage_master_user_password=True,
            deletion_protection=True, skip_final_snapshot=False,
            final_snapshot_identifier=final_snapshot_identifier(args.namespace),
            backup_retention_period=BACKUP_RETENTION_DAYS, backup_window=BACKUP_WINDOW,
            maintenance_window=MAINTENANCE_WINDOW, auto_minor_version_upgrade=True, copy_tags_to_snapshot=True,
            allow_major_version_upgrade=False, apply_immediately=False, tags=tags,
            opts=pulumi.ResourceOptions(parent=self, protect=True))
        self.endpoint = db.address
        self.master_secret_arn = db.master_user_secrets.apply(
            lambda s: str(s[0].secret_arn) if s and s[0].secret_arn else "")
        self.register_outputs({"endpoint": db.address})
