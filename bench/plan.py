"""(1) Offline plan latency per example stack, beside the bare import time of the Pulumi SDKs."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from bench.common import PYTHON, ROOT, log, median, run_child, summary

TOP_LEVEL_IMPORT = "import pulumi, pulumi_aws, pulumi_cloudflare, pulumi_tls, pulumi_random, pulumi_command"
TARGET_RATIO = 1.5


def aws_submodules_used() -> list[str]:
    """The pulumi_aws submodules the program's components use (``aws.ec2.Instance`` -> ec2)."""
    used: set[str] = set()
    for path in (ROOT / "components").glob("*.py"):
        used |= set(re.findall(r"\baws\.([a-z0-9_]+)\.(?:[A-Z]|get_)", path.read_text()))
    return sorted(used)


def sdk_import_statement() -> str:
    """Import every SDK module the program uses, the way using it loads it.

    pulumi_aws's submodules are lazy: ``import pulumi_aws`` alone loads none of them, while the
    program's first ``aws.ec2.X`` runs ec2/__init__.py, which imports all of ec2's ~180 resource
    modules. Reading one attribute of each submodule does exactly that. pulumi_cloudflare and the
    others load everything on import.
    """
    subs = ", ".join(repr(s) for s in aws_submodules_used())
    return (f"{TOP_LEVEL_IMPORT}, pulumi_command.local\n"
            f"for sub in ({subs},):\n"
            "    getattr(getattr(pulumi_aws, sub), '_utilities')\n")


def example_stacks() -> list[Path]:
    return sorted(p for p in ROOT.glob("Pulumi.*.yaml"))


def sdk_import_seconds(runs: int, statement: str) -> list[float]:
    times = []
    for _ in range(runs):
        r = run_child([PYTHON, "-c", statement])
        if r.returncode:
            raise RuntimeError(f"SDK import failed: {r.stderr[-2000:]}")
        times.append(r.seconds)
    return times


def plan_seconds(stack_file: Path, runs: int) -> tuple[list[float], list[float]]:
    times, peaks = [], []
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as out:
        for _ in range(runs):
            r = run_child([PYTHON, "-m", "tools.plan", str(stack_file), "--json", "--out", out])
            if r.returncode:
                raise RuntimeError(f"plan of {stack_file.name} failed: {r.stderr[-2000:]}")
            times.append(r.seconds)
            peaks.append(r.peak_rss_mb)
    return times, peaks


def measure(runs: int = 5) -> dict[str, Any]:
    """Round-robin: each round imports the SDKs and plans every stack once, so drift in a shared
    machine's load lands on the baseline and the plans alike."""
    stack_files = example_stacks()
    statement = sdk_import_statement()
    imports: list[float] = []
    top_level: list[float] = []
    times: dict[str, list[float]] = {f.name: [] for f in stack_files}
    peaks: dict[str, list[float]] = {f.name: [] for f in stack_files}
    for i in range(runs):
        log(f"plan: round {i + 1}/{runs}")
        imports += sdk_import_seconds(1, statement)
        top_level += sdk_import_seconds(1, TOP_LEVEL_IMPORT)
        for stack_file in stack_files:
            t, p = plan_seconds(stack_file, 1)
            times[stack_file.name] += t
            peaks[stack_file.name] += p
    imports += sdk_import_seconds(1, statement)
    base = median(imports)
    stacks: dict[str, Any] = {}
    for stack_file in stack_files:
        stack = stack_file.name[len("Pulumi."):-len(".yaml")]
        s: dict[str, Any] = {"seconds": summary(times[stack_file.name]), "peak_rss_mb": round(median(peaks[stack_file.name]), 1)}
        s["ratio_to_import"] = round(s["seconds"]["median"] / base, 2)
        s["beyond_import_seconds"] = round(s["seconds"]["median"] - base, 2)
        s["target_ratio"] = TARGET_RATIO
        s["met"] = s["ratio_to_import"] <= TARGET_RATIO
        stacks[stack] = s
    return {"sdk_import_seconds": summary(imports), "sdk_import_statement": statement,
            "aws_submodules": aws_submodules_used(), "top_level_import_seconds": summary(top_level),
            "stacks": stacks}
