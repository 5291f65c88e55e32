"""Delivery into the mailboxes (issue 13): sizes that agree from Postfix to rspamd, full mailboxes
refused at RCPT, UTF-8 addresses, and spam filed into Junk with learning from users' moves."""

from __future__ import annotations

import re

import pytest

from components.secrets import host_config
from components.settings import ConfigError, load_settings
from components.userdata import render_user_data
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
    # After the unknown-recipient check, and only for the recipients orgmail-sync lists (those with a
    # quota); when the service cannot answer, Postfix goes on (DUNNO).
    assert words == ("reject_non_fqdn_recipient, reject_unlisted_recipient, "
                     "check_recipient_access texthash:/etc/postfix/orgmail/quota_recipients")
    classes = re.search(r"^smtpd_restriction_classes = (.*)$", main_cf, re.M)
    assert classes and "orgmail_quota_check" in classes[1].split(", "), main_cf
    assert re.search(r"^orgmail_quota_check = check_policy_service "
                     r"\{ unix:private/quota-status, default_action=DUNNO \}$", main_cf, re.M), main_cf
    dovecot = files_of(MAILBOX)["/etc/dovecot/dovecot.conf"]
    service = re.search(r"^service quota-status \{\n(.*?)\n\}", dovecot, re.M | re.S)
    assert service and "executable = quota-status -p postfix" in service[1]
    assert "unix_listener /var/spool/postfix/private/quota-status {" in service[1]
    assert "mode = 0600" in service[1] and "user = postfix" in service[1]
    assert 'quota_status_overquota = "452 4.2.2 %{error}"' in dovecot
    assert "quota_status_nouser = DUNNO" in dovecot and "quota_status_success = DUNNO" in dovecot
    assert "quota-status" not in files_of(RELAY)["/etc/postfix/main.cf"]


def test_only_mailboxes_with_a_quota_are_checked_at_rcpt() -> None:
    """orgmail-sync lists for Postfix exactly the Dovecot users that have a quota, under the class
    that asks quota-status; an unlimited mailbox and one without a password yet are never asked about."""
    from tests.unit.test_rate_limits import sync_module
    sync = sync_module()
    mailboxes = [{"address": "ann@example.org", "quota": "2G"}, {"address": "Bob@Example.org"},
                 {"address": "Cat@example.net", "quota": "1M"}, {"address": "new@example.org", "quota": "5G"}]
    hashes = {a: "{BLF-CRYPT}$2y$10$x" for a in ("ann@example.org", "Bob@Example.org", "Cat@example.net")}
    users, checked, _ = sync.dovecot_users(mailboxes, hashes)
    assert checked == "ann@example.org orgmail_quota_check\ncat@example.net orgmail_quota_check\n"
    rows = users.splitlines()
    assert [r.split(":")[0] for r in rows] == ["ann@example.org", "Bob@Example.org", "Cat@example.net"]
    assert rows[0].endswith("::userdb_quota_storage_size=2G") and rows[1].endswith("::userdb_quota_ignore=yes"), rows
    assert sync.QUOTA_RECIPIENTS in files_of(MAILBOX)["/etc/postfix/main.cf"]


def test_an_unlimited_mailbox_is_left_out_of_the_quota_and_its_warnings() -> None:
    """The quota root's 80 and 95 % warnings make Dovecot count every folder of the mailbox after each delivery
    (quota.c quota_warnings_execute), even with no limit, when no warning can ever fire: 1.2 ms more a delivery
    (docs/benchmarks.md run 18). An unlimited mailbox is left out of the quota (userdb quota_ignore); one with a
    quota keeps both its limit and its warnings."""
    from tests.unit.test_rate_limits import sync_module
    sync = sync_module()
    users, _, _ = sync.dovecot_users([{"address": "ann@example.org", "quota": "2G"}, {"address": "bob@example.org"}],
                                     {a: "{BLF-CRYPT}$2y$10$x" for a in ("ann@example.org", "bob@example.org")})
    extra = {row.split(":")[0]: row.split(":", 7)[7] for row in users.splitlines()}
    assert extra == {"ann@example.org": "userdb_quota_storage_size=2G", "bob@example.org": "userdb_quota_ignore=yes"}
    dovecot = files_of(MAILBOX)["/etc/dovecot/dovecot.conf"]
    assert not re.search(r"^\s*quota_ignore\s*=", dovecot, re.M) and "quota_storage_percentage = 80" in dovecot


def test_lmtp_offers_smtputf8() -> None:
    """Postfix offers SMTPUTF8 (compatibility_level 3.6); the LMTP hop into Dovecot must too, or
    mail from a UTF-8 address is accepted and then bounced ("SMTPUTF8 is required")."""
    assert re.search(r"^compatibility_level = 3\.\d+$", files_of(MAILBOX)["/etc/postfix/main.cf"], re.M)
    assert "smtputf8_enable" not in files_of(MAILBOX)["/etc/postfix/main.cf"]  # the default: yes
    assert re.search(r"^mail_utf8_extensions = yes$", files_of(MAILBOX)["/etc/dovecot/dovecot.conf"], re.M)


