"""Quotas by default and the warnings before a mailbox is full (issue 18): every mailbox has a quota
unless one is configured as `unlimited`, the tier's default fits the tier's mail volume, and Dovecot
tells the user at 80 % and 95 % (the booted proof: tests/e2e/test_mailhost.py)."""

from __future__ import annotations

import email
import importlib.machinery
import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from components.secrets import host_config
from components.settings import ConfigError, load_settings, quota_gib
from components.shard import SHARD_FILES, render_shard_files
from components.tiers import TIERS
from components.userdata import HOST_FILES
from tests.unit.conftest import ROOT, host_script, raw_config
from tests.unit.test_cluster_hosts import SHARD, files
from tests.unit.test_userdata import MAILBOX, files_of

STACK_OF_TIER = {"small": "small", "medium": "medium", "large": "large", "isp": "isp-single"}
SCRIPT = ROOT / "cloud-init/files/dovecot/quota-warning"


def quota_warning() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("quota_warning", str(SCRIPT))
    spec = importlib.util.spec_from_loader("quota_warning", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def quotas(raw: dict[str, Any], stack: str) -> dict[str, str | None]:
    return {m["address"]: m["quota"] for m in host_config(load_settings(raw, stack))["mailboxes"]}


@pytest.mark.parametrize("tier", list(TIERS))
def test_a_mailbox_without_a_quota_gets_the_tiers_default(tier: str) -> None:
    stack = STACK_OF_TIER[tier]
    raw = raw_config(stack)
    domain = raw["domains"][0]["name"]
    raw["mailboxes"] = [*raw["mailboxes"], {"address": f"new@{domain}"}]
    assert quotas(raw, stack)[f"new@{domain}"] == TIERS[tier].default_quota


def test_default_quota_setting_and_unlimited_said_outright() -> None:
    raw = raw_config("dev")
    raw["mailboxes"] = [{"address": "ann@example.org", "quota": "3G"}, {"address": "bob@example.org"},
                        {"address": "cat@example.org", "quota": "unlimited"}]
    assert quotas(raw, "dev") == {"ann@example.org": "3G", "bob@example.org": "2G", "cat@example.org": None}
    raw["defaultQuota"] = "500M"
    assert quotas(raw, "dev")["bob@example.org"] == "500M"
    raw["defaultQuota"] = "unlimited"
    assert quotas(raw, "dev") == {"ann@example.org": "3G", "bob@example.org": None, "cat@example.org": None}


def test_the_dev_stack_shows_an_unlimited_mailbox() -> None:
    """The booted tests rely on one mailbox without a quota (bob's): it is configured, not defaulted."""
    assert quotas(raw_config("dev"), "dev") == {"ann@example.org": "2G", "bob@example.org": None}


@pytest.mark.parametrize("tier", [t for t in TIERS.values() if t.users_max is not None], ids=lambda t: t.name)
def test_the_default_quota_of_the_tiers_largest_organisation_fits_its_mail_volume(tier: Any) -> None:
    assert tier.users_max * quota_gib(tier.default_quota) <= tier.mail_volume_gb


def test_the_directorys_default_quota_is_the_isp_tiers() -> None:
    """orgmail-users add gives a cluster's new user the ISP tier's default quota."""
    assert TIERS["isp"].default_quota == host_script("users.py").DEFAULT_QUOTA


def test_a_cluster_refuses_default_quota() -> None:
    raw = raw_config("isp")
    raw["defaultQuota"] = "2G"
    with pytest.raises(ConfigError) as err:
        load_settings(raw, "isp")
    assert "orgmail:defaultQuota: a cluster's quotas live in the directory" in str(err.value)
    assert "`orgmail-users add --quota SIZE` (default 1G)" in str(err.value)


def warnings_block(conf: str) -> str:
    block = re.search(r'^quota "User quota" \{\n(.*?)\n\}$', conf, re.M | re.S)
    assert block, conf
    return block[1]


@pytest.mark.parametrize("role", ["mailbox", "shard"])
def test_dovecot_warns_at_95_then_80_percent_through_the_script(role: str) -> None:
    conf = (files_of(MAILBOX) if role == "mailbox" else files(render_shard_files(SHARD)))["/etc/dovecot/dovecot.conf"]
    block = warnings_block(conf)
    # Only the first warning that matches runs: the highest must come first.
    assert re.findall(r"warning warn-(\d+) \{\n    quota_storage_percentage = (\d+)\n    execute quota-warning \{\n"
                      r"      args = (\d+) %\{user\}\n", block) == [("95", "95", "95"), ("80", "80", "80")]
    service = re.search(r"^service quota-warning \{\n(.*?)\n\}$", conf, re.M | re.S)
    assert service, conf
    assert service[1].splitlines()[:2] == ["  executable = script /usr/local/lib/orgmail/quota-warning",
                                           "  user = vmail"]
    assert "unix_listener quota-warning {\n    user = vmail\n    mode = 0600\n  }" in service[1]
    shipped = {h.path for h in HOST_FILES if h.template == "dovecot/quota-warning"} | \
              {path for template, path, _ in SHARD_FILES if template == "dovecot/quota-warning"}
    assert shipped == {"/usr/local/lib/orgmail/quota-warning"}


def test_the_warning_message() -> None:
    qw = quota_warning()
    msg = email.message_from_bytes(qw.warning("80", "ann@example.org", "it@example.net").as_bytes())
    assert msg["From"] == "Mail system <postmaster@example.org>" and msg["To"] == "ann@example.org"
    assert msg["Subject"] == "Your mailbox is 80% full" and msg["Auto-Submitted"] == "auto-generated"
    assert msg["Message-ID"].endswith("@example.org>") and msg["Date"]
    body = msg.get_payload()
    assert "ann@example.org has reached 80% of its quota" in body and "(it@example.net)" in body
    assert "refused" in body and "Trash and Junk" in body


@pytest.mark.parametrize("argv", [[], ["80"], ["50", "ann@example.org"], ["80", "Ann@example.org"],
                                  ["80", "ann@example.org\n"], ["80", "ann@example.org", "x"]])
def test_the_script_refuses_what_dovecot_never_sends(argv: list[str], capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    qw = quota_warning()
    monkeypatch.setattr(qw.subprocess, "run", lambda *a, **k: pytest.fail("dovecot-lda run on bad arguments"))
    assert qw.main(["quota-warning", *argv]) == 64
    assert "usage: quota-warning {80|95} USER@DOMAIN" in capsys.readouterr().err


def test_the_script_delivers_with_dovecot_lda_without_enforcing_the_quota(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qw = quota_warning()
    env = tmp_path / "admin.env"
    env.write_text("ADMIN_EMAIL=it@example.net\n")
    monkeypatch.setattr(qw, "ADMIN_ENV", str(env))
    calls: list[tuple[list[str], bytes]] = []

    def run(cmd: list[str], input: bytes, **_: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append((cmd, input))
        return subprocess.CompletedProcess(cmd, 0 if len(calls) == 1 else 75, b"", b"lda: temporary failure")

    monkeypatch.setattr(qw.subprocess, "run", run)
    assert qw.main(["quota-warning", "95", "ann@example.org"]) == 0
    cmd, sent = calls[0]
    assert cmd == ["/usr/lib/dovecot/dovecot-lda", "-d", "ann@example.org", "-f", "postmaster@example.org",
                   "-o", "quota_enforce=no"]
    assert b"Subject: Your mailbox is 95% full" in sent and b"(it@example.net)" in sent
    # A failed delivery is reported (Dovecot logs the script's standard error), not swallowed.
    assert qw.main(["quota-warning", "80", "ann@example.org"]) == 75
    assert "dovecot-lda for ann@example.org exited 75: lda: temporary failure" in capsys.readouterr().err
    env.write_text("ADMIN_EMAIL=not an address\n")
    assert qw.admin_email() is None


def test_the_readme_states_each_tiers_default_quota() -> None:
    readme = (ROOT / "README.md").read_text()
    header = "| tier | users | instance (vCPU / GiB) | sustained | mail volume | default quota | hosts, MX priorities |"
    assert header in readme
    table = readme.split(header, 1)[1].split("\n\n", 1)[0]
    stated = {cells[1].strip(): cells[6].strip() for line in table.splitlines()[2:]
              if len(cells := line.split("|")) > 7}
    assert stated == {name: tier.default_quota for name, tier in TIERS.items()}
    row = next(line for line in readme.splitlines() if line.startswith("| `defaultQuota` |"))
    assert "`2G` (small, medium, large), `1G` (isp)" in row
    assert {t.default_quota for t in TIERS.values() if t.name != "isp"} == {"2G"} and TIERS["isp"].default_quota == "1G"
