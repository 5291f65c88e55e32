"""Network: the stack's own VPC with one public subnet (IPv4 + IPv6), or given VPC/subnet ids."""

from __future__ import annotations

import ipaddress

import pulumi
import pulumi_aws as aws

from components.settings import Settings

VPC_CIDR = "10.42.0.0/16"
SUBNET_CIDR = "10.42.1.0/24"


def first_ipv6_subnet(vpc_block: str) -> str:
    """The first /64 of the VPC's Amazon-provided /56."""
    return str(next(ipaddress.ip_network(vpc_block).subnets(new_prefix=64)))


class Network(pulumi.ComponentResource):
    vpc_id: pulumi.Output[str]
    subnet_id: pulumi.Output[str]
    availability_zone: pulumi.Output[str]

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
        else:
            zones = aws.get_availability_zones_output(state="available", opts=invoke)
            az = zones.names.apply(lambda names: names[0])
            vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=VPC_CIDR, assign_generated_ipv6_cidr_block=True,
                              enable_dns_support=True, enable_dns_hostnames=True, tags=tags, opts=child)
            igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=tags, opts=child)
            subnet_res = aws.ec2.Subnet(
                f"{name}-public", vpc_id=vpc.id, cidr_block=SUBNET_CIDR, availability_zone=az,
                ipv6_cidr_block=vpc.ipv6_cidr_block.apply(first_ipv6_subnet),
                assign_ipv6_address_on_creation=True,
                # Hosts get Elastic IPs; nothing else in the subnet should be public by accident.
                map_public_ip_on_launch=False,
                tags=tags, opts=child)
            routes = aws.ec2.RouteTable(
                f"{name}-routes", vpc_id=vpc.id, tags=tags, opts=child,
                routes=[
                    aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=igw.id),
                    aws.ec2.RouteTableRouteArgs(ipv6_cidr_block="::/0", gateway_id=igw.id),
                ])
            aws.ec2.RouteTableAssociation(f"{name}-public-routes", subnet_id=subnet_res.id,
                                          route_table_id=routes.id, opts=child)
            self.vpc_id = vpc.id
            self.subnet_id = subnet_res.id
            self.availability_zone = subnet_res.availability_zone

        self.register_outputs({"vpcId": self.vpc_id, "subnetId": self.subnet_id})
