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

from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from components.tiers import INSTANCE_SPECS
from components.userdata import user_data_base64

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
    boot_dependencies: list[pulumi.Resource] = field(default_factory=list)


def edge_user_data(args: EdgeArgs) -> str:
    """The edge's cloud-init user-data: rendered by the edge role (not yet built).

    A placeholder until then: it names the edge's settings and installs nothing. The lead replaces it with
    the edge's bootstrap (Postfix with postscreen and PROXY v2 from args.lb_cidrs, rspamd, Dovecot proxy from
    the directory, the queue drain on Terminating:Wait), under EC2's 16 KB like every host's.
    """
    return "\n".join([
        "#cloud-config",
        "# orgmail edge: placeholder user-data (the edge role is not yet built)",
        "write_files:",
        "  - path: /etc/orgmail/edge.env",
        "    permissions: '0644'",
        "    content: |",
        f"      STACK={args.namespace}",
        f"      REGION={args.region}",
        f"      SSM_PATH={args.ssm_path}/edge",
        f"      MAIL_HOST={args.mail_host}",
        f"      LB_NETWORKS={' '.join(args.lb_cidrs)}",
        f"      AUTOSCALING_GROUP={group_name(args.namespace)}",
        f"      DRAIN_HOOK={DRAIN_HOOK}",
        "",
    ])


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
