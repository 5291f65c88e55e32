"""The ISP cluster's front: a Network Load Balancer with one Elastic IP per zone, a TCP listener per mail
port, and a target group per port that hands each connection to an edge with a PROXY v2 header.

Why these attributes (tests/unit/test_cluster.py checks each):
* PROXY protocol v2, client address preservation off: the edge learns the client's address from the header
  (Postfix `upstream_proxy_protocol = haproxy` on postscreen/smtpd, Dovecot `haproxy = yes` with
  `haproxy_trusted_networks` = the load balancer's subnets), while every connection reaches the edge from a
  load-balancer address, so the edges' security group admits the mail ports from those subnets only.
* TCP health checks on each traffic port: an edge whose Postfix or Dovecot stops answering leaves that
  port's target group (a health check opens and closes a connection: the edge may log it).
* Deregistration delay of DEREGISTRATION_DELAY_SECONDS: an edge leaving (scale-in, instance refresh) gets
  no new connection but keeps its open ones that long, longer than Postfix's 300-second smtpd_timeout, so a
  session in progress ends by itself; only then does the lifecycle hook (components/edge.py) drain its queue.
* Cross-zone load balancing on: the MX name's A records are the Elastic IPs themselves, not the load
  balancer's DNS name, so nothing steers clients away from a zone without a healthy edge; with cross-zone on,
  each zone's address reaches every healthy edge. It costs inter-zone data transfer (docs/cluster.md).
* Its own security group (set at creation: a Network Load Balancer made without one can never get one):
  the mail ports from anywhere, and to the edges' group only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from components.firewall import PORT_NAMES
from components.userdata import MAIL_PORTS

DEREGISTRATION_DELAY_SECONDS = 600
HEALTH_CHECK_INTERVAL_SECONDS = 10
HEALTH_CHECK_THRESHOLD = 3  # consecutive checks to turn healthy, and unhealthy
# The port each target group's health check connects to. A check carries a PROXY v2 header without a
# client (the LOCAL command) and hangs up at once; Postfix's smtpd (3.10, upstream proxy protocol on 465
# and 587) then finds no peer and dies with a fatal error, and after a few such deaths its master
# throttles the service for a minute, holding real clients' greetings for up to 60 s (seen in the booted
# cluster, tests/e2e/test_cluster.py). postscreen (25) and Dovecot (993, 995) take such a check in their
# stride, so the submission ports are checked through postscreen's: the same Postfix master.
HEALTH_CHECK_PORTS: dict[int, int | None] = {25: None, 465: 25, 587: 25, 993: None, 995: None}  # None: its own


@dataclass(frozen=True)
class LoadBalancerArgs:
    stack: str
    vpc_id: pulumi.Input[str]
    subnet_ids: Sequence[pulumi.Input[str]]  # the load balancer's own subnet in each zone
    security_group_id: pulumi.Input[str]
    internet_ready: list[pulumi.Resource] = field(default_factory=list)  # an internet-facing NLB needs the gateway


class LoadBalancer(pulumi.ComponentResource):
    public_ips: list[pulumi.Output[str]]
    allocation_ids: list[pulumi.Output[str]]
    target_group_arns: list[pulumi.Output[str]]
    arn: pulumi.Output[str]

    def __init__(self, name: str, args: LoadBalancerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:LoadBalancer", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"orgmail:stack": args.stack, "orgmail:role": "load-balancer"}
        # One address per zone: the MX name's A records and PTRs. Protected: they are the domain's reputation.
        ips = [aws.ec2.Eip(f"{name}-ip{n}", domain="vpc", tags={**tags, "Name": f"orgmail-{args.stack} mx {n}"},
                           opts=pulumi.ResourceOptions(parent=self, protect=True))
               for n in range(1, len(args.subnet_ids) + 1)]
        lb = aws.lb.LoadBalancer(
            name, load_balancer_type="network", internal=False, ip_address_type="ipv4",
            subnet_mappings=[aws.lb.LoadBalancerSubnetMappingArgs(subnet_id=subnet, allocation_id=ip.allocation_id)
                             for subnet, ip in zip(args.subnet_ids, ips, strict=True)],
            security_groups=[args.security_group_id], enable_cross_zone_load_balancing=True,
            enable_deletion_protection=True, tags=tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=args.internet_ready))
        self.target_group_arns = []
        for port in MAIL_PORTS:
            service = PORT_NAMES[port]
            group = aws.lb.TargetGroup(
                f"{name}-{service}", port=port, protocol="TCP", target_type="instance", vpc_id=args.vpc_id,
                proxy_protocol_v2=True, preserve_client_ip="false",
                deregistration_delay=DEREGISTRATION_DELAY_SECONDS, connection_termination=False,
                # One client address, one edge (while it is healthy): Postfix's per-client limits (anvil)
                # are per edge, so a client meets the count it left. Greylisting and the per-login limits are
                # rspamd's, in the edges' shared store (components/edge_cache.py): a sender retrying from
                # another address of its pool, on another edge, is not greylisted again.
                stickiness=aws.lb.TargetGroupStickinessArgs(enabled=True, type="source_ip"),
                health_check=aws.lb.TargetGroupHealthCheckArgs(
                    enabled=True, protocol="TCP", interval=HEALTH_CHECK_INTERVAL_SECONDS,
                    port=str(HEALTH_CHECK_PORTS[port] or "traffic-port"),
                    healthy_threshold=HEALTH_CHECK_THRESHOLD, unhealthy_threshold=HEALTH_CHECK_THRESHOLD),
                tags={**tags, "orgmail:port": str(port)}, opts=child)
            aws.lb.Listener(
                f"{name}-{service}", load_balancer_arn=lb.arn, port=port, protocol="TCP",
                default_actions=[aws.lb.ListenerDefaultActionArgs(type="forward", target_group_arn=group.arn)],
                tags=tags, opts=child)
            self.target_group_arns.append(group.arn)
        self.public_ips = [ip.public_ip for ip in ips]
        self.allocation_ids = [ip.allocation_id for ip in ips]
        self.arn = lb.arn
        self.register_outputs({"publicIps": self.public_ips})
