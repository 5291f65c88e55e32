"""The cluster roles' host configuration (components/edge.py, shard.py, outbound_relay.py): every setting the
roles depend on, asserted on the rendered files, with the cases that must be refused. Postfix, Dovecot, nft and
fail2ban read the same files in tests/validate/test_artefacts.py."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from components.directory import (
    DIRECTORY_CA_FILE,
    EDGE_PASSDB,
    POSTFIX_QUERIES,
    SHARD_PASSDB,
    SHARD_USERDB,
    for_edge,
    for_shard,
)
from components.edge import EDGE_PACKAGES, EdgeHost, edge_cluster_host, render_edge_files
from components.outbound_relay import RELAY_PACKAGES, RelayArgs, relay_user_data, render_relay_files
from components.shard import SHARD_PACKAGES, ShardArgs, render_shard_files, shard_user_data
from components.userdata import EC2_USER_DATA_LIMIT, ClusterHost, cluster_user_data, compress_user_data

LB = ("10.42.0.0/27", "10.42.0.32/27")
EDGES = ("10.42.11.0/24", "10.42.12.0/24")
EDGE = EdgeHost(stack="s", region="eu-west-1", ssm_path="/orgmail/s", mail_host="mail.example.org", lb_networks=LB,
                domains=("example.org", "example.net"), admin_email="admin@example.org", dkim_selector="mail2025",
                autoscaling_group="orgmail-s-edges")
SHARD = ShardArgs(stack="s", region="eu-west-1", ssm_path="/orgmail/s", hostname="shard2.customers.example",
                  data_volume_id="vol-0abc", edge_networks=EDGES)
RELAY = RelayArgs(stack="s", region="eu-west-1", ssm_path="/orgmail/s", hostname="relay1.customers.example",
                  mail_host="mail.example.org", queue_volume_id="vol-0def", edge_networks=EDGES)


def files(rendered: list) -> dict[str, str]:
    return {f.path: f.content for f in rendered}


def settings_of(text: str) -> dict[str, str]:
    """main.cf's settings (continuation lines joined)."""
    out: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line[0].isspace() and key:
            out[key] += " " + line.strip()
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        out[key] = value.strip()
    return out


