"""The GitHub workflows: actionlint passes on them (and fails on a broken one); the PR and deploy flows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def actionlint() -> str:
    here = Path(sys.executable).parent / "actionlint"
    found = str(here) if here.exists() else shutil.which("actionlint")
    if found:
        return found
    reason = "actionlint is not installed (pip install -r requirements-dev.txt)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def lint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([actionlint(), "-no-color", *map(str, paths)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_workflows_pass_actionlint() -> None:
    assert {p.name for p in WORKFLOWS} == {"pull-request.yml", "deploy.yml"}
    result = lint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_fails_on_a_broken_workflow(tmp_path: Path) -> None:
    workflows = tmp_path / ".github" / "workflows"
    workflows.mkdir(parents=True)
    broken = workflows / "broken.yml"
    broken.write_text((ROOT / ".github/workflows/pull-request.yml").read_text()
                      .replace("stack-name: ${{ matrix.stack }}", "stack-name: ${{ matrix.stak }}")
                      .replace("comment-on-pr: true", "comment-on-prr: true"))
    result = lint(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'property "stak" is not defined in object type {stack: any}' in result.stdout
    assert 'input "comment-on-prr" is not defined in action "pulumi/actions@v7"' in result.stdout


def load(name: str) -> dict[Any, Any]:
    doc: dict[Any, Any] = yaml.safe_load((ROOT / ".github/workflows" / name).read_text())
    return doc


def test_pull_request_flow() -> None:
    doc = load("pull-request.yml")
    assert "pull_request" in doc[True]  # YAML 1.1 reads the key `on` as True
    jobs = doc["jobs"]
    steps = "\n".join(str(s.get("run", "")) for s in jobs["test"]["steps"])
    for command in ("ruff check", "mypy", "pytest tests/unit tests/tools", "policy/run-tests.sh"):
        assert command in steps, command
    diff = "\n".join(str(s.get("run", "")) for s in jobs["offline-diff"]["steps"])
    assert "tools.plandiff --old-tree base" in diff and "GITHUB_STEP_SUMMARY" in diff and "tools.cost" in diff
    assert "preview" not in jobs["offline-diff"].get("needs", []), "forks get the offline diff without credentials"
    preview = jobs["preview"]
    assert "head.repo.full_name == github.repository" in preview["if"]
    assert preview["permissions"]["id-token"] == "write"
    uses = {s["uses"].split("@")[0]: s for s in preview["steps"] if "uses" in s}
    assert uses["pulumi/actions"]["with"]["command"] == "preview"
    assert uses["pulumi/actions"]["with"]["comment-on-pr"] is True
    assert uses["pulumi/actions"]["with"]["policyPacks"] == "policy"
    assert "role-to-assume" in uses["aws-actions/configure-aws-credentials"]["with"]


def test_deploy_flow_is_gated_by_environments() -> None:
    doc = load("deploy.yml")
    assert doc[True]["push"]["branches"] == ["main"]
    up = doc["jobs"]["up"]
    assert up["environment"] == "${{ matrix.stack }}"
    assert up["needs"] == "test" and up["strategy"]["max-parallel"] == 1
    action = next(s for s in up["steps"] if s.get("uses", "").startswith("pulumi/actions@"))
    assert action["with"]["command"] == "up"
    assert doc["concurrency"]["cancel-in-progress"] is False
