"""Config validation: every bad setting stops the program with a message naming it."""

from __future__ import annotations

import copy
import json
from typing import Any

import pulumi
import pytest
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from components import program
from components.settings import ConfigError, load_settings
from tests.unit.conftest import STACKS, raw_config
from tools.mockengine import RecordingMocks, RecordingMonitor, pulumi_config_values


def test_example_stacks_are_valid() -> None:
    for stack in ("dev", "small", "medium", "large", "isp-single"):
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
    ("mailboxes.0.quota", "lots", "orgmail:mailboxes[0].quota", "500M, 2G or 1T, or unlimited"),
    ("mailboxes.0.quota", "Unlimited", "orgmail:mailboxes[0].quota", "500M, 2G or 1T, or unlimited"),
    ("defaultQuota", "2GB", "orgmail:defaultQuota", "500M, 2G or 1T, or unlimited"),
    ("defaultQuota", 2, "orgmail:defaultQuota", "500M, 2G or 1T, or unlimited"),
    ("mailboxes.0.aliases", ["info@elsewhere.example"], "orgmail:mailboxes[0].aliases[0]", "outside"),
    ("mailboxes.0.aliases", ["info@example.org", "info@example.org"], "orgmail:mailboxes[0].aliases[1]",
     "listed twice"),
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
    ("cloudflareAccountId", _DELETE, "orgmail:cloudflareAccountId", "ACME challenges"),
    ("admin.email", "zed@example.org", "orgmail:admin.email", "neither a mailbox nor an alias"),
    ("dkimRetiring", ["s2025"], "orgmail:dkimRetiring", "map of old selector -> date"),
    ("dkimRetiring", {"s2026": "2027-01-31"}, "orgmail:dkimRetiring.s2026", "is orgmail:dkimSelector"),
    ("dkimRetiring", {"Old_Key": "2027-01-31"}, "orgmail:dkimRetiring.Old_Key", "DNS label"),
    ("dkimRetiring", {"s2025": "next month"}, "orgmail:dkimRetiring.s2025", "YYYY-MM-DD"),
    ("dkimRetiring", {"s2025": "2027-02-30"}, "orgmail:dkimRetiring.s2025", "YYYY-MM-DD"),
    ("dkimRetiring", {"s2025": "2027-01-31\n"}, "orgmail:dkimRetiring.s2025", "YYYY-MM-DD"),
    # A final newline must fail the setting's own check too ($ in a regex matches before it).
    ("mailboxes.0.address", "ann@example.org\n", "orgmail:mailboxes[0].address", "lower-case address"),
    ("mailboxes.0.address", "ann@example.org\n", "orgmail:mailboxes[0].address", "line break (\\n)"),
    ("mailboxes.0.aliases", ["info@example.org\n"], "orgmail:mailboxes[0].aliases[0]", "must be an address"),
    ("aliases", {"sales@example.org\n": ["ann@example.org"]}, "orgmail:aliases.sales@example.org\\n",
     "must be an address"),
    ("aliases", {"sales@example.org\n": ["ann@example.org"]}, "orgmail:aliases.sales@example.org\\n",
     "line break (\\n)"),
    ("aliases", {"sales@example.org": ["ann@example.org\n"]}, "orgmail:aliases.sales@example.org", "target"),
    ("dkimSelector", "orgmail\n", "orgmail:dkimSelector", "DNS label"),
    ("domains.0.name", "example.org\n", "orgmail:domains[0].name", "domain name"),
    ("domains.0.zoneId", "0123456789abcdef0123456789abcdef\n", "orgmail:domains[0].zoneId", "32 lower-case hex"),
    ("mailHost", "mail.example.org\n", "orgmail:mailHost", "mail.example.org"),
    ("mailboxes.0.quota", "2G\n", "orgmail:mailboxes[0].quota", "500M, 2G or 1T"),
    ("mailboxes.0.quota", "unlimited\n", "orgmail:mailboxes[0].quota", "500M, 2G or 1T"),
    ("defaultQuota", "2G\n", "orgmail:defaultQuota", "500M, 2G or 1T"),
    ("organization", "Example Org\n", "orgmail:organization", "required"),
    ("region", "eu-central-1\n", "orgmail:region", "eu-central-1"),
    ("amiId", "ami-0123456789abcdef0\n", "orgmail:amiId", "ami-0123456789abcdef0"),
    ("network", {"vpcId": "vpc-0123456789abcdef0\n", "subnetId": "subnet-0123456789abcdef0"},
     "orgmail:network.vpcId", "vpc-0123456789abcdef0"),
    ("network", {"vpcId": "vpc-0123456789abcdef0", "subnetId": "subnet-0123456789abcdef0\n"},
     "orgmail:network.subnetId", "subnet-0123456789abcdef0"),
    ("upgrades.rebootTime", "04:30\n", "orgmail:upgrades.rebootTime", "HH:MM"),
    ("cloudflareAccountId", "0a1b2c3d4e5f60718293a4b5c6d7e8f9\n", "orgmail:cloudflareAccountId", "32 lower-case hex"),
    ("passwordHashes", {"ann@example.org": "{BLF-CRYPT}$2y$10$" + "a" * 53 + "\n"},
     "orgmail:passwordHashes.ann@example.org", "BLF-CRYPT"),
    # Internationalised names: A-labels must be real punycode of a valid label; a TLD is never all digits.
    ("domains.0.name", "example.xn--", "orgmail:domains[0].name", "domain name"),
    ("domains.0.name", "example.123", "orgmail:domains[0].name", "domain name"),
    ("domains.0.name", "example.xn--zz", "orgmail:domains[0].name", "xn--zz is not a valid IDNA A-label"),
    ("domains.0.name", "xn--ls8h.example", "orgmail:domains[0].name", "xn--ls8h is not a valid IDNA A-label"),
    ("mailHost", "mail.xn--a-ecp.example.org", "orgmail:mailHost", "xn--a-ecp is not a valid IDNA A-label"),
    ("mailboxes.0.address", "ann@example.xn--zz", "orgmail:mailboxes[0].address", "xn--zz is not a valid IDNA A-label"),
]


