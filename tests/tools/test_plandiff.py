"""The offline plan diff on real pairs of stack configs: each day-2 change touches only what it should."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tools.plandiff import _snapshot_of_text, compare, format_diff

ROOT = Path(__file__).resolve().parents[2]
SALT = b"test-salt"
DEV = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())


def stack_text(change: Any = None) -> str:
    doc = copy.deepcopy(DEV)
    if change:
        change(doc["config"])
    return yaml.safe_dump(doc, sort_keys=False)


@functools.cache
def base() -> dict[str, Any]:
    return _snapshot_of_text(stack_text(), "Pulumi.dev.yaml", SALT)


def diff_with(change: Any) -> dict[str, Any]:
    return compare(base(), _snapshot_of_text(stack_text(change), "Pulumi.dev.yaml", SALT))


def changed(diff: dict[str, Any]) -> dict[str, list[str]]:
    return {c["name"]: [ch["key"] for ch in c["changes"]] for c in diff["resources"]["changed"]}


def test_same_config_twice_is_an_empty_diff() -> None:
    """Generated keys, passwords and Elastic IPs differ between mock runs; the diff must not show it."""
    diff = compare(base(), _snapshot_of_text(stack_text(), "Pulumi.dev.yaml", SALT))
    assert diff["resources"]["added"] == diff["resources"]["removed"] == diff["resources"]["changed"] == []
    assert diff["dns"] == {"added": [], "removed": [], "changed": []}
    assert diff["userData"] == {}


def test_multi_host_stack_is_stable_across_runs() -> None:
    text = (ROOT / "Pulumi.isp-single.yaml").read_text()
    a = _snapshot_of_text(text, "Pulumi.isp-single.yaml", SALT)
    b = _snapshot_of_text(text, "Pulumi.isp-single.yaml", SALT)
    diff = compare(a, b)
    assert diff["resources"]["changed"] == [] and diff["dns"]["changed"] == [], diff


def test_tier_change_resizes_instance_and_volume_only() -> None:
    diff = diff_with(lambda c: c.update({"orgmail:tier": "medium"}))
    assert diff["resources"]["added"] == [] and diff["resources"]["removed"] == []
    assert changed(diff) == {
        "mail-instance": ["creditSpecification.cpuCredits", "instanceType", "rootBlockDevice.volumeSize"],
        "mail-data": ["size"],
    }
    instance = next(c for c in diff["resources"]["changed"] if c["name"] == "mail-instance")
    kinds = {ch["key"]: (ch["old"], ch["new"]) for ch in instance["changes"]}
    assert kinds["instanceType"] == ("t3.medium", "m6i.xlarge")
    assert kinds["rootBlockDevice.volumeSize"] == (20, 30)
    assert diff["dns"]["changed"] == [] and diff["dns"]["added"] == []


def test_new_mailbox_changes_only_ssm_parameters_never_the_host() -> None:
    diff = diff_with(lambda c: c["orgmail:mailboxes"].append({"address": "carol@example.org", "quota": "1G"}))
    assert [(r["type"], r["name"]) for r in diff["resources"]["added"]] == [
        ("random:index/randomPassword:RandomPassword", "secrets-password-carol-at-example-org")]
    assert diff["resources"]["removed"] == []
    assert changed(diff) == {"secrets-config-000": ["value"], "secrets-passwords-000": ["value"]}
    for c in diff["resources"]["changed"]:
        assert c["type"] == "aws:ssm/parameter:Parameter"
        assert c["changes"][0]["secret"] and c["changes"][0]["old"] == c["changes"][0]["new"] == "[secret]"
    assert diff["userData"] == {}, "a day-2 change must not touch the host's user-data"
    assert diff["dns"] == {"added": [], "removed": [], "changed": []}


def test_new_domain_adds_its_dns_records() -> None:
    diff = diff_with(lambda c: c["orgmail:domains"].append(
        {"name": "example.net", "zoneId": "fedcba9876543210fedcba9876543210"}))
    added = {(d["type"], d["name"]) for d in diff["dns"]["added"]}
    assert {("MX", "example.net"), ("TXT", "example.net"), ("TXT", "_dmarc.example.net"),
            ("TXT", "s2026._domainkey.example.net")} <= added
    mx = next(d for d in diff["dns"]["added"] if d["type"] == "MX")
    assert (mx["content"], mx["priority"]) == ("mail.example.org", 10)
    dkim = next(d for d in diff["dns"]["added"] if d["name"] == "s2026._domainkey.example.net")
    assert "<public key of secrets-dkim-s2026>" in dkim["content"]
    assert all(d["name"].endswith("example.net") or "example.net" in d["name"] for d in diff["dns"]["added"])
    assert diff["dns"]["removed"] == [] and diff["dns"]["changed"] == []
    assert "mail-instance" not in changed(diff) and diff["userData"] == {}


def test_dmarc_policy_change_only_changes_the_dmarc_record() -> None:
    diff = diff_with(lambda c: c["orgmail:dmarc"].update({"policy": "reject"}))
    assert diff["resources"] == {"added": [], "removed": [], "changed": [], "unchanged": diff["resources"]["unchanged"]}
    assert diff["userData"] == {}
    assert diff["dns"]["added"] == [] and diff["dns"]["removed"] == []
    [change] = diff["dns"]["changed"]
    assert change["record"]["name"] == "_dmarc.example.org"
    assert [(f["key"], f["old"], f["new"]) for f in change["changes"]] == [
        ("content", '"v=DMARC1; p=quarantine; rua=mailto:dmarc@example.org"',
         '"v=DMARC1; p=reject; rua=mailto:dmarc@example.org"')]


def test_dkim_selector_rotation_shows_the_new_key() -> None:
    diff = diff_with(lambda c: c.update({"orgmail:dkimSelector": "s2027"}))
    assert ("tls:index/privateKey:PrivateKey", "secrets-dkim-s2027") in {
        (r["type"], r["name"]) for r in diff["resources"]["added"]}
    added = {d["name"]: d["content"] for d in diff["dns"]["added"]}
    assert "<public key of secrets-dkim-s2027>" in added["s2027._domainkey.example.org"]


def test_user_data_change_is_a_unified_diff() -> None:
    diff = diff_with(lambda c: c.update({"orgmail:mailHost": "mail.mx.example.org"}))
    entry = diff["userData"]["mail-instance"]
    assert entry["status"] == "changed" and entry["linesAdded"] >= 1 and entry["linesRemoved"] >= 1
    assert "--- old/mail-instance" in entry["diff"] and "+++ new/mail-instance" in entry["diff"]
    assert any(line.startswith("+") and "mail.mx.example.org" in line for line in entry["diff"].splitlines())
    assert "userDataBase64" in changed(diff)["mail-instance"]
    text = format_diff(diff, "a", "b")
    assert "mail-instance: changed" in text and "mail.mx.example.org" in text


def test_a_replacing_change_says_which_host_goes_down_and_why() -> None:
    """Issue 17 item 7: the reviewer reads first that a host is replaced, and which setting did it."""
    diff = diff_with(lambda c: c.update({"orgmail:mailHost": "mail.mx.example.org"}))
    assert diff["hosts"]["replaced"] == [{"host": "mail.mx.example.org", "resource": "mail-instance",
                                          "inputs": ["userDataBase64"]}]
    assert diff["hosts"]["settingsChanged"] == ["orgmail:mailHost"]
    text = format_diff(diff, "a", "b").splitlines()
    assert text[2:5] == [
        "Hosts: 1 replaced",
        "  ! this replaces host mail.mx.example.org (minutes without service): its user-data changes",
        "    because these settings changed: orgmail:mailHost"]
    assert text[5].startswith("  Settings that replace hosts (they make user-data or the image): ")
    assert "orgmail:mailHost" in text[5] and "orgmail:amiId" in text[5] and "orgmail:admin" not in text[5]


def test_a_day2_change_replaces_no_host() -> None:
    """An SSH network, the admin's address, Session Manager, the reboot hour: SSM only, no host goes down."""
    for change in ({"orgmail:upgrades": {"rebootTime": "02:00", "autoReboot": False}},
                   {"orgmail:admin": {**DEV["config"]["orgmail:admin"], "sshCidrs": ["198.51.100.0/24"],
                                      "email": "new-admin@example.net", "ssm": False}}):
        diff = diff_with(lambda c, change=change: c.update(change))
        assert diff["hosts"]["replaced"] == diff["hosts"]["restarted"] == [] and diff["userData"] == {}
        assert INSTANCE_NAMES.isdisjoint(changed(diff))
        assert format_diff(diff, "a", "b").splitlines()[2] == \
            "Hosts: none replaced or restarted (day-2 changes only: orgmail-sync applies them)"