def code(text: str) -> str:
    """A file without its comment lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("#"))


# --- edge -------------------------------------------------------------------------------------------------


def test_edge_postfix_takes_the_client_address_from_the_proxy_header_on_every_port() -> None:
    main = settings_of(files(render_edge_files(EDGE))["/etc/postfix/main.cf"])
    assert main["postscreen_upstream_proxy_protocol"] == "haproxy"  # port 25
    # Not in main.cf: smtpd behind postscreen gets the client from postscreen, and warns at every start
    # that it ignores the setting (seen on the booted edge).
    assert "smtpd_upstream_proxy_protocol" not in main
    master = files(render_edge_files(EDGE))["/etc/postfix/master.cf"]
    assert re.search(r"^smtp +inet .* postscreen$", master, re.M)
    for service in ("submission", "submissions"):
        block = re.search(rf"^{service} +inet .*\n((?:  -o .*\n)+)", master, re.M)
        assert block and "  -o smtpd_upstream_proxy_protocol=haproxy\n" in block[1], service


def test_edge_postfix_reads_the_directory_through_proxymap() -> None:
    f = files(render_edge_files(EDGE))
    main = settings_of(f["/etc/postfix/main.cf"])
    master = f["/etc/postfix/master.cf"]
    for name, query in POSTFIX_QUERIES.items():
        table = f"proxy:pgsql:/etc/postfix/orgmail/pgsql/{name}.cf"
        if name == "blocked_logins":  # a restriction, on submission; in main.cf too, for proxy_read_maps
            assert main["smtpd_sender_restrictions"].startswith(f"check_sasl_access {table}, ")
            for service in ("submission", "submissions"):
                block = re.search(rf"^{service} +inet .*\n((?:  -o .*\n)+)", master, re.M)
                assert block and f"  -o smtpd_sender_restrictions=check_sasl_access,{table}," in block[1], service
        elif name == "srs_forwarding":
            assert main["sender_dependent_default_transport_maps"] == table
        else:
            assert main[name] == table, name
        body = f[f"/etc/postfix/orgmail/pgsql/{name}.cf.in"]
        assert f"query = {for_edge(query, EDGE.mail_host)}\n" in body and "dbname = orgmail\n" in body
        assert "{mail_host}" not in body
        assert not re.search(r"^(hosts|user|password) =", body, re.M)
    # libpq in Postfix's proxymap verifies the directory's certificate and name against RDS's CA.
    assert main["import_environment"].endswith(f" PGSSLMODE=verify-full PGSSLROOTCERT={DIRECTORY_CA_FILE}")


def test_edge_delivers_through_its_dovecot_lmtp_proxy_and_sends_out_through_the_relays() -> None:
    f = files(render_edge_files(EDGE))
    main = settings_of(f["/etc/postfix/main.cf"])
    assert main["virtual_transport"] == "lmtp:inet:127.0.0.1:24"
    assert main["relayhost"] == "$orgmail_relays" and main["orgmail_relays"] == ""
    dovecot = f["/etc/dovecot/dovecot.conf"]
    assert "lmtp_proxy = yes\n" in dovecot
    assert re.search(r"inet_listener lmtp \{\n    listen = 127\.0\.0\.1\n    port = 24\n", dovecot)
    boot = f["/usr/local/sbin/orgmail-bootstrap"]
    assert "param relay-hosts" in boot and "shuf" in boot and 'postconf -e "orgmail_relays=' in boot


def test_edge_gives_forwarded_mail_an_srs_sender_and_reverses_bounces_as_the_single_host_does() -> None:
    from components.edge import EDGE_SERVICES
    from tests.unit.conftest import ROOT

    f = files(render_edge_files(EDGE))
    main = settings_of(f["/etc/postfix/main.cf"])
    assert main["sender_dependent_default_transport_maps"] == "proxy:pgsql:/etc/postfix/orgmail/pgsql/srs_forwarding.cf"
    assert main["recipient_canonical_maps"] == "pipemap:{regexp:/etc/postfix/srs-only.regexp, tcp:127.0.0.1:10002}"
    assert main["recipient_canonical_classes"] == "envelope_recipient, header_recipient"
    assert main["mydestination"] == "$myhostname, localhost" and main["myhostname"] == EDGE.mail_host
    # The query names the MX name, so the SRS senders it makes are not sent through postsrsd again.
    assert f"lower('%d') <> '{EDGE.mail_host}'" in f["/etc/postfix/orgmail/pgsql/srs_forwarding.cf.in"]
    # The services that put it back in through postsrsd: the single host's own lines (one file, both include it).
    services = (ROOT / "cloud-init/files/postfix/srs-services.cf.j2").read_text()
    assert "srsfwd    unix" in services and "sender_canonical_maps=tcp:127.0.0.1:10001" in services
    assert code(services) in f["/etc/postfix/master.cf"]
    assert '{% include "files/postfix/srs-services.cf.j2" %}' in (ROOT / "cloud-init/files/postfix/master.cf.j2").read_text()
    assert f["/etc/default/postsrsd"] == (ROOT / "cloud-init/files/postsrsd/postsrsd.default").read_text()
    assert "param srs-secret | secret_file /etc/postsrsd.secret root" in f["/usr/local/sbin/orgmail-bootstrap"]
    assert "postsrsd" in EDGE_PACKAGES
    # ARC-sealed on arrival with the domain's DKIM key (the single host's arc.conf), so the destination of a
    # forward can trust the results the edge saw.
    assert code(f["/etc/rspamd/local.d/arc.conf"]) == code((ROOT / "cloud-init/files/rspamd/arc.conf").read_text())
    assert EDGE_SERVICES.index("postsrsd.service") < EDGE_SERVICES.index("postfix.service")


def test_edge_authenticates_smtp_through_its_dovecot() -> None:
    f = files(render_edge_files(EDGE))
    main = settings_of(f["/etc/postfix/main.cf"])
    assert main["smtpd_sasl_type"] == "dovecot" and main["smtpd_sasl_path"] == "private/auth"
    assert "unix_listener /var/spool/postfix/private/auth" in f["/etc/dovecot/dovecot.conf"]
    assert f["/etc/postfix/master.cf"].count("smtpd_sasl_auth_enable=yes") == 2
    assert f["/etc/postfix/master.cf"].count("reject_sender_login_mismatch") == 2


def test_edge_dovecot_is_a_proxy_only_behind_the_load_balancer() -> None:
    dovecot = code(files(render_edge_files(EDGE))["/etc/dovecot/dovecot.conf"])
    assert f"haproxy_trusted_networks = {' '.join(LB)}\n" in dovecot
    assert dovecot.count("haproxy = yes") == 2  # 993 and 995
    assert re.search(r"inet_listener imap \{\n    port = 0\n", dovecot)
    assert re.search(r"inet_listener pop3 \{\n    port = 0\n", dovecot)
    assert f"passdb sql {{\n  query = {EDGE_PASSDB}\n}}" in dovecot
    assert "userdb" not in dovecot
    assert "mail_driver" not in dovecot and "nopassword" not in dovecot
    assert "auth_cache_size = 10M\n" in dovecot and "!include_try /etc/dovecot/orgmail-directory.conf\n" in dovecot


def test_edge_signs_with_the_published_selector_and_firewalls_to_the_load_balancer() -> None:
    f = files(render_edge_files(EDGE))
    assert f["/etc/rspamd/orgmail/dkim_selectors.map"] == "example.org mail2025\nexample.net mail2025\n"
    assert "enabled = true;" in f["/etc/rspamd/local.d/dkim_signing.conf"]
    assert "param dkim/mail2025 | secret_file /var/lib/rspamd/dkim/mail2025.key _rspamd" in f[
        "/usr/local/sbin/orgmail-bootstrap"]
    nft = f["/etc/nftables.conf"]
    assert f"ip saddr {{ {', '.join(LB)} }} tcp dport {{ 25, 465, 587, 993, 995 }} accept" in nft
    assert "meta nfproto ipv4 tcp dport" not in nft  # not from anywhere


def test_edge_fail2ban_bans_in_postfix_on_the_proxied_address() -> None:
    f = files(render_edge_files(EDGE))
    jail = code(f["/etc/fail2ban/jail.local"])
    assert "banaction = orgmail-postfix-ban\n" in jail and "nftables" not in jail
    assert re.search(r"\[dovecot\]\nenabled = true\n", jail)
    main = settings_of(f["/etc/postfix/main.cf"])
    assert "cidr:/etc/postfix/orgmail/banned" in main["postscreen_access_list"]
    assert main["postscreen_denylist_action"] == "drop"
    assert f["/etc/postfix/master.cf"].count("check_client_access,cidr:/etc/postfix/orgmail/banned") == 2
    action = f["/etc/fail2ban/action.d/orgmail-postfix-ban.conf"]
    assert "'<ip> reject'" in action and "postfix reload" in action


def test_edge_shares_the_single_hosts_hardening() -> None:
    from components.userdata import HostConfig, render_files

    single = files(render_files(HostConfig(stack="s", role="mailbox", hostname="mail.example.org",
                                           mail_host="mail.example.org", region="r", ssm_path="/orgmail/s",
                                           data_volume_id="vol-1")))
    edge = files(render_edge_files(EDGE))
    for setting in ("smtpd_tls_protocols", "tls_medium_cipherlist", "smtpd_forbid_bare_newline", "postscreen_dnsbl_sites",
                    "milter_default_action", "smtpd_tls_auth_only"):
        assert settings_of(edge["/etc/postfix/main.cf"])[setting] == settings_of(single["/etc/postfix/main.cf"])[setting]
    ciphers = re.search(r"^ssl_cipher_list = .*$", single["/etc/dovecot/dovecot.conf"], re.M)
    assert ciphers is not None and ciphers[0] in edge["/etc/dovecot/dovecot.conf"]


@pytest.mark.parametrize("networks", [(), ("2001:db8::/64",)])
def test_edge_needs_ipv4_load_balancer_subnets(networks: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="load balancer"):
        replace(EDGE, lb_networks=networks)


# --- shard ------------------------------------------------------------------------------------------------


def test_shard_serves_only_its_own_users_from_the_directory() -> None:
    dovecot = code(files(render_shard_files(SHARD))["/etc/dovecot/dovecot.conf"])
    assert f"passdb sql {{\n  query = {for_shard(SHARD_PASSDB, 'shard2')}\n}}" in dovecot
    assert f"  query = {for_shard(SHARD_USERDB, 'shard2')}\n" in dovecot
    assert "m.shard <> 'shard2'" in dovecot and "{shard}" not in dovecot
    assert "nopassword" not in dovecot  # the password is checked again here
    assert f"login_trusted_networks = {' '.join(EDGES)}\n" in dovecot
    for listener, port in (("imap", 143), ("pop3", 110), ("lmtp", 24), ("doveadm", 24245)):
        assert re.search(rf"inet_listener {listener} \{{\n    port = {port}\n", dovecot), listener
    for listener in ("imaps", "pop3s"):
        assert re.search(rf"inet_listener {listener} \{{\n    port = 0\n", dovecot), listener
    assert "!include_try /etc/dovecot/orgmail-doveadm.conf\n" in dovecot
    # No TLS on a shard (the edges end it): TLS off, so that Dovecot looks for no certificate (it logged an
    # error on every connection), and no other TLS setting.
    assert "mail_uid = vmail\n" in dovecot and "\nssl = no\n" in dovecot
    assert "ssl" not in dovecot.replace("sslmode", "").replace("\nssl = no\n", "\n")


def test_shard_takes_connections_from_the_edges_only_and_mounts_its_volume() -> None:
    f = files(render_shard_files(SHARD))
    assert f"ip saddr {{ {', '.join(EDGES)} }} tcp dport {{ 24, 143, 110, 24245 }} accept" in f["/etc/nftables.conf"]
    # doveadm (24245) from those subnets too: the other shards live there (a move's copy); the security group
    # admits only shards to it (tests/unit/test_cluster.py).
    assert "Only from the hosts' subnets (edges, and shards for doveadm)" in f["/etc/nftables.conf"]
    boot = f["/usr/local/sbin/orgmail-bootstrap"]
    assert "orgmail-volume prepare /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc\n" in boot
    assert "param doveadm-secret" in boot and "param directory/password" in boot
    assert "/etc/fail2ban/jail.local" not in f and "/etc/postfix/main.cf" not in f


def test_a_shard_needs_a_directory_name_and_the_edges() -> None:
    with pytest.raises(ValueError, match="shard name"):
        replace(SHARD, hostname="Shard_1.customers.example")
    with pytest.raises(ValueError, match="edges' subnets"):
        replace(SHARD, edge_networks=())


# --- outbound relay ---------------------------------------------------------------------------------------


def test_relay_accepts_from_the_edges_only_and_delivers_over_ipv4() -> None:
    f = files(render_relay_files(RELAY))
    main = settings_of(f["/etc/postfix/main.cf"])
    assert main["mynetworks"] == "127.0.0.1/32 " + " ".join(EDGES)
    for restriction in ("smtpd_client_restrictions", "smtpd_relay_restrictions", "smtpd_recipient_restrictions"):
        assert main[restriction] == "permit_mynetworks, reject", restriction
    assert main["inet_protocols"] == "ipv4" and main["myhostname"] == "relay1.customers.example"
    assert main["mydestination"] == "" and main["local_recipient_maps"] == "" and main["relay_domains"] == ""
    assert main["local_transport"].startswith("error:")
    assert "virtual_mailbox_maps" not in main and "relayhost" not in main
    assert int(main["message_size_limit"]) > 200 * 1024 * 1024
    assert f"ip saddr {{ {', '.join(EDGES)} }} tcp dport {{ 25 }} accept" in f["/etc/nftables.conf"]
    assert "/etc/dovecot/dovecot.conf" not in f
    assert "orgmail-volume prepare /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0def" in f[
        "/usr/local/sbin/orgmail-bootstrap"]
    assert "directory" not in code(f["/usr/local/sbin/orgmail-bootstrap"])  # no directory login on a relay



def test_relay_sends_directly_or_through_ses_as_orgmail_sync_says() -> None:
    """orgmail:outbound on a cluster: the relay's Postfix reads the same maps as the single mailbox host
    (one shared include), which orgmail-sync --cluster writes (below); empty maps (direct) until it has."""
    f = files(render_relay_files(RELAY))
    main = settings_of(f["/etc/postfix/main.cf"])
    assert main["sender_dependent_relayhost_maps"] == "regexp:/etc/postfix/orgmail/relayhost"
    assert main["smtp_sasl_password_maps"] == "texthash:/etc/postfix/orgmail/sasl_passwd"
    assert main["smtp_tls_policy_maps"] == "texthash:/etc/postfix/orgmail/tls_policy"
    assert main["smtp_sasl_auth_soft_bounce"] == "yes"  # a refused login defers, never bounces
    boot = code(f["/usr/local/sbin/orgmail-bootstrap"])
    assert boot.index("install -m 0600 /dev/null /etc/postfix/orgmail/sasl_passwd") < boot.index(
        "/usr/local/sbin/orgmail-sync --cluster ||")
    # The edges never send outside themselves: no SES map, no login there.
    edge = settings_of(files(render_edge_files(EDGE))["/etc/postfix/main.cf"])
    assert "sender_dependent_relayhost_maps" not in edge and "smtp_sasl_password_maps" not in edge


@pytest.mark.parametrize("rendered", [render_edge_files(EDGE), render_shard_files(SHARD), render_relay_files(RELAY)],
                         ids=["edge", "shard", "relay"])
def test_every_cluster_host_applies_its_day2_settings_before_its_services_start_and_every_five_minutes(
        rendered: list) -> None:
    """admin.sshCidrs (and a relay's orgmail:outbound) reach a cluster host without replacing it: orgmail-sync
    --cluster in the role's bundle, run by the bootstrap before the services start and by its timer after."""
    f = files(rendered)
    assert "/usr/local/sbin/orgmail-sync" in f
    assert "ExecStart=/usr/local/sbin/orgmail-sync --cluster" in f["/etc/systemd/system/orgmail-sync.service"]
    assert "OnUnitActiveSec=5min" in f["/etc/systemd/system/orgmail-sync.timer"]
    boot = code(f["/usr/local/sbin/orgmail-bootstrap"])
    sync = boot.index("/usr/local/sbin/orgmail-sync --cluster ||")
    assert boot.index("/usr/local/sbin/orgmail-unbundle") < sync < boot.index('systemctl restart "$unit"')
    assert "systemctl enable --now orgmail-sync.timer" in boot
    assert "include \"/etc/orgmail/nftables.d/*.nft\"" in f["/etc/nftables.conf"]  # where the SSH sets go


# --- every role -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "text"), [
    ("edge", cluster_user_data(edge_cluster_host(EDGE), render_edge_files(EDGE))),
    ("shard", shard_user_data(SHARD)), ("relay", relay_user_data(RELAY))])
