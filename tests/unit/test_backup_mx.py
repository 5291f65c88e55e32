"""Mail from the backup MX relays (issue 13, defect 7): the mailbox host judges the relay's client, not
the relay; relays are exempt from its limits and greylisting; the relay-to-mailbox hop is verified TLS;
and nothing a relay accepted is refused for its content or size by the mailbox host (no backscatter)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from components.userdata import render_files, ssm_files
from tests.unit.test_rate_limits import master_services, sync_module
from tests.unit.test_userdata import MAILBOX, RELAY

RELAY_CLIENTS = "cidr:/etc/postfix/orgmail/relay_clients"


def files(host: Any) -> dict[str, str]:
    return {f.path: f.content for f in render_files(host)}


def main_cf(host: Any) -> dict[str, str]:
    """main.cf's settings as Postfix reads them: a line starting with white space continues the one before."""
    text = re.sub(r"\n[ \t]+", " ", files(host)["/etc/postfix/main.cf"])
    return dict(re.findall(r"^(\w+) = (.*)$", text, re.M))


def test_mailbox_host_exempts_the_relays_from_postscreen_and_rate_limits() -> None:
    mailbox = main_cf(MAILBOX)
    assert mailbox["postscreen_access_list"] == f"permit_mynetworks, {RELAY_CLIENTS}"
    assert mailbox["smtpd_client_event_limit_exceptions"] == f"$mynetworks, {RELAY_CLIENTS}"
    relay = main_cf(RELAY)  # a relay has no relays of its own in front of it
    assert relay["postscreen_access_list"] == "permit_mynetworks"
    assert relay["smtpd_client_event_limit_exceptions"] == "$mynetworks"


def test_relay_to_mailbox_hop_requires_a_verified_certificate_for_the_mailbox_host_name() -> None:
    relay = master_services(files(RELAY)["/etc/postfix/master.cf"])["relay/unix"]
    assert "smtp_tls_security_level=secure" in relay and "smtp_tls_secure_cert_match=nexthop" in relay
    # The transport names the mailbox host ([mail.example.org]: the nexthop the certificate must match),
    # and the CA store is the system's (the mailbox host has a Let's Encrypt certificate).
    assert main_cf(RELAY)["smtp_tls_CAfile"] == "/etc/ssl/certs/ca-certificates.crt"
    # Mail to the internet stays opportunistic TLS; the mailbox host sends nothing through "relay".
    assert main_cf(RELAY)["smtp_tls_security_level"] == "may"
    mailbox = master_services(files(MAILBOX)["/etc/postfix/master.cf"])["relay/unix"]
    assert not [o for o in mailbox if o.startswith("smtp_tls")]


def test_rspamd_judges_the_relays_client_and_exempts_the_relay() -> None:
    mailbox = ssm_files("mailbox")
    relay_conf = mailbox["/etc/rspamd/local.d/external_relay.conf"]["content"]
    assert "enabled = true;" in relay_conf
    assert 'strategy = "ip_map";' in relay_conf and 'ip_map = "/etc/rspamd/orgmail/relays.map";' in relay_conf
    # Settings (rspamd's priority 10) must still see the relay's own address, and SPF/RBL the client's.
    assert re.search(r"^\s*priority = 9;", relay_conf, re.M)
    settings = mailbox["/etc/rspamd/local.d/settings.conf"]["content"]
    assert '.include(try=true) "/etc/rspamd/orgmail/relay_settings.inc"' in settings
    relay_files = {**ssm_files("relay"), **files(RELAY)}
    assert not {"/etc/rspamd/local.d/external_relay.conf", "/etc/rspamd/local.d/settings.conf"} & set(relay_files)


def test_relays_reject_spam_at_the_mailbox_hosts_threshold() -> None:
    """The relay refuses before its queue what the mailbox host would refuse from anyone else."""
    assert files(RELAY)["/etc/rspamd/local.d/actions.conf"] == files(MAILBOX)["/etc/rspamd/local.d/actions.conf"]


def test_relay_accepts_only_what_fits_the_mailbox_hosts_size_limit() -> None:
    sync = sync_module()
    limits = {"message_size_limit": 26214400, "smtpd_recipient_limit": 100}
    assert sync.postfix_limits("mailbox", limits) == limits
    assert sync.postfix_limits("relay", limits) == {"message_size_limit": 26214400 - 65536, "smtpd_recipient_limit": 100}
    assert limits["message_size_limit"] == 26214400  # not changed in place


@pytest.fixture
def relay_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path, Path, Path]:
    sync = sync_module()
    clients, rmap, settings = tmp_path / "relay_clients", tmp_path / "relays.map", tmp_path / "relay_settings.inc"
    monkeypatch.setattr(sync, "RELAY_CLIENTS", str(clients))
    monkeypatch.setattr(sync, "RELAY_MAP", str(rmap))
    monkeypatch.setattr(sync, "RELAY_SETTINGS", str(settings))
    monkeypatch.setattr(sync.os, "fchown", lambda *args: None)  # the host writes as root; tests need not run as root
    return sync, clients, rmap, settings


