"""Insiders and guessers: admin.trustedNetworks, the host config that carries it, and the rendered
host files that bind From: to the login, ban guessers and keep submitted mail private."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from components.secrets import host_config
from components.settings import ConfigError, load_settings
from components.userdata import render_files
from tests.unit.conftest import raw_config
from tests.unit.test_userdata import MAILBOX, RELAY


def with_trusted(value: Any, tier: str | None = None) -> dict[str, Any]:
    raw = copy.deepcopy(raw_config("dev"))
    raw["admin"] = {**raw["admin"], "trustedNetworks": value}
    if tier:
        raw["tier"] = tier
    return raw


def test_trusted_networks_and_relays_reach_the_host_config() -> None:
    s = load_settings(with_trusted(["203.0.113.0/24", "2001:db8::/48"], tier="large"), "dev")
    assert s.admin.trusted_networks == ("203.0.113.0/24", "2001:db8::/48")
    doc = host_config(s)
    assert doc["trustedNetworks"] == ["203.0.113.0/24", "2001:db8::/48"]
    assert doc["relayHosts"] == ["mx2.example.org"] and doc["mailHost"] == "mail.example.org"
    assert load_settings(raw_config("dev"), "dev").admin.trusted_networks == ()


@pytest.mark.parametrize(("value", "where", "says"), [
    ("203.0.113.0/24", "orgmail:admin.trustedNetworks", "must be a list"),
    (["203.0.113.7/24"], "orgmail:admin.trustedNetworks[0]", "no host bits"),
    (["office"], "orgmail:admin.trustedNetworks[0]", "no host bits"),
    (["0.0.0.0/0"], "orgmail:admin.trustedNetworks[0]", "too wide"),
    (["::/0"], "orgmail:admin.trustedNetworks[0]", "too wide"),
    (["203.0.113.0/24", "16.0.0.0/4"], "orgmail:admin.trustedNetworks[1]", "too wide"),
])
def test_trusted_networks_refused(value: Any, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(with_trusted(value), "dev")
    assert any(p.startswith(where + ":") and says in p for p in err.value.problems), err.value.problems


def files(host: Any) -> dict[str, str]:
    return {f.path: f.content for f in render_files(host)}


def test_from_check_and_privacy_only_on_the_mailbox_host() -> None:
    mailbox, relay = files(MAILBOX), files(RELAY)
    lua = mailbox["/etc/rspamd/lua.local.d/orgmail_from.lua"]
    assert 'url = "/etc/postfix/orgmail/senders"' in lua and 'action = "reject"' in lua
    assert "/etc/rspamd/lua.local.d/orgmail_from.lua" not in relay
    master = mailbox["/etc/postfix/master.cf"]
    assert master.count("-o cleanup_service_name=subcleanup") == 2  # 587 and 465, never 25
    assert "header_checks=regexp:/etc/postfix/submission_header_checks" in master
    dkim = mailbox["/etc/rspamd/local.d/dkim_signing.conf"]
    assert 'sign_networks = ["127.0.0.1/32", "::1/128"];' in dkim and "sign_local = false;" in dkim
    assert "internal_mail_filter_classes = bounce, notify" in mailbox["/etc/postfix/main.cf"]
    assert "add_smtp_user = false;" in mailbox["/etc/rspamd/local.d/milter_headers.conf"]


def test_fail2ban_normal_mode_and_bans_on_every_port() -> None:
    jail = files(MAILBOX)["/etc/fail2ban/jail.local"]
    postfix = jail.split("[postfix]", 1)[1].split("\n[", 1)[0]
    assert "mode = extra" in postfix and "mode = aggressive" not in jail  # normal + SMTP AUTH failures
    assert "[postfix-sasl]" not in jail  # its failures are the postfix jail's (test_at_most_one_jail_reads_the_journal)
    for name in ("postfix", "dovecot"):
        section = jail.split(f"[{name}]", 1)[1].split("\n[", 1)[0]
        assert "banaction = %(banaction_allports)s" in section, name
    assert "exre-user =" in files(RELAY)["/etc/fail2ban/filter.d/postfix.local"]


def jail_sections(jail_local: str) -> dict[str, dict[str, str]]:
    """{section: {setting: value}} of a jail.local (one-line settings; continuation lines are skipped)."""
    sections = re.findall(r"^\[([^\]]+)\]\n(.*?)(?=^\[|\Z)", jail_local, re.S | re.M)
    return {name: dict(re.findall(r"^(\w+) = (.*)$", body, re.M)) for name, body in sections}


def enabled_jails(jail_local: str) -> dict[str, dict[str, str]]:
    """The enabled jails, each with the backend it inherits from [DEFAULT] filled in."""
    sections = jail_sections(jail_local)
    default = sections.get("DEFAULT", {})
    return {name: {"backend": default.get("backend", "auto"), **settings} for name, settings in sections.items()
            if name != "DEFAULT" and settings.get("enabled") == "true"}


@pytest.mark.parametrize("host", [MAILBOX, RELAY], ids=["mailbox", "relay"])
def test_at_most_one_jail_reads_the_journal(host: Any) -> None:
    """Every fail2ban jail on the systemd backend wakes for every journal line written, matching or
    not: a second such jail doubled fail2ban's CPU per delivered message (docs/benchmarks.md). The
    others read files (Dovecot's failed logins, fail2ban's own log for recidive)."""
    jail_local = {f.path: f.content for f in render_files(host)}["/etc/fail2ban/jail.local"]
    jails = enabled_jails(jail_local)
    assert jail_sections(jail_local)["DEFAULT"]["backend"] == "systemd"
    on_journal = [name for name, settings in jails.items() if settings["backend"] == "systemd"]
    assert on_journal == ["postfix"], on_journal
    assert all(s.get("logpath", "").startswith("/") for n, s in jails.items() if n not in on_journal), jails


def test_the_dovecot_jail_reads_only_failed_logins_never_every_delivery() -> None:
    """fail2ban's dovecot jail reads the file Dovecot's event exporter writes for failed logins only;
    the journal would also hand it the lines of every LMTP delivery (docs/benchmarks.md, run 4)."""
    mailbox = files(MAILBOX)
    settings = jail_sections(mailbox["/etc/fail2ban/jail.local"])["dovecot"]
    logpath = "/var/log/dovecot/login-failures.log"
    assert settings["logpath"] == logpath and settings["filter"] == "orgmail-dovecot", settings
    assert "journalmatch" not in settings and settings["backend"] != "systemd", settings
    dovecot = mailbox["/etc/dovecot/dovecot.conf"]
    exporter = re.search(r"^event_exporter fail2ban \{\n(.*?)^\}", dovecot, re.S | re.M)
    metric = re.search(r"^metric login_failures \{\n(.*?)^\}", dovecot, re.S | re.M)
    assert exporter and metric, dovecot
    assert f"file_path = {logpath}" in exporter.group(1) and "format = json" in exporter.group(1)
    assert "exporter = fail2ban" in metric.group(1)
    assert "filter = event=login_aborted AND reason=auth_failed" in metric.group(1)
    assert f"f {logpath} 0640 dovecot adm" in mailbox["/etc/tmpfiles.d/orgmail-dovecot.conf"]
    rotate = mailbox["/etc/logrotate.d/orgmail-dovecot"]
    assert rotate.startswith("# ") and f"\n{logpath} {{" in rotate and "doveadm stats reopen" in rotate
    bootstrap = mailbox["/usr/local/sbin/orgmail-bootstrap"]
    assert bootstrap.index("systemd-tmpfiles --create /etc/tmpfiles.d/orgmail-dovecot.conf") < \
        bootstrap.index("systemctl restart dovecot.service fail2ban.service")
    relay = files(RELAY)
    assert "/etc/fail2ban/filter.d/orgmail-dovecot.conf" not in relay and "/etc/tmpfiles.d/orgmail-dovecot.conf" not in relay


def jail_identifiers(jail_local: str, jail: str) -> set[str]:
    section = jail_local.split(f"[{jail}]\n", 1)[1].split("\n[", 1)[0]
    (match,) = [line.split("=", 1)[1] for line in section.splitlines() if line.startswith("journalmatch")]
    terms = [t.strip() for t in match.split("+")]
    assert all(re.fullmatch(r"SYSLOG_IDENTIFIER=postfix/[a-z/]+", t) for t in terms), terms
    return {t.split("=", 1)[1] for t in terms}


def client_facing_services(master_cf: str) -> dict[str, bool]:
    """{syslog identifier: offers AUTH} of every master.cf service that listens to the internet."""
    services: dict[str, bool] = {}
    for block in re.split(r"\n(?=\S)", master_cf):
        fields = block.split()
        loopback = fields[0].startswith(("127.", "[::1]", "localhost")) if fields else True
        if len(fields) >= 8 and fields[1] == "inet" and not block.startswith("#") and not loopback:
            name = re.search(r"-o syslog_name=(\S+)", block)
            services[f"{name.group(1) if name else 'postfix'}/{fields[7]}"] = "smtpd_sasl_auth_enable=yes" in block
    return services


@pytest.mark.parametrize("host", [MAILBOX, RELAY], ids=["mailbox", "relay"])
def test_fail2ban_reads_every_client_facing_postfix_process_and_no_other(host: Any) -> None:
    """The postfix jails read only what clients cause (smtpd, postscreen), not the lines every message
    makes in cleanup, qmgr, lmtp and smtp; every port that listens is covered, those that offer AUTH
    included (the jail's mode "extra" reads SMTP AUTH failures)."""
    rendered = {f.path: f.content for f in render_files(host)}
    jail_local, master_cf = rendered["/etc/fail2ban/jail.local"], rendered["/etc/postfix/master.cf"]
    services = client_facing_services(master_cf)
    assert "postfix/postscreen" in services and len(services) == (3 if host.role == "mailbox" else 1), services
    # smtpd behind postscreen logs as postfix/smtpd (pass-through from postscreen, "smtpd pass" service)
    assert set(services) | {"postfix/smtpd"} <= jail_identifiers(jail_local, "postfix")
    assert not {"postfix/cleanup", "postfix/qmgr", "postfix/lmtp", "postfix/smtp"} & jail_identifiers(jail_local, "postfix")