@pytest.mark.parametrize(("path", "value", "setting", "words"), INVALID,
                         ids=[f"{p}={'<deleted>' if v is _DELETE else repr(v)}"[:60] for p, v, _, _ in INVALID])
def test_invalid_setting_is_named(path: str, value: Any, setting: str, words: str) -> None:
    cfg = raw_config("dev")
    _set(cfg, path, value)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, "dev")
    matching = [p for p in err.value.problems if p.startswith(setting + ":")]
    assert matching, f"no problem names {setting}: {err.value.problems}"
    assert any(words in p for p in matching), matching


# --- role and report addresses (issue 13, defect 4) ------------------------------------------

@pytest.mark.parametrize("stack", ["dev", "small", "medium", "large", "isp-single"])
def test_every_role_and_report_address_is_deliverable(stack: str) -> None:
    """postmaster@ and abuse@ of each domain, and every report address the stack publishes in a hosted
    domain (DMARC and TLS-RPT rua, CAA iodef), is a mailbox or an alias that ends in one or outside."""
    s = load_settings(raw_config(stack), stack)
    wanted = [f"{role}@{d.name}" for d in s.domains for role in ("postmaster", "abuse")]
    wanted += [s.dmarc.report_address, s.publishing.tls_rpt_address, s.publishing.caa_iodef or s.admin.email]
    hosted = tuple("@" + d.name for d in s.domains)
    for address in (a for a in wanted if a.endswith(hosted)):
        assert address in s.recipients, address


