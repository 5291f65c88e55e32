"""Network: the stack's own VPC with one public subnet (IPv4 + IPv6), or given VPC/subnet ids."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from components.settings import Settings
from components.tiers import TIERS

VPC_CIDR = "10.42.0.0/16"
SUBNET_CIDR = "10.42.1.0/24"


def first_ipv6_subnet(vpc_block: str) -> str:
    """The first /64 of the VPC's Amazon-provided /56."""
    return str(next(ipaddress.ip_network(vpc_block).subnets(new_prefix=64)))


class NoZoneError(Exception):
    """No zone of the region offers every instance type the tier needs."""


def tier_instance_types(settings: Settings) -> tuple[str, ...]:
    return tuple(sorted(set(TIERS[settings.tier].host_types)))


def zone_offerings(types: Sequence[str], invoke: pulumi.InvokeOptions
                   ) -> pulumi.Output[tuple[list[str], list[tuple[str, str]]]]:
    """The region's zones open to every account (no opt-in, no Local or Wavelength Zones) and where each
    of `types` is offered there: (zone names, [(instance type, zone)]), for choose_zone(s)."""
    zones = aws.get_availability_zones_output(
        state="available", opts=invoke,
        filters=[aws.GetAvailabilityZonesFilterArgs(name="opt-in-status", values=["opt-in-not-required"]),
                 aws.GetAvailabilityZonesFilterArgs(name="zone-type", values=["availability-zone"])])
    offerings = aws.ec2.get_instance_type_offerings_output(
        location_type="availability-zone", opts=invoke,
        filters=[aws.ec2.GetInstanceTypeOfferingsFilterArgs(name="instance-type", values=list(types))])
    return pulumi.Output.all(zones.names, offerings.instance_types, offerings.locations).apply(
        lambda a: (list(a[0]), list(zip(a[1], a[2], strict=True))))


def choose_zone(zones: Sequence[str], offered: Sequence[tuple[str, str]], types: Sequence[str], region: str) -> str:
    """The first zone (by name) that offers every instance type in `types`.

    `zones` are the region's available zones that need no opt-in (Local and Wavelength Zones are
    filtered out before); `offered` are (instance type, zone) pairs from DescribeInstanceTypeOfferings.
    AZ names map to different physical zones per account, so the choice is made per account.
    """
    have: dict[str, set[str]] = {}
    for instance_type, zone in offered:
        have.setdefault(zone, set()).add(instance_type)
    for zone in sorted(zones):
        if set(types) <= have.get(zone, set()):
            return zone
    raise NoZoneError(
        f"no availability zone of {region} that needs no opt-in offers all of {', '.join(types)} "
        f"(zones: {', '.join(sorted(zones)) or 'none'}); choose another orgmail:region, or give "
        "network.vpcId and network.subnetId of a subnet in a zone that does")


