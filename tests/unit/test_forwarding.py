"""Forwarding to outside addresses (SRS and ARC): what the plan gives the mailbox host. The booted proof
is test_mail_forwarded_outside_gets_srs_sender_arc_seal_and_bounces_come_back in tests/e2e."""

from __future__ import annotations

import json

from components.secrets import instance_policy
from components.settings import load_settings
from components.userdata import MAILBOX_PACKAGES, ssm_files
from tests.unit.conftest import raw_config, run_stack

PARAM = "aws:ssm/parameter:Parameter"


def test_the_dev_stack_forwards_an_alias_outside() -> None:
    s = load_settings(raw_config("dev"), "dev")
    assert s.aliases["partner@example.org"] == ("chair@partner.example",)


def test_srs_key_is_a_stack_secret_in_ssm_that_relays_cannot_read() -> None:
    run = run_stack("large")
    [param] = [p for p in run.of_type(PARAM) if p.inputs["name"] == "/orgmail/large/srs-secret"]
    key = run.one("random:index/randomPassword:RandomPassword", "secrets-srs-secret")
    assert param.inputs["type"] == "SecureString" and param.inputs["value"] == key.outputs["result"]
    assert key.inputs["length"] >= 32
    settings = load_settings(raw_config("large"), "large")
    relay = json.dumps(instance_policy(settings, "123456789012", "relay"))
    assert "srs-secret" not in relay and "/orgmail/large/*" not in relay


def test_mailbox_host_runs_postsrsd_at_its_own_name_and_arc_seals_inbound_mail() -> None:
    assert "postsrsd" in MAILBOX_PACKAGES
    files = ssm_files("mailbox")
    default = files["/etc/default/postsrsd"]["content"]
    assert 'SRS_DOMAIN="$(postconf -h myhostname)"' in default and "SRS_SECRET=/etc/postsrsd.secret" in default
    arc = files["/etc/rspamd/local.d/arc.conf"]["content"]
    assert "sign_inbound = true;" in arc and 'use_domain = "recipient";' in arc
    assert 'path = "/var/lib/rspamd/dkim/$selector.key";' in arc
    relay = ssm_files("relay")
    assert "/etc/default/postsrsd" not in relay and "/etc/rspamd/local.d/arc.conf" not in relay
