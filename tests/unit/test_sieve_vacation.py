"""Filters and out-of-office (issue 18): each user's own Sieve script after the spam filing, managed over
ManageSieve on loopback only, with no new public port. Booted:
tests/e2e/test_mailhost.py::test_a_vacation_reply_goes_once_to_people_never_to_lists_bulk_or_spam."""

from __future__ import annotations

import re

from components.userdata import MAIL_PORTS, MAILBOX_PACKAGES
from tests.unit.test_userdata import MAILBOX, files_of


def test_managesieve_listens_on_loopback_only() -> None:
    conf = files_of(MAILBOX)["/etc/dovecot/dovecot.conf"]
    assert re.search(r"^protocols = imap pop3 lmtp sieve$", conf, re.M), conf
    assert ("service managesieve-login {\n  inet_listener sieve {\n    listen = 127.0.0.1\n    port = 4190\n  }\n}"
            in conf)
    assert "dovecot-managesieved" in MAILBOX_PACKAGES
    # No new port anywhere a client could reach: not in the security group's ports, not in nftables.
    assert 4190 not in MAIL_PORTS
    assert "4190" not in files_of(MAILBOX)["/etc/nftables.conf"]


def test_personal_scripts_run_after_the_spam_filing() -> None:
    conf = files_of(MAILBOX)["/etc/dovecot/dovecot.conf"]
    personal = conf.index("sieve_script personal {\n  driver = file\n  path = ~/sieve\n  active_path = ~/.dovecot.sieve\n}")
    assert conf.index("sieve_script spam-to-junk {\n  type = before\n") > personal  # type before: runs first anyway
    spam = files_of(MAILBOX)["/etc/dovecot/sieve/spam-to-junk.sieve"]
    # It stops: a user's vacation script never sees (and so never answers) spam.
    assert 'fileinto :create "Junk";\n  stop;' in spam