def test_cluster_user_data_reads_its_roles_path_and_holds_no_secret(role: str, text: str) -> None:
    assert len(compress_user_data(text)) <= EC2_USER_DATA_LIMIT
    assert f"SSM_PATH=/orgmail/s/{role}\n" in text
    assert "PRIVATE KEY" not in text and not re.search(r"password = (?!\"?%s|/)", text)
    assert ("fqdn:" in text) == (role != "edge")  # EC2 names the edges


@pytest.mark.parametrize("rendered", [render_edge_files(EDGE), render_relay_files(RELAY)], ids=["edge", "relay"])
def test_each_postfix_role_builds_only_the_lookup_tables_it_ships(rendered: list) -> None:
    """The relay's first boot failed on `newaliases` (no /etc/aliases there; the validators never run the
    bootstrap): a role whose bootstrap runs newaliases or postmap ships the source file, and a role without
    aliases sets no alias database for Postfix to miss."""
    f = files(rendered)
    main = settings_of(f["/etc/postfix/main.cf"])
    bootstrap = code(f["/usr/local/sbin/orgmail-bootstrap"])
    database = main.get("alias_database", "hash:/etc/aliases")  # Postfix's default on Debian
    if re.search(r"^\s*newaliases\b", bootstrap, re.M):
        assert database and database.split(":", 1)[1] in f, database
    else:
        assert database == "" and main["alias_maps"] == "", main.get("alias_maps")
    for built in re.findall(r"^\s*postmap (?:\w+:)?(\S+)", bootstrap, re.M):
        assert built in f, built


