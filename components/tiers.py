"""Sizing by organisation tier: one table, taken from the source article's guidance.

The source article (not in this repository; see docs/design.md) gives:
  * hardware: minimum 2 vCPU / 4 GB RAM / 50 GB disk; recommended 4 vCPU / 8 GB / 250 GB SSD;
  * bandwidth per organisation size: small (1-20 users) 50-100 Mbps down / 10-20 up,
    medium (20-100) 200-500 / 50-100, large (100-500) 1 Gbps / 200-500 Mbps,
    ISP (500+) 10 Gbps+ / 1-2 Gbps;
  * several MX hosts with priorities 10 / 20 / 30.

Each tier's instance must meet the article's minimum hardware and sustain (baseline, not burst)
the tier's download bandwidth. `tests/unit/test_tiers.py` proves both from the spec table below.
"""

from __future__ import annotations

from dataclasses import dataclass

ARTICLE_MIN_VCPU = 2
ARTICLE_MIN_MEMORY_GIB = 4
ARTICLE_MIN_DISK_GB = 50
ARTICLE_RECOMMENDED_VCPU = 4
ARTICLE_RECOMMENDED_MEMORY_GIB = 8
ARTICLE_RECOMMENDED_DISK_GB = 250


@dataclass(frozen=True)
class InstanceSpec:
    vcpu: int
    memory_gib: float
    baseline_gbps: float  # sustained bandwidth, what a mail host can count on
    burst_gbps: float
    burstable: bool


# Source: AWS "Amazon EC2 instance types" specifications, network performance tables
# (docs.aws.amazon.com/ec2/latest/instancetypes/gp.html), read 2026-11. Baseline is the
# sustained figure AWS documents for "up to" instance types. Traffic through an internet
# gateway is further capped at 5 Gbps for instances with fewer than 32 vCPUs
# (docs.aws.amazon.com/AWSEC2/latest/UserGuide/ec2-instance-network-bandwidth.html), which is
# why the ISP tier uses a 32-vCPU type.
INSTANCE_SPECS: dict[str, InstanceSpec] = {
    "t3.medium": InstanceSpec(vcpu=2, memory_gib=4, baseline_gbps=0.256, burst_gbps=5, burstable=True),
    "m6i.large": InstanceSpec(vcpu=2, memory_gib=8, baseline_gbps=0.781, burst_gbps=12.5, burstable=False),
    "m6i.xlarge": InstanceSpec(vcpu=4, memory_gib=16, baseline_gbps=1.562, burst_gbps=12.5, burstable=False),
    "m6i.2xlarge": InstanceSpec(vcpu=8, memory_gib=32, baseline_gbps=3.125, burst_gbps=12.5, burstable=False),
    "m6in.8xlarge": InstanceSpec(vcpu=32, memory_gib=128, baseline_gbps=50, burst_gbps=50, burstable=False),
}

INTERNET_GATEWAY_CAP_GBPS_UNDER_32_VCPU = 5.0


@dataclass(frozen=True)
class ClusterSizing:
    """The ISP tier as a cluster (orgmail:cluster; docs/cluster.md): defaults of every size it takes.

    Mail comes in through a Network Load Balancer to an Auto Scaling group of edges (Postfix, rspamd,
    Dovecot proxy), which route each user to the one shard holding their mailbox; outside mail leaves
    through a small fixed pool of relays (Elastic IP, PTR, SPF); the directory (domains, users, aliases,
    shards) is Amazon RDS for PostgreSQL, Multi-AZ.
    """

    zones: int  # availability zones the cluster spans (at least 2)
    shards: int  # mailbox backends
    shard_instance_type: str
    shard_volume_gb: int  # each shard's mail-data volume (gp3)
    shard_volume_iops: int
    shard_volume_throughput: int
    edge_instance_type: str
    edges_min: int
    edges_max: int
    edges_desired: int
    relays: int  # outbound relays, each with its own Elastic IP in SPF
    relay_queue_volume_gb: int
    directory_instance_class: str  # RDS for PostgreSQL, Multi-AZ
    directory_storage_gb: int
    cache_node_type: str  # ElastiCache (Valkey): the edges' shared rspamd store, two nodes (components/edge_cache.py)


# The ISP cluster's defaults: 4000 GB of mail on two shards as the single-host ISP tier holds on one; two
# edges (one per zone) to a scaling limit of six; two relays; the directory on a general-purpose class
# (a few thousand small rows per domain, read through Dovecot's and Postfix's caches); the edges' shared rspamd
# store with room for an ISP's Bayes tokens (6 GiB a node), not a burstable class.
ISP_CLUSTER = ClusterSizing(
    zones=2, shards=2, shard_instance_type="m6i.2xlarge", shard_volume_gb=2000,
    shard_volume_iops=6000, shard_volume_throughput=250,
    edge_instance_type="m6i.large", edges_min=2, edges_max=6, edges_desired=2,
    relays=2, relay_queue_volume_gb=100,
    directory_instance_class="db.m6i.large", directory_storage_gb=100,
    cache_node_type="cache.m7g.large",
)