def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lookup fails: the relays' addresses must come from the published parameter, never DNS."""
    def getaddrinfo(*args: Any, **kwargs: Any) -> list[Any]:
        raise AssertionError("orgmail-sync looked a relay up in DNS")
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


PUBLISHED = json.dumps({"mx2.example.org": "198.51.100.2", "mx3.example.org": "198.51.100.3"})


def test_sync_writes_the_relays_published_addresses(relay_maps: tuple[Any, Path, Path, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sync, clients, rmap, settings = relay_maps
    no_dns(monkeypatch)
    assert sync.apply_relay_clients(["mx2.example.org", "mx3.example.org"], PUBLISHED) == {"postfix", "rspamd"}
    assert clients.read_text() == "198.51.100.2/32 permit\n198.51.100.3/32 permit\n"
    assert rmap.read_text() == "198.51.100.2\n198.51.100.3\n"
    rule = settings.read_text()
    assert 'ip = ["198.51.100.2/32", "198.51.100.3/32"];' in rule
    assert 'symbols_disabled = ["GREYLIST_CHECK", "GREYLIST_SAVE", "RATELIMIT_CHECK"];' in rule
    assert "actions { reject = null; greylist = null; }" in rule and rule.count("{") == rule.count("}")
    assert sync.apply_relay_clients(["mx2.example.org", "mx3.example.org"], PUBLISHED) == set()  # unchanged
    # A relay removed from the stack (tier change) loses its exemption even while its address is still published.
    assert sync.apply_relay_clients(["mx2.example.org"], PUBLISHED) == {"postfix", "rspamd"}
    assert rmap.read_text() == "198.51.100.2\n"


def test_sync_keeps_the_relays_until_every_address_is_published(relay_maps: tuple[Any, Path, Path, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A new relay's Elastic IP is published after the mailbox host's config names it: the maps keep the
    last complete list in between, and never list an address that is not published."""
    sync, clients, rmap, settings = relay_maps
    no_dns(monkeypatch)
    sync.apply_relay_clients(["mx2.example.org"], PUBLISHED)
    assert sync.apply_relay_clients(["mx2.example.org", "mx4.example.org"], PUBLISHED) == set()
    assert sync.apply_relay_clients(["mx2.example.org"], None) == set()
    assert rmap.read_text() == "198.51.100.2\n"


def test_sync_refuses_a_published_value_that_is_not_an_address(relay_maps: tuple[Any, Path, Path, Path]) -> None:
    sync, clients, rmap, settings = relay_maps
    with pytest.raises(ValueError):
        sync.apply_relay_clients(["mx2.example.org"], json.dumps({"mx2.example.org": "mx2.example.org"}))


def test_sync_always_leaves_the_maps_postfix_and_rspamd_read(relay_maps: tuple[Any, Path, Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """No relays (small and medium tiers), or nothing published at the first boot: empty maps, never missing ones."""
    sync, clients, rmap, settings = relay_maps
    no_dns(monkeypatch)
    assert sync.apply_relay_clients([], None) == {"postfix", "rspamd"}
    # No rule at all: an rspamd settings rule without a condition would match every message.
    assert clients.read_text() == rmap.read_text() == settings.read_text() == ""
    for path in (clients, rmap, settings):
        path.unlink()
    sync.apply_relay_clients(["mx2.example.org"], None)
    assert clients.read_text() == rmap.read_text() == settings.read_text() == ""


def test_the_relays_elastic_ips_are_published_for_the_mailbox_host_only() -> None:
    """Pulumi writes the relays' Elastic IPs to <ssm path>/relay-addresses once they exist; the mailbox
    host's role reads it, a relay's does not need it and cannot read it; stacks without relays have none."""
    from components.secrets import instance_policy
    from components.settings import load_settings, raw_from_pulumi_config
    from tests.unit.conftest import run_stack, stack_config

    run = run_stack("large")
    param = run.one("aws:ssm/parameter:Parameter", "secrets-relay-addresses")
    settings = load_settings(raw_from_pulumi_config(stack_config("large")), "large")
    assert param.raw_inputs["name"] == f"{settings.ssm_path}/relay-addresses"
    value = param.raw_inputs["value"]  # SSM values are secret in the provider's schema, whatever their type
    published = json.loads(value["value"] if isinstance(value, dict) else value)
    eips = {r.name: r.outputs["publicIp"] for r in run.of_type("aws:ec2/eip:Eip")}
    assert sorted(published) == sorted(settings.relay_hosts)
    assert all(address in eips.values() for address in published.values()), (published, eips)
    arn = f"arn:aws:ssm:{settings.region}:123456789012:parameter{settings.ssm_path}/relay-addresses"

    def readable(role: str) -> bool:
        statement = instance_policy(settings, "123456789012", role)["Statement"][0]
        return any(r == arn or (r.endswith("/*") and arn.startswith(r[:-1])) for r in statement["Resource"])
    assert readable("mailbox") and not readable("relay")
    assert not [r for r in run_stack("medium").resources if r.name.endswith("relay-addresses")]
