"""The ISP tier as a cluster (issue 15): the whole graph of Pulumi.isp.yaml on the mock engine.

Load balancer and target groups, the edges' Auto Scaling group and its drain hook, the directory (RDS), the
security groups as a reachability check over their rules, IAM per role, DNS, the provider constraints, and
that nothing in the plan grows with the number of users (they live in the directory).
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import ipaddress
import json
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Any

import botocore.session
import pytest

from components.backup import SNAPSHOT_TAG
from components.cluster import CLUSTER_ROLES, role_policy
from components.edge import DRAIN_HEARTBEAT_SECONDS, edge_certificate_parameter, edge_user_data, group_name
from components.firewall import CACHE_PORT, DIRECTORY_PORT, DOVEADM_PORT, EDGE_TO_SHARD_PORTS, SHARD_PORTS
from components.load_balancer import DEREGISTRATION_DELAY_SECONDS
from components.outbound_relay import relay_user_data
from components.settings import DEFAULT_RATE_LIMITS, ConfigError, Settings, load_settings
from components.shard import shard_user_data
from components.tiers import ISP_CLUSTER, TIERS
from components.userdata import EC2_USER_DATA_LIMIT, MAIL_PORTS, bundle_files
from tests.unit.conftest import raw_config, run_stack, stack_config
from tests.unit.test_roles import allowed
from tools import deploy_checks as dc
from tools.mockengine import PLACEHOLDER_ACCOUNT, MockRun, Registered
from tools.plan import user_data_text

STACK = "isp"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
SG = "aws:ec2/securityGroup:SecurityGroup"
SUBNET = "aws:ec2/subnet:Subnet"
TARGET_GROUP = "aws:lb/targetGroup:TargetGroup"
RECORD = "cloudflare:index/dnsRecord:DnsRecord"
PARAM = "aws:ssm/parameter:Parameter"
INSTANCE = "aws:ec2/instance:Instance"
ENI = "aws:ec2/networkInterface:NetworkInterface"
ANYWHERE = ("0.0.0.0/0", "::/0")
POSTFIX_SMTPD_TIMEOUT = 300  # Postfix's default smtpd_timeout: a session idle longer is dropped by Postfix itself


def run() -> MockRun:
    return run_stack(STACK)


def settings() -> Settings:
    return load_settings(raw_config(STACK), STACK)


def cluster_raw(**changes: Any) -> dict[str, Any]:
    raw = raw_config(STACK)
    raw["cluster"] = {**raw["cluster"], **changes}
    return raw


def problems(raw: dict[str, Any], stack: str = STACK) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_settings(raw, stack)
    return err.value.problems


# --- settings --------------------------------------------------------------------------------------------


def test_the_example_is_the_tier_tables_cluster_and_isp_yaml_stays_single_host() -> None:
    s = settings()
    assert s.cluster == ISP_CLUSTER == TIERS["isp"].cluster
    assert load_settings(raw_config("isp-single"), "isp-single").cluster is None
    raw = raw_config(STACK)
    raw["cluster"] = {}
    assert load_settings(raw, STACK).cluster == ISP_CLUSTER  # every key defaults to the table


@pytest.mark.parametrize("tier", ["small", "medium", "large"])
def test_a_cluster_is_refused_on_the_single_host_tiers(tier: str) -> None:
    raw = raw_config(STACK)
    raw["tier"] = tier
    found = [p for p in problems(raw) if p.startswith("orgmail:cluster:")]
    assert found == [f"orgmail:cluster: only tier isp runs as a cluster (tier is {tier}); remove orgmail:cluster "
                     "or set orgmail:tier to isp"]


@pytest.mark.parametrize(("changes", "expected"), [
    ({"zones": 1}, "orgmail:cluster.zones: must be a whole number from 2 to 6, got 1"),
    ({"zones": 7}, "orgmail:cluster.zones: must be a whole number from 2 to 6, got 7"),
    ({"shards": 0}, "orgmail:cluster.shards: must be a whole number from 1 to 100, got 0"),
    ({"shardVolumeGb": 16385}, "orgmail:cluster.shardVolumeGb: must be a whole number from 50 to 16384, got 16385"),
    ({"edgesMin": 1}, "orgmail:cluster.edgesMin: must be a whole number from 2 to 100, got 1"),
    ({"edgesMin": 4, "edgesMax": 3, "edgesDesired": 4},
     "orgmail:cluster.edgesMax: must be at least cluster.edgesMin (4), got 3"),
    ({"edgesDesired": 7}, "orgmail:cluster.edgesDesired: must lie from cluster.edgesMin (2) to cluster.edgesMax (6), got 7"),
    ({"relays": 9}, "orgmail:cluster.relays: must be a whole number from 1 to 8, got 9"),
    ({"directoryStorageGb": 10}, "orgmail:cluster.directoryStorageGb: must be a whole number from 20 to 65536, got 10"),
    ({"shardInstanceType": "m6i.large\n"}, "orgmail:cluster.shardInstanceType: must be an EC2 instance type"),
    ({"edgeInstanceType": "M6I.LARGE"}, "orgmail:cluster.edgeInstanceType: must be an EC2 instance type like m6i.large"),
    ({"directoryInstanceClass": "m6i.large"},
     "orgmail:cluster.directoryInstanceClass: must be an RDS instance class like db.m6i.large, got 'm6i.large'"),
    ({"shardz": 2}, "orgmail:cluster.shardz: unknown setting; did you mean shards?"),
])
def test_each_cluster_setting_is_checked_whole(changes: dict[str, Any], expected: str) -> None:
    found = problems(cluster_raw(**changes))
    assert any(p.startswith(expected) for p in found), found


def test_the_cluster_sizes_fit_what_aws_offers() -> None:
    """Instance types from botocore's EC2 model (the settings check the shape; AWS the type itself)."""
    offered = botocore.session.get_session().get_service_model("ec2").shape_for("InstanceType").enum
    c = settings().cluster
    assert c is not None
    assert {c.edge_instance_type, c.shard_instance_type, TIERS["isp"].relay_instance_type} <= set(offered)
    assert 3000 <= c.shard_volume_iops <= min(16000, 500 * c.shard_volume_gb)
    assert 125 <= c.shard_volume_throughput <= c.shard_volume_iops / 4


