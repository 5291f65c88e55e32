"""User-data rendering: plain values in, a valid cloud-config out, every file as rendered."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from pathlib import Path

import pytest
import yaml

from components.userdata import (
    HOST_FILES,
    MAIL_PORTS,
    HostConfig,
    bundle_files,
    compress_user_data,
    render_bundle,
    render_files,
    render_user_data,
    ssm_files,
    user_data_base64,
)
from tests.unit.conftest import STACKS, run_stack

MAILBOX = HostConfig(stack="t", role="mailbox", hostname="mail.example.org", mail_host="mail.example.org",
                     region="eu-central-1", ssm_path="/orgmail/t", data_volume_id="vol-0123456789abcdef0")
RELAY = HostConfig(stack="t", role="relay", hostname="mx2.example.org", mail_host="mail.example.org",
                   region="eu-central-1", ssm_path="/orgmail/t",
                   data_volume_id="vol-0fedcba9876543210")


def files_of(host: HostConfig) -> dict[str, str]:
    return {f.path: f.content for f in render_files(host)}


def test_yaml_round_trip_keeps_every_file_exactly() -> None:
    """Every file travels exactly one way and arrives as rendered: user-data (the bootstrap, orgmail-unbundle,
    the firewall), the host's bundle (named by its SHA-256 in user-data; orgmail-sync in it) or its role's files."""
    for host in (MAILBOX, RELAY):
        doc = yaml.safe_load(render_user_data(host))
        written = {f["path"]: f["content"] for f in doc["write_files"]}
        through_ssm = ssm_files(host.role)
        bundle = {p: f["content"] for p, f in bundle_files(render_bundle(host)).items()}
        assert set(written) == {"/etc/orgmail/host.env", "/usr/local/sbin/orgmail-bootstrap", "/etc/nftables.conf",
                                "/etc/systemd/system/orgmail-bootstrap.service", "/usr/local/sbin/orgmail-unbundle"}
        assert "/usr/local/sbin/orgmail-sync" in bundle
        assert through_ssm and bundle
        assert not set(through_ssm) & set(written) and not set(bundle) & (set(written) | set(through_ssm))
        assert {**written, **bundle, **{p: f["content"] for p, f in through_ssm.items()}} == files_of(host)
        assert f"BUNDLE_SHA256={hashlib.sha256(render_bundle(host).encode()).hexdigest()}\n" in \
            written["/etc/orgmail/host.env"]
        assert all(f["defer"] is True for f in doc["write_files"])  # after packages are installed
        assert doc["runcmd"] == [["systemctl", "enable", "--now", "--no-block", "orgmail-bootstrap.service"]]
        assert doc["fqdn"] == host.hostname


def test_a_changed_bundle_file_changes_the_user_data() -> None:
    """A bundle file still belongs to one instance: changing it changes the SHA-256 in user-data, so
    Pulumi replaces the instance as when the file itself was in user-data."""
    other = dataclasses.replace(MAILBOX, dnssec_validation=False)  # only unbound's file (in the bundle) differs
    assert render_bundle(other) != render_bundle(MAILBOX)
    assert render_user_data(other) != render_user_data(MAILBOX)
    assert render_bundle(MAILBOX) == render_bundle(MAILBOX)  # same files, same bytes, same hash


def test_the_bootstrap_writes_the_bundle_before_it_configures_anything() -> None:
    """The bundle holds unbound's, Postfix's and every unit's files: the bootstrap writes it (and
    reloads systemd) before the first service it restarts and before the set-up from SSM."""
    [script] = [f.content for f in render_files(MAILBOX) if f.path == "/usr/local/sbin/orgmail-bootstrap"]
    bundle = script.index("/usr/local/sbin/orgmail-unbundle")
    assert script.index("systemctl daemon-reload", bundle) < script.index("systemctl restart unbound")
    assert script.index("amazon-ssm-agent.deb") < bundle < script.index("orgmail-sync --boot")
    assert script.index("apt-get install") < bundle  # awscli present, whatever cloud-init's package step did


def test_roles_get_their_files_and_packages() -> None:
    mailbox, relay = files_of(MAILBOX), files_of(RELAY)
    assert "/etc/dovecot/dovecot.conf" in mailbox and "/etc/dovecot/dovecot.conf" not in relay
    assert len(mailbox) == len(HOST_FILES)
    relay_packages = yaml.safe_load(render_user_data(RELAY))["packages"]
    assert "dovecot-imapd" not in relay_packages and "postfix" in relay_packages
    assert "relay_recipient_maps" in relay["/etc/postfix/main.cf"]
    assert "virtual_transport = lmtp:unix:private/dovecot-lmtp" in mailbox["/etc/postfix/main.cf"]
    assert "submission inet" in mailbox["/etc/postfix/master.cf"] and "submission" not in relay["/etc/postfix/master.cf"]


def test_the_boot_tests_root_preinstalls_every_package_a_host_installs() -> None:
    """The booted host's root (scripts/e2e-rootfs.sh) has every package the user-data installs, so the
    boot tests run what a real host runs (a package missing there would only be installed on AWS)."""
    script = (Path(__file__).parents[2] / "scripts/e2e-rootfs.sh").read_text()
    block = re.search(r"^PACKAGES=\(\n(.*?)^\)", script, re.S | re.M)
    assert block, "PACKAGES=( ... ) in scripts/e2e-rootfs.sh"
    preinstalled = set(block.group(1).split())
    for host in (MAILBOX, RELAY):
        installed = set(yaml.safe_load(render_user_data(host))["packages"])
        assert installed <= preinstalled, sorted(installed - preinstalled)


def test_nftables_opens_the_mail_ports_and_admin_ssh_only() -> None:
    nft = files_of(MAILBOX)["/etc/nftables.conf"]
    assert "policy drop;" in nft
    assert "\n    meta nfproto ipv4 tcp dport { " + ", ".join(map(str, MAIL_PORTS)) + " } accept\n" in nft
    # SSH only from the sets orgmail-sync fills from admin.sshCidrs (a day-2 setting).
    assert "\n    ip saddr @ssh4 tcp dport 22 accept\n    ip6 saddr @ssh6 tcp dport 22 accept\n" in nft
    assert nft.endswith('\ninclude "/etc/orgmail/nftables.d/*.nft"\n')
    # path MTU discovery (ICMP type 3 code 4, ICMPv6 type 2) and IPv6 neighbour discovery
    assert "\n    meta l4proto { icmp, ipv6-icmp } accept\n" in nft
    relay_nft = files_of(RELAY)["/etc/nftables.conf"]
    assert "\n    meta nfproto ipv4 tcp dport { 25 } accept\n" in relay_nft
    assert [line for line in relay_nft.splitlines() if "dport 22" in line] == [
        "    ip saddr @ssh4 tcp dport 22 accept", "    ip6 saddr @ssh6 tcp dport 22 accept"]


def test_mail_services_ipv4_only() -> None:
    """No AAAA record names the hosts and AWS gives reverse DNS only to Elastic IPv4: Postfix
    delivers and listens, Dovecot listens, over IPv4 only."""
    for host in (MAILBOX, RELAY):
        main_cf = files_of(host)["/etc/postfix/main.cf"]
        assert "\ninet_protocols = ipv4\n" in main_cf
    assert "\nlisten = *\n" in files_of(MAILBOX)["/etc/dovecot/dovecot.conf"]


def test_senders_hear_of_stuck_mail_after_four_hours() -> None:
    """The production value; tests/e2e/test_outbound.py proves the notice with a shorter one."""
    assert "\ndelay_warning_time = 4h\n" in files_of(MAILBOX)["/etc/postfix/main.cf"]
    assert "delay_warning_time" not in files_of(RELAY)["/etc/postfix/main.cf"]


def test_no_plaintext_imap_or_pop3() -> None:
    dovecot = files_of(MAILBOX)["/etc/dovecot/dovecot.conf"]
    assert "ssl = required" in dovecot and "auth_allow_cleartext = no" in dovecot
    assert dovecot.count("port = 0") == 2  # imap 143 and pop3 110 disabled


def test_volume_found_by_id() -> None:
    boot = files_of(MAILBOX)["/usr/local/sbin/orgmail-bootstrap"]
    assert "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0" in boot
    relay = files_of(RELAY)["/usr/local/sbin/orgmail-bootstrap"]
    assert "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0fedcba9876543210" in relay


def test_postfix_queue_on_the_volume_before_postfix_or_dovecot_starts() -> None:
    """Issue 16 item 1: every host mounts Postfix's queue from its volume; Postfix and Dovecot (whose
    sockets live in the queue directory) require that first, and the bootstrap mounts the volume and
    the queue before it (re)starts them."""
    for host in (MAILBOX, RELAY):
        files = files_of(host)
        unit = files["/etc/systemd/system/orgmail-queue.service"]
        assert "RequiresMountsFor=/srv/mail" in unit and "ExecStart=/usr/local/sbin/orgmail-queue" in unit
        script = files["/usr/local/sbin/orgmail-queue"]
        assert "mount --bind $q $spool" in script and "postfix set-permissions" in script
        units = ["postfix"] + (["dovecot"] if host.role == "mailbox" else [])
        for name in units:
            dropin = files[f"/etc/systemd/system/{name}.service.d/orgmail.conf"]
            assert "Requires=orgmail-queue.service" in dropin and "After=orgmail-queue.service" in dropin
        boot = files["/usr/local/sbin/orgmail-bootstrap"]
        order = [boot.index(step) for step in ("/usr/local/sbin/orgmail-sync --boot",  # writes orgmail-volume
                                               "/usr/local/sbin/orgmail-volume prepare /dev/disk/by-id/",
                                               "systemctl start orgmail-queue.service",
                                               "systemctl restart postfix.service")]
        assert order == sorted(order), order
    assert "/srv/mail/vmail" not in files_of(RELAY)["/usr/local/sbin/orgmail-bootstrap"]


def test_every_host_resolves_through_its_own_validating_resolver() -> None:
    """Issue 13 defect 2: blocklists refuse queries through shared resolvers (AWS's VPC resolver),
    so every role runs unbound on loopback, validating with Debian's root trust anchor, and names it
    alone in a plain /etc/resolv.conf before anything else resolves; rspamd asks it directly."""
    for host in (MAILBOX, RELAY):
        assert "unbound" in yaml.safe_load(render_user_data(host))["packages"]
        files = files_of(host)
        conf = files["/etc/unbound/unbound.conf.d/orgmail.conf"]
        assert [ln.strip() for ln in conf.splitlines() if ln.strip().startswith("interface:")] == [
            "interface: 127.0.0.1", "interface: ::1"]
        settings = "".join(ln for ln in conf.splitlines() if not ln.startswith("#"))
        assert "module-config" not in settings and "trust-anchor" not in settings  # Debian's validator and anchor
        boot = files["/usr/local/sbin/orgmail-bootstrap"]
        steps = ["systemctl restart unbound.service", "rm -f /etc/resolv.conf",
                 "printf 'nameserver 127.0.0.1\\noptions edns0 trust-ad\\n' > /etc/resolv.conf",
                 "/usr/local/sbin/orgmail-sync --boot", "systemctl start orgmail-queue.service"]
        order = [boot.index(step) for step in steps]  # Postfix copies resolv.conf into its chroot after
        assert order == sorted(order), order
        assert 'nameserver = ["127.0.0.1:53"];' in files["/etc/rspamd/local.d/options.inc"]


def test_test_overrides_default_off() -> None:
    doc = yaml.safe_load(render_user_data(MAILBOX))
    assert doc["package_update"] is True
    env = files_of(MAILBOX)["/etc/orgmail/host.env"]
    assert "AWS_ENDPOINT_URL" not in env
    assert "orgmail-cert.timer" in files_of(MAILBOX)["/usr/local/sbin/orgmail-bootstrap"]
    assert "module-config" not in files_of(MAILBOX)["/etc/unbound/unbound.conf.d/orgmail.conf"]
    test = dataclasses.replace(MAILBOX, dnssec_validation=False)
    assert 'module-config: "iterator"' in files_of(test)["/etc/unbound/unbound.conf.d/orgmail.conf"]


def test_compression_is_deterministic_and_small() -> None:
    text = render_user_data(MAILBOX)
    assert compress_user_data(text) == compress_user_data(text)
    # User-data holds the bootstrap and orgmail-unbundle; every other file, orgmail-sync too, is in the bundle.
    assert len(compress_user_data(text)) < USER_DATA_BUDGET
    assert user_data_base64(text) == user_data_base64(text)


def test_role_checked() -> None:
    import pytest
    with pytest.raises(ValueError):
        HostConfig(stack="t", role="mailbox", hostname="m.example.org", mail_host="m.example.org",
                   region="eu-central-1", ssm_path="/orgmail/t", data_volume_id=None)
    with pytest.raises(ValueError, match="volume id"):
        HostConfig(stack="t", role="relay", hostname="m.example.org", mail_host="m.example.org",
                   region="eu-central-1", ssm_path="/orgmail/t", data_volume_id=None)


def test_rendering_is_pure() -> None:
    """Same plain values, same text: no Outputs, no clock, no randomness."""
    assert render_user_data(MAILBOX) == render_user_data(MAILBOX)
    assert render_files(RELAY) == render_files(RELAY)


# Over 10 KB of headroom under EC2's 16 KB, for every stack and role: what user-data holds is the
# bootstrap and orgmail-unbundle (about 4.9 KB compressed); host files, orgmail-sync among them, belong in
# the bundle. (With orgmail-sync in user-data it was 10.2 KB, and every change to it fought for bytes.)
USER_DATA_BUDGET = 6 * 1024


@pytest.mark.parametrize("stack", STACKS)
def test_every_example_stacks_user_data_keeps_its_headroom(stack: str) -> None:
    """The budget holds for what `pulumi up` renders for every example stack and host role, not only
    for one synthetic host (the large example's mailbox host was 15412 B while that one passed)."""
    for instance in run_stack(stack).of_type("aws:ec2/instance:Instance"):
        size = len(base64.b64decode(instance.inputs["userDataBase64"]))
        assert size < USER_DATA_BUDGET, f"{stack}/{instance.name}: {size} B gzip, budget {USER_DATA_BUDGET}"


def test_a_new_instance_upgrades_its_packages_before_the_bootstrap() -> None:
    """Issue 17 item 7: the stack's image copy is pinned (it never replaces hosts by itself), so every
    new instance, a replacement too, brings it up to date first: cloud-init's package_upgrade is
    apt-get dist-upgrade on Debian, run before runcmd (the bootstrap)."""
    for host in (MAILBOX, RELAY):
        doc = yaml.safe_load(render_user_data(host))
        assert doc["package_update"] is True and doc["package_upgrade"] is True
    offline = yaml.safe_load(render_user_data(dataclasses.replace(MAILBOX, install_packages=False)))
    assert offline["package_upgrade"] is False  # the test root has no network to upgrade from


def test_the_late_volume_wait_is_shortened_only_by_a_test_override() -> None:
    """orgmail-volume waits 180 s for a late volume; only the booted test shortens it (HostConfig override),
    and the production bootstrap does not name the variable at all."""
    def prepare_line(host: HostConfig) -> str:
        bootstrap = files_of(host)["/usr/local/sbin/orgmail-bootstrap"]
        return next(line for line in bootstrap.splitlines() if "orgmail-volume prepare" in line)

    assert prepare_line(MAILBOX).startswith("/usr/local/sbin/orgmail-volume prepare ")
    assert prepare_line(dataclasses.replace(MAILBOX, volume_wait_seconds=20)).startswith(
        "ORGMAIL_VOLUME_WAIT_SECONDS=20 /usr/local/sbin/orgmail-volume prepare ")
    volume = (Path(__file__).resolve().parents[2] / "cloud-init/files/orgmail/volume.py").read_text()
    assert 'WAIT_SECONDS = int(os.environ.get("ORGMAIL_VOLUME_WAIT_SECONDS", "180"))' in volume
