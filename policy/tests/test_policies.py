"""Every example stack passes every policy; each policy catches a violating variant with a clear message."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import STACKS, load_stack, of_type, violations
from orgmail_policies import INGRESS_RULE, INSTANCE, POLICIES, SG, VOLUME

RECORD = "cloudflare:index/dnsRecord:DnsRecord"


def test_pack_has_the_mandatory_policies() -> None:
    assert {p.name for p in POLICIES} == {
        "no-ssh-from-world", "mail-ports-only", "imdsv2-required", "ebs-encrypted", "mail-data-protected",
        "dns-not-proxied", "backup-bucket-private-versioned", "ssh-not-from-everywhere",
        "default-security-group-closed", "backup-lifecycle-keeps-current", "data-stores-encrypted"}


@pytest.mark.parametrize("stack", STACKS)
def test_example_stack_passes_every_policy(stack: str) -> None:
    resources = load_stack(stack)
    assert of_type(resources, INSTANCE) and of_type(resources, VOLUME) and of_type(resources, RECORD)
    assert violations(resources) == []


def _ingress(resources: list[dict[str, Any]], port: int, v6: bool = False) -> dict[str, Any]:
    key = "cidrIpv6" if v6 else "cidrIpv4"
    return next(r for r in of_type(resources, INGRESS_RULE) if r["props"]["fromPort"] == port and key in r["props"])


@pytest.mark.parametrize("cidr_key,world", [("cidrIpv4", "0.0.0.0/0"), ("cidrIpv6", "::/0")])
def test_ssh_from_the_world_is_caught(cidr_key: str, world: str) -> None:
    resources = load_stack("large")  # the large example allows SSH from an office network
    rule = _ingress(resources, 22, v6=cidr_key == "cidrIpv6")
    rule["props"][cidr_key] = world
    found = violations(resources, "no-ssh-from-world")
    assert found == [("no-ssh-from-world", f"{rule['name']}: SSH (port 22) is open to {world}; "
                      "allow it from admin.sshCidrs only, or use SSM Session Manager")]
    assert any(name == "mail-ports-only" for name, _ in violations(resources))


def test_all_traffic_rule_opens_ssh_too() -> None:
    resources = load_stack("dev")
    rule = _ingress(resources, 25)
    rule["props"].update(ipProtocol="-1", fromPort=0, toPort=0)
    assert [n for n, _ in violations(resources, "no-ssh-from-world")] == ["no-ssh-from-world"]


def test_inline_security_group_ingress_is_checked() -> None:
    resources = load_stack("dev")
    sg = of_type(resources, SG)[0]
    sg["props"]["ingress"] = [{"protocol": "tcp", "fromPort": 3306, "toPort": 3306, "cidrBlocks": ["0.0.0.0/0"]}]
    found = violations(resources, "mail-ports-only")
    assert found and "ingress tcp 3306-3306 from 0.0.0.0/0 is not allowed" in found[0][1]


def test_non_mail_port_is_caught() -> None:
    resources = load_stack("dev")
    rule = _ingress(resources, 993)
    rule["props"].update(fromPort=143, toPort=143)
    found = violations(resources, "mail-ports-only")
    assert found == [("mail-ports-only", f"{rule['name']}: ingress tcp 143-143 from 0.0.0.0/0 is not allowed; "
                      "only TCP 25, 465, 587, 993, 995 (and 22 from admin CIDRs, the ICMP of path MTU "
                      "discovery, and a cluster's own ports from its security groups) may be open")]


@pytest.mark.parametrize(("port", "source"), [(3306, "referencedSecurityGroupId"), (5432, "cidrIpv4"),
                                              (6379, "cidrIpv4")])
def test_a_cluster_port_from_a_network_or_another_port_from_a_group_is_caught(port: int, source: str) -> None:
    """A cluster's own ports (the directory, the edges' store, the shards behind the edges) are open only from
    another of its security groups; from a network, or any other port from a group, is caught."""
    resources = load_stack("isp")
    rule = next(r for r in of_type(resources, INGRESS_RULE) if r["props"]["fromPort"] == 6379)
    group = rule["props"]["referencedSecurityGroupId"]
    rule["props"] = {k: v for k, v in rule["props"].items() if k != "referencedSecurityGroupId"}
    rule["props"].update(fromPort=port, toPort=port, **{source: group if source.startswith("referenced") else "10.0.0.0/8"})
    found = violations(resources, "mail-ports-only")
    assert [name for name, _ in found] == ["mail-ports-only"] and f"tcp {port}-{port}" in found[0][1], found


def _icmp(resources: list[dict[str, Any]], protocol: str) -> dict[str, Any]:
    return next(r for r in of_type(resources, INGRESS_RULE) if r["props"]["ipProtocol"] == protocol)


def test_path_mtu_icmp_is_allowed_and_nothing_wider() -> None:
    resources = load_stack("dev")
    v4, v6 = _icmp(resources, "icmp"), _icmp(resources, "icmpv6")
    assert (v4["props"]["fromPort"], v4["props"]["toPort"], v4["props"]["cidrIpv4"]) == (3, 4, "0.0.0.0/0")
    assert (v6["props"]["fromPort"], v6["props"]["toPort"], v6["props"]["cidrIpv6"]) == (2, 0, "::/0")
    assert violations(resources, "mail-ports-only") == []
    v4["props"]["toPort"] = -1  # every "destination unreachable"
    v6["props"]["fromPort"] = 128  # echo request
    found = violations(resources, "mail-ports-only")
    assert [m.split(" is not allowed")[0] for _, m in found] == [
        f"{v4['name']}: ingress icmp type 3 code -1 from 0.0.0.0/0", f"{v6['name']}: ingress icmpv6 type 128 code 0 from ::/0"]


def test_port_range_is_caught() -> None:
    resources = load_stack("dev")
    rule = _ingress(resources, 25)
    rule["props"]["toPort"] = 995
    assert [n for n, _ in violations(resources, "mail-ports-only")] == ["mail-ports-only"]


def test_ssh_from_admin_cidr_is_allowed() -> None:
    resources = load_stack("medium")
    assert _ingress(resources, 22)["props"]["cidrIpv4"] == "198.51.100.0/24"
    assert violations(resources, "mail-ports-only") == []


@pytest.mark.parametrize("tokens", ["optional", None])
def test_imdsv1_is_caught(tokens: str | None) -> None:
    resources = load_stack("isp-single")
    instance = of_type(resources, INSTANCE)[1]
    if tokens is None:
        del instance["props"]["metadataOptions"]
    else:
        instance["props"]["metadataOptions"]["httpTokens"] = tokens
    found = violations(resources, "imdsv2-required")
    assert found == [("imdsv2-required", f"{instance['name']}: instance metadata must require IMDSv2 tokens "
                      f"(metadataOptions.httpTokens = \"required\", got {tokens!r})")]


def test_unencrypted_volume_is_caught() -> None:
    resources = load_stack("small")
    volume = of_type(resources, VOLUME)[0]
    volume["props"]["encrypted"] = False
    assert violations(resources, "ebs-encrypted") == [
        ("ebs-encrypted", f"{volume['name']}: EBS volume must be encrypted (encrypted = true)")]


@pytest.mark.parametrize(("kind", "key", "value", "message"), [
    ("aws:rds/instance:Instance", "storageEncrypted", False, "RDS storage must be encrypted (storageEncrypted = true)"),
    ("aws:elasticache/replicationGroup:ReplicationGroup", "atRestEncryptionEnabled", False,
     "ElastiCache must be encrypted (atRestEncryptionEnabled = true)"),
    ("aws:elasticache/replicationGroup:ReplicationGroup", "transitEncryptionEnabled", None,
     "ElastiCache must be encrypted (transitEncryptionEnabled = true)"),
    ("aws:elasticache/replicationGroup:ReplicationGroup", "authToken", None,
     "ElastiCache must require an AUTH token (authToken)"),
])
def test_an_unencrypted_directory_or_store_is_caught(kind: str, key: str, value: Any, message: str) -> None:
    resources = load_stack("isp")
    [store] = of_type(resources, kind)
    assert violations(resources, "data-stores-encrypted") == []
    if value is None:
        del store["props"][key]
    else:
        store["props"][key] = value
    assert violations(resources, "data-stores-encrypted") == [("data-stores-encrypted", f"{store['name']}: {message}")]


def test_unencrypted_root_and_extra_device_are_caught() -> None:
    resources = load_stack("large")
    instance = of_type(resources, INSTANCE)[0]
    instance["props"]["rootBlockDevice"]["encrypted"] = False
    instance["props"]["ebsBlockDevices"] = [{"deviceName": "/dev/sdg", "volumeSize": 10}]
    messages = [m for _, m in violations(resources, "ebs-encrypted")]
    assert messages == [f"{instance['name']}: root block device must be encrypted (rootBlockDevice.encrypted = true)",
                        f"{instance['name']}: EBS block device /dev/sdg must be encrypted"]


@pytest.mark.parametrize(("stack", "name"), [("medium", "mail-data"), ("large", "mx2-queue")])
def test_unprotected_volume_holding_mail_is_caught(stack: str, name: str) -> None:
    """The mailbox host's mail-data volume and a relay's queue volume both hold accepted mail."""
    resources = load_stack(stack)
    volume = next(r for r in of_type(resources, VOLUME) if r["name"] == name)
    assert volume["protect"] is True
    volume["protect"] = False
    found = violations(resources, "mail-data-protected")
    assert len(found) == 1 and found[0][1].startswith(f"{name}: this volume holds accepted mail")
    assert "protect=True" in found[0][1]


def test_proxied_record_is_caught() -> None:
    resources = load_stack("dev")
    mx = next(r for r in of_type(resources, RECORD) if r["props"]["type"] == "MX")
    mx["props"]["proxied"] = True
    found = violations(resources, "dns-not-proxied")
    assert len(found) == 1 and found[0][1].startswith(f"{mx['name']}: MX example.org must not be proxied")


def test_only_webmails_tunnel_cname_may_be_proxied() -> None:
    resources = load_stack("medium")
    [tunnel] = [r for r in of_type(resources, RECORD) if r["props"]["type"] == "CNAME" and r["props"]["proxied"]]
    assert tunnel["props"]["content"].endswith(".cfargotunnel.com") and violations(resources, "dns-not-proxied") == []
    tunnel["props"]["content"] = "elsewhere.example.net"
    found = violations(resources, "dns-not-proxied")
    assert len(found) == 1 and found[0][1].startswith(f"{tunnel['name']}: CNAME webmail.medium.example must not")
    tunnel["props"]["content"] = None  # a preview before the tunnel exists
    assert violations(resources, "dns-not-proxied") == []
    tunnel["name"] = "other-record"
    assert len(violations(resources, "dns-not-proxied")) == 1


def _with_backup_bucket(resources: list[dict[str, Any]], *, acl: str = "private", versioned: bool = True,
                        blocked: bool = True) -> list[dict[str, Any]]:
    """The backup bucket as the program is expected to add it: BucketV2, versioning and public access block."""
    urn = "urn:pulumi:dev::orgmail::orgmail:index:Backup$aws:s3/bucketV2:BucketV2::backup-bucket"
    extra: list[dict[str, Any]] = [{"type": "aws:s3/bucketV2:BucketV2", "name": "backup-bucket", "urn": urn,
                                    "protect": True, "props": {"bucket": "orgmail-dev-backup", "acl": acl}}]
    if versioned:
        extra.append({"type": "aws:s3/bucketVersioningV2:BucketVersioningV2", "name": "backup-versioning",
                      "urn": urn.replace("bucketV2:BucketV2::backup-bucket", "v:V::backup-versioning"),
                      "props": {"bucket": "orgmail-dev-backup", "versioningConfiguration": {"status": "Enabled"}},
                      "propertyDependencies": {"bucket": [urn]}})
    extra.append({"type": "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", "name": "backup-public-block",
                  "urn": urn.replace("bucketV2:BucketV2::backup-bucket", "p:P::backup-public-block"),
                  "props": {"bucket": "orgmail-dev-backup", "blockPublicAcls": True, "blockPublicPolicy": blocked,
                            "ignorePublicAcls": True, "restrictPublicBuckets": True}})
    return resources + extra


def test_private_versioned_backup_bucket_passes() -> None:
    assert violations(_with_backup_bucket(load_stack("dev"))) == []


def test_unversioned_backup_bucket_is_caught() -> None:
    found = violations(_with_backup_bucket(load_stack("dev"), versioned=False), "backup-bucket-private-versioned")
    assert len(found) == 1 and found[0][1].startswith("backup-bucket: backup bucket must be versioned")


def test_public_backup_bucket_is_caught() -> None:
    found = violations(_with_backup_bucket(load_stack("dev"), acl="public-read", blocked=False),
                       "backup-bucket-private-versioned")
    assert [m for _, m in found] == [
        "backup-bucket: backup bucket must not be public (acl 'public-read')",
        "backup-bucket: backup bucket needs a BucketPublicAccessBlock with blockPublicAcls, blockPublicPolicy, "
        "ignorePublicAcls, restrictPublicBuckets all true"]


def test_legacy_bucket_with_inline_versioning() -> None:
    resources = load_stack("dev") + [{"type": "aws:s3/bucket:Bucket", "name": "old-backup", "urn": "urn:x::old-backup",
                                      "props": {"bucket": "b", "versioning": {"enabled": False}}}]
    messages = [m for _, m in violations(resources, "backup-bucket-private-versioned")]
    assert len(messages) == 2 and "must be versioned" in messages[0] and "BucketPublicAccessBlock" in messages[1]
