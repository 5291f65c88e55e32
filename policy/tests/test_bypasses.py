"""Ways around the pack that passed before issue 16 item 9; each must now be refused.

Every variant starts from an example stack's real resources and changes or adds one thing, so the
rest of the stack stays known-good (test_policies checks the untouched stacks pass).
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from conftest import load_stack, of_type, violations

INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
SG_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
SG = "aws:ec2/securityGroup:SecurityGroup"
DEFAULT_SG = "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup"
INSTANCE = "aws:ec2/instance:Instance"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
LIFECYCLE = "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration"
BUCKET = "aws:s3/bucket:Bucket"


def _ssh_rule(resources: list[dict[str, Any]], v6: bool = False) -> dict[str, Any]:
    key = "cidrIpv6" if v6 else "cidrIpv4"
    return next(r for r in of_type(resources, INGRESS_RULE) if r["props"]["fromPort"] == 22 and key in r["props"])


def _added(resources: list[dict[str, Any]], type_: str, name: str, props: dict[str, Any],
           **extra: Any) -> dict[str, Any]:
    resource = {"type": type_, "name": name, "urn": f"urn:pulumi:large::orgmail::{type_}::{name}", "protect": False,
                "props": props, **extra}
    resources.append(resource)
    return resource


def _names(found: list[tuple[str, str]]) -> set[str]:
    return {name for name, _ in found}


# --- SSH from networks wider than admin.sshCidrs may be -------------------------------------------------------

@pytest.mark.parametrize("v6,halves", [(False, ("0.0.0.0/1", "128.0.0.0/1")), (True, ("::/1", "8000::/1"))])
def test_ssh_from_the_world_in_two_halves_is_caught(v6: bool, halves: tuple[str, str]) -> None:
    resources = load_stack("large")  # the large example allows SSH from an office network
    key = "cidrIpv6" if v6 else "cidrIpv4"
    rule = _ssh_rule(resources, v6)
    rule["props"][key] = halves[0]
    other = copy.deepcopy(rule)
    other.update(name=rule["name"] + "-2", urn=rule["urn"] + "-2")
    other["props"][key] = halves[1]
    resources.append(other)
    messages = [m for _, m in violations(resources, "no-ssh-from-world")]
    limit = "/16" if v6 else "/8"
    assert messages == [f"{r['name']}: SSH (port 22) is open to {c}, wider than {limit}; allow it from "
                        "admin.sshCidrs only, or use SSM Session Manager"
                        for r, c in ((rule, halves[0]), (other, halves[1]))]
    assert "mail-ports-only" in _names(violations(resources))


def _shapes(cidr: str, protocol: str, lo: int, hi: int) -> list[tuple[str, dict[str, Any]]]:
    """The same ingress in every resource shape that can carry one."""
    v6 = ":" in cidr
    inline = {"protocol": protocol, "fromPort": lo, "toPort": hi,
              ("ipv6CidrBlocks" if v6 else "cidrBlocks"): [cidr]}
    return [
        (INGRESS_RULE, {"ipProtocol": protocol, "fromPort": lo, "toPort": hi, ("cidrIpv6" if v6 else "cidrIpv4"): cidr,
                        "securityGroupId": "sg-1"}),
        (SG_RULE, {"type": "ingress", "securityGroupId": "sg-1", **inline}),
        (SG, {"description": "extra", "ingress": [inline]}),
        (DEFAULT_SG, {"vpcId": "vpc-1", "ingress": [inline]}),
    ]


@pytest.mark.parametrize("shape", range(4), ids=["vpc-ingress-rule", "sg-rule", "sg-inline", "default-sg-inline"])
@pytest.mark.parametrize("cidr,protocol,lo,hi", [
    ("10.0.0.0/7", "tcp", 22, 22),
    ("2001:db8::/15", "tcp", 22, 22),
    ("0.0.0.0/0", "TCP", 22, 22),       # upper case
    ("::/0", " Tcp ", 22, 22),
    ("0.0.0.0/0", "6", 20, 30),        # a range containing 22, by protocol number
    ("64.0.0.0/2", "-1", 0, 0),        # all traffic
    ("::/0", "all", 0, 0),
    ("0.0.0.0/0", "tcp", None, None),  # no ports given: taken as every port
    ("not-a-cidr", "tcp", 22, 22),     # what cannot be read is refused, not ignored
])
def test_ssh_from_a_wide_network_is_caught_in_every_shape(shape: int, cidr: str, protocol: str,
                                                          lo: int | None, hi: int | None) -> None:
    resources = load_stack("dev")
    type_, props = _shapes(cidr, protocol, lo, hi)[shape]  # type: ignore[arg-type]
    added = _added(resources, type_, "extra", props)
    found = violations(resources, "no-ssh-from-world")
    assert len(found) == 1 and found[0][1].startswith(f"{added['name']}: SSH (port 22) is open to {cidr}")


@pytest.mark.parametrize("shape", range(4), ids=["vpc-ingress-rule", "sg-rule", "sg-inline", "default-sg-inline"])
@pytest.mark.parametrize("cidr", ["10.0.0.0/8", "2001:db8::/16"])
def test_ssh_from_the_widest_allowed_network_passes(shape: int, cidr: str) -> None:
    resources = load_stack("dev")
    type_, props = _shapes(cidr, "tcp", 22, 22)[shape]
    _added(resources, type_, "extra", props)
    assert violations(resources, "no-ssh-from-world") == []
    if type_ != DEFAULT_SG:
        assert violations(resources, "mail-ports-only") == []


def test_ssh_from_every_public_network_in_allowed_pieces_is_caught() -> None:
    """Each /8 is as wide as admin.sshCidrs allows; together they are the whole internet."""
    resources = load_stack("dev")
    for i in range(256):
        _added(resources, INGRESS_RULE, f"ssh-{i}", {"ipProtocol": "tcp", "fromPort": 22, "toPort": 22,
                                                     "cidrIpv4": f"{i}.0.0.0/8", "securityGroupId": "sg-1"})
    assert violations(resources, "no-ssh-from-world") == []
    assert [m for _, m in violations(resources, "ssh-not-from-everywhere")] == [
        "together, the stack's ingress rules open SSH (port 22) to every public IPv4 address "
        "(256 networks); allow it from admin.sshCidrs only, or use SSM Session Manager"]


def test_leaving_out_private_networks_does_not_help() -> None:
    resources = load_stack("dev")
    private = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")]
    pieces = [ipaddress.ip_network(f"{i}.0.0.0/8") for i in range(256)]
    for i, net in enumerate(p for p in pieces if not any(p.subnet_of(x) for x in private)):  # type: ignore[arg-type]
        _added(resources, SG_RULE, f"ssh-{i}", {"type": "ingress", "protocol": "tcp", "fromPort": 22, "toPort": 22,
                                                "cidrBlocks": [str(net)], "securityGroupId": "sg-1"})
    assert len(violations(resources, "ssh-not-from-everywhere")) == 1


def test_missing_one_public_network_is_not_everywhere() -> None:
    resources = load_stack("dev")
    for i in [*range(0, 8), *range(9, 256)]:  # all but 8.0.0.0/8
        _added(resources, INGRESS_RULE, f"ssh-{i}", {"ipProtocol": "tcp", "fromPort": 22, "toPort": 22,
                                                     "cidrIpv4": f"{i}.0.0.0/8", "securityGroupId": "sg-1"})
    assert violations(resources, "ssh-not-from-everywhere") == []


def test_ssh_from_every_public_ipv6_network_is_caught() -> None:
    resources = load_stack("dev")
    for i, cidr in enumerate(("2000::/4", "3000::/4")):
        _added(resources, INGRESS_RULE, f"ssh-{i}", {"ipProtocol": "tcp", "fromPort": 22, "toPort": 22,
                                                     "cidrIpv6": cidr, "securityGroupId": "sg-1"})
    assert [m for _, m in violations(resources, "ssh-not-from-everywhere")] == [
        "together, the stack's ingress rules open SSH (port 22) to every public IPv6 address "
        "(2 networks); allow it from admin.sshCidrs only, or use SSM Session Manager"]


def test_example_stacks_open_ssh_from_their_admin_networks_only() -> None:
    for stack in ("dev", "large"):
        assert violations(load_stack(stack), "ssh-not-from-everywhere") == []


# --- protocol names and numbers ---------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["TCP", "Tcp", "6", 6])
def test_mail_port_with_any_spelling_of_tcp_passes(protocol: str | int) -> None:
    resources = load_stack("dev")
    next(r for r in of_type(resources, INGRESS_RULE) if r["props"]["fromPort"] == 25)["props"]["ipProtocol"] = protocol
    assert violations(resources) == []


@pytest.mark.parametrize("protocol", ["UDP", "17", "132", "ALL"])
def test_mail_port_over_another_protocol_is_caught(protocol: str) -> None:
    resources = load_stack("dev")
    next(r for r in of_type(resources, INGRESS_RULE) if r["props"]["fromPort"] == 25)["props"]["ipProtocol"] = protocol
    assert _names(violations(resources)) >= {"mail-ports-only"}


# --- the default security group ---------------------------------------------------------------------------

def test_default_security_group_with_inline_ingress_is_caught() -> None:
    resources = load_stack("dev")
    _added(resources, DEFAULT_SG, "default-sg", {"vpcId": "vpc-1", "ingress": [
        {"protocol": "tcp", "fromPort": 25, "toPort": 25, "cidrBlocks": ["0.0.0.0/0"]}]})
    assert violations(resources) == [
        ("default-security-group-closed", "default-sg: the VPC's default security group must have no ingress "
         "(got tcp 25-25 from 0.0.0.0/0); open mail ports in the stack's own security group")]


def test_default_security_group_self_reference_is_caught() -> None:
    resources = load_stack("dev")
    _added(resources, DEFAULT_SG, "default-sg", {"vpcId": "vpc-1", "ingress": [
        {"protocol": "-1", "fromPort": 0, "toPort": 0, "self": True}]})
    assert _names(violations(resources)) == {"default-security-group-closed", "mail-ports-only"}


def test_default_security_group_without_ingress_passes() -> None:
    resources = load_stack("dev")
    _added(resources, DEFAULT_SG, "default-sg", {"vpcId": "vpc-1", "ingress": [], "egress": []})
    assert violations(resources) == []


def test_rule_added_to_the_default_security_group_is_caught() -> None:
    resources = load_stack("dev")
    default = _added(resources, DEFAULT_SG, "default-sg", {"vpcId": "vpc-1"})
    _added(resources, INGRESS_RULE, "into-default", {"ipProtocol": "tcp", "fromPort": 25, "toPort": 25,
                                                     "cidrIpv4": "0.0.0.0/0", "securityGroupId": "sg-default"},
           propertyDependencies={"securityGroupId": [default["urn"]]})
    vpc = of_type(resources, "aws:ec2/vpc:Vpc")[0]
    _added(resources, SG_RULE, "into-vpc-default", {"type": "ingress", "protocol": "tcp", "fromPort": 25,
                                                    "toPort": 25, "cidrBlocks": ["0.0.0.0/0"],
                                                    "securityGroupId": "sg-default"},
           propertyDependencies={"securityGroupId": [vpc["urn"]]})  # vpc.default_security_group_id
    assert [m for _, m in violations(resources, "default-security-group-closed")] == [
        "into-default: the VPC's default security group must have no ingress (got tcp 25-25 from 0.0.0.0/0); "
        "open mail ports in the stack's own security group",
        "into-vpc-default: the VPC's default security group must have no ingress (got tcp 25-25 from 0.0.0.0/0); "
        "open mail ports in the stack's own security group"]


# --- launch templates -------------------------------------------------------------------------------------

def _template(**props: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"imageId": "ami-1", "instanceType": "t4g.small",
                            "metadataOptions": {"httpEndpoint": "enabled", "httpTokens": "required"},
                            "blockDeviceMappings": [{"deviceName": "/dev/xvda",
                                                     "ebs": {"encrypted": "true", "volumeSize": 30}}]}
    base.update(props)
    return base


def test_safe_launch_template_passes() -> None:
    resources = load_stack("dev")
    _added(resources, LAUNCH_TEMPLATE, "mail-template", _template())
    assert violations(resources) == []


@pytest.mark.parametrize("metadata", [{"httpTokens": "optional"}, {"httpEndpoint": "enabled"}, None])
def test_imdsv1_through_a_launch_template_is_caught(metadata: dict[str, str] | None) -> None:
    resources = load_stack("dev")
    _added(resources, LAUNCH_TEMPLATE, "mail-template", _template(metadataOptions=metadata))
    got = (metadata or {}).get("httpTokens")
    assert violations(resources) == [
        ("imdsv2-required", f"mail-template: launch template metadata must require IMDSv2 tokens "
         f"(metadataOptions.httpTokens = \"required\", got {got!r})")]


@pytest.mark.parametrize("ebs", [{"volumeSize": 30}, {"encrypted": "false"}, {"encrypted": False}])
def test_unencrypted_disk_through_a_launch_template_is_caught(ebs: dict[str, Any]) -> None:
    resources = load_stack("dev")
    _added(resources, LAUNCH_TEMPLATE, "mail-template", _template(blockDeviceMappings=[
        {"deviceName": "/dev/xvda", "ebs": {"encrypted": "true"}}, {"deviceName": "/dev/sdf", "ebs": ebs},
        {"deviceName": "/dev/sdg", "virtualName": "ephemeral0"}]))
    assert violations(resources) == [
        ("ebs-encrypted", "mail-template: launch template block device /dev/sdf must be encrypted "
         "(ebs.encrypted = \"true\")")]


# --- the backup bucket's lifecycle ------------------------------------------------------------------------

def _lifecycle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return of_type(resources, LIFECYCLE)[0]


def test_example_lifecycle_expires_only_noncurrent_versions() -> None:
    rules = _lifecycle(load_stack("dev"))["props"]["rules"]
    assert rules and all("noncurrentVersionExpiration" in r and "expiration" not in r for r in rules)
    assert violations(load_stack("dev"), "backup-lifecycle-keeps-current") == []


@pytest.mark.parametrize("change,what", [
    ({"expiration": {"days": 90}}, "expires current objects (expiration.days 90)"),
    ({"expiration": {"date": "2030-01-01T00:00:00Z"}}, "expires current objects (expiration.date 2030-01-01T00:00:00Z)"),
    ({"transitions": [{"days": 30, "storageClass": "GLACIER"}]}, "moves current objects to GLACIER"),
    ({"transitions": [{"days": 0, "storageClass": "DEEP_ARCHIVE"}],
      "filter": {"prefix": "data/"}}, "moves current objects to DEEP_ARCHIVE"),
])
def test_lifecycle_that_expires_or_moves_current_objects_is_caught(change: dict[str, Any], what: str) -> None:
    resources = load_stack("dev")
    lifecycle = _lifecycle(resources)
    lifecycle["props"]["rules"][0].update(change)
    rule_id = lifecycle["props"]["rules"][0]["id"]
    assert violations(resources) == [
        ("backup-lifecycle-keeps-current", f"{lifecycle['name']}: lifecycle rule {rule_id!r} {what}; restic's "
         "repository breaks when a current object goes away or cannot be read at once: expire noncurrent "
         "versions only")]


def test_lifecycle_may_clean_up_delete_markers_and_noncurrent_versions() -> None:
    resources = load_stack("dev")
    _lifecycle(resources)["props"]["rules"].append({
        "id": "tidy", "status": "Enabled", "filter": {}, "expiration": {"expiredObjectDeleteMarker": True},
        "noncurrentVersionTransitions": [{"noncurrentDays": 1, "storageClass": "GLACIER"}]})
    assert violations(resources) == []


def test_disabled_lifecycle_rule_is_not_counted() -> None:
    resources = load_stack("dev")
    _lifecycle(resources)["props"]["rules"].append({"id": "off", "status": "Disabled", "expiration": {"days": 1}})
    assert violations(resources) == []


@pytest.mark.parametrize("bucket_type", [BUCKET, "aws:s3/bucketV2:BucketV2"])
@pytest.mark.parametrize("rule,what", [
    ({"enabled": True, "expiration": {"days": 30}}, "expires current objects (expiration.days 30)"),
    ({"enabled": True, "expirations": [{"days": 30}]}, "expires current objects (expiration.days 30)"),
    ({"enabled": True, "transitions": [{"days": 30, "storageClass": "STANDARD_IA"}]},
     "moves current objects to STANDARD_IA"),
])
def test_inline_lifecycle_rules_on_the_bucket_are_checked(bucket_type: str, rule: dict[str, Any], what: str) -> None:
    resources = load_stack("dev")
    bucket = of_type(resources, BUCKET)[0]
    bucket["type"] = bucket_type
    bucket["props"]["lifecycleRules"] = [{"enabled": True, "noncurrentVersionExpiration": {"days": 30}},
                                         {"id": "old", **rule}]
    assert [(n, m) for n, m in violations(resources) if n == "backup-lifecycle-keeps-current"] == [
        ("backup-lifecycle-keeps-current", f"{bucket['name']}: lifecycle rule 'old' {what}; restic's "
         "repository breaks when a current object goes away or cannot be read at once: expire noncurrent "
         "versions only")]


def test_lifecycle_v2_resource_is_checked() -> None:
    resources = load_stack("dev")
    lifecycle = _lifecycle(resources)
    lifecycle["type"] = "aws:s3/bucketLifecycleConfigurationV2:BucketLifecycleConfigurationV2"
    lifecycle["props"]["rules"][0]["expiration"] = {"days": 1}
    assert _names(violations(resources)) == {"backup-lifecycle-keeps-current"}


@pytest.mark.parametrize("type_,kind", [("aws:ec2/spotInstanceRequest:SpotInstanceRequest", "spot instance"),
                                        ("aws:ec2/launchConfiguration:LaunchConfiguration", "launch configuration")])
def test_other_instance_launchers_are_checked(type_: str, kind: str) -> None:
    resources = load_stack("dev")
    _added(resources, type_, "launcher", {"metadataOptions": {"httpTokens": "optional"},
                                          "rootBlockDevice": {"encrypted": False}})
    assert violations(resources) == [
        ("imdsv2-required", f"launcher: {kind} metadata must require IMDSv2 tokens "
         "(metadataOptions.httpTokens = \"required\", got 'optional')"),
        ("ebs-encrypted", "launcher: root block device must be encrypted (rootBlockDevice.encrypted = true)")]
