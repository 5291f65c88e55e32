"""The resource graph per stack on the Pulumi mock engine."""

from __future__ import annotations

import base64
import gzip
import json
from collections import Counter

import pytest

from components.backup import SNAPSHOT_TAG
from components.network import NoZoneError, choose_zone
from components.settings import load_settings
from components.tiers import TIERS
from components.userdata import EC2_USER_DATA_LIMIT
from tests.unit.conftest import ROOT, raw_config, run_stack, stack_config
from tools.mockengine import MockRun, run_program
from tools.plan import host_files

INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
INSTANCE = "aws:ec2/instance:Instance"
VOLUME = "aws:ebs/volume:Volume"
EIP = "aws:ec2/eip:Eip"
RECORD = "cloudflare:index/dnsRecord:DnsRecord"
PTR = "aws:ec2/eipDomainName:EipDomainName"
PARAM = "aws:ssm/parameter:Parameter"
ENI = "aws:ec2/networkInterface:NetworkInterface"
COMPONENTS = {"orgmail:index:AcmeChallenges", "orgmail:index:Network", "orgmail:index:Firewall", "orgmail:index:Secrets", "orgmail:index:Backup",
              "orgmail:index:MailHost", "orgmail:index:Dns", "orgmail:index:Web", "orgmail:index:Webmail"}


def settings_of(stack: str):
    return load_settings(raw_config(stack), stack)


def rules(run: MockRun, type_: str) -> set[tuple[str, int, int, str]]:
    out = set()
    for r in run.of_type(type_):
        i = r.inputs
        out.add((i["ipProtocol"], int(i["fromPort"]), int(i["toPort"]), i.get("cidrIpv4") or i["cidrIpv6"]))
    return out


def user_data(r) -> str:
    raw = base64.b64decode(r.inputs["userDataBase64"])
    return gzip.decompress(raw).decode()


def test_resource_counts_per_tier(stack_run) -> None:
    stack, run = stack_run
    s = settings_of(stack)
    hosts = TIERS[s.tier].host_count
    counts = Counter(r.type for r in run.resources)
    assert counts[INSTANCE] == hosts
    assert counts[EIP] == hosts and counts["aws:ec2/eipAssociation:EipAssociation"] == hosts
    assert counts[PTR] == hosts
    assert counts[VOLUME] == hosts and counts["aws:ec2/volumeAttachment:VolumeAttachment"] == hosts
    assert counts["aws:ec2/vpc:Vpc"] == 1 and counts["aws:ec2/subnet:Subnet"] == 1
    assert counts["aws:ec2/securityGroup:SecurityGroup"] == 1
    assert counts["tls:index/privateKey:PrivateKey"] == 1
    assert counts["cloudflare:index/apiToken:ApiToken"] == 1
    assert counts["orgmail:index:MailHost"] == hosts
    domains = len(s.domains)
    # per host: A, HELO SPF, CAA issue + issuewild (+ iodef); per domain: MX per host, SPF, DMARC, DKIM,
    # MTA-STS, TLS-RPT and 6 SRV; plus DMARC report authorisations
    auth = sum(1 for r in run.of_type(RECORD) if "._report._dmarc." in r.inputs["name"])
    caa = 3 if s.publishing.caa_iodef else 2
    webmail = 1 if s.webmail else 0  # its CNAME to the tunnel
    assert counts[RECORD] == hosts * (2 + caa) + domains * (hosts + 3 + 1 + 1 + 6) + auth + webmail
    # the MTA-STS/autoconfig Worker and the ACME challenge Worker, with their custom domains
    assert counts["cloudflare:index/workersScript:WorkersScript"] == 2
    web_hosts = domains * (2 if s.publishing.autoconfig else 1)
    assert counts["cloudflare:index/workersCustomDomain:WorkersCustomDomain"] == web_hosts + 1