def test_missing_role_and_report_addresses_become_aliases_of_the_admin() -> None:
    cfg = raw_config("dev")
    cfg["mailboxes"][0]["aliases"] = []  # ann had postmaster@ and abuse@
    cfg["domains"].append({"name": "second.example", "zoneId": "0123456789abcdef0123456789abcdee"})
    cfg["tlsRpt"] = {"reportAddress": "tls@second.example"}
    cfg["caa"] = {"iodef": "certs@example.org"}
    s = load_settings(cfg, "dev")
    admin = ("ann@example.org",)
    assert {a: t for a, t in s.aliases.items() if t == admin} == {
        "postmaster@example.org": admin, "abuse@example.org": admin, "dmarc@example.org": admin,
        "postmaster@second.example": admin, "abuse@second.example": admin, "tls@second.example": admin,
        "certs@example.org": admin}
    assert s.aliases["team@example.org"] == ("ann@example.org", "bob@example.org")


def test_configured_role_addresses_and_outside_report_addresses_are_kept() -> None:
    cfg = raw_config("dev")
    cfg["aliases"]["dmarc@example.org"] = ["bob@example.org"]
    cfg["tlsRpt"] = {"reportAddress": "reports@outside.example"}
    s = load_settings(cfg, "dev")
    assert s.aliases["dmarc@example.org"] == ("bob@example.org",)
    assert "postmaster@example.org" not in s.aliases  # ann's own alias, as configured
    assert not any(a.endswith("@outside.example") for a in s.aliases)


def test_an_outside_admin_receives_the_role_addresses() -> None:
    cfg = raw_config("dev")
    cfg["mailboxes"][0]["aliases"] = []
    cfg["admin"]["email"] = "it@provider.example"
    s = load_settings(cfg, "dev")
    assert s.aliases["postmaster@example.org"] == ("it@provider.example",)


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


def test_the_account_is_needed_even_when_mta_sts_and_autoconfig_are_off() -> None:
    """The ACME challenge Worker and the MTA-STS opt-out policy live there."""
    cfg = raw_config("dev")
    del cfg["cloudflareAccountId"]
    cfg["mtaSts"] = {"mode": "none"}
    cfg["autoconfig"] = False
    with pytest.raises(ConfigError, match="orgmail:cloudflareAccountId: required"):
        load_settings(cfg, "dev")


# Every string setting, with every string-valued form a setting can take (Pulumi passes scalars as strings).
# test_every_setting_config_covers_every_setting keeps this complete when a setting is added.
def _every_setting_config() -> dict[str, Any]:
    cfg = raw_config("dev")
    cfg.update({
        "passwordHashes": {"ann@example.org": "{BLF-CRYPT}$2y$10$" + "a" * 53},
        "admin": {"email": "ann@example.org", "ssm": "true", "sshCidrs": ["203.0.113.0/24", "2001:db8:100::/48"],
                  "trustedNetworks": ["198.51.100.0/24"]},
        "dmarc": {"policy": "reject", "subdomainPolicy": "quarantine", "reportAddress": "dmarc@example.org",
                  "percent": "50"},
        "dnsTtl": "300",
        "amiId": "ami-0123456789abcdef0",
        "network": {"vpcId": "vpc-0123456789abcdef0", "subnetId": "subnet-0123456789abcdef0"},
        "rateLimits": {k: "10" for k in ("connectionsPerMinute", "messagesPerMinute", "recipientsPerMinute",
                                         "authPerMinute", "recipientsPerMessage", "messageSizeMb",
                                         "messagesPerUserHour", "recipientsPerUserHour")},
        "upgrades": {"autoReboot": "false", "rebootTime": "03:15"},
        "mtaSts": {"mode": "enforce", "maxAgeDays": "30"},
        "tlsRpt": {"reportAddress": "ann@example.org"},
        "caa": {"iodef": "ann@example.org"},
        "autoconfig": "true",
        "verify": {"afterDeploy": "true", "failDeploy": "false", "skipHost": "true"},
        "backup": {"keepDaily": "7", "keepWeekly": "4", "keepMonthly": "12", "snapshotDays": "7",
                   "noncurrentDays": "30", "alarmEmail": "true"},
        "dkimRetiring": {"s2025": "2027-01-31"},
        "spamhausDqsKey": "abcdefghijklm0123456789xyz",
        "outbound": {"relay": "ses", "sesRegion": "us-east-1", "sesKeyGeneration": "3", "sesKeyRetiring": "2"},
        "defaultQuota": "5G",
        "webmail": {"hostname": "webmail.example.org", "requirePasswordChange": "false",
                    "access": {"identityProviderIds": ["0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"],
                               "emailDomains": ["example.org"], "emails": ["guest@partner.example"],
                               "sessionDuration": "12h"}},
    })
    # First, so that mailboxes[0] shows every key a mailbox takes.
    cfg["mailboxes"] = [{"address": "desk@example.org", "quota": "1G", "aliases": ["front@example.org"],
                         "sharedWith": ["ann@example.org"], "forwardCopyTo": ["desk@outside.example"]},
                        *cfg["mailboxes"]]
    return cfg


