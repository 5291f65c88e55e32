"""Limits that fit offices behind NAT (issue 12): per client address on port 25, per login on the
submission ports; the settings, what travels through SSM, and what the host is given."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from components.secrets import host_config
from components.settings import ConfigError, load_settings
from components.userdata import render_files
from tests.unit.conftest import ROOT, host_script, raw_config
from tests.unit.test_userdata import MAILBOX, RELAY


def sync_module() -> ModuleType:
    return host_script("sync.py")


def with_limits(**limits: Any) -> dict[str, Any]:
    cfg = raw_config("dev")
    cfg["rateLimits"] = limits
    return cfg


def test_per_user_defaults_and_values() -> None:
    default = load_settings(raw_config("dev"), "dev").rate_limits
    assert (default.messages_per_user_hour, default.recipients_per_user_hour) == (200, 1000)
    s = load_settings(with_limits(messagesPerUserHour="30", recipientsPerUserHour=300), "dev").rate_limits
    assert (s.messages_per_user_hour, s.recipients_per_user_hour) == (30, 300)


@pytest.mark.parametrize(("limits", "setting", "words"), [
    ({"messagesPerUserHour": 0}, "orgmail:rateLimits.messagesPerUserHour", "whole number from 1 to 1000000"),
    ({"messagesPerUserHour": "lots"}, "orgmail:rateLimits.messagesPerUserHour", "whole number from 1 to 1000000"),
    ({"recipientsPerUserHour": 1000001}, "orgmail:rateLimits.recipientsPerUserHour", "1 to 1000000"),
    ({"recipientsPerUserHour": 50}, "orgmail:rateLimits.recipientsPerUserHour",
     "at least rateLimits.recipientsPerMessage (100): a message to that many recipients could never be sent"),
    ({"messagesPerUser": 5}, "orgmail:rateLimits.messagesPerUser", "unknown setting"),
])
def test_bad_per_user_limits_are_named(limits: dict[str, Any], setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(with_limits(**limits), "dev")
    assert any(f"- {setting}: " in line and words in line for line in str(err.value).splitlines()), str(err.value)


def test_per_user_limits_travel_in_the_host_config() -> None:
    """A day-2 setting: the config parameter in SSM carries it, orgmail-sync applies it."""
    doc = host_config(load_settings(with_limits(messagesPerUserHour=30, recipientsPerUserHour=300), "dev"))
    assert doc["userLimits"] == {"messagesPerUserHour": 30, "recipientsPerUserHour": 300}
    assert doc["postfixLimits"]["smtpd_client_auth_rate_limit"] == 10


def test_sync_writes_one_bucket_per_login_and_kind() -> None:
    inc = sync_module().user_rates({"messagesPerUserHour": 30, "recipientsPerUserHour": 300})
    rows = inc.splitlines()
    assert len(rows) == 2
    messages, recipients = rows
    # Each bucket its own key: rspamd keys buckets by the selector's value alone.
    assert 'selector = "id(\'messages\');user.lower"' in messages
    assert 'selector = "id(\'recipients\');user.lower"' in recipients
    assert "burst = 30; rate = \"30 / 1h\"; skip_recipients = true;" in messages
    assert "burst = 300; rate = \"300 / 1h\"; skip_recipients = false;" in recipients
    assert 'message = "Limit of 30 messages per user an hour reached (rateLimits.messagesPerUserHour)"' in messages
    assert 'message = "Limit of 300 recipients per user an hour reached (rateLimits.recipientsPerUserHour)"' in recipients
    assert all(row.count("{") == row.count("}") for row in rows)


def test_rspamd_includes_the_buckets_and_exempts_no_recipient() -> None:
    files = {f.path: f.content for f in render_files(MAILBOX)}
    conf = files["/etc/rspamd/local.d/ratelimit.conf"]
    assert '.include(try=true) "/etc/rspamd/orgmail/user_rates.inc"' in conf
    assert 'whitelisted_rcpts = "/dev/null";' in conf  # rspamd's default exempts mail to any postmaster
    assert "/etc/rspamd/local.d/ratelimit.conf" not in {f.path for f in render_files(RELAY)}


def master_services(master_cf: str) -> dict[str, list[str]]:
    """Service name -> its -o overrides, from a rendered master.cf."""
    services: dict[str, list[str]] = {}
    name = ""
    for line in master_cf.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0].isspace():
            services[name].extend(re.findall(r"-o (\S+)", line))
        else:
            fields = line.split()
            name = f"{fields[0]}/{fields[1]}"
            services[name] = []
    return services


def test_submission_ports_limit_only_auth_per_address() -> None:
    services = master_services({f.path: f.content for f in render_files(MAILBOX)}["/etc/postfix/master.cf"])
    for service in ("submission/inet", "submissions/inet"):
        overrides = services[service]
        for limit in ("connection", "message", "recipient"):
            assert f"smtpd_client_{limit}_rate_limit=0" in overrides, (service, overrides)
        assert not [o for o in overrides if o.startswith("smtpd_client_auth_rate_limit")], overrides
    # Port 25 (postscreen, then smtpd) keeps every per-address limit main.cf gets from orgmail-sync.
    for service in ("smtp/inet", "smtpd/pass"):
        assert not [o for o in services[service] if "rate_limit" in o], services[service]
    relay = master_services({f.path: f.content for f in render_files(RELAY)}["/etc/postfix/master.cf"])
    assert not [o for overrides in relay.values() for o in overrides if "rate_limit" in o]


def test_readme_documents_the_per_user_settings() -> None:
    readme = Path(ROOT / "README.md").read_text()
    for setting in ("rateLimits.messagesPerUserHour", "rateLimits.recipientsPerUserHour"):
        assert f"| `{setting}` |" in readme, setting