def test_security_group_rules_exact(stack_run) -> None:
    stack, run = stack_run
    s = settings_of(stack)
    expected = {("tcp", p, p, "0.0.0.0/0") for p in (25, 465, 587, 993, 995)}  # mail: IPv4 only
    expected |= {("tcp", 22, 22, c) for c in s.admin.ssh_cidrs}
    # path MTU discovery: ICMP "fragmentation needed" (type 3 code 4), ICMPv6 "packet too big" (type 2)
    expected |= {("icmp", 3, 4, "0.0.0.0/0"), ("icmpv6", 2, 0, "::/0")}
    assert rules(run, INGRESS) == expected
    assert rules(run, EGRESS) == {("tcp", 25, 25, "0.0.0.0/0")} | {
        ("tcp", p, p, c) for p in (80, 443) for c in ("0.0.0.0/0", "::/0")} | {
        # the host's own resolver asks the authoritative servers (blocklists refuse shared resolvers)
        (proto, 53, 53, c) for proto in ("udp", "tcp") for c in ("0.0.0.0/0", "::/0")} | {
        # webmail: cloudflared's connections out to Cloudflare (no port opens for it)
        (proto, 7844, 7844, c) for proto in ("tcp", "udp") for c in ("0.0.0.0/0", "::/0") if s.webmail}


def test_mail_over_ipv6_only_where_an_aaaa_record_names_the_host(stack_run) -> None:
    """Inbound and outbound mail ports are open to IPv6 exactly when the stack publishes AAAA
    records for its hosts (today none: AWS gives reverse DNS only to Elastic IPv4)."""
    _, run = stack_run
    aaaa = [r for r in run.of_type(RECORD) if r.inputs["type"] == "AAAA"]
    mail_v6 = [r for r in rules(run, INGRESS) | rules(run, EGRESS)
               if r[0] == "tcp" and r[1] in (25, 465, 587, 993, 995) and ":" in r[3]]
    assert bool(aaaa) == bool(mail_v6) and not aaaa


def test_ssh_rules_follow_admin_cidrs() -> None:
    large = run_stack("large")
    ssh = {r for r in rules(large, INGRESS) if r[1] == 22}
    assert ssh == {("tcp", 22, 22, "203.0.113.0/24"), ("tcp", 22, 22, "2001:db8:100::/48")}
    assert not {r for r in rules(run_stack("small"), INGRESS) if r[1] == 22}


def test_instances_hardened(stack_run) -> None:
    stack, run = stack_run
    tier = TIERS[settings_of(stack).tier]
    for r in run.of_type(INSTANCE):
        i = r.inputs
        assert i["metadataOptions"]["httpTokens"] == "required"
        assert i["metadataOptions"]["httpPutResponseHopLimit"] == 1
        root = i["rootBlockDevice"]
        assert root["encrypted"] is True and root["volumeType"] == "gp3"
        assert root["volumeSize"] == tier.root_volume_gb
        interface = next(e for e in run.of_type(ENI) if e.id == i["primaryNetworkInterface"]["networkInterfaceId"])
        assert len(interface.inputs["securityGroups"]) == 1
        assert i["primaryNetworkInterface"]["deleteOnTermination"] is False  # it outlives the instance
        mailbox = r.name == "mail-instance"
        assert i["instanceType"] == (tier.instance_type if mailbox else tier.relay_instance_type)
        spec = tier.spec if mailbox else tier.relay_spec
        assert (i.get("creditSpecification") or {}).get("cpuCredits") == ("standard" if spec.burstable else None)


def test_changed_user_data_replaces_the_instance_old_one_first(stack_run) -> None:
    """cloud-init runs user-data once per instance: a change must bring a new instance, and the
    old one (with its volume attachment and address association) must go before the new attaches."""
    _, run = stack_run
    for inst in run.of_type(INSTANCE):
        assert inst.inputs["userDataReplaceOnChange"] is True
        assert inst.delete_before_replace is True
    attachments = run.of_type("aws:ec2/volumeAttachment:VolumeAttachment")
    assert attachments and all(r.delete_before_replace for r in attachments)
    for attach in attachments:
        assert attach.inputs["stopInstanceBeforeDetaching"] is True
    # The address stays on the host's own interface: a replacement does not touch it.
    for assoc in run.of_type("aws:ec2/eipAssociation:EipAssociation"):
        assert "instanceId" not in assoc.inputs and assoc.inputs["networkInterfaceId"].startswith("eni-")