@dataclass(frozen=True)
class Tier:
    name: str
    users_min: int
    users_max: int | None  # None: open-ended (ISP)
    download_mbps: tuple[int, int]  # article's bandwidth guidance (low, high)
    upload_mbps: tuple[int, int]
    instance_type: str
    relay_instance_type: str  # backup-MX relays hold no mailboxes
    root_volume_gb: int
    mail_volume_gb: int
    mail_volume_iops: int  # gp3: 3000 is the free baseline
    mail_volume_throughput: int  # gp3 MiB/s: 125 is the free baseline
    # A backup-MX relay's own queue volume: inbound mail it holds while the mailbox host is down, for
    # up to its maximal_queue_lifetime (10 days), at about 50 messages of 75 KB per user a day: 37.5 MB
    # per user (large: 500 users, 19 GB -> 20; isp: 100 GB for about 2,700 users; small and medium
    # have no relays). A full queue loses nothing: Postfix answers 452 (try later) when less than 1.5
    # message sizes are free. gp3 grows online; the host grows its file system (orgmail-volume).
    relay_queue_volume_gb: int
    host_count: int  # first host holds the mailboxes; the rest are backup-MX relays
    # orgmail:defaultQuota's default, the quota of every mailbox that names none: the tier's largest
    # user count fills at most its mail volume (small 20 x 2G of 50 GB, medium 100 x 2G of 250 GB,
    # large 500 x 2G of 1000 GB); the ISP tier's is the directory's (orgmail-users add), 4,000 users
    # of 1G on the single host's 4000 GB.
    default_quota: str
    mx_priorities: tuple[int, ...]
    cluster: ClusterSizing | None = None  # orgmail:cluster's defaults (ISP only)

    @property
    def spec(self) -> InstanceSpec:
        return INSTANCE_SPECS[self.instance_type]

    @property
    def relay_spec(self) -> InstanceSpec:
        return INSTANCE_SPECS[self.relay_instance_type]

    @property
    def host_types(self) -> tuple[str, ...]:
        """The instance type of every host, mailbox host first, then the relays."""
        return (self.instance_type,) + (self.relay_instance_type,) * (self.host_count - 1)

    @property
    def internet_gbps(self) -> float:
        """Sustained bandwidth to the internet of the mailbox host."""
        spec = self.spec
        if spec.vcpu < 32:
            return min(spec.baseline_gbps, INTERNET_GATEWAY_CAP_GBPS_UNDER_32_VCPU)
        return spec.baseline_gbps / 2


TIERS: dict[str, Tier] = {
    t.name: t
    for t in (
        Tier(
            name="small", users_min=1, users_max=20,
            download_mbps=(50, 100), upload_mbps=(10, 20),
            instance_type="t3.medium", relay_instance_type="t3.medium",
            root_volume_gb=20, mail_volume_gb=50,
            mail_volume_iops=3000, mail_volume_throughput=125, relay_queue_volume_gb=10,
            host_count=1, mx_priorities=(10,), default_quota="2G",
        ),
        Tier(
            name="medium", users_min=20, users_max=100,
            download_mbps=(200, 500), upload_mbps=(50, 100),
            instance_type="m6i.xlarge", relay_instance_type="t3.medium",
            root_volume_gb=30, mail_volume_gb=250,
            mail_volume_iops=3000, mail_volume_throughput=125, relay_queue_volume_gb=10,
            host_count=1, mx_priorities=(10,), default_quota="2G",
        ),
        Tier(
            name="large", users_min=100, users_max=500,
            download_mbps=(1000, 1000), upload_mbps=(200, 500),
            instance_type="m6i.2xlarge", relay_instance_type="t3.medium",
            root_volume_gb=30, mail_volume_gb=1000,
            mail_volume_iops=6000, mail_volume_throughput=250, relay_queue_volume_gb=20,
            host_count=2, mx_priorities=(10, 20), default_quota="2G",
        ),
        Tier(
            name="isp", users_min=500, users_max=None,
            download_mbps=(10000, 10000), upload_mbps=(1000, 2000),
            instance_type="m6in.8xlarge", relay_instance_type="m6i.large",
            root_volume_gb=50, mail_volume_gb=4000,
            mail_volume_iops=12000, mail_volume_throughput=500, relay_queue_volume_gb=100,
            host_count=3, mx_priorities=(10, 20, 30), default_quota="1G", cluster=ISP_CLUSTER,
        ),
    )
}
