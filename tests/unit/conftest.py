"""Shared fixtures: example stack configs and cached mock runs of the program."""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tools.mockengine import MockRun, run_program

ROOT = Path(__file__).resolve().parents[2]


def host_script(name: str) -> ModuleType:
    """A Python host script (cloud-init/files/orgmail/<name>) loaded as a module, for its functions."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_").removesuffix(".py"),
                                                  ROOT / "cloud-init/files/orgmail" / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
STACKS = ("dev", "small", "medium", "large", "isp-single")


def stack_config(stack: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]


@functools.cache
def _run(stack: str) -> MockRun:
    return run_program(stack_config(stack), stack)


@pytest.fixture(params=STACKS)
def stack_run(request: pytest.FixtureRequest) -> tuple[str, MockRun]:
    return request.param, _run(request.param)


@pytest.fixture
def dev_run() -> MockRun:
    return _run("dev")


def run_stack(stack: str) -> MockRun:
    return _run(stack)


def raw_config(stack: str = "dev") -> dict[str, Any]:
    """The stack's `orgmail:` settings as load_settings takes them (short keys)."""
    return copy.deepcopy({k.split(":", 1)[1]: v for k, v in stack_config(stack).items() if k.startswith("orgmail:")})