def test_users_never_come_from_the_config_of_a_cluster() -> None:
    """Decision: a cluster's users live in the directory (the CLI), so the config holding them would make the
    plan and the state grow with them. `mailboxes` and `passwordHashes` are refused outright (one line each,
    however many there are), and `aliases` may name only the organisation's role and report addresses."""
    raw = raw_config(STACK)
    raw["mailboxes"] = [{"address": f"user{i}@isp.example"} for i in range(5000)]
    raw["passwordHashes"] = {"user0@isp.example": "{BLF-CRYPT}$2y$10$" + "a" * 53}
    found = problems(raw)
    assert [p.split(":")[1] for p in found if p.startswith(("orgmail:mailboxes", "orgmail:passwordHashes"))] == [
        "mailboxes", "passwordHashes"]
    assert all("orgmail-users add" in p for p in found)
    raw = raw_config(STACK)
    raw["aliases"] = {"sales@isp.example": ["noc@isp.example"], "postmaster@isp.example": ["noc@isp.example"]}
    found = problems(raw)
    assert [p for p in found if p.startswith("orgmail:aliases.")] == [
        "orgmail:aliases.sales@isp.example: a cluster's orgmail:aliases holds only postmaster@ and abuse@ of each domain "
        "and the report addresses; add other aliases to the directory with `orgmail-users alias` (docs/cluster.md)"]


def test_what_a_cluster_does_not_take_yet_is_refused_by_name() -> None:
    raw = raw_config(STACK)
    raw["network"] = {"vpcId": "vpc-0123456789abcdef0", "subnetId": "subnet-0123456789abcdef0"}
    found = problems(raw)
    assert any(p.startswith("orgmail:network: a cluster builds its own VPC") for p in found)


def test_the_plan_does_not_grow_with_the_users() -> None:
    """Nothing per user: no generated password, no password-hash parameter, no mailbox in any role's config;
    the resource count is a function of domains, zones, shards and relays alone."""
    r = run()
    assert not [x for x in r.resources if "password-" in x.name or "mailbox-passwords" in str(x.inputs.get("name"))]
    for role in CLUSTER_ROLES:
        parts = sorted((p.inputs["name"], p.inputs["value"]) for p in r.of_type(PARAM)
                       if p.inputs["name"].startswith(f"/orgmail/{STACK}/{role}/config/part-"))
        config = json.loads("".join(v for _, v in parts if v != "-"))
        assert config.get("mailboxes", []) == [] and config["shards"] == list(settings().shard_hosts)
    from tools.mockengine import run_program
    bigger = copy.deepcopy(stack_config(STACK))
    bigger["orgmail:cluster"] = {**bigger["orgmail:cluster"], "shards": 3}
    grown = Counter(x.type for x in run_program(bigger, STACK).resources) - Counter(x.type for x in r.resources)
    # One more shard: its host (instance, volume, address, interface, attachment), its alarms (status checks,
    # bootstrap, its backups' two): nothing else.
    assert grown == Counter({"aws:cloudwatch/metricAlarm:MetricAlarm": 5, "orgmail:index:MailHost": 1,
                             INSTANCE: 1, "aws:ebs/volume:Volume": 1, "aws:ec2/eip:Eip": 1, ENI: 1,
                             "aws:ec2/eipAssociation:EipAssociation": 1, "aws:ec2/volumeAttachment:VolumeAttachment": 1})


# --- network -----------------------------------------------------------------------------------------------


def subnets(kind: str) -> list[Registered]:
    return sorted((s for s in run().of_type(SUBNET) if s.name.startswith(f"network-{kind}")), key=lambda s: s.name)


def test_every_tier_of_subnet_spans_the_zones() -> None:
    c = settings().cluster
    assert c is not None
    zones = c.zones
    for kind in ("lb", "public", "private"):
        found = subnets(kind)
        assert len(found) == zones and len({s.inputs["availabilityZone"] for s in found}) == zones, kind
        assert all(s.ignore_changes == ["availabilityZone"] and s.inputs["mapPublicIpOnLaunch"] is False for s in found)
    # The directory's subnets have no route out.
    tables = {t.id: t for t in run().of_type("aws:ec2/routeTable:RouteTable")}
    for association in run().of_type("aws:ec2/routeTableAssociation:RouteTableAssociation"):
        routes = tables[association.inputs["routeTableId"]].inputs.get("routes", [])
        private = association.name.startswith("network-private")
        assert (routes == []) == private, association.name


def test_zones_offering_every_type_are_chosen_and_too_few_is_a_clear_error() -> None:
    from components.network import NoZoneError, choose_zones
    offered = [("m6i.large", "z-a"), ("m6i.large", "z-b"), ("m6i.large", "z-c"), ("m6in.8xlarge", "z-b")]
    assert choose_zones(["z-c", "z-b", "z-a"], offered, ["m6i.large"], "r", 2) == ["z-a", "z-b"]
    with pytest.raises(NoZoneError, match="cluster.zones is 2, but only 1 availability zone"):
        choose_zones(["z-a", "z-b"], offered, ["m6i.large", "m6in.8xlarge"], "r", 2)


# --- load balancer ---------------------------------------------------------------------------------------


def test_the_load_balancer_has_an_elastic_ip_in_each_zone() -> None:
    r = run()
    [lb] = r.of_type("aws:lb/loadBalancer:LoadBalancer")
    i = lb.inputs
    assert i["loadBalancerType"] == "network" and i["internal"] is False and i["enableCrossZoneLoadBalancing"] is True
    assert i["enableDeletionProtection"] is True
    ips = {e.id: e for e in r.of_type("aws:ec2/eip:Eip") if e.name.startswith("lb-ip")}
    c = settings().cluster
    assert c is not None and len(ips) == c.zones and all(e.protect for e in ips.values())
    assert {m["allocationId"] for m in i["subnetMappings"]} == set(ips)
    assert {m["subnetId"] for m in i["subnetMappings"]} == {s.id for s in subnets("lb")}
    [group] = i["securityGroups"]
    assert group == r.one(SG, "firewall-lb").id


def test_listeners_and_target_groups_carry_proxy_v2_health_checks_and_a_long_drain() -> None:
    r = run()
    groups = {g.outputs["arn"]: g for g in r.of_type(TARGET_GROUP)}
    listeners = r.of_type("aws:lb/listener:Listener")
    assert sorted(int(x.inputs["port"]) for x in listeners) == sorted(MAIL_PORTS)
    for listener in listeners:
        assert listener.inputs["protocol"] == "TCP"
        [action] = listener.inputs["defaultActions"]
        group = groups[action["targetGroupArn"]].inputs
        assert action["type"] == "forward" and group["port"] == listener.inputs["port"]
        assert group["protocol"] == "TCP" and group["targetType"] == "instance"
        assert group["proxyProtocolV2"] is True and group["preserveClientIp"] == "false"
        assert group["stickiness"] == {"enabled": True, "type": "source_ip"}
        check = group["healthCheck"]
        assert check["enabled"] is True and check["protocol"] == "TCP"
        # smtpd behind the proxy protocol dies on a check's header without a client: 465 and 587 are checked
        # through postscreen's 25, every other port on its own.
        own = group["port"] not in (465, 587)
        assert check["port"] == ("traffic-port" if own else "25"), (group["port"], check)
        assert group["deregistrationDelay"] == DEREGISTRATION_DELAY_SECONDS > POSTFIX_SMTPD_TIMEOUT
        assert group["connectionTermination"] is False