INSTANCE_NAMES = {"mail-instance"}


def test_every_host_of_a_stack_replaced_in_turn_is_named() -> None:
    text = (ROOT / "Pulumi.isp-single.yaml").read_text()
    old = _snapshot_of_text(text, "Pulumi.isp-single.yaml", SALT)
    doc = yaml.safe_load(text)
    doc["config"]["orgmail:amiId"] = "ami-0123456789abcdef0"
    diff = compare(old, _snapshot_of_text(yaml.safe_dump(doc), "Pulumi.isp-single.yaml", SALT))
    hosts = [r["host"] for r in diff["hosts"]["replaced"]]
    assert len(hosts) == 3 and all(r["inputs"] == ["ami"] for r in diff["hosts"]["replaced"])
    assert diff["hosts"]["settingsChanged"] == ["orgmail:amiId"]
    out = format_diff(diff, "a", "b")
    assert "Hosts: 3 replaced one after another, mailbox host first" in out
    assert all(f"  ! this replaces host {h} (minutes without service): its image changes" in out for h in hosts)


def test_a_tier_change_says_the_host_stops_and_starts() -> None:
    diff = diff_with(lambda c: c.update({"orgmail:tier": "medium"}))
    assert diff["hosts"]["replaced"] == [] and [r["host"] for r in diff["hosts"]["restarted"]] == ["mail.example.org"]
    assert ("  ! this stops and starts host mail.example.org (minutes without service): its instance type changes"
            in format_diff(diff, "a", "b"))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.plandiff", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_json_masks_secrets(tmp_path: Path) -> None:
    new = tmp_path / "Pulumi.dev.yaml"
    new.write_text(stack_text(lambda c: c["orgmail:mailboxes"].append({"address": "carol@example.org"})))
    result = run_cli("Pulumi.dev.yaml", str(new), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"old", "new", "resources", "dns", "userData"} <= set(doc)
    assert {c["name"] for c in doc["resources"]["changed"]} == {"secrets-config-000", "secrets-passwords-000"}
    for forbidden in ("BLF-CRYPT", "$2a$", "PRIVATE KEY", "placeholder-cloudflare-token"):
        assert forbidden not in result.stdout, forbidden
    # Who receives what is shown (issue 17, item 14); only in the mail section, never as a parameter value.
    assert doc["mail"]["mailboxesAdded"] == [{"address": "carol@example.org", "quota": "2G"}]  # the default
    assert "carol@example.org" not in json.dumps(doc["resources"])
    text = run_cli("Pulumi.dev.yaml", str(new))
    assert text.returncode == 0 and '"[secret]" -> "[secret]" (changed)' in text.stdout


def test_git_revision_and_old_tree_forms() -> None:
    committed = subprocess.run(["git", "show", "HEAD:Pulumi.small.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert committed.returncode == 0
    rev = run_cli("HEAD:Pulumi.small.yaml", "Pulumi.small.yaml", "--json")
    assert rev.returncode == 0, rev.stderr
    doc = json.loads(rev.stdout)
    if committed.stdout == (ROOT / "Pulumi.small.yaml").read_text():
        assert doc["resources"]["changed"] == [] and doc["dns"]["changed"] == []
    tree = run_cli("--old-tree", str(ROOT), "Pulumi.small.yaml", "Pulumi.small.yaml", "--json")
    assert tree.returncode == 0, tree.stderr
    doc = json.loads(tree.stdout)
    assert doc["resources"]["added"] == doc["resources"]["changed"] == [] and doc["userData"] == {}
    assert doc["resources"]["unchanged"] > 20


def test_stack_missing_on_the_old_side_is_all_new(tmp_path: Path) -> None:
    result = run_cli("HEAD:Pulumi.nosuch.yaml", "Pulumi.small.yaml", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["resources"]["unchanged"] == 0 and len(doc["resources"]["added"]) > 20
    assert doc["userData"]["mail-instance"]["status"] == "added"