def test_a_host_has_address_route_and_permissions_before_it_boots(stack_run) -> None:
    """The first boot installs packages over IPv4 and reads SSM: everything it needs exists first."""
    _, run = stack_run
    urns = {r.urn: r for r in run.resources}
    network = [r.urn for r in run.resources if r.type in (
        "aws:ec2/internetGateway:InternetGateway", "aws:ec2/routeTable:RouteTable",
        "aws:ec2/routeTableAssociation:RouteTableAssociation")]
    assert len(network) == 3
    # All but the signing selector, which waits for its DKIM records (a host booted before it signs from
    # its next sync on: test_dkim_rotation.py), and the relays' addresses, which exist only after the
    # relays' Elastic IPs (the mailbox host keeps empty relay maps until its next sync: test_backup_mx.py).
    late = {"dns-dkim-selector", "secrets-relay-addresses"}
    boot_reads = ({r.urn for r in run.of_type(PARAM) if r.name not in late and "/bundle/" not in r.inputs["name"]}
                  | {r.urn for r in run.of_type("aws:iam/rolePolicy:RolePolicy")})
    for inst in run.of_type(INSTANCE):
        deps = set(inst.dependencies)
        # Its own bundle (its files beyond the bootstrap), not another host's.
        own = {r.urn for r in run.of_type(PARAM) if f"/bundle/{inst.inputs['tags']['Name']}/part-" in r.inputs["name"]}
        bundles = {r.urn for r in run.of_type(PARAM) if "/bundle/" in r.inputs["name"]}
        assert own and own <= deps and not (bundles - own) & deps
        [assoc] = [urns[d] for d in deps if urns[d].type == "aws:ec2/eipAssociation:EipAssociation"]
        assert set(network) <= set(assoc.dependencies)
        interface = next(e for e in run.of_type(ENI) if e.id == inst.inputs["primaryNetworkInterface"]["networkInterfaceId"])
        assert set(network) <= set(interface.dependencies) and assoc.inputs["networkInterfaceId"] == interface.id
        assert boot_reads <= deps, sorted(urns[u].name for u in boot_reads - deps)


def test_zone_offers_every_instance_type_of_the_tier_and_never_moves() -> None:
    # The mock region's first zone lacks m6in types (as in many regions): the ISP tier goes to b.
    isp = run_stack("isp-single").one("aws:ec2/subnet:Subnet", "network-public")
    assert isp.inputs["availabilityZone"] == "eu-north-1b" and isp.ignore_changes == ["availabilityZone"]
    assert run_stack("dev").one("aws:ec2/subnet:Subnet", "network-public").inputs["availabilityZone"].endswith("a")
    offered = [("m6in.8xlarge", "z-b"), ("m6i.large", "z-a"), ("m6i.large", "z-b"), ("m6in.8xlarge", "z-c")]
    assert choose_zone(["z-c", "z-b", "z-a"], offered, ["m6i.large", "m6in.8xlarge"], "r") == "z-b"
    with pytest.raises(NoZoneError, match="offers all of m6i.large, m6in.8xlarge.*orgmail:region"):
        choose_zone(["z-a"], offered, ["m6i.large", "m6in.8xlarge"], "r")