def test_packages_include_the_directory_drivers_and_the_rootfs_has_them() -> None:
    from pathlib import Path

    assert {"postfix-pgsql", "dovecot-pgsql"} <= set(EDGE_PACKAGES)
    assert "dovecot-pgsql" in SHARD_PACKAGES and "postfix" not in SHARD_PACKAGES
    assert "dovecot-imapd" not in RELAY_PACKAGES
    rootfs = Path(__file__).resolve().parents[2].joinpath("scripts/e2e-rootfs.sh").read_text()
    packages = set(rootfs.split("PACKAGES=(", 1)[1].split(")", 1)[0].split())
    assert set(EDGE_PACKAGES + SHARD_PACKAGES + RELAY_PACKAGES) <= packages


def test_a_cluster_host_reads_only_its_own_path() -> None:
    with pytest.raises(ValueError, match="own SSM path"):
        ClusterHost(stack="s", role="edge", region="r", ssm_path="/orgmail/s/shard", hostname="", packages=(),
                    services=(), tls_units=())
    with pytest.raises(ValueError, match="unknown cluster role"):
        ClusterHost(stack="s", role="mailbox", region="r", ssm_path="/orgmail/s/mailbox", hostname="", packages=(),
                    services=(), tls_units=())


def test_an_edges_root_mail_goes_to_the_administrator() -> None:
    aliases = {f.path: f.content for f in render_edge_files(EDGE)}["/etc/aliases"]
    assert aliases.splitlines() == ["postmaster: root", "abuse: root", "MAILER-DAEMON: postmaster",
                                    "root: admin@example.org"]
    for bad in ("", "admin", "admin@example.org\nroot: attacker@evil.example", "a b@example.org"):
        with pytest.raises(ValueError, match="admin email"):
            replace(EDGE, admin_email=bad)


