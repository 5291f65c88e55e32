"""The ISP cluster's shared rspamd state: Amazon ElastiCache (Valkey), one store for every edge.

rspamd keeps greylisting records, the per-login rate-limit buckets, Bayes tokens and its reputation data in
Redis. With a Redis on each edge, a sender greylisted by one edge meets the next edge as a stranger on its
retry (the load balancer spreads connections), a user's hourly limit is multiplied by the number of edges,
and what one edge learns the others never know. So the edges share one store:

* a replication group of CACHE_NODES nodes in different zones, automatic failover and Multi-AZ (the
  primary endpoint's DNS name moves to the promoted replica), in the private subnets, reachable from the
  edges' security group only (components/firewall.py);
* TLS required in transit and an AUTH token (random, SSM SecureString under the edges' path): the edges'
  rspamd has no Redis TLS of its own, so each edge runs stunnel (Debian's stunnel4) from 127.0.0.1:CACHE_TUNNEL_PORT
  to the endpoint, verifying its certificate and name (cloud-init/files/cluster/bootstrap.sh.j2);
* encrypted at rest; daily snapshots kept SNAPSHOT_RETENTION_DAYS (greylisting and limits are short-lived, but
  Bayes tokens are months of users' training).

If the store cannot be reached, rspamd scans without it: no greylisting and no rate limits until it returns,
mail is neither refused nor lost (docs/cluster.md, failure modes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from components.firewall import CACHE_PORT

# Valkey: ElastiCache's Redis-compatible engine (rspamd speaks to it as to Redis), priced below its Redis OSS.
CACHE_ENGINE = {"engine": "valkey", "version": "8.0"}
CACHE_NODES = 2  # a primary and a replica in another zone: failover needs two
SNAPSHOT_RETENTION_DAYS = 7
SNAPSHOT_WINDOW = "00:00-01:00"  # UTC, before the directory's backup window (01:00)
MAINTENANCE_WINDOW = "sun:06:00-sun:07:00"  # after the directory's (sun 05:00-05:30)
# Where rspamd on an edge reaches the store: stunnel's local end. Not 6379, so that nothing on the edge is
# taken for a Redis of its own.
CACHE_TUNNEL_PORT = 6380
# SSM parameters under the edges' path: the endpoint (written once the store exists: the edges wait for it)
# and the AUTH token.
CACHE_HOST_PARAMETER = "cache-host"
CACHE_TOKEN_PARAMETER = "cache/auth-token"
REPLICATION_GROUP_ID_MAX = 40


def replication_group_id(namespace: str) -> str:
    """ElastiCache's replication group id: 1-40 letters, digits and single hyphens, beginning with a letter,
    not ending with a hyphen; a long stack name is cut and keeps a digest of the whole, so two stacks never
    meet in one name."""
    base = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"orgmail-{namespace}-edges".lower())).strip("-")
    if len(base) <= REPLICATION_GROUP_ID_MAX:
        return base
    digest = hashlib.sha256(namespace.encode()).hexdigest()[:6]
    return f"{base[:REPLICATION_GROUP_ID_MAX - 7].rstrip('-')}-{digest}"


@dataclass(frozen=True)
class EdgeCacheArgs:
    stack: str
    namespace: str
    node_type: str  # cluster.cacheNodeType
    subnet_ids: Sequence[pulumi.Input[str]]  # the private subnet of each zone
    security_group_id: pulumi.Input[str]  # the cache group: the edges' group alone reaches it
    auth_token: pulumi.Input[str]


class EdgeCache(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]

    def __init__(self, name: str, args: EdgeCacheArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:EdgeCache", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"orgmail:stack": args.stack, "orgmail:role": "edge-cache"}
        group_id = replication_group_id(args.namespace)
        subnets = aws.elasticache.SubnetGroup(
            f"{name}-subnets", name=group_id, subnet_ids=args.subnet_ids,
            description=f"orgmail {args.stack} shared rspamd store of the edges: private subnets of every zone",
            tags=tags, opts=child)
        group = aws.elasticache.ReplicationGroup(
            name, replication_group_id=group_id,
            description=f"orgmail {args.stack}: shared rspamd state of the edges (greylisting, limits, Bayes)",
            engine=CACHE_ENGINE["engine"], engine_version=CACHE_ENGINE["version"], node_type=args.node_type,
            num_cache_clusters=CACHE_NODES, automatic_failover_enabled=True, multi_az_enabled=True,
            port=CACHE_PORT, subnet_group_name=subnets.name, security_group_ids=[args.security_group_id],
            transit_encryption_enabled=True, at_rest_encryption_enabled=True,
            auth_token=args.auth_token, network_type="ipv4",
            snapshot_retention_limit=SNAPSHOT_RETENTION_DAYS, snapshot_window=SNAPSHOT_WINDOW,
            maintenance_window=MAINTENANCE_WINDOW, auto_minor_version_upgrade=True, apply_immediately=False,
            tags=tags, opts=child)
        self.endpoint = group.primary_endpoint_address
        self.register_outputs({"endpoint": group.primary_endpoint_address})