def test_every_host_keeps_its_queue_on_a_protected_volume(stack_run) -> None:
    """Issue 16 item 1: Postfix's queue outlives an instance replacement. Every host has its own
    protected, encrypted gp3 volume in its zone, attached (old attachment first) to its instance and
    found by id at boot; the mailbox host's is the mail-data volume, a relay's is sized by its tier and
    never snapshotted (an old queue restored would deliver twice)."""
    stack, run = stack_run
    tier = TIERS[settings_of(stack).tier]
    zone = run.one("aws:ec2/subnet:Subnet", "network-public").inputs["availabilityZone"]
    volumes = {v.id: v for v in run.of_type(VOLUME)}
    attachments = run.of_type("aws:ec2/volumeAttachment:VolumeAttachment")
    instances = run.of_type(INSTANCE)
    assert len(volumes) == len(attachments) == len(instances) == tier.host_count
    by_instance = {a.inputs["instanceId"]: a for a in attachments}
    for inst in instances:
        attach = by_instance[inst.id]
        assert attach.delete_before_replace is True and attach.inputs["stopInstanceBeforeDetaching"] is True
        vol = volumes[attach.inputs["volumeId"]]
        assert vol.protect is True and vol.inputs["encrypted"] is True and vol.inputs["type"] == "gp3"
        assert vol.inputs["availabilityZone"] == zone and vol.inputs["finalSnapshot"] is True
        ud = user_data(inst)
        assert "nvme-Amazon_Elastic_Block_Store_" + vol.id.replace("-", "") in ud
        files = host_files(run, inst)
        assert "/etc/systemd/system/orgmail-queue.service" in files
        assert "/etc/systemd/system/postfix.service.d/orgmail.conf" in files
        if inst.name == "mail-instance":
            assert vol.name == "mail-data"
        else:
            assert vol.name == inst.name.replace("-instance", "-queue")
            assert vol.inputs["size"] == tier.relay_queue_volume_gb
            assert SNAPSHOT_TAG not in vol.inputs["tags"], \
                vol.inputs["tags"]


def test_data_volume_encrypted_protected_attached(stack_run) -> None:
    stack, run = stack_run
    tier = TIERS[settings_of(stack).tier]
    vol = run.one(VOLUME, "mail-data")
    assert vol.protect is True
    assert vol.inputs["encrypted"] is True and vol.inputs["type"] == "gp3"
    assert vol.inputs["size"] == tier.mail_volume_gb
    attach = run.one("aws:ec2/volumeAttachment:VolumeAttachment", "mail-data-attachment")
    assert attach.inputs["volumeId"] == vol.id and vol.id.startswith("vol-")
    # the host finds the volume by id: the user-data carries exactly this volume's id
    ud = user_data(run.one(INSTANCE, "mail-instance"))
    assert "nvme-Amazon_Elastic_Block_Store_" + attach.inputs["volumeId"].replace("-", "") in ud
    for eip in run.of_type(EIP):
        assert eip.protect is True and eip.inputs["domain"] == "vpc"


def test_ptr_created_after_a_record(stack_run) -> None:
    _, run = stack_run
    a_records = {r.inputs["name"]: r.urn for r in run.of_type(RECORD) if r.inputs["type"] == "A"}
    ptrs = run.of_type(PTR)
    assert ptrs
    for ptr in ptrs:
        host = ptr.inputs["domainName"]
        assert a_records[host] in ptr.dependencies, f"PTR of {host} does not wait for its A record"


@pytest.mark.parametrize("mode", ["enforce", "none"])
def test_mta_sts_id_changes_only_after_the_worker_serves_the_new_policy(mode: str) -> None:
    """RFC 8461 3.1: a sender seeing the new id fetches the policy; it must already be the new one.
    Also for the opt-out (RFC 8461 8.3): the "mode: none" policy goes out before its id."""
    config = stack_config("medium")
    config["orgmail:mtaSts"] = {**config.get("orgmail:mtaSts", {}), "mode": mode}
    run = run_program(config, "medium")
    scripts = [w for w in run.of_type("cloudflare:index/workersScript:WorkersScript") if w.name == "web-worker"]
    assert len(scripts) == 1
    txt = [r for r in run.of_type(RECORD) if r.inputs["name"].startswith("_mta-sts.")]
    assert len(txt) == len(settings_of("medium").domains)
    for r in txt:
        assert scripts[0].urn in r.dependencies, f"{r.inputs['name']} does not wait for the Worker"
    others = [r for r in run.of_type(RECORD) if not r.inputs["name"].startswith("_mta-sts.")]
    assert all(scripts[0].urn not in r.dependencies for r in others)


