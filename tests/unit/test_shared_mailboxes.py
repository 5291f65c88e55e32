"""Shared mailboxes (issue 18): mailboxes[].sharedWith. The rules a stack config must keep, what the
host gets (a Dovecot user without a login, a namespace per shared mailbox with rights for its users
only, send-as for them), and no password made for it. The booted proof, with an authenticated user
trying what he must not, is tests/e2e/test_mailhost.py::test_a_shared_mailbox_is_seen_and_sent_as_by_its_users_only."""

from __future__ import annotations

import re
from typing import Any

import pytest

from components.secrets import host_config
from components.settings import ConfigError, load_settings
from tests.unit.conftest import host_script, raw_config, stack_config
from tools.mockengine import run_program

SUPPORT = {"address": "support@example.org", "sharedWith": ["ann@example.org"], "quota": "5G",
           "aliases": ["help@example.org"]}


def with_support(**changes: Any) -> dict[str, Any]:
    raw = raw_config("dev")
    raw["mailboxes"] = [*raw["mailboxes"], {**SUPPORT, **changes}]
    return raw


def problems(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(raw, "dev")
    return str(err.value)


@pytest.mark.parametrize(("members", "where", "says"), [
    (["support@example.org"], "orgmail:mailboxes[2].sharedWith[0]", "is this shared mailbox itself"),
    (["carl@example.org"], "orgmail:mailboxes[2].sharedWith[0]", "is not a mailbox of this stack"),
    (["team@example.org"], "orgmail:mailboxes[2].sharedWith[0]", "is not a mailbox of this stack"),
    (["chair@partner.example"], "orgmail:mailboxes[2].sharedWith[0]", "is not a mailbox of this stack"),
    (["ann@example.org", "ann@example.org"], "orgmail:mailboxes[2].sharedWith[1]", "is listed twice"),
    (["Ann@example.org"], "orgmail:mailboxes[2].sharedWith[0]", "must be an address like ann@example.org"),
    (["ann@example.org\n"], "orgmail:mailboxes[2].sharedWith[0]", "must be an address like ann@example.org"),
    ("ann@example.org", "orgmail:mailboxes[2].sharedWith", "must be a list"),
])
def test_who_may_share_a_mailbox(members: Any, where: str, says: str) -> None:
    found = problems(with_support(sharedWith=members))
    assert re.search(rf"{re.escape(where)}: [^\n]*{re.escape(says)}", found), found


def test_a_shared_mailbox_is_not_shared_with_another_shared_one() -> None:
    raw = with_support()
    raw["mailboxes"].append({"address": "desk@example.org", "sharedWith": ["support@example.org"]})
    assert "orgmail:mailboxes[3].sharedWith[0]: support@example.org is a shared mailbox itself" in problems(raw)


def test_a_shared_mailbox_takes_no_password_hash() -> None:
    raw = with_support()
    raw["passwordHashes"] = {"support@example.org": "{BLF-CRYPT}$2y$10$" + "a" * 53}
    found = problems(raw)
    assert "orgmail:passwordHashes.support@example.org: a shared mailbox has no login of its own" in found
    assert "aaaa" not in found  # a secret is never echoed


def test_the_host_config_names_the_users_and_lets_them_send_as_it() -> None:
    config = host_config(load_settings(with_support(), "dev"))
    assert {"address": "support@example.org", "quota": "5G", "sharedWith": ["ann@example.org"]} in config["mailboxes"]
    assert config["senders"]["support@example.org"] == ["ann@example.org"]
    assert config["senders"]["help@example.org"] == ["ann@example.org"]
    assert config["aliases"]["help@example.org"] == ["support@example.org"]
    # A mailbox that is not shared keeps its single login, and no other key.
    assert {"address": "ann@example.org", "quota": "2G"} in config["mailboxes"]


def test_no_password_is_made_for_a_shared_mailbox() -> None:
    cfg = dict(stack_config("dev"))
    cfg["orgmail:mailboxes"] = [*cfg["orgmail:mailboxes"], SUPPORT]
    run = run_program(cfg, "dev")
    assert set(run.outputs["initialPasswords"]) == {"ann@example.org", "bob@example.org"}
    names = [r.name for r in run.of_type("random:index/randomPassword:RandomPassword")]
    assert not [n for n in names if "support" in n], names


def test_sync_writes_a_user_without_login_and_a_namespace_for_its_users() -> None:
    sync = host_script("sync.py")
    mailboxes = [{"address": "ann@example.org", "quota": "2G"}, {"address": "bob@example.org", "quota": None},
                 {"address": "support@example.org", "quota": "5G", "sharedWith": ["ann@example.org", "bob@example.org"]}]
    users, checked, _ = sync.dovecot_users(mailboxes, {"ann@example.org": "{BLF-CRYPT}$2y$10$x",
                                                    "bob@example.org": "{BLF-CRYPT}$2y$10$y"})
    assert ("support@example.org::5000:5000::/srv/mail/vmail/example.org/support::userdb_quota_storage_size=5G"
            in users.splitlines())
    assert "support@example.org orgmail_quota_check" in checked
    conf = sync.shared_namespaces(mailboxes)
    assert conf.startswith("# Written by orgmail-sync from orgmail:mailboxes[].sharedWith.\n"
                           "mail_plugins {\n  acl = yes\n}\nacl_driver = vfile\n")
    assert "\nacl_globals_only = yes\n" in conf
    assert ('namespace "Shared/support@example.org" {\n  type = public\n  separator = /\n'
            "  prefix = Shared/support@example.org/\n  mail_path = /srv/mail/vmail/example.org/support/mail\n"
            "  subscriptions = no\n  list = children\n  hidden = yes\n  mailbox_list_index = no\n  acl_globals_only = no\n"
            "  mailbox INBOX {\n    auto = create\n  }\n"
            "  acl user=ann@example.org {\n    rights = lrwstipekx\n  }\n"
            "  acl user=bob@example.org {\n    rights = lrwstipekx\n  }\n}\n") in conf
    # Never the right to change rights (a), and nothing for anyone else.
    assert "anyone" not in conf and "authenticated" not in conf and "owner" not in conf
    # Nothing shared: no ACL plugin at all (it would cost every delivery and login).
    assert sync.shared_namespaces(mailboxes[:2]) == ""


def test_the_users_file_is_what_the_passdb_reads_as_no_login() -> None:
    """orgmail-passdb.lua answers "no such user" for an empty hash: the shared mailbox's line has one."""
    from tests.unit.conftest import ROOT
    lua = (ROOT / "cloud-init/files/dovecot/orgmail-passdb.lua").read_text()
    assert 'if hash == nil or hash == "" then\n    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN' in lua


def test_dovecot_includes_the_shared_namespaces() -> None:
    from tests.unit.test_userdata import MAILBOX, files_of
    conf = files_of(MAILBOX)["/etc/dovecot/dovecot.conf"]
    assert "\n!include_try /etc/dovecot/orgmail-shared.conf\n" in conf
    assert "acl" not in conf.replace("orgmail-shared.conf", "")  # the plugin only with a shared mailbox


def test_a_change_of_the_shared_mailboxes_restarts_dovecot_and_never_reloads_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Dovecot 2.4.1's master crashed (SIGSEGV) on a reload whose configuration had lost its shared
    namespaces (booted test); such a change restarts it instead, and a reload owed at the same time is
    covered by the restart. A restart that fails stays owed, as reloads do."""
    from tests.unit.test_volume import sync_with
    sync, fake = sync_with(monkeypatch, tmp_path)
    fake.failing = {"dovecot.service"}
    assert sync.reload({"dovecot", "dovecot-restart", "postfix"}) == [
        "reload of dovecot-restart failed, kept pending: Job failed."]
    assert ["systemctl", "try-reload-or-restart", "dovecot.service"] not in fake.calls
    assert ["systemctl", "try-restart", "dovecot.service"] in fake.calls
    assert sorted(p.name for p in sync.PENDING.iterdir()) == ["dovecot", "dovecot-restart"]
    fake.failing, fake.calls[:] = set(), []
    assert sync.reload(set()) == []
    assert [c for c in fake.calls if "dovecot.service" in c] == [["systemctl", "try-restart", "dovecot.service"]]
    assert not list(sync.PENDING.iterdir())


def test_dovecot_comes_back_after_a_crash() -> None:
    """Debian's dovecot.service has no Restart=: the mailbox host adds one (booted: test_mailhost.py
    test_dovecot_comes_back_after_its_master_crashes)."""
    from tests.unit.test_userdata import MAILBOX, files_of
    dropin = files_of(MAILBOX)["/etc/systemd/system/dovecot.service.d/orgmail-restart.conf"]
    assert "[Service]\nRestart=on-failure\nRestartSec=5s\n" in dropin


# --- copy-forwarding (mailboxes[].forwardCopyTo) ------------------------------------------------

def with_copies(targets: Any) -> dict[str, Any]:
    raw = raw_config("dev")
    raw["mailboxes"] = [{**m, "forwardCopyTo": targets} if m["address"] == "bob@example.org" else m
                        for m in raw["mailboxes"]]
    return raw


def test_a_copy_forward_keeps_the_mailbox_and_adds_outside_targets() -> None:
    config = host_config(load_settings(with_copies(["bob@home.example", "b@work.example"]), "dev"))
    # Postfix delivers an address an alias maps to itself: bob keeps every message, the copies go out.
    assert config["aliases"]["bob@example.org"] == ["bob@example.org", "bob@home.example", "b@work.example"]
    assert {"address": "bob@example.org", "quota": None} in config["mailboxes"]
    assert config["senders"]["bob@example.org"] == ["bob@example.org"]  # no one new may send as bob


@pytest.mark.parametrize(("targets", "where", "says"), [
    (["ann@example.org"], "orgmail:mailboxes[1].forwardCopyTo[0]", "is in a configured domain"),
    (["team@example.org"], "orgmail:mailboxes[1].forwardCopyTo[0]", "make a group alias"),
    (["x@home.example", "x@home.example"], "orgmail:mailboxes[1].forwardCopyTo[1]", "is listed twice"),
    (["not an address"], "orgmail:mailboxes[1].forwardCopyTo[0]", "must be an address"),
    (["x@home.example\n"], "orgmail:mailboxes[1].forwardCopyTo[0]", "must be an address"),
    ("x@home.example", "orgmail:mailboxes[1].forwardCopyTo", "must be a list"),
])
def test_what_a_copy_forward_refuses(targets: Any, where: str, says: str) -> None:
    found = problems(with_copies(targets))
    assert re.search(rf"{re.escape(where)}: [^\n]*{re.escape(says)}", found), found


def test_the_pull_request_diff_shows_a_new_copy_forward() -> None:
    """A copy to an outside address is what an admin must see in review: plandiff lists it in front."""
    from tools.plandiff import compare_mail, format_mail, mail_routing
    old = mail_routing(run_program(stack_config("dev"), "dev"))
    cfg = dict(stack_config("dev"))
    cfg["orgmail:mailboxes"] = with_copies(["bob@home.example"])["mailboxes"]
    lines = format_mail(compare_mail(old, mail_routing(run_program(cfg, "dev"))))
    assert lines[1] == "  ! mail to bob@example.org now also leaves for bob@home.example, outside your domains", lines
