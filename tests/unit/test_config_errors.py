"""Configuration mistakes a new admin makes, each answered by one clear line (issue 17, item 13):
dotted names written flat, typos (with the nearest valid name and no follow-on errors), a stack file
that is missing or not YAML, encrypted values the offline tools cannot read, and a tier too small
for the mailboxes and quotas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import components.settings as settings_module
from components.settings import ConfigError, load_settings
from tests.unit.conftest import ROOT, raw_config


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_settings(raw, "dev")
    return e.value.problems


@pytest.mark.parametrize(("flat", "value", "parent", "child"), [
    ("dmarc.policy", "reject", "dmarc", "policy"),
    ("admin.email", "ann@example.org", "admin", "email"),
    ("rateLimits.messageSizeMb", 50, "rateLimits", "messageSizeMb"),
])
def test_dotted_name_gets_the_nested_form(flat: str, value: Any, parent: str, child: str) -> None:
    raw = raw_config()
    raw.setdefault(parent, {}).pop(child, None)
    raw[flat] = value
    found = problems(raw)
    # One problem: the flat name, with the nested form to write; admin.email's "required" is not repeated.
    assert len(found) == 1, found
    assert found[0].startswith(f"orgmail:{flat}: ")
    assert "write it nested" in found[0] and f"orgmail:{parent}:" in found[0] and f"{child}: " in found[0]


@pytest.mark.parametrize(("typo", "meant"), [("mailboxs", "mailboxes"), ("mailhost", "mailHost"),
                                             ("aliasses", "aliases"), ("passwordHash", "passwordHashes")])
def test_top_level_typo_suggests_the_nearest_name_without_follow_on_errors(typo: str, meant: str) -> None:
    raw = raw_config()
    raw[typo] = raw.pop(meant) if meant in raw else {}
    found = problems(raw)
    assert found == [f"orgmail:{typo}: unknown setting; did you mean {meant}? (the rest was checked as if it were)"]


def test_typo_in_an_object_or_list_item_suggests_too() -> None:
    raw = raw_config()
    raw["dmarc"]["polcy"] = raw["dmarc"].pop("policy")
    raw["mailboxes"][1]["adress"] = raw["mailboxes"][1].pop("address")
    raw["domains"][0]["zoneID"] = raw["domains"][0].pop("zoneId")
    found = problems(raw)
    assert found == [
        "orgmail:domains[0].zoneID: unknown setting; did you mean zoneId? (the rest was checked as if it were)",
        "orgmail:mailboxes[1].adress: unknown setting; did you mean address? (the rest was checked as if it were)",
        "orgmail:dmarc.polcy: unknown setting; did you mean policy? (the rest was checked as if it were)",
    ], found


def test_problems_inside_a_misspelled_setting_are_still_reported() -> None:
    raw = raw_config()
    raw["mailboxs"] = raw.pop("mailboxes")
    raw["mailboxs"][0]["quota"] = "lots"
    found = problems(raw)
    assert len(found) == 2 and "did you mean mailboxes?" in found[0], found
    assert found[1].startswith("orgmail:mailboxes[0].quota: must be a size")


def test_unknown_name_far_from_every_setting_lists_the_valid_ones() -> None:
    raw = raw_config()
    raw["colour"] = "blue"
    [found] = problems(raw)
    assert "unknown setting; valid settings are organization, tier" in found and "did you mean" not in found


# --- The stack file itself ----------------------------------------------------------------------

TOOLS = (["tools.plan"], ["tools.cost"], ["tools.zonefile"], ["tools.verify"], ["tools.deploy_checks"],
         ["tools.plandiff", "Pulumi.dev.yaml"])


def _run(args: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    module, *before = args
    return subprocess.run([sys.executable, "-m", module, *before, str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def _broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    bad_yaml = tmp_path / "yaml" / "Pulumi.dev.yaml"
    bad_yaml.parent.mkdir()
    bad_yaml.write_text("config:\n  orgmail:tier: small\n   orgmail:region: eu-central-1\n")
    not_map = tmp_path / "list" / "Pulumi.dev.yaml"
    not_map.parent.mkdir()
    not_map.write_text("- orgmail:tier: small\n")
    return {"missing": (tmp_path / "Pulumi.absent.yaml", "no such file"),
            "yaml": (bad_yaml, "not valid YAML at line 3, column"),
            "not a mapping": (not_map, "must be a YAML mapping with a config: section")}


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t[0])
def test_a_broken_stack_file_is_one_clear_line(tool: list[str], tmp_path: Path) -> None:
    for case, (path, words) in _broken_files(tmp_path).items():
        result = _run(tool, path)
        assert result.returncode == 2, (case, result.stderr)
        assert "Traceback" not in result.stderr, (case, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and words in lines[0], (case, lines)


def test_invalid_config_in_deploy_checks_is_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "Pulumi.dev.yaml"
    bad.write_text((ROOT / "Pulumi.dev.yaml").read_text().replace("tier: small", "tier: enormous"))
    result = _run(["tools.deploy_checks"], bad)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "orgmail:tier: must be one of" in result.stderr


# --- Encrypted values ----------------------------------------------------------------------------

def test_plan_says_which_encrypted_values_it_cannot_read(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())
    doc["config"]["orgmail:passwordHashes"] = {"ann@example.org": {"secure": "v1:AAAABBBB"}}
    doc["config"]["orgmail:spamhausDqsKey"] = {"secure": "v1:CCCCDDDD"}
    doc["config"]["aws:profile"] = {"secure": "v1:EEEEFFFF"}  # (cloudflare:apiToken is refused: test_provider_credentials)
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(doc))
    table = _run(["tools.plan"], path)
    assert table.returncode == 0, table.stderr
    assert "orgmail:passwordHashes.ann@example.org: encrypted (secure:)" in table.stdout
    assert "planned without it: ann@example.org gets a generated initial password" in table.stdout
    assert "orgmail:spamhausDqsKey: encrypted (secure:)" in table.stdout
    assert "aws:profile" not in table.stdout  # not read by the program's settings
    as_json = subprocess.run([sys.executable, "-m", "tools.plan", str(path), "--json", "--out", str(tmp_path / "o")],
                             cwd=ROOT, capture_output=True, text=True, timeout=180)
    notes = json.loads(as_json.stdout)["notes"]
    assert any(n.startswith("orgmail:passwordHashes.ann@example.org: encrypted") for n in notes), notes


# --- The tier against the mailboxes ----------------------------------------------------------------

def test_example_stacks_have_no_warnings() -> None:
    for stack in ("dev", "small", "medium", "large", "isp-single"):
        assert settings_module.settings_warnings(load_settings(raw_config(stack), stack)) == [], stack


def test_more_mailboxes_than_the_tier_serves_is_a_warning() -> None:
    raw = raw_config()
    raw["mailboxes"] += [{"address": f"user{i}@example.org"} for i in range(19)]  # 21 in all
    [warning] = settings_module.settings_warnings(load_settings(raw, "dev"))
    assert warning == ("orgmail:mailboxes: 21 mailboxes, more than tier small serves (1-20 users); "
                       "set orgmail:tier to medium")


def test_quotas_beyond_the_mail_volume_are_a_warning() -> None:
    raw = raw_config()
    raw["mailboxes"][1]["quota"] = "49G"  # with ann's 2G: 51 GiB on the small tier's 50 GB volume
    [warning] = settings_module.settings_warnings(load_settings(raw, "dev"))
    assert warning.startswith("orgmail:mailboxes: the quotas add up to 51 GB, more than tier small's 50 GB "
                              "mail volume"), warning
    raw["mailboxes"][1]["quota"] = "48G"
    assert settings_module.settings_warnings(load_settings(raw, "dev")) == []


def test_plan_prints_the_warnings(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())
    doc["config"]["orgmail:mailboxes"][1]["quota"] = "1T"
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = _run(["tools.plan"], path)
    assert result.returncode == 0, result.stderr
    assert "Warnings:" in result.stdout and "the quotas add up to 1026 GB" in result.stdout


def test_pulumi_preview_logs_the_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """The program itself (what `pulumi preview` runs) reports the same warnings through the engine."""
    import pulumi
    from pulumi.runtime.stack import run_pulumi_func
    from pulumi.runtime.sync_await import _sync_await

    from components import program
    from tests.unit.conftest import stack_config
    from tools.mockengine import RecordingMocks, RecordingMonitor, pulumi_config_values

    config = stack_config("dev")
    config["orgmail:mailboxes"] = [*config["orgmail:mailboxes"], *({"address": f"u{i}@example.org"} for i in range(19))]
    mocks = RecordingMocks("eu-central-1")
    pulumi.runtime.set_mocks(mocks, project="orgmail", stack="dev", preview=False, monitor=RecordingMonitor(mocks))
    pulumi.runtime.set_all_config(pulumi_config_values(config))

    async def run() -> None:
        program.main()

    with caplog.at_level("WARNING"):
        _sync_await(run_pulumi_func(run))
    assert "orgmail:mailboxes: 21 mailboxes, more than tier small serves (1-20 users)" in caplog.text