def test_dns_records_unproxied_with_ttl(stack_run) -> None:
    stack, run = stack_run
    s = settings_of(stack)
    zones = {d.zone_id for d in s.domains}
    for r in run.of_type(RECORD):
        if str(r.inputs.get("content", "")).endswith(".cfargotunnel.com"):  # webmail's name: answered by Cloudflare's proxy
            assert (r.inputs["proxied"], r.inputs["ttl"], r.inputs["type"]) == (True, 1, "CNAME")
            assert r.inputs["name"] == s.webmail.hostname and r.inputs["zoneId"] in zones
            continue
        assert r.inputs["proxied"] is False
        assert r.inputs["ttl"] == s.dns_ttl
        assert r.inputs["zoneId"] in zones
        assert ("data" in r.inputs) == (r.inputs["type"] in ("SRV", "CAA"))


def test_a_records_carry_the_elastic_ips(stack_run) -> None:
    _, run = stack_run
    ips = {r.name.removesuffix("-ip"): r.outputs["publicIp"] for r in run.of_type(EIP)}
    for r in run.of_type(RECORD):
        if r.inputs["type"] == "A":
            assert r.inputs["content"] == ips[r.inputs["name"].split(".")[0]]
    assert run.outputs["publicIp"] == ips["mail"]


def test_dkim_record_matches_the_signing_key(dev_run: MockRun) -> None:
    key = dev_run.one("tls:index/privateKey:PrivateKey", "secrets-dkim-s2026")
    assert key.inputs["algorithm"] == "RSA" and key.inputs["rsaBits"] == 2048
    pub = "".join(key.outputs["publicKeyPem"].strip().splitlines()[1:-1])
    dkim = [r for r in dev_run.of_type(RECORD) if r.inputs["name"] == "s2026._domainkey.example.org"][0]
    assert dkim.inputs["content"].replace('" "', "").strip('"') == f"v=DKIM1; k=rsa; p={pub}"
    param = [p for p in dev_run.of_type(PARAM) if p.inputs["name"] == "/orgmail/dev/dkim/s2026"][0]
    assert param.inputs["value"] == key.outputs["privateKeyPem"]
    assert param.inputs["type"] == "SecureString"


def test_secrets_are_secure_parameters_under_the_stack_path(stack_run) -> None:
    stack, run = stack_run
    by_name = {p.inputs["name"]: p for p in run.of_type(PARAM)}
    for name, p in by_name.items():
        assert name.startswith(f"/orgmail/{stack}/")
        secret = not name.startswith((f"/orgmail/{stack}/config/", f"/orgmail/{stack}/files/", f"/orgmail/{stack}/bundle/",
                                      f"/orgmail/{stack}/dkim-selector", f"/orgmail/{stack}/relay-addresses"))
        assert (p.inputs["type"] == "SecureString") == secret, name
    # No host holds the Cloudflare token: only each host's own ACME challenge key.
    token = run.one("cloudflare:index/apiToken:ApiToken", "acme-dns-token")
    assert all(p.inputs["value"] != token.outputs["value"] for p in by_name.values())
    keys = {n for n in by_name if n.startswith(f"/orgmail/{stack}/certbot/")}
    assert keys == {f"/orgmail/{stack}/certbot/{h}/key" for h in settings_of(stack).mx_hosts}


def test_the_acme_workers_token_is_scoped_to_the_mail_hosts_zone(stack_run) -> None:
    stack, run = stack_run
    s = settings_of(stack)
    token = run.one("cloudflare:index/apiToken:ApiToken", "acme-dns-token")
    (policy,) = token.inputs["policies"]
    assert policy["effect"] == "allow"
    assert {g["id"] for g in policy["permissionGroups"]} == {
        "c8fed203ed3043cba015a93ad1616f1f", "4755a26eedb94da69e1066d98aa820be"}
    assert json.loads(policy["resources"]) == {f"com.cloudflare.api.account.zone.{s.primary_domain.zone_id}": "*"}