# A cluster (tier isp) takes neither mailboxes nor an existing network nor SES yet: its settings in a config of
# their own, every orgmail:cluster key given (as strings, as `pulumi config set` writes them).
def _every_cluster_setting_config() -> dict[str, Any]:
    cfg = raw_config("isp")
    cfg["cluster"] = {"zones": "3", "shards": "4", "shardInstanceType": "m6i.xlarge", "shardVolumeGb": "1000",
                      "edgeInstanceType": "m6i.large", "edgesMin": "3", "edgesMax": "9", "edgesDesired": "3",
                      "relays": "3", "directoryInstanceClass": "db.r6i.large", "directoryStorageGb": "200",
                      "cacheNodeType": "cache.r7g.large"}
    cfg["aliases"] = {"postmaster@isp.example": ["noc@isp.example"]}
    return cfg


def test_every_cluster_setting_config_is_valid() -> None:
    c = load_settings(_every_cluster_setting_config(), "isp").cluster
    assert c is not None and (c.zones, c.shards, c.edges_max, c.directory_instance_class) == (3, 4, 9, "db.r6i.large")
    assert c.cache_node_type == "cache.r7g.large"


def test_every_setting_config_is_valid() -> None:
    s = load_settings(_every_setting_config(), "dev")
    assert s.vpc_id == "vpc-0123456789abcdef0" and s.admin.ssh_cidrs == ("203.0.113.0/24", "2001:db8:100::/48")
    assert s.password_hashes and s.upgrades.reboot_time == "03:15" and s.publishing.caa_iodef == "ann@example.org"
    assert s.outbound.ses_region == "us-east-1" and s.outbound.ses_key_generations == (3, 2)


def test_every_setting_config_covers_every_setting() -> None:
    """A new setting, top level or nested, must be added to _every_setting_config (and so to the string tests)."""
    from components.settings import KNOWN_KEYS

    cfg, cluster = _every_setting_config(), _every_cluster_setting_config()
    assert set(KNOWN_KEYS) == set(cfg) | {"cluster"}, set(KNOWN_KEYS) ^ set(cfg)
    objects: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
        (k, v, cfg, "dev") for k, v in cfg.items()
        if isinstance(v, dict) and k not in ("aliases", "passwordHashes", "dkimRetiring")]
    objects += [(f"{k}.0", v[0], cfg, "dev") for k, v in cfg.items() if isinstance(v, list) and isinstance(v[0], dict)]
    objects.append(("cluster", cluster["cluster"], cluster, "isp"))
    for path, obj, base, stack in objects:
        probe = copy.deepcopy(base)
        _set(probe, f"{path}.zzUnknown", "x")
        with pytest.raises(ConfigError) as err:
            load_settings(probe, stack)
        [problem] = [p for p in err.value.problems if "zzUnknown" in p]
        valid = problem.split("valid keys are ", 1)[1].split(", ")
        assert set(valid) <= set(obj), f"{path}: {set(valid) - set(obj)} missing from _every_setting_config"