class Network(pulumi.ComponentResource):
    vpc_id: pulumi.Output[str]
    subnet_id: pulumi.Output[str]
    availability_zone: pulumi.Output[str]
    # What must exist before a host's address works and it boots: gateway and routes.
    internet_ready: list[pulumi.Resource]

    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        invoke = pulumi.InvokeOptions(parent=self)
        tags = {"Name": f"orgmail-{settings.stack}", "orgmail:stack": settings.stack}

        if settings.vpc_id and settings.subnet_id:
            subnet = aws.ec2.get_subnet_output(id=settings.subnet_id, opts=invoke)
            self.vpc_id = pulumi.Output.from_input(settings.vpc_id)
            self.subnet_id = pulumi.Output.from_input(settings.subnet_id)
            self.availability_zone = subnet.availability_zone
            self.internet_ready = []
        else:
            types = tier_instance_types(settings)
            az = zone_offerings(types, invoke).apply(lambda z: choose_zone(z[0], z[1], types, settings.region))
            vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=VPC_CIDR, assign_generated_ipv6_cidr_block=True,
                              enable_dns_support=True, enable_dns_hostnames=True, tags=tags, opts=child)
            igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=tags, opts=child)
            subnet_res = aws.ec2.Subnet(
                f"{name}-public", vpc_id=vpc.id, cidr_block=SUBNET_CIDR, availability_zone=az,
                ipv6_cidr_block=vpc.ipv6_cidr_block.apply(first_ipv6_subnet),
                assign_ipv6_address_on_creation=True,
                # Hosts get Elastic IPs; nothing else in the subnet should be public by accident.
                map_public_ip_on_launch=False,
                tags=tags,
                # The zone is chosen once. Were it impaired or its offerings to change later, a new
                # choice must not replace the subnet (the protected data volume lives in that zone).
                opts=pulumi.ResourceOptions(parent=self, ignore_changes=["availabilityZone"]))
            routes = aws.ec2.RouteTable(
                f"{name}-routes", vpc_id=vpc.id, tags=tags, opts=child,
                routes=[
                    aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=igw.id),
                    aws.ec2.RouteTableRouteArgs(ipv6_cidr_block="::/0", gateway_id=igw.id),
                ])
            association = aws.ec2.RouteTableAssociation(f"{name}-public-routes", subnet_id=subnet_res.id,
                                                        route_table_id=routes.id, opts=child)
            self.internet_ready = [igw, routes, association]
            self.vpc_id = vpc.id
            self.subnet_id = subnet_res.id
            self.availability_zone = subnet_res.availability_zone

        self.register_outputs({"vpcId": self.vpc_id, "subnetId": self.subnet_id})


# --- the ISP cluster (orgmail:cluster): one set of subnets per availability zone -------------------------

# Per zone n (1-based): the load balancer's own subnet (nothing else lives there, so "from these networks"
# means "through the load balancer" in the edges' rules and Dovecot's haproxy_trusted_networks), a public
# subnet for the hosts (edges, shards, relays: each reaches the internet for packages, SSM, S3 and
# certificates, none is reachable from it but through the load balancer), and a private subnet for the
# directory (RDS), with no route out at all.
CLUSTER_ZONES_MAX = 6


def lb_subnet_cidr(n: int) -> str:
    """The load balancer's subnet in zone n: a /27 (an NLB needs at least 8 free addresses in each)."""
    return f"10.42.0.{(n - 1) * 32}/27"


def host_subnet_cidr(n: int) -> str:
    return f"10.42.{10 + n}.0/24"


def private_subnet_cidr(n: int) -> str:
    return f"10.42.{20 + n}.0/24"


def nth_ipv6_subnet(vpc_block: str, n: int) -> str:
    """The n-th /64 (from 0) of the VPC's Amazon-provided /56."""
    network = ipaddress.ip_network(vpc_block)
    return str(ipaddress.ip_network((int(network.network_address) + (n << 64), 64)))


def choose_zones(zones: Sequence[str], offered: Sequence[tuple[str, str]], types: Sequence[str], region: str,
                 count: int) -> list[str]:
    """The first `count` zones (by name) that offer every instance type in `types` (see choose_zone)."""
    have: dict[str, set[str]] = {}
    for instance_type, zone in offered:
        have.setdefault(zone, set()).add(instance_type)
    fit = [zone for zone in sorted(zones) if set(types) <= have.get(zone, set())]
    if len(fit) < count:
        raise NoZoneError(
            f"orgmail:cluster.zones is {count}, but only {len(fit)} availability zone(s) of {region} that need no "
            f"opt-in offer all of {', '.join(types)} ({', '.join(fit) or 'none'}; zones: {', '.join(sorted(zones)) or 'none'}); "
            "lower cluster.zones (at least 2), choose other instance types or another orgmail:region")
    return fit[:count]


def _pick(zones: list[str], index: int) -> str:
    return zones[index]


@dataclass(frozen=True)
class ClusterNetworkArgs:
    stack: str
    region: str
    zones: int  # cluster.zones
    instance_types: tuple[str, ...]  # every zone chosen offers all of them


def cluster_network_args(settings: Settings) -> ClusterNetworkArgs:
    c = settings.cluster
    assert c is not None
    types = tuple(sorted({c.edge_instance_type, c.shard_instance_type, TIERS[settings.tier].relay_instance_type}))
    return ClusterNetworkArgs(stack=settings.stack, region=settings.region, zones=c.zones, instance_types=types)


