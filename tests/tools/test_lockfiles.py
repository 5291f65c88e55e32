"""The hash locks the deploy jobs install (`pip install --require-hashes`) agree with the pins.

requirements.lock is the closure of requirements.txt, policy/requirements.lock the closure of the
policy pack's runtime requirement; both are made by tools/lockfile.py from `pip download`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tools.lockfile import LockError, canonical, lock_text, read_lock, read_pins

ROOT = Path(__file__).resolve().parents[2]
# The runner the deploy jobs use: ubuntu-24.04, CPython 3.11 (setup-python), x86_64.
RUNNER: dict[str, str] = {**{k: str(v) for k, v in default_environment().items()}, "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
          "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
          "python_version": "3.11", "python_full_version": "3.11.14"}


def lock(path: str) -> dict[str, tuple[str, list[str]]]:
    return read_lock((ROOT / path).read_text())


def pins(path: str) -> dict[str, str]:
    return read_pins((ROOT / path).read_text())


def dependencies(name: str, version: str) -> set[str]:
    """Canonical names a distribution needs on the runner, from its installed metadata."""
    dist = importlib.metadata.distribution(name)
    assert dist.version == version, (
        f"{name}: installed {dist.version}, locked {version}: the venv installs requirements.lock first (Makefile); "
        "if a pin changed, make the lock again (docs/pull-requests.md)")
    needed = set()
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(dict(RUNNER, extra="")):
            needed.add(canonical(req.name))
    return needed


def test_the_program_lock_is_requirements_txt_and_its_whole_closure() -> None:
    locked = lock("requirements.lock")
    wanted = pins("requirements.txt")
    assert {n: locked[n][0] for n in wanted if n in locked} == wanted, "every pin of requirements.txt, same version"
    reachable: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in reachable:
            continue
        reachable.add(name)
        assert name in locked, f"{name} is needed on the runner but missing from requirements.lock"
        todo.extend(dependencies(name, locked[name][0]))
    assert set(locked) == reachable, f"locked but needed by nothing: {sorted(set(locked) - reachable)}"


def test_the_policy_lock_pins_the_pack_and_the_program_pulumi() -> None:
    locked = lock("policy/requirements.lock")
    assert locked["pulumi-policy"][0] == pins("policy/requirements.txt")["pulumi-policy"]
    assert locked["pulumi"][0] == pins("requirements.txt")["pulumi"], "one Pulumi version everywhere"
    assert "pytest" not in locked, "the deploy needs the pack, not its tests"


def test_every_lock_entry_is_pinned_and_hashed() -> None:
    for path in ("requirements.lock", "policy/requirements.lock"):
        entries = lock(path)
        assert len(entries) > 10 and all(digests for _, digests in entries.values()), path
    with pytest.raises(LockError, match="needs --hash=sha256"):
        read_lock("jinja2==3.1.6\n")
    with pytest.raises(LockError, match="not pinned as name==version"):
        read_lock("jinja2>=3 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(LockError, match="listed twice"):
        read_lock(("Jinja2==3.1.6 --hash=sha256:" + "0" * 64 + "\n") * 2)


def test_the_lock_tool_hashes_every_file(tmp_path: Path) -> None:
    (tmp_path / "Jinja2-3.1.6-py3-none-any.whl").write_bytes(b"wheel")
    (tmp_path / "pyspf-2.0.14.tar.gz").write_bytes(b"sdist")
    text = lock_text(tmp_path, "requirements.txt")
    assert read_lock(text) == {"jinja2": ("3.1.6", [hashlib.sha256(b"wheel").hexdigest()]),
                               "pyspf": ("2.0.14", [hashlib.sha256(b"sdist").hexdigest()])}
    (tmp_path / "jinja2-3.1.5-py3-none-any.whl").write_bytes(b"older")
    with pytest.raises(LockError, match="more than one version of jinja2"):
        lock_text(tmp_path, "requirements.txt")


def test_runner_is_the_interpreter_of_the_locks() -> None:
    """The locks hold CPython 3.11 x86_64 wheels: the workflows' setup-python must stay on 3.11."""
    for path in (ROOT / ".github/workflows").glob("*.yml"):
        doc = yaml.safe_load(path.read_text())
        for job in doc["jobs"].values():
            for step in job.get("steps", []):
                if step.get("uses", "").startswith("actions/setup-python@"):
                    assert step["with"]["python-version"] == "3.11", path.name
    assert sys.version_info[:2] == (3, 11), "the venv the completeness test reads must be 3.11 too"