def test_an_edge_never_bans_the_load_balancers_own_addresses() -> None:
    jail = {f.path: f.content for f in render_edge_files(EDGE)}["/etc/fail2ban/jail.local"]
    assert re.search(r"^ignoreip = 127\.0\.0\.1/32 ::1 10\.42\.0\.0/27 10\.42\.0\.32/27$", jail, re.M), jail


def test_cluster_config_files_travel_without_their_comment_lines() -> None:
    """EC2's 16 KB carries a cluster host's every file: its configuration files keep their first line (what the
    file is) and lose the other comment lines, which stay in the templates; scripts, lua and SQL are not touched
    here (the scripts lose theirs by their own rules)."""
    from components.userdata import without_config_comments

    files = {f.path: f.content for f in [*render_edge_files(EDGE), *render_shard_files(SHARD)]}
    for path in ("/etc/postfix/main.cf", "/etc/dovecot/dovecot.conf", "/etc/fail2ban/jail.local",
                 "/etc/systemd/system/orgmail-drain.service"):
        lines = files[path].splitlines()
        assert not any(line.lstrip().startswith("#") for line in lines[1:]), path
    assert files["/etc/postfix/main.cf"].startswith("# ")  # the header line stays
    assert without_config_comments("/etc/postfix/main.cf", "# head\n# why\nsmtpd_tls = yes\n  # nested\n") == \
        "# head\nsmtpd_tls = yes\n"
    for path, text in (("/etc/nftables.conf", "#!/usr/sbin/nft -f\n# why\n"), ("/etc/orgmail/senders.sql", "# x\n#y\n"),
                       ("/etc/rspamd/lua.local.d/orgmail_from.lua", "-- x\n#t\n"), ("/etc/postfix/main.cf", "a = b")):
        assert without_config_comments(path, text) == text, path
