"""Network: the stack's own VPC with one public subnet (IPv4 + IPv6), or given VPC/subnet ids."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

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
            zones = aws.get_availability_zones_output(
                state="available", opts=invoke,
                filters=[aws.GetAvailabilityZonesFilterArgs(name="opt-in-status", values=["opt-in-not-required"]),
                         aws.GetAvailabilityZonesFilterArgs(name="zone-type", values=["availability-zone"])])
            offerings = aws.ec2.get_instance_type_offerings_output(
                location_type="availability-zone", opts=invoke,
                filters=[aws.ec2.GetInstanceTypeOfferingsFilterArgs(name="instance-type", values=list(types))])
            az = pulumi.Output.all(zones.names, offerings.instance_types, offerings.locations).apply(
                lambda a: choose_zone(a[0], list(zip(a[1], a[2], strict=True)), types, settings.region))
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