# --- edges -------------------------------------------------------------------------------------------------


def test_the_edges_scale_across_the_zones_behind_every_target_group_and_drain_before_they_go() -> None:
    r = run()
    c = settings().cluster
    assert c is not None
    [group] = r.of_type("aws:autoscaling/group:Group")
    i = group.inputs
    assert (i["minSize"], i["maxSize"], i["desiredCapacity"]) == (c.edges_min, c.edges_max, c.edges_desired)
    assert set(i["vpcZoneIdentifiers"]) == {s.id for s in subnets("public")}
    assert set(i["targetGroupArns"]) == {g.outputs["arn"] for g in r.of_type(TARGET_GROUP)}
    assert i["healthCheckType"] == "ELB" and i["name"] == group_name(STACK)
    [hook] = r.of_type("aws:autoscaling/lifecycleHook:LifecycleHook")
    h = hook.inputs
    assert h["lifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING" and h["autoscalingGroupName"] == i["name"]
    assert h["heartbeatTimeout"] == DRAIN_HEARTBEAT_SECONDS >= 1800 and h["defaultResult"] == "CONTINUE"


def test_the_edges_launch_hardened_with_the_edge_roles_user_data() -> None:
    r = run()
    [template] = r.of_type("aws:ec2/launchTemplate:LaunchTemplate")
    t = template.inputs
    assert t["metadataOptions"]["httpTokens"] == "required" and t["metadataOptions"]["httpPutResponseHopLimit"] == 1
    [root] = t["blockDeviceMappings"]
    assert root["ebs"]["encrypted"] == "true" and root["ebs"]["volumeType"] == "gp3"
    [nic] = t["networkInterfaces"]
    assert nic["securityGroups"] == [r.one(SG, "firewall-edge").id]
    assert t["iamInstanceProfile"]["name"] == r.one("aws:iam/instanceProfile:InstanceProfile",
                                                    "cluster-edge-profile").outputs["name"]
    raw = base64.b64decode(t["userData"])
    assert len(raw) <= EC2_USER_DATA_LIMIT
    text = gzip.decompress(raw).decode()
    assert "SSM_PATH=/orgmail/isp/edge" in text and "amazon-ssm-agent.deb" in text
    files = role_files(r, "edge", text)
    assert "haproxy_trusted_networks = 10.42.0.0/27 10.42.0.32/27" in files["/etc/dovecot/dovecot.conf"]["content"]


def test_the_edges_take_the_stacks_rate_limits_from_their_config_and_a_change_replaces_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """rateLimits reach the edges as they reach the single host: in their role's config, which orgmail-sync
    --cluster applies (Postfix's anvil limits per client address and the message size by postconf, rspamd's
    per-login hourly buckets), before Postfix first starts and at every change. The edges' bundle holds orgmail's
    defaults only, so a change of the limits leaves the launch template as it was: no edge is replaced. Before
    the bundle held the stack's limits, and every change was an instance refresh."""
    from tools.mockengine import run_program

    config = copy.deepcopy(stack_config(STACK))
    config["orgmail:rateLimits"] = {"connectionsPerMinute": 7, "messagesPerMinute": 33, "recipientsPerMinute": 44,
                                    "authPerMinute": 5, "recipientsPerMessage": 55, "messagesPerUserHour": 66,
                                    "recipientsPerUserHour": 77, "messageSizeMb": 30}
    r = run_program(config, STACK)
    params = {p.inputs["name"]: p.inputs["value"] for p in r.of_type(PARAM)}
    edge_config = json.loads("".join(params[n] for n in sorted(params) if n.startswith(f"/orgmail/{STACK}/edge/config/part-")))
    assert edge_config["postfixLimits"] == {
        "smtpd_client_connection_rate_limit": 7, "smtpd_client_message_rate_limit": 33,
        "smtpd_client_recipient_rate_limit": 44, "smtpd_client_auth_rate_limit": 5, "smtpd_recipient_limit": 55,
        "message_size_limit": 30 * 1024 * 1024, "mailbox_size_limit": 30 * 1024 * 1024,
        "virtual_mailbox_limit": 30 * 1024 * 1024}
    assert edge_config["userLimits"] == {"messagesPerUserHour": 66, "recipientsPerUserHour": 77}
    [template] = r.of_type("aws:ec2/launchTemplate:LaunchTemplate")
    [example] = run().of_type("aws:ec2/launchTemplate:LaunchTemplate")
    assert template.inputs["userData"] == example.inputs["userData"]  # the same bundle: no instance refresh
    files = role_files(r, "edge", gzip.decompress(base64.b64decode(template.inputs["userData"])).decode())
    main_cf = dict(line.split(" = ", 1) for line in files["/etc/postfix/main.cf"]["content"].splitlines()
                   if " = " in line and not line.startswith("#"))
    d = DEFAULT_RATE_LIMITS
    assert (main_cf["smtpd_client_connection_rate_limit"], main_cf["anvil_rate_time_unit"], main_cf["message_size_limit"]) == (
        str(d.connections_per_minute), "60s", str(d.message_size_mb * 1024 * 1024))
    assert '"/etc/rspamd/orgmail/user_rates.inc"' in files["/etc/rspamd/local.d/ratelimit.conf"]["content"]
    # orgmail-sync --cluster on an edge: the same postconf and buckets as on the single host.
    from tests.unit.test_backup import _sync_script

    sync = _sync_script()
    calls: list[list[str]] = []

    def postconf(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "\n" * 8, "")

    monkeypatch.setattr(sync.subprocess, "run", postconf)
    written: dict[str, str] = {}
    monkeypatch.setattr(sync, "write", lambda path, text, *a: written.setdefault(path, text) == text)
    changed: set[str] = set()
    sync.apply_limits("edge", edge_config, changed)
    assert changed == {"postfix", "rspamd"}
    assert ["postconf", "-e", *(f"{k}={v}" for k, v in edge_config["postfixLimits"].items())] in calls
    rates = written["/etc/rspamd/orgmail/user_rates.inc"]
    assert 'burst = 66; rate = "66 / 1h"' in rates and 'burst = 77; rate = "77 / 1h"' in rates
    # The bundle's default buckets are the text orgmail-sync writes for the defaults.
    assert files["/etc/rspamd/orgmail/user_rates.inc"]["content"] == sync.user_rates(
        {"messagesPerUserHour": d.messages_per_user_hour, "recipientsPerUserHour": d.recipients_per_user_hour})


def role_files(r: MockRun, role: str, user_data: str) -> dict[str, dict[str, str]]:
    """A role's bundle as the stack stores it (its parts joined in order, "-" unused), checked as the host's
    orgmail-unbundle checks it: the SHA-256 its user-data names."""
    params = {p.inputs["name"]: p.inputs["value"] for p in r.of_type(PARAM)}
    prefix = f"/orgmail/isp/{role}/bundle/part-"
    parts = [params[name] for name in sorted(params) if name.startswith(prefix)]
    assert parts and all(len(p.encode()) <= 4096 for p in parts), role
    bundle = "".join(p for p in parts if p != "-")
    [named] = re.findall(r"^\s*BUNDLE_SHA256=([0-9a-f]{64})$", user_data, re.M)
    assert hashlib.sha256(bundle.encode()).hexdigest() == named, role
    return bundle_files(bundle)


def test_every_cluster_host_boots_its_roles_rendered_configuration() -> None:
    """No placeholder left: each shard and relay boots its role's user-data, under EC2's limit, naming its
    own volume and reading only its role's SSM path; the edges get the relays' private addresses."""
    r = run()
    for inst in r.of_type(INSTANCE):
        raw = base64.b64decode(inst.inputs["userDataBase64"])
        assert len(raw) <= EC2_USER_DATA_LIMIT, inst.name
        text = gzip.decompress(raw).decode()
        role = "shard" if inst.name.startswith("shard") else "relay"
        assert f"SSM_PATH=/orgmail/isp/{role}\n" in text and f"ROLE={role}\n" in text, inst.name
        assert "placeholder" not in text and "nvme-Amazon_Elastic_Block_Store_vol" in text, inst.name
        assert "amazon-ssm-agent.deb" in text, inst.name  # admin.ssm in the example: Session Manager on every host
        # Its role's other files, the same for every host of the role (no volume id, no host name in them).
        files = role_files(r, role, text)
        assert "/usr/local/sbin/orgmail-volume" in files and "/etc/dovecot/dovecot.conf" not in files, inst.name
        names = [*settings().shard_hosts, *settings().outbound_relays]
        assert not any("vol-" in f["content"] or any(n in f["content"] for n in names) for f in files.values()), inst.name
    params = {p.inputs["name"]: p for p in r.of_type("aws:ssm/parameter:Parameter")}
    assert params["/orgmail/isp/edge/relay-hosts"].inputs["type"] == "String"
    assert params["/orgmail/isp/shard/doveadm-secret"].inputs["type"] == "SecureString"
    for function in (edge_user_data, shard_user_data, relay_user_data):
        assert "not yet built" not in (function.__doc__ or ""), function.__name__


# --- shards and relays ----------------------------------------------------------------------------------


def test_shards_are_mailbox_hosts_spread_over_the_zones() -> None:
    r = run()
    s = settings()
    c = s.cluster
    assert c is not None
    instances = {x.name: x for x in r.of_type(INSTANCE)}
    volumes = {v.id: v for v in r.of_type("aws:ebs/volume:Volume")}
    attachments = {a.inputs["instanceId"]: a for a in r.of_type("aws:ec2/volumeAttachment:VolumeAttachment")}
    zones = set()
    for n in range(1, c.shards + 1):
        inst = instances[f"shard{n}-instance"]
        assert inst.inputs["instanceType"] == c.shard_instance_type
        vol = volumes[attachments[inst.id].inputs["volumeId"]]
        assert vol.protect and vol.inputs["encrypted"] is True and vol.inputs["size"] == c.shard_volume_gb
        assert SNAPSHOT_TAG in vol.inputs["tags"]  # the daily DLM snapshots
        zones.add(vol.inputs["availabilityZone"])
        text = gzip.decompress(base64.b64decode(inst.inputs["userDataBase64"])).decode()
        assert "nvme-Amazon_Elastic_Block_Store_" + vol.id.replace("-", "") in text
        alarms = {a.name for a in r.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")}
        assert {f"shard{n}-system-check", f"shard{n}-instance-check", f"shard{n}-bootstrap"} <= alarms
    assert len(zones) == min(c.shards, c.zones)
    relays = [x for name, x in instances.items() if name.startswith("relay")]
    assert len(relays) == c.relays
    for relay in relays:
        vol = volumes[attachments[relay.id].inputs["volumeId"]]
        assert SNAPSHOT_TAG not in vol.inputs["tags"] and vol.protect  # a queue: never snapshotted


def test_every_shard_backs_up_nightly_and_is_watched_on_its_own() -> None:
    """The shards run the mailbox host's restic backup: its script and timer in their bundle, the repository key
    and the timer at the first boot, the bucket and retention in their SSM path (read before each run, so a
    changed retention replaces no shard); each shard's reports alarm on their own (Stack and Host), the relays
    back up nothing."""
    r = run()
    s = settings()
    params = {p.inputs["name"]: p.inputs for p in r.of_type(PARAM)}
    shard_path = f"{s.ssm_path}/shard"
    assert params[f"{shard_path}/backup-bucket"]["value"] == r.one("aws:s3/bucket:Bucket", "backup-bucket").id
    assert json.loads(params[f"{shard_path}/backup/keep"]["value"]) == {
        "keepDaily": s.backup.keep_daily, "keepWeekly": s.backup.keep_weekly, "keepMonthly": s.backup.keep_monthly}
    assert params[f"{shard_path}/backup/restic-password"]["type"] == "SecureString"
    backup_files = {"/usr/local/sbin/orgmail-backup", "/usr/local/sbin/orgmail-restore",
                    "/etc/systemd/system/orgmail-backup.service", "/etc/systemd/system/orgmail-backup.timer"}
    for inst in r.of_type(INSTANCE):
        text = gzip.decompress(base64.b64decode(inst.inputs["userDataBase64"])).decode()
        role = "shard" if inst.name.startswith("shard") else "relay"
        files = role_files(r, role, text)
        if role == "relay":
            assert not backup_files & set(files) and "orgmail-backup" not in text, inst.name
            continue
        assert backup_files <= set(files), inst.name
        assert "param backup/restic-password | secret_file /etc/orgmail/restic-password root" in text
        assert "systemctl enable --now orgmail-backup.timer" in text
        [hostname] = re.findall(r"^\s*HOSTNAME=(\S+)$", text, re.M)
        assert hostname in s.shard_hosts  # restic's host of its snapshots
    alarms = {a.name: a.inputs for a in r.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
              if a.inputs["metricName"] == "BackupResult"}
    assert set(alarms) == {f"shard{n}-backup-{kind}" for n in range(1, len(s.shard_hosts) + 1)
                           for kind in ("not-ok", "stale")}
    for n, host in enumerate(s.shard_hosts, start=1):
        for kind in ("not-ok", "stale"):
            assert alarms[f"shard{n}-backup-{kind}"]["dimensions"] == {"Stack": s.namespace, "Host": host}


# --- directory ---------------------------------------------------------------------------------------------


def test_the_directory_is_multi_az_encrypted_private_protected_and_holds_no_password_in_state() -> None:
    r = run()
    [db] = r.of_type("aws:rds/instance:Instance")
    i = db.inputs
    assert i["engine"] == "postgres" and i["multiAz"] is True and i["storageEncrypted"] is True
    assert i["publiclyAccessible"] is False and i["deletionProtection"] is True and db.protect is True
    assert i["manageMasterUserPassword"] is True and "password" not in i
    assert i["backupRetentionPeriod"] >= 7 and i["skipFinalSnapshot"] is False
    assert i["vpcSecurityGroupIds"] == [r.one(SG, "firewall-directory").id]
    [group] = r.of_type("aws:rds/subnetGroup:SubnetGroup")
    assert group.outputs["name"] == i["dbSubnetGroupName"]
    assert set(group.inputs["subnetIds"]) == {s.id for s in subnets("private")}
    assert len({s.inputs["availabilityZone"] for s in subnets("private")}) >= 2
    [parameters] = r.of_type("aws:rds/parameterGroup:ParameterGroup")
    assert {"name": "rds.force_ssl", "value": "1", "applyMethod": "pending-reboot"} in parameters.inputs["parameters"]
    # No database password anywhere: not an input, not an output, not a parameter.
    for x in r.resources:
        assert not any("password" in k.lower() for k in x.inputs if k != "manageMasterUserPassword"), x.name
    assert r.outputs["directoryMasterSecret"].startswith("arn:aws:secretsmanager:")


# --- reachability ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Path:
    source: str  # a group, or a network
    target: str  # a group
    protocol: str
    port: int


def reachability(r: MockRun) -> tuple[set[Path], list[str]]:
    """Every (source, target, port) the security groups let in, and the ingress paths the source's egress
    rules do not let out (traffic between groups needs both). Sources are group names or networks."""
    groups = {g.id: g.name.removeprefix("firewall-") for g in r.of_type(SG)}
    ingress, egress = set(), set()
    for rule in r.of_type(INGRESS) + r.of_type(EGRESS):
        i = rule.inputs
        peer = str(groups.get(i.get("referencedSecurityGroupId", "")) or i.get("cidrIpv4") or i.get("cidrIpv6"))
        own = groups[i["securityGroupId"]]
        assert int(i["fromPort"]) == int(i["toPort"]), rule.name  # no port ranges
        if rule.type == INGRESS:
            ingress.add(Path(peer, own, i["ipProtocol"], int(i["fromPort"])))
        else:
            egress.add(Path(own, peer, i["ipProtocol"], int(i["fromPort"])))
    unmatched = [f"{p.source} -> {p.target}:{p.port}" for p in ingress
                 if p.source in groups.values() and p not in egress]
    return ingress, unmatched


def reachability_problems(r: MockRun, lb_networks: set[str], admin: set[str]) -> list[str]:
    """The cluster's rule: only the load balancer is reachable from anywhere (its mail ports); only its
    subnets reach the edges' mail ports; only edges reach shards and relays; only edges and shards reach
    PostgreSQL; only edges reach their shared rspamd store; SSH only from admin networks."""
    ingress, unmatched = reachability(r)
    found = [f"{u}: allowed in, not out" for u in unmatched]
    for p in ingress:
        where = f"{p.source} -> {p.target}:{p.protocol}/{p.port}"
        if p.port == 22:
            if p.source not in admin:
                found.append(f"{where}: SSH from outside admin.sshCidrs")
            continue
        if p.source in ANYWHERE and not (p.target == "lb" and p.port in MAIL_PORTS and p.protocol == "tcp"):
            found.append(f"{where}: open to the internet (only the load balancer's mail ports may be)")
        if p.target == "edge" and not (p.source in lb_networks and p.port in MAIL_PORTS):
            found.append(f"{where}: the edges take mail from the load balancer's subnets only")
        if p.target == "shard" and not ((p.source == "edge" and p.port in EDGE_TO_SHARD_PORTS)
                                        or (p.source == "shard" and p.port == DOVEADM_PORT)):
            found.append(f"{where}: only edges reach the shards' mail ports, only shards their doveadm")
        if p.target == "relay" and not (p.source == "edge" and p.port == 25):
            found.append(f"{where}: only edges reach the relays")
        if (p.port == DIRECTORY_PORT or p.target == "directory") and not (
                p.target == "directory" and p.port == DIRECTORY_PORT and p.source in ("edge", "shard")):
            found.append(f"{where}: only edges and shards reach PostgreSQL")
        if (p.port == CACHE_PORT or p.target == "cache") and not (
                p.target == "cache" and p.port == CACHE_PORT and p.source == "edge"):
            found.append(f"{where}: only edges reach their shared rspamd store")
    return found


def test_only_the_load_balancer_faces_the_internet_and_each_role_reaches_only_the_next() -> None:
    r = run()
    lb_networks = {s.inputs["cidrBlock"] for s in subnets("lb")}
    assert reachability_problems(r, lb_networks, set(settings().admin.ssh_cidrs)) == []
    ingress, _ = reachability(r)
    assert {(p.source, p.target, p.port) for p in ingress if p.source in ANYWHERE} == {
        ("0.0.0.0/0", "lb", port) for port in MAIL_PORTS}
    assert {(p.source, p.port) for p in ingress if p.target == "edge"} == {
        (net, port) for net in lb_networks for port in MAIL_PORTS}
    assert {(p.source, p.port) for p in ingress if p.target == "directory"} == {
        ("edge", DIRECTORY_PORT), ("shard", DIRECTORY_PORT)}
    assert {(p.source, p.port) for p in ingress if p.target == "cache"} == {("edge", CACHE_PORT)}
    # Mail from the edges; doveadm (a move's copy, the shards' shared secret) from the other shards only.
    assert {(p.source, p.port) for p in ingress if p.target == "shard"} == {
        *{("edge", port) for port in EDGE_TO_SHARD_PORTS}, ("shard", DOVEADM_PORT)}
    assert set(EDGE_TO_SHARD_PORTS) | {DOVEADM_PORT} == set(SHARD_PORTS)
    # The load balancer's subnets hold the load balancer alone: no host interface lives there.
    lb_ids = {s.id for s in subnets("lb")}
    assert not [e for e in r.of_type(ENI) if e.inputs["subnetId"] in lb_ids]


def test_each_resource_sits_in_its_roles_group() -> None:
    r = run()
    group = {g.name.removeprefix("firewall-"): g.id for g in r.of_type(SG)}
    for eni in r.of_type(ENI):
        role = "shard" if eni.name.startswith("shard") else "relay"
        assert eni.inputs["securityGroups"] == [group[role]], eni.name


def _rule(group_id: str, **inputs: Any) -> Registered:
    return Registered(type=INGRESS, name="rogue", urn="u", id="i", parent="", custom=True, protect=False,
                      dependencies=[], ignore_changes=[], raw_inputs={"securityGroupId": group_id, "ipProtocol": "tcp",
                                                                      **inputs})


@pytest.mark.parametrize(("target", "rule", "expected"), [
    ("shard", {"fromPort": 143, "toPort": 143, "cidrIpv4": "0.0.0.0/0"}, "open to the internet"),
    ("edge", {"fromPort": 25, "toPort": 25, "cidrIpv6": "::/0"}, "load balancer's subnets only"),
    ("directory", {"fromPort": 5432, "toPort": 5432, "referencedSecurityGroupId": "lb"}, "only edges and shards"),
    ("cache", {"fromPort": 6379, "toPort": 6379, "referencedSecurityGroupId": "shard"}, "only edges reach their shared"),
    ("cache", {"fromPort": 6379, "toPort": 6379, "cidrIpv4": "10.0.0.0/16"}, "only edges reach their shared"),
    ("relay", {"fromPort": 25, "toPort": 25, "referencedSecurityGroupId": "shard"}, "only edges reach the relays"),
    ("shard", {"fromPort": 24245, "toPort": 24245, "referencedSecurityGroupId": "edge"}, "only shards their doveadm"),
    ("shard", {"fromPort": 143, "toPort": 143, "referencedSecurityGroupId": "shard"}, "only edges reach the shards' mail"),
])
def test_the_reachability_check_catches_a_rule_too_many(target: str, rule: dict[str, Any], expected: str) -> None:
    r = run()
    ids = {g.name.removeprefix("firewall-"): g.id for g in r.of_type(SG)}
    if "referencedSecurityGroupId" in rule:
        rule = {**rule, "referencedSecurityGroupId": ids[rule["referencedSecurityGroupId"]]}
    widened = MockRun(resources=[*r.resources, _rule(ids[target], **rule)], outputs={}, secret_outputs=set())
    found = reachability_problems(widened, {s.inputs["cidrBlock"] for s in subnets("lb")}, set())
    assert any(expected in p for p in found), found


# --- IAM ---------------------------------------------------------------------------------------------------


def test_one_role_per_role_type_each_reading_only_its_own_sub_path() -> None:
    r = run()
    s = settings()
    names = [p.inputs["name"] for p in r.of_type(PARAM)]
    policies = {role: json.loads(r.one("aws:iam/rolePolicy:RolePolicy", f"cluster-{role}-policy").inputs["policy"])
                for role in CLUSTER_ROLES}
    for role, policy in policies.items():
        iam_role = r.one("aws:iam/role:Role", f"cluster-{role}-role")
        assert iam_role.inputs["permissionsBoundary"].endswith(":policy/orgmail/orgmail-permissions-boundary")
        assert iam_role.inputs["path"] == "/orgmail/"
        readable = {n for n in names
                    if allowed(policy, "ssm:GetParameter", f"arn:aws:ssm:{s.region}:{PLACEHOLDER_ACCOUNT}:parameter{n}")}
        own = {n for n in names if n.startswith(f"{s.ssm_path}/{role}/")}
        assert own and readable == own, role
        assert not allowed(policy, "ssm:GetParametersByPath",
                           f"arn:aws:ssm:{s.region}:{PLACEHOLDER_ACCOUNT}:parameter{s.ssm_path}")
    # Every parameter belongs to exactly one role (none is left to a path no role reads, but the ACME Worker's).
    assert {n for n in names if not any(n.startswith(f"{s.ssm_path}/{role}/") for role in CLUSTER_ROLES)} == set()
    assert f"{s.ssm_path}/edge/dkim/{s.dkim_selector}" in names
    assert f"{s.ssm_path}/shard/backup/restic-password" in names
    bucket = f"arn:aws:s3:::{r.one('aws:s3/bucket:Bucket', 'backup-bucket').id}"
    assert allowed(policies["shard"], "s3:PutObject", f"{bucket}/data/x")
    assert not allowed(policies["shard"], "s3:DeleteObjectVersion", f"{bucket}/data/x")
    for role in ("edge", "relay"):
        assert not any(a.startswith("s3:") for st in policies[role]["Statement"] for a in st["Action"])
    asg = (f"arn:aws:autoscaling:{s.region}:{PLACEHOLDER_ACCOUNT}:autoScalingGroup:0:"
           f"autoScalingGroupName/{group_name(s.namespace)}")
    assert allowed(policies["edge"], "autoscaling:CompleteLifecycleAction", asg)
    assert not allowed(policies["edge"], "autoscaling:CompleteLifecycleAction", asg + "-other")
    assert not allowed(policies["shard"], "autoscaling:CompleteLifecycleAction", asg)
    with pytest.raises(ValueError, match="unknown cluster role"):
        role_policy(s, "mailbox", PLACEHOLDER_ACCOUNT)


def test_the_first_relay_alone_keeps_the_edges_certificate_and_may_write_only_that_parameter() -> None:
    """One certificate of the MX name for every edge (Let's Encrypt's 5 a week for the same names would not last
    an Auto Scaling group's replacements): the first relay renews it and publishes it in the edges' path."""
    r = run()
    s = settings()
    arn = f"arn:aws:ssm:{s.region}:{PLACEHOLDER_ACCOUNT}:parameter"
    cert = edge_certificate_parameter(s.ssm_path)
    param = next(p for p in r.of_type(PARAM) if p.inputs["name"] == cert)
    assert (param.inputs["type"], param.inputs["tier"], param.inputs["value"]) == ("SecureString", "Advanced", "none")
    assert cert.startswith(f"{s.ssm_path}/edge/")  # the edges read it with their own path's permission
    policies = {role: json.loads(r.one("aws:iam/rolePolicy:RolePolicy", f"cluster-{role}-policy").inputs["policy"])
                for role in CLUSTER_ROLES}
    names = [p.inputs["name"] for p in r.of_type(PARAM)]
    writable = {role: {n for n in names if allowed(policy, "ssm:PutParameter", f"{arn}{n}")}
                for role, policy in policies.items()}
    assert writable == {"edge": set(), "shard": set(), "relay": {cert}}
    assert not allowed(policies["relay"], "ssm:PutParameter", f"{arn}{s.ssm_path}/edge/dkim/{s.dkim_selector}")
    # The MX name's challenge key is the relays' (the edges order no certificate).
    assert f"{s.ssm_path}/relay/certbot/{s.mail_host}/key" in names
    assert not any(n.startswith(f"{s.ssm_path}/edge/certbot/") for n in names)
    first, *others = sorted((i for i in r.of_type(INSTANCE) if i.name.startswith("relay")), key=lambda i: i.name)
    keeper = f"key=$(param certbot/{s.mail_host}/key)"
    assert keeper in user_data_text(first.inputs) and "orgmail-edge-cert.timer" in user_data_text(first.inputs)
    assert others and all(keeper not in user_data_text(i.inputs) for i in others)


def test_each_host_gets_its_roles_profile() -> None:
    r = run()
    profiles = {p.name.split("-")[1]: p.outputs["name"] for p in r.of_type("aws:iam/instanceProfile:InstanceProfile")}
    assert set(profiles) == set(CLUSTER_ROLES)
    for inst in r.of_type(INSTANCE):
        assert inst.inputs["iamInstanceProfile"] == profiles["shard" if inst.name.startswith("shard") else "relay"]


# --- DNS -------------------------------------------------------------------------------------------------


def test_mx_on_the_load_balancer_and_spf_on_the_relays_only() -> None:
    r = run()
    s = settings()
    lb_ips = sorted(e.outputs["publicIp"] for e in r.of_type("aws:ec2/eip:Eip") if e.name.startswith("lb-ip"))
    # Each relay's own address, in the relays' order (the mock engine numbers addresses as resources register,
    # which varies between runs: never pair them by sorting).
    relay_ips = [r.one("aws:ec2/eip:Eip", f"relay{n}-ip").outputs["publicIp"]
                 for n in range(1, len(s.outbound_relays) + 1)]
    a = {(x.inputs["name"], x.inputs["content"]) for x in r.of_type(RECORD) if x.inputs["type"] == "A"}
    assert a == {(s.mail_host, ip) for ip in lb_ips} | {(h, ip) for h, ip in zip(s.outbound_relays, relay_ips,
                                                                                   strict=True)}
    mx = {(x.inputs["name"], x.inputs["content"], x.inputs["priority"]) for x in r.of_type(RECORD)
          if x.inputs["type"] == "MX"}
    assert mx == {(d.name, s.mail_host, 10) for d in s.domains}
    for d in s.domains:
        [spf] = [x.inputs["content"] for x in r.of_type(RECORD) if x.inputs["name"] == d.name and x.inputs["type"] == "TXT"]
        assert spf == '"v=spf1 ' + "".join(f"ip4:{ip} " for ip in relay_ips) + '-all"'
        assert not any(ip in spf for ip in lb_ips)
    # The MX name's own SPF: the edges' SRS senders of forwarded mail are there, and the relays send it.
    [spf] = [x.inputs["content"] for x in r.of_type(RECORD) if x.inputs["name"] == s.mail_host and x.inputs["type"] == "TXT"]
    assert spf == '"v=spf1 ' + "".join(f"ip4:{ip} " for ip in relay_ips) + '-all"'
    assert not [x for x in r.of_type(RECORD) if x.inputs["name"].startswith("shard")]
    # A PTR on every address, each after its A record.
    urns = {x.urn: x for x in r.resources}
    ptrs = r.of_type("aws:ec2/eipDomainName:EipDomainName")
    assert len(ptrs) == len(lb_ips) + len(relay_ips)
    allocations = {e.id: e for e in r.of_type("aws:ec2/eip:Eip")}
    for ptr in ptrs:
        ip = allocations[ptr.inputs["allocationId"]].outputs["publicIp"]
        [record] = [urns[d] for d in ptr.dependencies if urns[d].type == RECORD]
        assert (record.inputs["name"], record.inputs["content"]) == (ptr.inputs["domainName"], ip)


# --- provider constraints and the offline tools -----------------------------------------------------------


def test_the_cluster_meets_every_provider_constraint() -> None:
    found = dc.check_run(run())
    assert found == [], "\n".join(map(str, found))


@pytest.mark.parametrize(("type_", "inputs", "expected"), [
    (TARGET_GROUP, {"port": 25, "protocol": "TCP", "deregistrationDelay": 3601}, "outside 0-3600"),
    (TARGET_GROUP, {"port": 25, "protocol": "TCPX"}, "not one of ProtocolEnum"),
    (TARGET_GROUP, {"healthCheck": {"interval": 4, "healthyThreshold": 11}}, "outside 5-300"),
    (TARGET_GROUP, {"stickiness": {"enabled": True, "type": "lb_cookie"}}, "not one of"),
    ("aws:autoscaling/lifecycleHook:LifecycleHook",
     {"name": "drain queue", "lifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING", "heartbeatTimeout": 7201},
     "outside 30-7200"),
    ("aws:autoscaling/lifecycleHook:LifecycleHook", {"name": "drain queue"}, "does not match"),
    ("aws:autoscaling/group:Group", {"name": "x" * 256, "minSize": 2, "maxSize": 2}, "at most 255"),
    ("aws:rds/instance:Instance", {"engine": "postgres", "username": "postgres"}, "reserved word"),
    ("aws:rds/instance:Instance", {"backupWindow": "05:00-05:30", "maintenanceWindow": "sun:05:15-sun:05:45"},
     "overlaps maintenanceWindow"),
    ("aws:rds/instance:Instance", {"allocatedStorage": 100, "maxAllocatedStorage": 100}, "above allocatedStorage"),
    ("aws:rds/instance:Instance", {"finalSnapshotIdentifier": "orgmail-a--b-final"}, "single hyphens"),
    ("aws:rds/subnetGroup:SubnetGroup", {"description": "x", "subnetIds": ["subnet-1"]}, "fewer than two"),
    ("aws:rds/parameterGroup:ParameterGroup",
     {"family": "postgres17", "parameters": [{"name": "rds.force_ssl", "value": "1", "applyMethod": "later"}]},
     "not one of ApplyMethod"),
    ("aws:lb/loadBalancer:LoadBalancer", {"loadBalancerType": "network"}, None),
])
def test_what_aws_would_refuse_of_the_clusters_types_fails_here(type_: str, inputs: dict[str, Any],
                                                                  expected: str | None) -> None:
    reg = Registered(type=type_, name="r", urn="u", id="i", parent="", custom=True, protect=False, dependencies=[],
                     ignore_changes=[], raw_inputs=inputs)
    found = [f"{p.path}: {p.message}" for p in dc.check_resource(reg)]
    if expected is None:
        assert found == []
    else:
        assert any(expected in p for p in found), found


def test_the_largest_cluster_with_the_longest_names_meets_every_provider_constraint() -> None:
    """The longest names the settings accept (test_deploy_checks.edge_config) with the most the cluster takes
    where it changes a value's length or a limit: found the role configs over SSM's 4 KB (now in parts) and
    an autoscaling ceiling above RDS's 65,536 GiB."""
    from tests.unit.test_deploy_checks import LONGEST_STACK, edge_config
    from tools.mockengine import run_program
    cfg = edge_config("isp")
    for key in ("orgmail:mailboxes", "orgmail:outbound", "orgmail:webmail"):  # none of them in a cluster
        cfg.pop(key)
    cfg["orgmail:aliases"] = {}
    cfg["orgmail:cluster"] = {"zones": 3, "shards": 10, "relays": 8, "directoryStorageGb": 65536,
                              "shardVolumeGb": 50}
    big = run_program(cfg, LONGEST_STACK)
    assert len(big.of_type("aws:ec2/eip:Eip")) == 3 + 10 + 8
    found = dc.check_run(big)
    assert found == [], "\n".join(map(str, found))


def test_the_directorys_storage_ceiling() -> None:
    from components.directory_db import max_storage
    assert max_storage(100) == 400 and max_storage(20000) == 65536 and max_storage(65536) is None


def test_long_names_fit_the_load_balancers_and_the_directorys_limits() -> None:
    """pulumi-aws auto-names a load balancer or target group `<name>-<7 characters>`: at most 32; the longest
    target group name the cluster makes must fit."""
    names = [g.name + dc.AUTONAME_SUFFIX for g in run().of_type(TARGET_GROUP)]
    assert max(len(n) for n in names) <= 32 and all(dc.elb_name(n) is None for n in names)
    from components.directory_db import final_snapshot_identifier
    assert dc.rds_identifier(255)(final_snapshot_identifier("a--b-")) is None


def test_the_offline_plan_and_cost_of_the_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    from tools.cost import cost_section
    from tools.plan import main as plan
    assert plan(["Pulumi.isp.yaml", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["resources"]) == len(run().resources)
    section = cost_section(run(), settings())
    items = [line["item"] for line in section["lines"]]
    assert any(i.startswith("2 edges of edges-group (m6i.large") for i in items)
    assert any("shard1-instance (m6i.2xlarge)" in i for i in items)
    unpriced = " ".join(section["unpriced"])
    assert "Network Load Balancer" in unpriced and "2 x db.m6i.large" in unpriced
    assert f"ElastiCache (valkey) edge-cache: 2 x {ISP_CLUSTER.cache_node_type} node hours" in unpriced


def test_lb_subnets_are_disjoint_from_the_hosts() -> None:
    nets = [ipaddress.ip_network(s.inputs["cidrBlock"]) for kind in ("lb", "public", "private") for s in subnets(kind)]
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])


def test_the_preflight_counts_the_clusters_hosts_addresses_and_zones() -> None:
    from tools.preflight import elastic_ips, host_types, preflight, vcpus_needed
    s = settings()
    c = s.cluster
    assert c is not None
    assert Counter(host_types(s)) == Counter({"m6i.2xlarge": c.shards, "m6i.large": c.relays + c.edges_max})
    assert sum(vcpus_needed(s).values()) == 2 * 8 + 8 * 2  # two m6i.2xlarge shards, two relays and six edges
    assert elastic_ips(s) == c.zones + c.shards + c.relays == 6
    lines = preflight(s)
    assert any("6 of the 5 per region" in line and "ask for an increase" in line for line in lines)
    assert any("in 2 zones of eu-north-1" in line for line in lines)
    assert any(line.startswith("Cluster: ") and "deploy-cluster-policy.json" in line for line in lines)


def test_the_zone_files_mark_the_load_balancers_and_relays_addresses(tmp_path: Any) -> None:
    from tools.zonefile import main as zonefile
    assert zonefile(["Pulumi.isp.yaml", "--out", str(tmp_path)]) == 0
    zone = (tmp_path / "isp.example.zone").read_text()
    # The load balancer's addresses as this zone file names them (another mock run may number the
    # Elastic IPs in another order).
    lb_ips = re.findall(r"^; PLACEHOLDER .*: mail\.isp\.example\. +\d+ IN A +(\S+)$", zone, re.M)
    assert len(lb_ips) == len([e for e in run().of_type("aws:ec2/eip:Eip") if e.name.startswith("lb-ip")]) >= 2
    for ip in lb_ips:
        assert f"; PTR of {ip} -> mail.isp.example. is set at AWS" in zone
    assert all(line.startswith("; PLACEHOLDER") for line in zone.splitlines() if "v=spf1 ip4:" in line)


def test_the_rules_follow_the_admin_networks_and_the_ses_relay() -> None:
    """cluster_rules as data: SSH from admin.sshCidrs on every host role and nowhere else; with the SES relay
    the outbound relays (only they) may reach port 587 outside."""
    from components.firewall import ClusterFirewallArgs, cluster_rules
    rules = cluster_rules(ClusterFirewallArgs(stack="s", vpc_id="vpc-1", lb_cidrs=("10.42.0.0/27",),
                                              ssh_cidrs=("203.0.113.0/24",), ses=True))
    assert {(r.group, r.peer) for r in rules if r.port == 22} == {
        (g, "203.0.113.0/24") for g in ("edge", "shard", "relay")}
    plain = cluster_rules(ClusterFirewallArgs(stack="s", vpc_id="vpc-1", lb_cidrs=("10.42.0.0/27",)))
    assert {(r.group, r.direction, r.port, r.peer) for r in set(rules) - set(plain) if r.port != 22} == {
        ("relay", "egress", 587, "0.0.0.0/0")}
    assert not [r for r in plain if r.port == 22]


def test_shards_and_relays_reboot_after_updates_each_at_its_own_time_and_edges_never() -> None:
    """upgrades.* on the cluster (orgmail-sync --cluster writes unattended-upgrades' file): shards, then relays,
    30 minutes apart from upgrades.rebootTime, so no two of one role reboot at once; the edges' config names no
    reboot time (Auto Scaling replaces an edge, and a new instance upgrades before it serves)."""
    from components.cluster import role_config
    s = settings()
    shard, relay = (role_config(s, r, ("10.0.0.0/27",))["upgrades"]["rebootTimes"] for r in ("shard", "relay"))
    assert list(shard) == list(s.shard_hosts) and list(relay) == list(s.outbound_relays)
    times = [*shard.values(), *relay.values()]
    assert times[0] == s.upgrades.reboot_time and len(set(times)) == len(times)
    assert not set(role_config(s, "edge", ("10.0.0.0/27",))["upgrades"]["rebootTimes"]) & {
        *s.shard_hosts, *s.outbound_relays}