def test_iam_policy_reads_only_this_stacks_path(stack_run) -> None:
    stack, run = stack_run
    s = settings_of(stack)
    policy = json.loads(run.one("aws:iam/rolePolicy:RolePolicy", "secrets-host-policy").inputs["policy"])
    base = f"arn:aws:ssm:{s.region}:123456789012:parameter/orgmail/{stack}"
    for st in policy["Statement"]:
        actions = st["Action"]
        if any(a.startswith("ssm:GetParameter") for a in actions):
            assert st["Resource"] == [base, base + "/*"]
        elif st["Sid"].startswith("BackupBucket") or st["Sid"] == "BackupsOutliveTheHost":
            # restic's repository: the stack's bucket only
            assert all(a.startswith("s3:") for a in actions)
        elif st["Sid"] == "ReportToCloudWatch":  # backup and bootstrap results, in their own namespace only
            assert actions == ["cloudwatch:PutMetricData"]
            assert st["Condition"] == {"StringEquals": {"cloudwatch:namespace": "orgmail"}}
        else:
            assert st["Sid"] == "SessionManager"
            assert not any("Parameter" in a for a in actions)
    sids = {st["Sid"] for st in policy["Statement"]}
    assert ("SessionManager" in sids) == s.admin.ssm_session_manager
    # no broad managed policies on the host role (the DLM service role has AWS's own)
    assert not [a for a in run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
                if "secrets-host-role" in a.inputs["role"]]
    role = run.one("aws:iam/role:Role", "secrets-host-role")
    assume = json.loads(role.inputs["assumeRolePolicy"])
    assert assume["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


def test_no_secret_in_user_data_or_plain_outputs(stack_run) -> None:
    _, run = stack_run
    secrets = [run.one("tls:index/privateKey:PrivateKey", n).outputs["privateKeyPem"]
               for n in [r.name for r in run.of_type("tls:index/privateKey:PrivateKey")]]
    secrets += [r.outputs["result"] for r in run.of_type("random:index/randomPassword:RandomPassword")]
    secrets += [r.outputs["bcryptHash"] for r in run.of_type("random:index/randomPassword:RandomPassword")]
    secrets += [r.outputs["value"] for r in run.of_type("cloudflare:index/apiToken:ApiToken")]
    key_body = [s.splitlines()[1] for s in secrets[:1]]
    plain_outputs = json.dumps({k: v for k, v in run.outputs.items() if k not in run.secret_outputs})
    assert "initialPasswords" in run.secret_outputs
    for r in run.of_type(INSTANCE):
        ud = user_data(r)
        for s in secrets + key_body:
            assert s not in ud
            assert s not in plain_outputs
        assert "PRIVATE KEY" not in ud


def test_every_resource_is_parented_to_its_component(stack_run) -> None:
    _, run = stack_run
    for r in run.resources:
        if r.type in ("pulumi:providers:aws", "orgmail:index:OrgMail"):
            assert "::pulumi:pulumi:Stack::" in r.parent
        elif r.type in COMPONENTS or r.type in ("command:local:Command", "aws:ec2/amiCopy:AmiCopy"):
            assert r.parent.endswith("orgmail:index:OrgMail::orgmail")
        else:
            parent_type = r.parent.split("::")[-2].split("$")[-1]
            assert parent_type in COMPONENTS, f"{r.type} {r.name} parented to {parent_type}"


def test_user_data_under_the_ec2_limit(stack_run) -> None:
    _, run = stack_run
    for r in run.of_type(INSTANCE):
        assert len(base64.b64decode(r.inputs["userDataBase64"])) < EC2_USER_DATA_LIMIT
        ud = user_data(r)
        assert ud.startswith("#cloud-config\n")
        assert ("ROLE=mailbox" in ud) == (r.name == "mail-instance")


def test_relays_forward_to_the_mailbox_host() -> None:
    run = run_stack("isp-single")
    for name in ("mx2-instance", "mx3-instance"):
        ud = user_data(run.one(INSTANCE, name))
        assert "ROLE=relay" in ud and "MAIL_HOST=mail.isp.example" in ud
        assert "dovecot" not in ud.split("packages:")[1].split("write_files")[0]
        assert "relay_recipient_maps" in host_files(run, run.one(INSTANCE, name))["/etc/postfix/main.cf"]


def test_hosts_boot_the_stacks_own_copy_of_the_image() -> None:
    """A replacement boots the copy in the account, which Debian's deregistration cannot remove;
    a looked-up AMI's later releases are ignored, a pinned one makes a new copy."""
    run = run_stack("large")
    [image] = run.of_type("aws:ec2/amiCopy:AmiCopy")
    assert image.inputs["sourceAmiId"] == "ami-debian13-placeholder" and image.inputs["encrypted"] is True
    assert image.inputs["name"] == "orgmail-large-ami-debian13-placeholder"
    assert sorted(image.ignore_changes) == ["name", "sourceAmiId"]
    for inst in run.of_type(INSTANCE):
        assert inst.inputs["ami"] == image.id and inst.ignore_changes == []
    assert run.outputs["amiId"] == image.id and run.outputs["amiSource"] == "ami-debian13-placeholder"
    cfg = stack_config("dev")
    cfg["orgmail:amiId"] = "ami-0123456789abcdef0"
    [pinned] = run_program(cfg, "dev").of_type("aws:ec2/amiCopy:AmiCopy")
    assert pinned.inputs["sourceAmiId"] == "ami-0123456789abcdef0" and pinned.ignore_changes == []


def test_existing_network_is_used_as_given() -> None:
    cfg = stack_config("dev")
    cfg["orgmail:network"] = {"vpcId": "vpc-0123456789abcdef0", "subnetId": "subnet-0123456789abcdef0"}
    run = run_program(cfg, "dev")
    assert not run.of_type("aws:ec2/vpc:Vpc") and not run.of_type("aws:ec2/subnet:Subnet")
    assert run.one(ENI, "mail-interface").inputs["subnetId"] == "subnet-0123456789abcdef0"
    assert run.one("aws:ec2/securityGroup:SecurityGroup", "firewall-mail").inputs["vpcId"] == "vpc-0123456789abcdef0"


def test_own_network_is_dual_stack_and_routed(dev_run: MockRun) -> None:
    vpc = dev_run.one("aws:ec2/vpc:Vpc", "network-vpc")
    assert vpc.inputs["assignGeneratedIpv6CidrBlock"] is True
    subnet = dev_run.one("aws:ec2/subnet:Subnet", "network-public")
    assert subnet.inputs["ipv6CidrBlock"] == "2001:db8:4200:100::/64"
    routes = dev_run.one("aws:ec2/routeTable:RouteTable", "network-routes").inputs["routes"]
    assert {r.get("cidrBlock") or r.get("ipv6CidrBlock") for r in routes} == {"0.0.0.0/0", "::/0"}


def test_outputs(dev_run: MockRun) -> None:
    o = dev_run.outputs
    assert o["mailHost"] == "mail.example.org" and o["mxHosts"] == ["mail.example.org"]
    assert o["dkimSelector"] == "s2026"
    assert {(c["port"], c["security"]) for c in o["clientSettings"]["smtp"]} == {(465, "SSL/TLS"), (587, "STARTTLS")}
    assert o["clientSettings"]["imap"]["port"] == 993 and o["clientSettings"]["pop3"]["port"] == 995
    assert {r["type"] for r in o["dnsRecords"]} == {"A", "MX", "TXT", "CAA", "SRV"}
    assert set(o["initialPasswords"]) == {"ann@example.org", "bob@example.org"}


def test_host_config_parameter_has_mailboxes_and_no_secret(dev_run: MockRun) -> None:
    parts = sorted((p.inputs["name"], p.inputs["value"]) for p in dev_run.of_type(PARAM)
                   if p.inputs["name"].startswith("/orgmail/dev/config/"))
    config = json.loads("".join(v for _, v in parts if v != "-"))
    assert config["domains"] == ["example.org"]
    assert config["mailboxes"] == [{"address": "ann@example.org", "quota": "2G"},
                                   {"address": "bob@example.org", "quota": None}]
    assert config["aliases"]["team@example.org"] == ["ann@example.org", "bob@example.org"]
    assert config["senders"]["postmaster@example.org"] == ["ann@example.org"]
    assert config["postfixLimits"]["smtpd_client_connection_rate_limit"] == 10
    assert "BLF-CRYPT" not in json.dumps(config)


@pytest.mark.parametrize("count", [1, 120])
def test_large_mailbox_lists_split_across_parameters(count: int) -> None:
    cfg = stack_config("dev")
    cfg["orgmail:mailboxes"] = [{"address": f"user{i:04d}@example.org"} for i in range(count)]
    cfg["orgmail:aliases"] = {}
    cfg["orgmail:admin"] = {"email": "user0000@example.org"}
    run = run_program(cfg, "dev")
    for prefix in ("/orgmail/dev/config/", "/orgmail/dev/mailbox-passwords/"):
        parts = sorted((p.inputs["name"], p.inputs["value"]) for p in run.of_type(PARAM)
                       if p.inputs["name"].startswith(prefix))
        assert all(len(v) <= 4096 for _, v in parts)
        doc = json.loads("".join(v for _, v in parts if v != "-"))
        assert len(doc["mailboxes"] if "config" in prefix else doc) == count
        if count == 120:
            assert len(parts) > 1


def test_verify_after_deploy_is_opt_in() -> None:
    run = run_stack("medium")
    (cmd,) = run.of_type("command:local:Command")
    assert cmd.inputs["create"].endswith(
        "-m tools.verify Pulumi.medium.yaml --outputs - --retry-for 900 --skip-host --no-fail")
    # Portable: nothing of this checkout or machine, so another checkout does not replace and rerun it.
    assert cmd.inputs["create"].startswith(".venv/bin/python -m tools.verify ") and "dir" not in cmd.inputs
    assert str(ROOT) not in json.dumps(cmd.inputs)
    stdin = json.loads(cmd.inputs["stdin"])
    assert set(stdin) == {"hostIps", "dkimPublicKey", "dkimRetiring", "dnsRecords"}
    assert stdin["hostIps"] == {"mail.medium.example": run.outputs["publicIp"]}
    assert "PRIVATE" not in cmd.inputs["stdin"]
    # it runs after every record and every PTR exists
    for r in [*run.of_type(PTR), *run.of_type(RECORD)]:
        if "orgmail:index:Webmail$" not in r.urn:  # the verifier checks mail, not webmail's name
            assert r.urn in cmd.dependencies, r.name
    assert not run_stack("dev").of_type("command:local:Command")


def test_verifier_interpreter_comes_from_the_project_file(tmp_path) -> None:
    from components.orgmail import project_python

    cases = {"runtime:\n  name: python\n  options:\n    virtualenv: venv/\n": "venv/bin/python",
             "runtime: python\n": "python3",
             "runtime:\n  name: python\n  options:\n    virtualenv: /abs/venv\n": "python3",
             "runtime:\n  name: python\n  options:\n    virtualenv: ../elsewhere\n": "python3"}
    for text, expected in cases.items():
        (tmp_path / "Pulumi.yaml").write_text("name: orgmail\n" + text)
        assert project_python(tmp_path / "Pulumi.yaml") == expected, text


def test_verify_can_fail_the_deploy() -> None:
    cfg = stack_config("medium")
    cfg["orgmail:verify"] = {"afterDeploy": True, "failDeploy": True, "skipHost": False}
    (cmd,) = run_program(cfg, "medium").of_type("command:local:Command")
    assert cmd.inputs["create"].endswith("--retry-for 900")


def test_mock_password_hashes_verify_at_plan_and_provider_cost() -> None:
    """Plans hash at bcrypt's cheapest cost; a booted host gets the provider's cost (10)."""
    import bcrypt

    from tools.mockengine import PLAN_BCRYPT_COST, PROVIDER_BCRYPT_COST

    cfg = stack_config("dev")
    for cost, run in ((PLAN_BCRYPT_COST, run_program(cfg, "dev")),
                      (PROVIDER_BCRYPT_COST, run_program(cfg, "dev", bcrypt_cost=PROVIDER_BCRYPT_COST))):
        pw = run.one("random:index/randomPassword:RandomPassword", "secrets-password-ann-at-example-org")
        hashed = pw.outputs["bcryptHash"]
        assert hashed.startswith(f"$2a${cost:02d}$")
        assert bcrypt.checkpw(pw.outputs["result"].encode(), hashed.encode())
