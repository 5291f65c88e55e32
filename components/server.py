"""Server: one mail host: instance, Elastic IP and its protected volume (mailbox role: the mail data and
Postfix's queue; relay role: Postfix's queue)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pulumi
import pulumi_aws as aws
import yaml

from components.backup import snapshot_tag
from components.names import aliases
from components.parameters import stored_in_parts
from components.settings import Settings
from components.tiers import TIERS
from components.userdata import HostConfig, bundle_parameter, render_bundle, render_user_data, user_data_base64

DEBIAN_OWNER = "136693071363"  # Debian's official AWS account
DEBIAN_13_NAME = "debian-13-amd64-*"
DATA_DEVICE = "/dev/sdf"  # a name EC2 wants; the host finds the volume by its id, not by this
# Minutes between the automatic reboots of a stack's hosts (mailbox host first, then each relay), so
# that one of them always answers for the domain's MX.
REBOOT_STAGGER_MINUTES = 30
# The longest values an EBS volume id and an S3 bucket name take: the bundle's size at plan time.
PLACEHOLDER_VOLUME_ID = "vol-" + "0" * 17
PLACEHOLDER_BUCKET = "b" * 63


@dataclass(frozen=True)
class HostPlacement:
    subnet_id: pulumi.Input[str]
    availability_zone: pulumi.Input[str]
    security_group_id: pulumi.Input[str]
    instance_profile: pulumi.Input[str]
    ami_id: pulumi.Input[str]  # the stack's own copy of the Debian image (debian_image)
    backup_bucket: pulumi.Input[str] | None = None  # the restic repository's bucket (mailbox host)
    # Gateway and routes: the address and the first boot need them.
    internet_ready: list[pulumi.Resource] = field(default_factory=list)
    # What the first boot reads: the role's policy and the SSM parameters.
    boot_dependencies: list[pulumi.Resource] = field(default_factory=list)


@dataclass(frozen=True)
class HostSpec:
    """A host of a cluster role (a shard, an outbound relay): what the tier table and the single-host roles'
    templates do not say. Its user-data comes from its role's module, from the id of its volume."""

    instance_type: str
    burstable: bool
    volume_gb: int
    keeps_mail: bool  # a mail-data volume (snapshotted daily); else a queue volume (never snapshotted)
    user_data: Callable[[str], str]  # the volume's id -> the host's user-data (text)
    bundle: str = ""  # its role's bundle (the same for every host of the role), whose SHA-256 the user-data names
    volume_iops: int | None = None  # None: gp3's free 3000
    volume_throughput: int | None = None  # None: gp3's free 125 MiB/s


def lookup_debian_ami(parent: pulumi.Resource) -> pulumi.Output[str]:
    ami = aws.ec2.get_ami_output(
        owners=[DEBIAN_OWNER], most_recent=True,
        filters=[
            aws.ec2.GetAmiFilterArgs(name="name", values=[DEBIAN_13_NAME]),
            aws.ec2.GetAmiFilterArgs(name="architecture", values=["x86_64"]),
            aws.ec2.GetAmiFilterArgs(name="virtualization-type", values=["hvm"]),
            aws.ec2.GetAmiFilterArgs(name="root-device-type", values=["ebs"]),
        ],
        opts=pulumi.InvokeOptions(parent=parent))
    return ami.id


def image_name(stack: str, source_ami: str) -> str:
    return f"orgmail-{stack}-{source_ami}"


