"""Config validation: every bad setting stops the program with a message naming it."""

from __future__ import annotations

from typing import Any

import pulumi
import pytest
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from components import program
from components.settings import ConfigError, load_settings
from tests.unit.conftest import raw_config
from tools.mockengine import RecordingMocks, RecordingMonitor, pulumi_config_values


def test_example_stacks_are_valid() -> None:
    for stack in ("dev", "small", "medium", "large", "isp"):
        s = load_settings(raw_config(stack), stack)
        assert s.stack == stack and s.domains and s.mailboxes


def test_defaults() -> None:
    s = load_settings(raw_config("small"), "small")
    assert s.dkim_selector == "orgmail"
    assert s.dns_ttl == 300
    assert s.admin.ssm_session_manager is True and s.admin.ssh_cidrs == ()
    assert s.rate_limits.connections_per_minute == 10  # the source article's value
    assert s.dmarc.subdomain_policy == s.dmarc.policy == "quarantine"
    assert s.upgrades.auto_reboot and s.upgrades.reboot_time == "04:30"
    assert s.ssm_path == "/orgmail/small"
    assert (s.backup.keep_daily, s.backup.keep_weekly, s.backup.keep_monthly) == (7, 4, 12)
    assert s.backup.snapshot_days == 7 and s.backup.noncurrent_days == 30 and s.backup.alarm_email is False


def _set(cfg: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    target: Any = cfg
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target.setdefault(k, {})
    last = keys[-1]
    if value is _DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


_DELETE = object()

# (what is changed, new value, setting the message must name, words it must contain)
INVALID: list[tuple[str, Any, str, str]] = [
    ("tier", "huge", "orgmail:tier", "small, medium, large, isp"),
    ("tier", _DELETE, "orgmail:tier", "must be one of"),
    ("organization", "", "orgmail:organization", "required"),
    ("region", "europe", "orgmail:region", "eu-central-1"),
    ("domains", [], "orgmail:domains", "required"),
    ("domains.0.name", "Example..org", "orgmail:domains[0].name", "domain name"),
    ("domains.0.name", "example", "orgmail:domains[0].name", "domain name"),
    ("domains", [{"name": "example.org", "zoneId": "0123456789abcdef0123456789abcdef"},
                 {"name": "example.org", "zoneId": "0123456789abcdef0123456789abcdee"}],
     "orgmail:domains[1].name", "duplicate"),
    ("domains.0.zoneId", _DELETE, "orgmail:domains[0].zoneId", "missing"),
    ("domains.0.zoneId", "not-a-zone", "orgmail:domains[0].zoneId", "32 lower-case hex"),
    ("domains.0.zone", "x", "orgmail:domains[0].zone", "unknown setting"),
    ("mailHost", "mail.other.example", "orgmail:mailHost", "outside every configured zone"),
    ("mailHost", "example.org", "orgmail:mailHost", "is a mail domain itself"),
    ("mailHost", "not a host", "orgmail:mailHost", "mail.example.org"),
    ("mailboxes.0.address", "ann@elsewhere.example", "orgmail:mailboxes[0].address", "outside the configured domains"),
    ("mailboxes.0.address", "Ann Smith@example.org", "orgmail:mailboxes[0].address", "lower-case address"),
    ("mailboxes.1.address", "ann@example.org", "orgmail:mailboxes[1].address", "duplicate mailbox"),
    ("mailboxes.0.quota", "lots", "orgmail:mailboxes[0].quota", "500M, 2G or 1T"),
    ("mailboxes.0.aliases", ["info@elsewhere.example"], "orgmail:mailboxes[0].aliases[0]", "outside"),
    ("mailboxes.0.aliases", ["bob@example.org"], "orgmail:mailboxes", "is itself a mailbox"),
    ("mailboxes.1.aliases", ["abuse@example.org"], "orgmail:mailboxes", "given to more than one mailbox"),
    ("aliases", {"a@example.org": ["b@example.org"], "b@example.org": ["a@example.org"]},
     "orgmail:aliases", "alias loop"),
    ("aliases", {"loop@example.org": ["loop@example.org"]}, "orgmail:aliases", "alias loop"),
    ("aliases", {"ann@example.org": ["bob@example.org"]}, "orgmail:aliases.ann@example.org", "already a mailbox"),
    ("aliases", {"x@example.org": ["ghost@example.org"]}, "orgmail:aliases.x@example.org", "neither a mailbox nor an alias"),
    ("aliases", {"x@example.org": []}, "orgmail:aliases.x@example.org", "at least one target"),
    ("admin.sshCidrs", ["0.0.0.0/0"], "orgmail:admin.sshCidrs[0]", "whole internet"),
    ("admin.sshCidrs", ["::/0"], "orgmail:admin.sshCidrs[0]", "whole internet"),
    ("admin.sshCidrs", ["10.0.0.1/8"], "orgmail:admin.sshCidrs[0]", "no host bits"),
    ("admin.sshCidrs", ["16.0.0.0/4"], "orgmail:admin.sshCidrs[0]", "too wide"),
    ("admin.email", "nobody", "orgmail:admin.email", "required"),
    ("admin.ssm", "maybe", "orgmail:admin.ssm", "true or false"),
    ("dmarc.policy", "block", "orgmail:dmarc.policy", "none, quarantine, reject"),
    ("dmarc.subdomainPolicy", "drop", "orgmail:dmarc.subdomainPolicy", "none, quarantine, reject"),
    ("dmarc.reportAddress", "reports", "orgmail:dmarc.reportAddress", "address"),
    ("dmarc.percent", 0, "orgmail:dmarc.percent", "1 to 100"),
    ("dkimSelector", "Bad_Selector", "orgmail:dkimSelector", "DNS label"),
    ("dnsTtl", 30, "orgmail:dnsTtl", "60 to 86400"),
    ("amiId", "debian", "orgmail:amiId", "ami-0123456789abcdef0"),
    ("network", {"vpcId": "vpc-0123456789abcdef0"}, "orgmail:network", "both vpcId and subnetId"),
    ("rateLimits.connectionsPerMinute", 0, "orgmail:rateLimits.connectionsPerMinute", "1 to 10000"),
    ("upgrades.rebootTime", "4am", "orgmail:upgrades.rebootTime", "HH:MM"),
    ("passwordHashes", {"ann@example.org": "plaintext"}, "orgmail:passwordHashes.ann@example.org", "BLF-CRYPT"),
    ("passwordHashes", {"zed@example.org": "{BLF-CRYPT}x"}, "orgmail:passwordHashes.zed@example.org", "no such mailbox"),
    ("tiers", "small", "orgmail:tiers", "unknown setting"),
    ("mtaSts.mode", "strict", "orgmail:mtaSts.mode", "testing, enforce, none"),
    ("mtaSts.maxAgeDays", 0, "orgmail:mtaSts.maxAgeDays", "1 to 365"),
    ("tlsRpt.reportAddress", "tls", "orgmail:tlsRpt.reportAddress", "address"),
    ("caa.iodef", "security", "orgmail:caa.iodef", "address"),
    ("autoconfig", "maybe", "orgmail:autoconfig", "true or false"),
    ("verify.afterDeploy", "soon", "orgmail:verify.afterDeploy", "true or false"),
    ("verify.when", True, "orgmail:verify.when", "unknown setting"),
    ("backup.keepDaily", 0, "orgmail:backup.keepDaily", "1 to 365"),
    ("backup.keepWeekly", "four", "orgmail:backup.keepWeekly", "whole number from 0 to 520"),
    ("backup.snapshotDays", 1001, "orgmail:backup.snapshotDays", "1 to 1000"),
    ("backup.noncurrentDays", 0, "orgmail:backup.noncurrentDays", "1 to 3650"),
    ("backup.alarmEmail", "yes", "orgmail:backup.alarmEmail", "true or false"),
    ("backup.retention", 7, "orgmail:backup.retention", "unknown setting"),
    ("backup", "nightly", "orgmail:backup", "must be an object"),
    ("cloudflareAccountId", "acct", "orgmail:cloudflareAccountId", "32 lower-case hex"),
    ("cloudflareAccountId", _DELETE, "orgmail:cloudflareAccountId", "mtaSts.mode: none and autoconfig: false"),
]


@pytest.mark.parametrize(("path", "value", "setting", "words"), INVALID,
                         ids=[f"{p}={v!r}"[:60] for p, v, _, _ in INVALID])
def test_invalid_setting_is_named(path: str, value: Any, setting: str, words: str) -> None:
    cfg = raw_config("dev")
    _set(cfg, path, value)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, "dev")
    matching = [p for p in err.value.problems if p.startswith(setting + ":")]
    assert matching, f"no problem names {setting}: {err.value.problems}"
    assert any(words in p for p in matching), matching