def test_mailbox_addresses_stay_ascii() -> None:
    """A UTF-8 local part of ours is refused at RCPT because no mailbox can have one."""
    raw = raw_config("dev")
    raw["mailboxes"] = [*raw["mailboxes"], {"address": "δοκιμή@example.org"}]
    with pytest.raises(ConfigError, match="mailboxes"):
        load_settings(raw, "dev")


SIEVE = ("spam-to-junk.sieve", "learn-spam.sieve", "learn-ham.sieve")


def test_spam_goes_to_junk_and_moves_teach_rspamd() -> None:
    from components.userdata import MAILBOX_PACKAGES, ssm_files

    assert "dovecot-sieve" in MAILBOX_PACKAGES
    dovecot = files_of(MAILBOX)["/etc/dovecot/dovecot.conf"]
    lmtp = re.search(r"^protocol lmtp \{\n(.*?)\n\}", dovecot, re.M | re.S)
    imap = re.search(r"^protocol imap \{\n(.*?)\n\}", dovecot, re.M | re.S)
    assert lmtp and "sieve = yes" in lmtp[1] and imap and "imap_sieve = yes" in imap[1]
    assert re.search(r"^sieve_script spam-to-junk \{\n  type = before\n  path = /etc/dovecot/sieve/spam-to-junk.sieve\n",
                     dovecot, re.M)
    assert re.search(r"^mailbox Junk \{\n  sieve_script learn-spam \{\n    type = before\n    cause = copy\n", dovecot, re.M)
    assert re.search(r"^imapsieve_from Junk \{\n  sieve_script learn-ham \{\n    type = before\n    cause = copy\n",
                     dovecot, re.M)
    pipe_dir = re.search(r"^sieve_pipe_bin_dir = (\S+)$", dovecot, re.M)
    assert pipe_dir

    files = ssm_files("mailbox")
    junk = files["/etc/dovecot/sieve/spam-to-junk.sieve"]["content"]
    # rspamd's milter adds "X-Spam: Yes" for its add-header action (actions.conf add_header).
    assert 'if header :is "X-Spam" "Yes" {\n  fileinto :create "Junk";\n  stop;\n}' in junk
    assert 'pipe :copy :try "rspamd-learn" ["spam"];' in files["/etc/dovecot/sieve/learn-spam.sieve"]["content"]
    ham = files["/etc/dovecot/sieve/learn-ham.sieve"]["content"]
    assert 'if environment :is "imap.mailbox" ["Trash", "Junk"] {\n  stop;\n}' in ham
    assert 'pipe :copy :try "rspamd-learn" ["ham"];' in ham
    learn = files[f"{pipe_dir[1]}/rspamd-learn"]
    assert learn["mode"] == "0755"
    assert 'exec /usr/bin/rspamc --connect /run/rspamd-controller/controller.sock --timeout 10 "learn_$1"' in learn["content"]
    assert "-P" not in learn["content"] and "password" not in learn["content"].lower().replace("no password", "")
    user_data = render_user_data(MAILBOX)  # static files travel through SSM (EC2's 16 KB)
    for name in SIEVE:
        assert f"/etc/dovecot/sieve/{name}" in files and f"path: /etc/dovecot/sieve/{name}" not in user_data
    assert not any("sieve" in path for path in ssm_files("relay"))


def test_rspamd_controller_only_on_a_socket_for_vmail() -> None:
    from components.userdata import ssm_files

    controller = ssm_files("mailbox")["/etc/rspamd/local.d/worker-controller.inc"]["content"]
    binds = re.findall(r"^bind_socket = (.*);$", controller, re.M)
    assert binds == ['"/run/rspamd-controller/controller.sock mode=0666"']  # replaces localhost:11334
    dropin = files_of(MAILBOX)["/etc/systemd/system/rspamd.service.d/orgmail.conf"]
    assert "ExecStartPre=+/usr/bin/install -d -o _rspamd -g 5000 -m 0750 /run/rspamd-controller" in dropin
    assert "rspamd-controller" not in files_of(RELAY)["/etc/systemd/system/rspamd.service.d/orgmail.conf"]
    assert "/etc/rspamd/local.d/worker-controller.inc" not in ssm_files("relay")


def test_sync_compiles_the_global_sieve_scripts() -> None:
    """Every extension a learning script requires beyond a personal script's is one orgmail-sync
    compiles with and one dovecot.conf grants global scripts."""
    from components.userdata import ssm_files
    from tests.unit.test_rate_limits import sync_module

    sync = sync_module()
    granted = {e.lstrip("+") for e in sync.SIEVE_GLOBAL_EXTENSIONS.split()}
    dovecot = files_of(MAILBOX)["/etc/dovecot/dovecot.conf"]
    block = re.search(r"^sieve_global_extensions \{\n(.*?)\n\}", dovecot, re.M | re.S)
    assert block
    global_only = set(re.findall(r"^  (\S+) = yes$", block[1], re.M))
    assert global_only <= granted and granted - global_only == {"imapsieve"}
    for name in SIEVE:
        text = ssm_files("mailbox")[f"/etc/dovecot/sieve/{name}"]["content"]
        required = set(re.findall(r'"([\w.]+)"', re.search(r"^require \[(.*)\];$", text, re.M)[1]))  # type: ignore[index]
        assert required - {"fileinto", "mailbox", "copy", "environment"} <= granted, (name, required)