Route = tuple[str | int, ...]


def _string_places(value: Any, route: Route = ()) -> list[tuple[Route, bool]]:
    """(route, is_key) of every string in the config: values, list items and map keys."""
    found: list[tuple[Route, bool]] = []
    if isinstance(value, str):
        found.append((route, False))
    elif isinstance(value, dict):
        for k, v in value.items():
            found.append(((*route, k), True))
            found += _string_places(v, (*route, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _string_places(v, (*route, i))
    return found


def _setting_name(route: Route) -> str:
    name = ""
    for step in route:
        name += f"[{step}]" if isinstance(step, int) else (f".{step}" if name else str(step))
    return name


def _mutate(cfg: dict[str, Any], route: Route, is_key: bool, change: Any) -> None:
    parent: Any = cfg
    for step in route[:-1]:
        parent = parent[step]
    last = route[-1]
    if is_key:
        items = list(parent.items())
        parent.clear()
        parent.update({(change(k) if k == last else k): v for k, v in items})
    else:
        parent[last] = change(parent[last])


def _string_cases() -> list[tuple[str, Route, bool]]:
    """One case per distinct string setting of the example stacks and _every_setting_config."""
    configs = {stack: raw_config(stack) for stack in STACKS} | {"every": _every_setting_config(),
                                                                "every-cluster": _every_cluster_setting_config()}
    seen: set[tuple[Route, bool]] = set()
    cases: list[tuple[str, Route, bool]] = []
    for stack, cfg in configs.items():
        for route, is_key in _string_places(cfg):
            if (route, is_key) not in seen:
                seen.add((route, is_key))
                cases.append((stack, route, is_key))
    return cases


def _config(stack: str) -> dict[str, Any]:
    if stack == "every-cluster":
        return _every_cluster_setting_config()
    return _every_setting_config() if stack == "every" else raw_config(stack)


# (character, where it goes, the words the problem must contain)
BAD_CHARACTERS = [
    ("\n", "end", "a line break (\\n)"),
    ("\r", "middle", "a line break (\\r)"),
    ("\x00", "middle", "a control character (\\x00)"),
    ("\u2028", "middle", "a line break (\\u2028)"),
]
STRING_CASES = _string_cases()


@pytest.mark.parametrize(("stack", "route", "is_key"), STRING_CASES,
                         ids=[f"{s}:{_setting_name(r)}{' (key)' if k else ''}" for s, r, k in STRING_CASES])
def test_control_character_in_any_string_setting_is_named(stack: str, route: Route, is_key: bool) -> None:
    for char, where, words in BAD_CHARACTERS:
        def change(s: str, char: str = char, where: str = where) -> str:
            return s + char if where == "end" else s[:len(s) // 2] + char + s[len(s) // 2:]

        cfg = _config(stack)
        _mutate(cfg, route, is_key, change)
        named = (*route[:-1], change(str(route[-1]))) if is_key else route
        setting = "orgmail:" + _setting_name(named).replace(char, ascii(char)[1:-1])
        with pytest.raises(ConfigError) as err:
            load_settings(cfg, {"every": "dev", "every-cluster": "isp"}.get(stack, stack))
        assert all(char not in p for p in err.value.problems), f"{char!r}: a problem line holds the raw character"
        matching = [p for p in err.value.problems if p.startswith(setting + ":")]
        assert any(f"contains {words}" in p and "remove it" in p for p in matching), (char, setting, err.value.problems)
        if route[0] == "passwordHashes" and not is_key:
            assert cfg["passwordHashes"][route[1]] not in str(err.value)


def test_every_control_character_is_refused() -> None:
    """C0 and C1 controls, DEL and the Unicode line and paragraph separators; tab included."""
    bad = [*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), "\u2028", "\u2029"]
    for char in bad:
        cfg = raw_config("dev")
        cfg["organization"] = "Example" + char + "Org"
        with pytest.raises(ConfigError) as err:
            load_settings(cfg, "dev")
        assert any(p.startswith("orgmail:organization: contains ") for p in err.value.problems), repr(char)


def test_ordinary_characters_are_not_control_characters() -> None:
    cfg = raw_config("dev")
    cfg["tier"] = "ایران é\u00a0x"  # non-ASCII and no-break space: wrong tier, but no control character
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, "dev")
    assert [p.split(":")[1] for p in err.value.problems] == ["tier"], err.value.problems


def _in_domain(domain: str) -> dict[str, Any]:
    return json.loads(json.dumps(raw_config("dev")).replace("example.org", domain))


@pytest.mark.parametrize("domain", ["example.xn--mgba3a4f16a", "xn--mgba3a4f16a.xn--mgba3a4f16a",
                                    "xn--mller-kva.example.org", "xn--fa-hia.de", "xn--nxasmm1c.xn--qxam",
                                    "example.xn--p1ai"])
def test_internationalised_domains_accepted(domain: str) -> None:
    s = load_settings(_in_domain(domain), "dev")
    assert s.domains[0].name == domain
    assert s.mail_host == f"mail.{domain}"
    assert s.mailboxes[0].address == f"ann@{domain}"
    assert s.aliases == {f"team@{domain}": (f"ann@{domain}", f"bob@{domain}"), f"dmarc@{domain}": (f"ann@{domain}",),
                         f"partner@{domain}": ("chair@partner.example",)}


def test_internationalised_tld_in_every_kind_of_name() -> None:
    cfg = raw_config("dev")
    cfg["domains"].append({"name": "example.xn--mgba3a4f16a", "zoneId": "0123456789abcdef0123456789abcdee"})
    cfg["mailboxes"].append({"address": "ann@example.xn--mgba3a4f16a"})
    cfg["mailHost"] = "mail.example.xn--mgba3a4f16a"
    cfg["caa"] = {"iodef": "ann@example.xn--mgba3a4f16a"}
    s = load_settings(cfg, "dev")
    assert s.mail_host == "mail.example.xn--mgba3a4f16a" and s.primary_domain.name == "example.xn--mgba3a4f16a"
    assert "ann@example.xn--mgba3a4f16a" in s.recipients


def test_validation_matches_whole_strings() -> None:
    """re.match with ^...$ accepts a final newline; validation must use fullmatch."""
    import ast
    from pathlib import Path

    import components.settings

    tree = ast.parse(Path(components.settings.__file__).read_text())
    calls = [n.lineno for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "match"]
    assert calls == [], f"components/settings.py lines {calls}: use fullmatch"


def test_spamhaus_dqs_key_optional_validated_and_never_echoed() -> None:
    cfg = raw_config("dev")
    assert load_settings(cfg, "dev").spamhaus_dqs_key is None  # the public zones, through the host's resolver
    cfg["spamhausDqsKey"] = "abcdefghijklm0123456789xyz"
    assert load_settings(cfg, "dev").spamhaus_dqs_key == "abcdefghijklm0123456789xyz"
    for bad in ("abcdefghijklm0123456789xy", "ABCDEFGHIJKLM0123456789XYZ", "abcdefghijklm0123456789xyz\n",
                "abcdefghijklm012345678.xyz", 12):
        cfg["spamhausDqsKey"] = bad
        with pytest.raises(ConfigError) as err:
            load_settings(cfg, "dev")
        assert "orgmail:spamhausDqsKey" in str(err.value) and "26 lower-case letters and digits" in str(err.value)
        assert str(bad).strip() not in str(err.value)  # a secret is never echoed