def test_all_problems_reported_together() -> None:
    cfg = raw_config("dev")
    cfg["tier"] = "huge"
    cfg["dmarc"]["policy"] = "block"
    cfg["admin"]["sshCidrs"] = ["0.0.0.0/0"]
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, "dev")
    assert len(err.value.problems) == 3
    assert str(err.value).startswith("invalid orgmail stack config (3 problem(s)):")


def test_password_hash_value_never_echoed() -> None:
    cfg = raw_config("dev")
    cfg["passwordHashes"] = {"ann@example.org": "hunter2-secret"}
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, "dev")
    assert "hunter2-secret" not in str(err.value)


def test_valid_password_hash_accepted() -> None:
    cfg = raw_config("dev")
    good = "{BLF-CRYPT}$2y$10$" + "a" * 53
    cfg["passwordHashes"] = {"ann@example.org": good}
    assert load_settings(cfg, "dev").password_hashes == {"ann@example.org": good}


def test_bad_stack_name() -> None:
    with pytest.raises(ConfigError, match="stack name"):
        load_settings(raw_config("dev"), "Prod_EU")


def test_invalid_config_registers_no_resource() -> None:
    """The real entry point fails with RunError (no traceback) before registering anything."""
    cfg = {f"orgmail:{k}": v for k, v in raw_config("dev").items()}
    cfg["orgmail:tier"] = "huge"
    monitor = RecordingMonitor(RecordingMocks("eu-central-1"))
    pulumi.runtime.set_mocks(monitor.mocks, project="orgmail", stack="dev", preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(pulumi_config_values(cfg))
    with pytest.raises(pulumi.RunError, match="orgmail:tier"):
        _sync_await(run_pulumi_func(program.main))
    assert monitor.registered == []


def test_no_account_needed_when_nothing_is_served() -> None:
    cfg = raw_config("dev")
    del cfg["cloudflareAccountId"]
    cfg["mtaSts"] = {"mode": "none"}
    cfg["autoconfig"] = False
    assert load_settings(cfg, "dev").publishing.worker is False