class ClusterNetwork(pulumi.ComponentResource):
    """The cluster's VPC over `cluster.zones` zones: per zone a load-balancer, a host and a private subnet."""

    vpc_id: pulumi.Output[str]
    zones: list[pulumi.Output[str]]
    lb_subnet_ids: list[pulumi.Output[str]]
    host_subnet_ids: list[pulumi.Output[str]]
    private_subnet_ids: list[pulumi.Output[str]]
    lb_cidrs: tuple[str, ...]
    internet_ready: list[pulumi.Resource]

    def __init__(self, name: str, args: ClusterNetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("orgmail:index:ClusterNetwork", name, None, opts)
        count, stack, region = args.zones, args.stack, args.region
        child = pulumi.ResourceOptions(parent=self)
        invoke = pulumi.InvokeOptions(parent=self)
        tags = {"Name": f"orgmail-{stack}", "orgmail:stack": stack}
        types = args.instance_types
        chosen = zone_offerings(types, invoke).apply(lambda z: choose_zones(z[0], z[1], types, region, count))
        vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=VPC_CIDR, assign_generated_ipv6_cidr_block=True,
                          enable_dns_support=True, enable_dns_hostnames=True, tags=tags, opts=child)
        igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=tags, opts=child)
        public = aws.ec2.RouteTable(
            f"{name}-routes", vpc_id=vpc.id, tags=tags, opts=child,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=igw.id),
                    aws.ec2.RouteTableRouteArgs(ipv6_cidr_block="::/0", gateway_id=igw.id)])
        # The directory's subnets: the VPC's local route only (no internet route at all).
        private = aws.ec2.RouteTable(f"{name}-private-routes", vpc_id=vpc.id,
                                     tags={**tags, "Name": f"orgmail-{stack} private"}, opts=child)
        self.zones, self.lb_subnet_ids, self.host_subnet_ids, self.private_subnet_ids = [], [], [], []
        self.internet_ready = [igw, public]
        # The zones are chosen once: a later choice must not move a subnet (a shard's volume lives there).
        keep_zone = pulumi.ResourceOptions(parent=self, ignore_changes=["availabilityZone"])
        for n in range(1, count + 1):
            zone = chosen.apply(functools.partial(_pick, index=n - 1))
            self.zones.append(zone)
            lb = aws.ec2.Subnet(f"{name}-lb{n}", vpc_id=vpc.id, cidr_block=lb_subnet_cidr(n), availability_zone=zone,
                                map_public_ip_on_launch=False,
                                tags={**tags, "Name": f"orgmail-{stack} load balancer {n}"}, opts=keep_zone)
            hosts = aws.ec2.Subnet(
                f"{name}-public{n}", vpc_id=vpc.id, cidr_block=host_subnet_cidr(n), availability_zone=zone,
                ipv6_cidr_block=vpc.ipv6_cidr_block.apply(functools.partial(nth_ipv6_subnet, n=n)),
                assign_ipv6_address_on_creation=True, map_public_ip_on_launch=False,
                tags={**tags, "Name": f"orgmail-{stack} hosts {n}"}, opts=keep_zone)
            inner = aws.ec2.Subnet(f"{name}-private{n}", vpc_id=vpc.id, cidr_block=private_subnet_cidr(n),
                                   availability_zone=zone, map_public_ip_on_launch=False,
                                   tags={**tags, "Name": f"orgmail-{stack} private {n}"}, opts=keep_zone)
            for kind, subnet, table in (("lb", lb, public), ("public", hosts, public), ("private", inner, private)):
                association = aws.ec2.RouteTableAssociation(f"{name}-{kind}{n}-routes", subnet_id=subnet.id,
                                                            route_table_id=table.id, opts=child)
                if kind != "private":
                    self.internet_ready.append(association)
            self.lb_subnet_ids.append(lb.id)
            self.host_subnet_ids.append(hosts.id)
            self.private_subnet_ids.append(inner.id)
        self.vpc_id = vpc.id
        self.lb_cidrs = tuple(lb_subnet_cidr(n) for n in range(1, count + 1))
        self.register_outputs({"vpcId": vpc.id})