def debian_image(parent: pulumi.Resource, settings: Settings) -> aws.ec2.AmiCopy:
    """The stack's private copy of the Debian 13 AMI every host boots from.

    Debian deregisters old AMIs; a replacement (every user-data change) onto an image id held in
    state would then fail. A copy in the account lives as long as the stack. Looked up (no
    orgmail:amiId): later Debian releases are ignored, so the hosts are never replaced by surprise;
    to move on, set orgmail:amiId or `pulumi up --replace` the copy. Pinned: a new id makes a new copy.
    """
    pin = pinned_image(settings)
    pinned = pin is not None
    source: pulumi.Output[str] = pulumi.Output.from_input(pin) if pin else lookup_debian_ami(parent)
    return aws.ec2.AmiCopy(
        "debian-13", name=source.apply(lambda ami: image_name(settings.namespace, ami)),
        description=f"orgmail {settings.stack}: copy of Debian 13 for its mail hosts",
        source_ami_id=source, source_ami_region=settings.region, encrypted=True,
        tags={"Name": f"orgmail-{settings.stack} Debian 13", "orgmail:stack": settings.stack},
        opts=pulumi.ResourceOptions(parent=parent, ignore_changes=[] if pinned else ["sourceAmiId", "name"]))


def staggered_reboot_time(base: str, index: int) -> str:
    """upgrades.rebootTime (HH:MM, UTC) for host number `index` of the stack (0: the mailbox host)."""
    hours, minutes = (int(x) for x in base.split(":"))
    at = (hours * 60 + minutes + index * REBOOT_STAGGER_MINUTES) % (24 * 60)
    return f"{at // 60:02d}:{at % 60:02d}"


def host_config(settings: Settings, hostname: str, role: str, data_volume_id: str | None,
                backup_bucket: str | None = None) -> HostConfig:
    """What a host's user-data is rendered from. Every setting read here replaces the host when it
    changes (replacing_settings); day-2 settings belong in components.secrets.host_config."""
    return HostConfig(
        stack=settings.namespace, role=role, hostname=hostname, mail_host=settings.mail_host,
        region=settings.region, ssm_path=settings.ssm_path, data_volume_id=data_volume_id,
        backup_bucket=backup_bucket,
    )


def pinned_image(settings: Settings) -> str | None:
    """orgmail:amiId: a new pinned id makes a new image copy, so it replaces every host."""
    return settings.ami_id


class _Recorder:
    """Stands in for Settings and records which settings a function reads, with their values
    (properties run against the recorder, so the fields behind them are recorded)."""

    def __init__(self, target: object, prefix: str, read: dict[str, object]) -> None:
        self._target, self._prefix, self._read = target, prefix, read

    def __getattr__(self, name: str) -> object:
        attribute = getattr(type(self._target), name, None)
        if isinstance(attribute, property) and attribute.fget is not None:
            return attribute.fget(self)
        value = getattr(self._target, name)
        dotted = f"{self._prefix}{name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return _Recorder(value, f"{dotted}.", self._read)
        self._read[dotted] = value
        return value


def _setting_name(attribute: str) -> str:
    """Settings attribute (mail_host, admin.ssh_cidrs) -> stack setting (orgmail:mailHost, ...)."""
    if attribute == "stack":
        return "the stack name"
    if attribute == "project":
        return "the Pulumi project name"
    camel = [re.sub(r"_([a-z])", lambda m: m.group(1).upper(), part) for part in attribute.split(".")]
    return "orgmail:" + ".".join(camel)


