"""The README and docs/ as a new admin meets them: links stay inside the repository, the quickstart
keeps the stack's encryption salt, every output they name exists, and the day-2 recipes they give work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.unit.conftest import ROOT, run_stack

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "tests" / "e2e" / "README.md"])
_LINK_RE = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    for target in _LINK_RE.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} links {target}, outside the repository"
        assert path.exists(), f"{doc.name} links {target}, which does not exist"
    # Paths in code spans too: `../shared/DESIGN.md` was not a link but sent readers outside.
    for span in re.findall(r"`([^`\n]+\.md)`", text):
        assert not span.startswith("../"), f"{doc.name} names {span}, outside the repository"


def test_nothing_refers_to_the_design_notes_outside_the_repository() -> None:
    for path in ROOT.rglob("*"):
        if path.suffix not in (".md", ".py", ".sh", ".j2", ".yaml") or ".venv" in path.parts or "build" in path.parts:
            continue
        if path == Path(__file__):
            continue
        text = path.read_text(errors="replace")
        assert "DESIGN.md" not in text and "shared/source" not in text, path
    assert (ROOT / "docs" / "design.md").exists()


def _quickstart() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Real deployment", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_quickstart_copies_the_example_before_stack_init() -> None:
    """`pulumi stack init` writes encryptionsalt into Pulumi.<stack>.yaml; a later cp would drop it."""
    lines = _quickstart()
    cp = next(i for i, line in enumerate(lines) if line.startswith("cp Pulumi."))
    init = next(i for i, line in enumerate(lines) if line.startswith("pulumi stack init"))
    assert cp < init, lines


def test_every_stack_output_the_readme_names_exists() -> None:
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"pulumi stack output (?:--json )?(?:--show-secrets )?([A-Za-z]+)", text))
    assert "instanceId" in named, "the README shows how to reach the host with Session Manager"
    for stack in ("dev", "large"):
        outputs = run_stack(stack).outputs
        assert named <= set(outputs), named - set(outputs)


def test_instance_id_outputs_name_every_host() -> None:
    run = run_stack("large")
    ids = {r.name: r.id for r in run.of_type("aws:ec2/instance:Instance")}
    assert run.outputs["instanceIds"] == {"mail.large.example": ids["mail-instance"],
                                          "mx2.large.example": ids["mx2-instance"]}
    assert run.outputs["instanceId"] == ids["mail-instance"]


def test_session_manager_example_uses_the_output() -> None:
    text = (ROOT / "README.md").read_text()
    assert re.search(r"aws ssm start-session --target \"?\$\(pulumi stack output instanceId\)", text)


def test_removing_a_mailbox_is_documented() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("- **Remove a mailbox**", 1)
    assert len(section) == 2, "README: Operations has no 'Remove a mailbox' entry"
    entry = section[1].split("\n- **", 1)[0]
    for needed in ("passwordHashes", "/srv/mail/vmail/", "orgmail-restore mailbox", "pulumi up"):
        assert needed in entry, needed
