"""plandiff for a reviewer of mailbox, alias and forward changes (issue 17, item 14): who receives what,
in plain words, while password hashes stay masked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.tools.test_plandiff import ROOT, SALT, base, diff_with, stack_text
from tools.plandiff import _snapshot_of_text, compare, format_diff


def mail(diff: dict[str, Any]) -> dict[str, Any]:
    return diff["mail"]


def test_unchanged_config_has_no_mail_changes() -> None:
    diff = compare(base(), _snapshot_of_text(stack_text(), "Pulumi.dev.yaml", SALT))
    assert mail(diff) == {"mailboxesAdded": [], "mailboxesRemoved": [], "quotasChanged": [],
                          "aliasesAdded": [], "aliasesRemoved": [], "aliasesChanged": [], "outsideForwardsAdded": []}
    assert "Mail routing: unchanged" in format_diff(diff, "old", "new")


def test_added_mailbox_and_its_quota_are_named() -> None:
    diff = diff_with(lambda c: c["orgmail:mailboxes"].append({"address": "carol@example.org", "quota": "1G"}))
    assert mail(diff)["mailboxesAdded"] == [{"address": "carol@example.org", "quota": "1G"}]
    text = format_diff(diff, "old", "new")
    assert "  + mailbox carol@example.org (quota 1G)" in text


def test_removed_mailbox_and_quota_change_are_named() -> None:
    def change(c: dict[str, Any]) -> None:
        c["orgmail:mailboxes"] = [m for m in c["orgmail:mailboxes"] if m["address"] != "bob@example.org"]
        c["orgmail:aliases"]["team@example.org"] = ["ann@example.org"]
        c["orgmail:mailboxes"][0]["quota"] = "5G"

    diff = diff_with(change)
    assert mail(diff)["mailboxesRemoved"] == [{"address": "bob@example.org", "quota": None}]
    assert mail(diff)["quotasChanged"] == [{"address": "ann@example.org", "old": "2G", "new": "5G"}]
    assert mail(diff)["aliasesChanged"] == [{"alias": "team@example.org", "added": [], "removed": ["bob@example.org"]}]
    text = format_diff(diff, "old", "new")
    assert "  - mailbox bob@example.org (no longer receives or logs in; its stored mail stays on the volume)" in text
    assert "  ~ mailbox ann@example.org: quota 2G -> 5G" in text
    assert "  ~ alias team@example.org: - bob@example.org" in text


def test_new_forward_to_an_outside_address_stands_out() -> None:
    def change(c: dict[str, Any]) -> None:
        c["orgmail:aliases"]["team@example.org"].append("someone@gmail.example")
        c["orgmail:aliases"]["sales@example.org"] = ["ann@example.org", "rep@partner.example"]

    diff = diff_with(change)
    assert mail(diff)["outsideForwardsAdded"] == [
        {"alias": "sales@example.org", "target": "rep@partner.example"},
        {"alias": "team@example.org", "target": "someone@gmail.example"}]
    assert mail(diff)["aliasesAdded"] == [{"alias": "sales@example.org",
                                           "targets": ["ann@example.org", "rep@partner.example"]}]
    text = format_diff(diff, "old", "new")
    assert "  + alias sales@example.org -> ann@example.org, rep@partner.example (outside)" in text
    assert "  ~ alias team@example.org: + someone@gmail.example (outside)" in text
    assert "  ! mail to sales@example.org now also leaves for rep@partner.example, outside your domains" in text
    assert "  ! mail to team@example.org now also leaves for someone@gmail.example, outside your domains" in text


def test_mailbox_aliases_show_as_aliases_of_that_mailbox() -> None:
    diff = diff_with(lambda c: c["orgmail:mailboxes"][1].update({"aliases": ["robert@example.org"]}))
    assert mail(diff)["aliasesAdded"] == [{"alias": "robert@example.org", "targets": ["bob@example.org"]}]


def test_cli_shows_recipients_but_never_a_password_hash(tmp_path: Path) -> None:
    doc = yaml.safe_load(stack_text())
    doc["config"]["orgmail:mailboxes"].append({"address": "carol@example.org", "quota": "1G"})
    doc["config"]["orgmail:aliases"]["partner@example.org"] = ["chair@partner.example", "vice@partner.example"]
    doc["config"]["orgmail:passwordHashes"] = {
        "ann@example.org": "{BLF-CRYPT}$2y$10$" + "a" * 53,
        "bob@example.org": {"secure": "v1:c2VjcmV0Y2lwaGVydGV4dA=="}}
    new = tmp_path / "Pulumi.dev.yaml"
    new.write_text(yaml.safe_dump(doc))
    for args in ([], ["--json"]):
        result = subprocess.run([sys.executable, "-m", "tools.plandiff", "Pulumi.dev.yaml", str(new), *args],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "carol@example.org" in result.stdout and "vice@partner.example" in result.stdout
        assert "$2y$10$" not in result.stdout and "c2VjcmV0Y2lwaGVydGV4dA" not in result.stdout
    out = json.loads(result.stdout)
    assert out["encrypted"] == [{"setting": "orgmail:passwordHashes.bob@example.org", "change": "added"}]
    text = subprocess.run([sys.executable, "-m", "tools.plandiff", "Pulumi.dev.yaml", str(new)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300).stdout
    assert ("orgmail:passwordHashes.bob@example.org: encrypted value added (not decrypted offline; the plans "
            "above are made without it)") in text


OLD_STACKFILE = '''"""stackfile.py as it was before issue 17 (no StackFileError, no read_stack_document)."""
from pathlib import Path
from typing import Any

import yaml


def stack_name(stack_file: Path) -> str:
    return stack_file.name[len("Pulumi."):-len(".yaml")]


def load_stack_config(stack_file: Path) -> dict[str, Any]:
    doc = yaml.safe_load(stack_file.read_text()) or {}
    return {k: v for k, v in (doc.get("config") or {}).items() if not (isinstance(v, dict) and set(v) == {"secure"})}
'''


def test_old_tree_of_an_older_program_still_plans(tmp_path: Path) -> None:
    """The pull-request workflow plans the base branch with --old-tree: this plandiff then runs on the base's
    modules, which may predate every helper it uses now."""
    import shutil

    old = tmp_path / "base"
    shutil.copytree(ROOT, old, ignore=shutil.ignore_patterns(".git", ".venv", ".mypy_cache", ".ruff_cache",
                                                             ".pytest_cache", "build", "tests", "bench", "__pycache__"))
    (old / "tools" / "stackfile.py").write_text(OLD_STACKFILE)
    plan = old / "tools" / "plan.py"  # and the plan module of that time, which imported only these two
    plan.write_text(re.sub(r"(?m)^from tools\.stackfile import .*$", "from tools.stackfile import load_stack_config, "
                           "stack_name", plan.read_text()))
    new = tmp_path / "Pulumi.dev.yaml"
    new.write_text(stack_text(lambda c: c["orgmail:aliases"]["team@example.org"].append("x@outside.example")))
    result = subprocess.run([sys.executable, "-m", "tools.plandiff", "--old-tree", str(old), "Pulumi.dev.yaml",
                             str(new)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "  ! mail to team@example.org now also leaves for x@outside.example, outside your domains" in result.stdout
