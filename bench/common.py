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

    ``paired`` is the ratio within each round (the i-th run of each, minutes apart at most), and its
    median is what the target is judged on: the shared machine's speed drifts between rounds (other
    guests, hypervisor steal), and a within-round ratio cancels what the two runs shared. ``ratio``,
    the median of ours over the median of theirs, is reported beside it.
    """
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"need runs of both in the same rounds, got {len(ours)} and {len(theirs)}")
    ratio = round(median([r["msgs_per_s"] for r in ours]) / median([r["msgs_per_s"] for r in theirs]), 2)
    paired = summary([a["msgs_per_s"] / b["msgs_per_s"] for a, b in zip(ours, theirs, strict=True)], 2)
    return {"ratio": ratio, "paired": paired, "target_ratio": target, "met": paired["median"] >= target,
            "judged_on": "paired median"}


def cpu_times() -> list[int]:
    """The machine's CPU time counters (USER_HZ) from /proc/stat's first line: user, nice, system, idle,
    iowait, irq, softirq, steal, ... Guests share the host's kernel, so this is the whole machine."""
    with open("/proc/stat", encoding="ascii") as f:
        return [int(v) for v in f.readline().split()[1:]]


def steal_pct(before: Sequence[int], after: Sequence[int]) -> float:
    """The share of the machine's CPU time the hypervisor gave to others between two cpu_times()
    (the steal column): on a shared VM the speed every figure depends on."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta[:8])
    return round(100 * delta[7] / total, 1) if total else 0.0


def cpu_ratio(ours: dict[str, float], theirs: dict[str, float]) -> float:
    """Their CPU milliseconds per message over ours (every service summed): what our throughput
    would be against theirs on a machine where CPU is the limit, and far less moved than wall
    time by other load on a shared machine."""
    return round(sum(theirs.values()) / sum(ours.values()), 2)
