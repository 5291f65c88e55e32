"""Shared helpers: timing, medians, child processes with their own peak memory."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@dataclass
class ChildRun:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stderr: str


def run_child(cmd: Sequence[str], cwd: Path = ROOT, timeout: float = 600) -> ChildRun:
    """Run ``cmd`` in a fresh process: wall time and that child's own peak RSS (wait4's rusage)."""
    started = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.005)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    return ChildRun(seconds, usage.ru_maxrss / 1024, proc.returncode, stderr)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, min, max and every run."""
    return {"median": round(median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def compare(ours: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]], target: float) -> dict[str, Any]:
    """Our throughput over a baseline's, from runs of both in the same rounds (``msgs_per_s`` each).

    ``ratio`` is the median of ours over the median of theirs; ``paired`` is the ratio within each
    round (the i-th run of each), whose spread shows how much the shared machine's drift moved it.
    """
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"need runs of both in the same rounds, got {len(ours)} and {len(theirs)}")
    ratio = round(median([r["msgs_per_s"] for r in ours]) / median([r["msgs_per_s"] for r in theirs]), 2)
    paired = [a["msgs_per_s"] / b["msgs_per_s"] for a, b in zip(ours, theirs, strict=True)]
    return {"ratio": ratio, "paired": summary(paired, 2), "target_ratio": target, "met": ratio >= target}


def cpu_ratio(ours: dict[str, float], theirs: dict[str, float]) -> float:
    """Their CPU milliseconds per message over ours (every service summed): what our throughput
    would be against theirs on a machine where CPU is the limit, and far less moved than wall
    time by other load on a shared machine."""
    return round(sum(theirs.values()) / sum(ours.values()), 2)
