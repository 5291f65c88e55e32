"""The GitHub workflows: actionlint passes on them (and fails on a broken one); the PR and deploy flows.

Structure tests read the YAML: secrets only in environment-gated jobs, preview jobs with read-only
credentials only, actions pinned by commit SHA, the Pulumi CLI pinned, hash-checked installs where
secrets are, a saved plan shown and applied, docs-only pushes skipped, a failed stack stopping the rest.
"""

from __future__ import annotations

import os
import re
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
                      .replace("needs: test", "needs: tset"))
    result = lint(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'property "stak" is not defined in object type {stack: any}' in result.stdout
    assert 'job "preview" needs job "tset" which does not exist in this workflow' in result.stdout


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
    assert up["needs"] == "plan" and doc["jobs"]["plan"]["needs"] == "test"
    action = next(s for s in up["steps"] if s.get("uses", "").startswith("pulumi/actions@"))
    assert action["with"]["command"] == "up"
    assert doc["concurrency"]["cancel-in-progress"] is False


SECRET = re.compile(r"\$\{\{\s*secrets\.([A-Za-z0-9_]+)\s*\}\}")
# What a job that runs a pull request's code may hold: the backend, the stack passphrase, the
# read-only Cloudflare token. Never the deploying token.
READ_ONLY_SECRETS = {"PULUMI_ACCESS_TOKEN", "PULUMI_CONFIG_PASSPHRASE", "CLOUDFLARE_READ_TOKEN"}


def all_workflows() -> dict[str, dict[Any, Any]]:
    return {p.name: load(p.name) for p in WORKFLOWS}


def secrets_of(value: Any) -> set[str]:
    """Every secret an expression in `value` reads (GITHUB_TOKEN is not a stored secret)."""
    return set(SECRET.findall(yaml.safe_dump(value))) - {"GITHUB_TOKEN"}


def aws_roles(job: dict[str, Any]) -> set[str]:
    return {str(s["with"]["role-to-assume"]) for s in job.get("steps", [])
            if s.get("uses", "").startswith("aws-actions/configure-aws-credentials@")}


def test_no_secret_outside_an_environment() -> None:
    for name, doc in all_workflows().items():
        assert not secrets_of(doc.get("env", {})), f"{name}: workflow-level env reads secrets"
        for job_name, job in doc["jobs"].items():
            used = secrets_of(job)
            assert not used or job.get("environment"), \
                f"{name}: job {job_name} reads secrets {sorted(used)} without a GitHub environment"
            assert not aws_roles(job) or job.get("environment"), \
                f"{name}: job {job_name} assumes an AWS role without a GitHub environment (OIDC sub)"


def test_preview_jobs_hold_only_read_only_credentials() -> None:
    seen = 0
    for name, doc in all_workflows().items():
        for job_name, job in doc["jobs"].items():
            roles = aws_roles(job)
            if any("AWS_PREVIEW_ROLE_ARN" in r for r in roles):
                seen += 1
                assert roles == {"${{ vars.AWS_PREVIEW_ROLE_ARN }}"}, (name, job_name)
                assert secrets_of(job) <= READ_ONLY_SECRETS, (name, job_name, secrets_of(job) - READ_ONLY_SECRETS)
        if "pull_request" in doc[True] or "pull_request_target" in doc[True]:
            text = yaml.safe_dump(doc)
            assert "AWS_DEPLOY_ROLE_ARN" not in text and secrets_of(doc) <= READ_ONLY_SECRETS, name
    assert seen == 2  # the pull request's preview and the deploy's plan


def test_deploy_role_and_token_only_in_the_stack_environment_on_main() -> None:
    seen = 0
    for name, doc in all_workflows().items():
        for job_name, job in doc["jobs"].items():
            deploying = "CLOUDFLARE_API_TOKEN" in secrets_of(job) or any("AWS_DEPLOY_ROLE_ARN" in r for r in aws_roles(job))
            if deploying:
                seen += 1
                assert set(doc[True]) == {"push"} and doc[True]["push"]["branches"] == ["main"], \
                    f"{name}: job {job_name} holds deploy credentials on {sorted(doc[True])}, not only pushes to main"
                assert job["environment"] == "${{ matrix.stack }}", (name, job_name)
    assert seen == 1


USES = re.compile(r"\s*(-\s+)?uses:\s*(?P<ref>\S+)(?P<rest>.*)")
PINNED = re.compile(r"(?P<action>[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(/[A-Za-z0-9_./-]+)?)@(?P<sha>[0-9a-f]{40})")


def test_every_action_is_pinned_by_commit_sha() -> None:
    shas: dict[str, set[str]] = {}
    for path in WORKFLOWS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            m = USES.fullmatch(line)
            if m is None:
                continue
            pin = PINNED.fullmatch(m["ref"])
            assert pin is not None, f"{path.name}:{number}: {m['ref']} is not pinned to a 40-hex commit SHA"
            assert re.fullmatch(r" # v\d+(\.\d+){0,2}", m["rest"]), \
                f"{path.name}:{number}: name the release after the SHA (# vX.Y.Z) for Dependabot and readers"
            shas.setdefault(pin["action"], set()).add(pin["sha"])
    assert shas and all(len(v) == 1 for v in shas.values()), shas
    dependabot = yaml.safe_load((ROOT / ".github/dependabot.yml").read_text())
    ecosystems = {(u["package-ecosystem"], u["directory"]) for u in dependabot["updates"]}
    assert ecosystems == {("github-actions", "/"), ("pip", "/"), ("pip", "/policy")}


def pulumi_pin() -> str:
    [version] = re.findall(r"^pulumi==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    return version


def test_pulumi_cli_pinned_to_the_sdk_version() -> None:
    steps = [(name, s) for name, doc in all_workflows().items() for job in doc["jobs"].values()
             for s in job.get("steps", []) if s.get("uses", "").startswith("pulumi/actions@")]
    assert steps
    for name, step in steps:
        assert str(step.get("with", {}).get("pulumi-version")) == pulumi_pin(), (name, step.get("name"))


def test_jobs_with_credentials_install_by_hash() -> None:
    for name, doc in all_workflows().items():
        for job_name, job in doc["jobs"].items():
            if not job.get("environment"):
                continue
            runs = [str(s.get("run", "")) for s in job["steps"]]
            installs = [line.strip() for r in runs for line in r.splitlines() if "pip install" in line]
            assert installs, (name, job_name)
            for line in installs:
                assert "--require-hashes" in line and re.search(r"-r (policy/)?requirements\.lock$", line), \
                    f"{name}: job {job_name}: {line}"
            assert {re.search(r"-r (\S+)$", line)[1] for line in installs} == {  # type: ignore[index]
                "requirements.lock", "policy/requirements.lock"}


def test_a_saved_plan_is_shown_then_applied() -> None:
    doc = load("deploy.yml")
    plan, up = doc["jobs"]["plan"], doc["jobs"]["up"]
    assert plan["environment"] == "plan" and plan["env"]["STACK"] == "${{ matrix.stack }}"
    [preview] = [s for s in plan["steps"] if "pulumi preview" in str(s.get("run", ""))]
    assert '--save-plan "plans/$STACK.json"' in preview["run"] and "--policy-pack policy" in preview["run"]
    assert "GITHUB_STEP_SUMMARY" in preview["run"] and "--diff" in preview["run"]
    # The preview's output goes through tee: only bash's pipefail makes its failure fail the step.
    assert doc["defaults"]["run"]["shell"] == "bash" and "shell" not in preview
    [upload] = [s for s in plan["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["with"] == {"name": "plan-${{ matrix.stack }}", "path": "plans/${{ matrix.stack }}.json",
                              "retention-days": 7, "if-no-files-found": "error"}
    assert up["needs"] == "plan"
    [download] = [s for s in up["steps"] if s.get("uses", "").startswith("actions/download-artifact@")]
    assert download["with"] == {"name": "plan-${{ matrix.stack }}", "path": "plans"}
    [apply] = [s for s in up["steps"] if s.get("uses", "").startswith("pulumi/actions@")]
    assert apply["with"]["command"] == "up" and apply["with"]["plan"] == "plans/${{ matrix.stack }}.json"
    assert apply["with"]["policyPacks"] == "policy"
    assert up["steps"].index(download) < up["steps"].index(apply)


def github_glob(pattern: str) -> re.Pattern[str]:
    """A GitHub Actions path filter as a regex: ** crosses directories, * and ? do not."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def push_runs(on_push: dict[str, Any], changed: list[str]) -> bool:
    """Whether a push of `changed` files starts the workflow (paths / paths-ignore filters)."""
    if "paths-ignore" in on_push:
        ignored = [github_glob(p) for p in on_push["paths-ignore"]]
        return any(not any(g.fullmatch(f) for g in ignored) for f in changed)
    if "paths" in on_push:
        return any(github_glob(p).fullmatch(f) for p in on_push["paths"] for f in changed)
    return True


def test_docs_only_pushes_do_not_deploy() -> None:
    on_push = load("deploy.yml")[True]["push"]
    assert not push_runs(on_push, ["README.md"])
    assert not push_runs(on_push, ["docs/pull-requests.md", "docs/iam/deploy-policy.json", "tests/e2e/README.md"])
    assert push_runs(on_push, ["README.md", "Pulumi.dev.yaml"])
    assert push_runs(on_push, ["cloud-init/user-data.yaml.j2"])
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    program = [f for f in tracked if f.startswith(("components/", "cloud-init/", "web/", "policy/", "tools/", ".github/"))
               or f in ("__main__.py", "requirements.txt", "requirements.lock") or re.fullmatch(r"Pulumi(\.\w+)?\.yaml", f)]
    assert len(program) > 50
    assert [f for f in program if not push_runs(on_push, [f])] == [], "a filter skips a file the deploy depends on"


def test_a_failed_stack_stops_the_later_stacks() -> None:
    jobs = load("deploy.yml")["jobs"]
    assert jobs["up"]["strategy"]["max-parallel"] == 1, "one stack at a time"
    assert jobs["up"]["strategy"]["fail-fast"] is True, "a failed stack cancels the stacks queued after it"
    assert jobs["plan"]["strategy"]["fail-fast"] is True and jobs["up"]["needs"] == "plan", \
        "a failed plan stops every up"
