"""Delivery into the mailboxes (issue 13): sizes that agree from Postfix to rspamd, full mailboxes
refused at RCPT, UTF-8 addresses, and spam filed into Junk with learning from users' moves."""

from __future__ import annotations

import re

import pytest

from components.secrets import host_config
from components.settings import ConfigError, load_settings
from tests.unit.conftest import raw_config
from tests.unit.test_userdata import MAILBOX, RELAY, files_of


@pytest.mark.parametrize("size_mb", [1, 25, 48, 49, 200])
def test_mailbox_limits_follow_the_message_size(size_mb: int) -> None:
    """local(8) and virtual(8) refuse to run when their limit is below message_size_limit; the
    default mailbox_size_limit (51200000) is below 49 MiB and more."""
    raw = raw_config("dev")
    raw["rateLimits"] = {"messageSizeMb": size_mb}
    limits = host_config(load_settings(raw, "dev"))["postfixLimits"]
    size = size_mb * 1024 * 1024
    assert limits["message_size_limit"] == size
    assert limits["mailbox_size_limit"] == size and limits["virtual_mailbox_limit"] == size


def test_rspamd_takes_every_message_postfix_may_accept() -> None:
    raw = raw_config("dev")
    raw["rateLimits"] = {"messageSizeMb": 201}
    with pytest.raises(ConfigError, match="rateLimits.messageSizeMb"):
        load_settings(raw, "dev")
    options = files_of(MAILBOX)["/etc/rspamd/local.d/options.inc"]
    found = re.search(r"^max_message = (\d+)mb;$", options, re.M)
    assert found and int(found[1]) * 1024 * 1024 > 200 * 1024 * 1024, options


def test_full_mailbox_refused_at_rcpt() -> None:
    main_cf = files_of(MAILBOX)["/etc/postfix/main.cf"]
    restrictions = re.search(r"^smtpd_recipient_restrictions = (.*?)\n(?! )", main_cf, re.M | re.S)
    assert restrictions, main_cf
    words = " ".join(restrictions[1].split())
    # After the unknown-recipient check; when the service cannot answer, Postfix goes on (DUNNO).
    assert words == ("reject_non_fqdn_recipient, reject_unlisted_recipient, "
                     "check_policy_service { unix:private/quota-status, default_action=DUNNO }")
    dovecot = files_of(MAILBOX)["/etc/dovecot/dovecot.conf"]
    service = re.search(r"^service quota-status \{\n(.*?)\n\}", dovecot, re.M | re.S)
    assert service and "executable = quota-status -p postfix" in service[1]
    assert "unix_listener /var/spool/postfix/private/quota-status {" in service[1]
    assert "mode = 0600" in service[1] and "user = postfix" in service[1]
    assert 'quota_status_overquota = "452 4.2.2 %{error}"' in dovecot
    assert "quota_status_nouser = DUNNO" in dovecot and "quota_status_success = DUNNO" in dovecot
    assert "quota-status" not in files_of(RELAY)["/etc/postfix/main.cf"]