def _shown(value: object) -> object:
    if isinstance(value, tuple):
        return [_shown(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return getattr(value, "name", str(value))  # a Domain: its name (its zone id replaces nothing)
    return value


def replacing_values(settings: Settings) -> dict[str, object]:
    """The stack settings whose change replaces hosts, with their values: every one that the user-data
    of a host (its name among them) or the image is made from. Found by running that code on a
    recording stand-in for the settings, not listed by hand."""
    read: dict[str, object] = {}
    recorder = cast(Settings, _Recorder(settings, "", read))
    for hostname in recorder.mx_hosts:
        role = "mailbox" if hostname == recorder.mail_host else "relay"
        host_config(recorder, hostname, role, "vol-0", "bucket")
    pinned_image(recorder)
    return dict(sorted((_setting_name(a), _shown(v)) for a, v in read.items()))


def replacing_settings(settings: Settings | None = None) -> tuple[str, ...]:
    """The names of replacing_values (of the large example stack when none is given)."""
    from components.settings import load_settings

    if settings is None:
        example = Path(__file__).resolve().parent.parent / "Pulumi.large.yaml"
        config = yaml.safe_load(example.read_text())["config"]
        settings = load_settings({k.split(":", 1)[1]: v for k, v in config.items()}, "large")
    return tuple(sorted(replacing_values(settings)))


class MailHost(pulumi.ComponentResource):
    public_ip: pulumi.Output[str]
    private_ip: pulumi.Output[str]
    allocation_id: pulumi.Output[str]
    instance_id: pulumi.Output[str]
    data_volume_id: pulumi.Output[str]
    ready: pulumi.Resource  # the last step of making (or replacing) the instance: its volume attached

    def __init__(self, name: str, settings: Settings, hostname: str, role: str, placement: HostPlacement,
                 opts: pulumi.ResourceOptions | None = None, after: MailHost | None = None,
                 legacy_name: str | None = None, spec: HostSpec | None = None) -> None:
        # `name` is the host's role (mail, mx2, ...); `legacy_name` what earlier versions named its
        # resources after (the first label of its host name): aliases keep their state.
        def was(suffix: str) -> list[pulumi.Alias | str] | None:
            return aliases(f"{legacy_name}{suffix}" if legacy_name else None, new=f"{name}{suffix}")

        super().__init__("orgmail:index:MailHost", name, None,
                         pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(aliases=was(""))))
        tier = TIERS[settings.tier]
        instance_type = tier.instance_type if role == "mailbox" else tier.relay_instance_type
        burstable = (tier.spec if role == "mailbox" else tier.relay_spec).burstable
        if spec is not None:
            instance_type, burstable = spec.instance_type, spec.burstable
        tags = {"Name": hostname, "orgmail:stack": settings.stack, "orgmail:role": role}

        # The address is the host's mail reputation and PTR: it outlives any instance.
        eip = aws.ec2.Eip(f"{name}-ip", domain="vpc", tags=tags,
                          opts=pulumi.ResourceOptions(parent=self, protect=True, aliases=was("-ip")))

        # Postfix's queue lives on this volume too, so mail accepted but not yet delivered (waiting for
        # a remote server, AWS's port-25 block, or, on a relay, the mailbox host) outlives the instance.
        bundle: list[pulumi.Resource] = []
        if spec is not None:
            # A cluster role: its own sizes and user-data (no bundle until its role renders one).
            kind = "data" if spec.keeps_mail else "queue"
            volume = aws.ebs.Volume(
                f"{name}-{kind}", availability_zone=placement.availability_zone, type="gp3", size=spec.volume_gb,
                iops=spec.volume_iops, throughput=spec.volume_throughput, encrypted=True, final_snapshot=True,
                tags={**tags, **(snapshot_tag(settings) if spec.keeps_mail else {}),
                      "Name": f"{hostname} mail {'data' if spec.keeps_mail else 'queue'}"},
                opts=pulumi.ResourceOptions(parent=self, protect=True))
            user_data = volume.id.apply(spec.user_data)
        elif role == "mailbox":
            volume = aws.ebs.Volume(
                f"{name}-data", availability_zone=placement.availability_zone, type="gp3",
                size=tier.mail_volume_gb, iops=tier.mail_volume_iops, throughput=tier.mail_volume_throughput,
                encrypted=True, final_snapshot=True,
                tags={**tags, **snapshot_tag(settings), "Name": f"{hostname} mail data"},
                opts=pulumi.ResourceOptions(parent=self, protect=True, aliases=was("-data")))
            host = pulumi.Output.all(volume.id, placement.backup_bucket).apply(
                lambda a: host_config(settings, hostname, role, a[0], a[1]))
        else:
            # No snapshot schedule: an old copy of a queue would deliver its mail twice.
            volume = aws.ebs.Volume(
                f"{name}-queue", availability_zone=placement.availability_zone, type="gp3",
                size=tier.relay_queue_volume_gb, encrypted=True, final_snapshot=True,
                tags={**tags, "Name": f"{hostname} mail queue"},
                opts=pulumi.ResourceOptions(parent=self, protect=True, aliases=was("-queue")))
            host = volume.id.apply(lambda v: host_config(settings, hostname, role, v))
        if spec is None:
            user_data = host.apply(render_user_data)
            # The host's files beyond the bootstrap (EC2 allows 16 KB of user-data): its bundle in SSM,
            # which the first boot writes only if its SHA-256 is the one the user-data names. So a changed
            # file still makes a new instance, and a bundle changed behind Pulumi's back configures none.
            bound = host_config(settings, hostname, role, PLACEHOLDER_VOLUME_ID,
                                PLACEHOLDER_BUCKET if placement.backup_bucket is not None else None)
            bundle = [*stored_in_parts(
                f"{name}-bundle", bundle_parameter(bound), host.apply(render_bundle), len(render_bundle(bound)),
                "String", f"host files of {hostname} (its first boot writes them)", {**tags}, self)]

        # The host's own interface carries its address across instance replacements. It is
        # associated once the gateway and routes exist, and the instance boots only after that and
        # after its permissions and parameters: its first boot installs packages over IPv4 and
        # reads SSM.
        interface = aws.ec2.NetworkInterface(
            f"{name}-interface", subnet_id=placement.subnet_id, security_groups=[placement.security_group_id],
            description=f"orgmail {settings.stack}: {role} host interface", tags=tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=placement.internet_ready, aliases=was("-interface")))
        association = aws.ec2.EipAssociation(
            f"{name}-ip-association", allocation_id=eip.allocation_id, network_interface_id=interface.id,
            opts=pulumi.ResourceOptions(parent=self, depends_on=placement.internet_ready,
                                        aliases=was("-ip-association")))

        instance = aws.ec2.Instance(
            f"{name}-instance", ami=placement.ami_id, instance_type=instance_type,
            primary_network_interface=aws.ec2.InstancePrimaryNetworkInterfaceArgs(
                network_interface_id=interface.id, delete_on_termination=False),
            iam_instance_profile=placement.instance_profile,
            user_data_base64=user_data.apply(user_data_base64),
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=1,
                instance_metadata_tags="disabled"),
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_type="gp3", volume_size=tier.root_volume_gb, encrypted=True, delete_on_termination=True),
            # Burstable types in "unlimited" mode bill for surplus CPU credits; mail never needs that.
            credit_specification=aws.ec2.InstanceCreditSpecificationArgs(cpu_credits="standard") if burstable else None,
            tags=tags,
            # cloud-init applies user-data once per instance, so changed user-data means a new instance.
            # The old one goes first: the data volume attaches to one instance at a time, and the new
            # instance's bootstrap waits for it (the volume, address and DNS records stay).
            user_data_replace_on_change=True,
            # Never every host of the stack at once: a host is made, or replaced, only once the host
            # before it has its new instance and volume (Pulumi registers it after that host's steps
            # are done). A bare depends_on changes none of its inputs, so replacing the host before it
            # (delete-before-replace) does not replace this one too. See docs/acme.md.
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True, aliases=was("-instance"),
                                        depends_on=[association, *placement.boot_dependencies, *bundle,
                                                    *([after.ready] if after else [])]))

        self.ready = aws.ec2.VolumeAttachment(
            f"{name}-data-attachment", device_name=DATA_DEVICE, volume_id=volume.id, instance_id=instance.id,
            stop_instance_before_detaching=True,
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True, aliases=was("-data-attachment")))

        self.public_ip = eip.public_ip
        self.private_ip = instance.private_ip
        self.allocation_id = eip.allocation_id
        self.instance_id = instance.id
        self.data_volume_id = volume.id
        self.register_outputs({"publicIp": eip.public_ip, "instanceId": instance.id})
