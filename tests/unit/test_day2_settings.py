"""Issue 17 item 7: ordinary settings are day-2 changes (SSM, orgmail-sync), never a new host.

admin.email, admin.sshCidrs, admin.ssm and upgrades.* once lived in user-data, so adding an SSH
network replaced every host. They travel in the host config parameter now; user-data holds only
what a new instance alone can apply, and the settings that still feed it are derived from the code.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from components.secrets import host_config
from components.server import replacing_settings
from components.settings import load_settings
from tests.unit.conftest import STACKS, raw_config, stack_config
from tools.mockengine import MockRun, run_program

INSTANCE = "aws:ec2/instance:Instance"

# Day-2 settings, each with another valid value.
DAY2_CHANGES: dict[str, Any] = {
    "admin.email": "someone-else@example.net",
    "admin.sshCidrs": ["198.51.100.0/24", "2001:db8:42::/48"],
    "admin.ssm": False,
    "upgrades.autoReboot": False,
    "upgrades.rebootTime": "02:10",
}


def with_setting(stack: str, dotted: str, value: Any) -> dict[str, Any]:
    config = copy.deepcopy(stack_config(stack))
    top, _, sub = dotted.partition(".")
    key = f"orgmail:{top}"
    config[key] = {**(config.get(key) or {}), sub: value} if sub else value
    return config


def user_data(run: MockRun) -> dict[str, str]:
    return {r.name: r.inputs["userDataBase64"] for r in run.of_type(INSTANCE)}


@pytest.mark.parametrize("stack", STACKS)
def test_day2_settings_never_change_user_data(stack: str) -> None:
    before = user_data(run_program(stack_config(stack), stack))
    for dotted, value in DAY2_CHANGES.items():
        after = user_data(run_program(with_setting(stack, dotted, value), stack))
        assert after == before, f"{stack}: orgmail:{dotted} changes user-data, so it would replace hosts"


def test_day2_settings_travel_in_the_host_config() -> None:
    raw = raw_config("large")
    raw["admin"] = {**raw["admin"], "email": "ops@example.org", "sshCidrs": ["203.0.113.0/24", "2001:db8::/48"],
                    "ssm": False}
    raw["upgrades"] = {"autoReboot": False, "rebootTime": "03:00"}
    settings = load_settings(raw, "large")
    doc = json.loads(json.dumps(host_config(settings)))
    assert doc["admin"] == {"email": "ops@example.org", "sshCidrs": ["203.0.113.0/24", "2001:db8::/48"],
                            "ssmSessionManager": False}
    # Each host's own reboot time, 30 minutes apart (mailbox host first).
    assert doc["upgrades"] == {"autoReboot": False,
                               "rebootTimes": {settings.mail_host: "03:00", settings.relay_hosts[0]: "03:30"}}


def test_replacing_settings_are_what_feeds_user_data() -> None:
    """Derived from the code (what host_config and the image read), not a hand list."""
    names = replacing_settings()
    assert not {f"orgmail:{d}" for d in DAY2_CHANGES} & set(names)
    assert {"orgmail:mailHost", "orgmail:tier", "orgmail:amiId", "the stack name"} <= set(names)
    for name in names:
        assert name in ("the stack name", "the Pulumi project name") or name.startswith("orgmail:"), name


@pytest.mark.parametrize(("dotted", "value"), [("mailHost", "post.example.org")])
def test_a_replacing_setting_does_change_user_data(dotted: str, value: str) -> None:
    """The other side: a setting the derivation names does change user-data (the list is not empty talk)."""
    assert f"orgmail:{dotted}" in replacing_settings()
    before = user_data(run_program(stack_config("dev"), "dev"))
    after = user_data(run_program(with_setting("dev", dotted, value), "dev"))
    assert list(after.values()) != list(before.values())


def test_fail2ban_reads_sshs_journal_lines_only_where_ssh_is_open() -> None:
    """Debian's sshd jail is a second reader of the journal (test_containment: at most one jail reads
    it): off unless admin.sshCidrs opens port 22."""
    from tests.unit.test_rate_limits import sync_module

    sync = sync_module()
    assert sync.sshd_jail([]) == "[sshd]\nenabled = false\n"
    assert sync.sshd_jail(["203.0.113.0/24"]) == "[sshd]\nenabled = true\n"


def test_sync_writes_the_ssh_sets_per_family() -> None:
    from tests.unit.test_rate_limits import sync_module

    sync = sync_module()
    assert sync.ssh_sets([]) == "flush set inet orgmail ssh4\nflush set inet orgmail ssh6\n"  # no SSH at all
    assert sync.ssh_sets(["203.0.113.0/24", "2001:db8::/48", "198.51.100.0/24"]).splitlines()[2:] == [
        "add element inet orgmail ssh4 { 203.0.113.0/24, 198.51.100.0/24 }",
        "add element inet orgmail ssh6 { 2001:db8::/48 }"]


def test_sync_writes_the_hosts_own_reboot_time() -> None:
    from tests.unit.test_rate_limits import sync_module

    text = sync_module().unattended_upgrades(False, "05:00")
    assert 'Unattended-Upgrade::Automatic-Reboot "false";\n' in text
    assert 'Unattended-Upgrade::Automatic-Reboot-Time "05:00";\n' in text
    assert '"origin=Debian,codename=${distro_codename}-security,label=Debian-Security";' in text


def test_root_mail_goes_to_the_admin_from_the_mailbox_host_only() -> None:
    """admin.email is root's alias on the mailbox host; a relay's root is the mailbox host's root, so a relay's
    own mail (cron, fail2ban, postmaster@ its name) never leaves for an outside admin by itself (issue 14)."""
    from tests.unit.test_rate_limits import sync_module

    sync = sync_module()
    config = {"admin": {"email": "admin@elsewhere.example"}, "mailHost": "mail.example.org"}
    assert sync.system_aliases("mailbox", config).splitlines() == [
        "postmaster: root", "abuse: root", "MAILER-DAEMON: postmaster", "root: admin@elsewhere.example"]
    assert sync.system_aliases("relay", config).splitlines()[-1] == "root: root@mail.example.org"
