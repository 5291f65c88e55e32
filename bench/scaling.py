"""(2) Plan scaling: generated stacks of 1/10/50 domains x 5/100/500 mailboxes, time and peak memory."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.common import PYTHON, log, median, run_child, summary

DOMAINS = (1, 10, 50)
MAILBOXES = (5, 100, 500)
TARGET_GROWTH = 2.0  # 500 mailboxes <= 2 x the time of 5


def generated_config(domains: int, mailboxes: int, tier: str = "medium") -> dict[str, Any]:
    """A valid stack config: mailboxes spread round-robin over the domains, one alias each."""
    names = [f"d{i}.bench.example" for i in range(domains)]
    boxes = [{"address": f"user{j}@{names[j % domains]}", "quota": "1G",
              "aliases": [f"alias{j}@{names[j % domains]}"]} for j in range(mailboxes)]
    return {"config": {
        "orgmail:organization": "Bench Org",
        "orgmail:tier": tier,
        "orgmail:region": "eu-central-1",
        "orgmail:cloudflareAccountId": "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
        "orgmail:mailHost": f"mail.{names[0]}",
        "orgmail:domains": [{"name": n, "zoneId": f"{i:032x}"} for i, n in enumerate(names, start=1)],
        "orgmail:mailboxes": boxes,
        "orgmail:admin": {"email": boxes[0]["address"], "ssm": True},
    }}


def measure(runs: int = 5) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for d in DOMAINS:
            for m in MAILBOXES:
                stack_file = Path(tmp) / f"Pulumi.scale-{d}d-{m}m.yaml"
                stack_file.write_text(yaml.safe_dump(generated_config(d, m)))
                log(f"scaling: {d} domains x {m} mailboxes x{runs}")
                times, peaks = [], []
                for _ in range(runs):
                    r = run_child([PYTHON, "-m", "tools.plan", str(stack_file), "--json", "--out", str(Path(tmp) / "out")])
                    if r.returncode:
                        raise RuntimeError(f"plan of {stack_file.name} failed: {r.stderr[-2000:]}")
                    times.append(r.seconds)
                    peaks.append(r.peak_rss_mb)
                cells[f"{d}x{m}"] = {"domains": d, "mailboxes": m, "seconds": summary(times),
                                     "peak_rss_mb": round(median(peaks), 1)}
                log(f"scaling: {d}x{m}: {cells[f'{d}x{m}']}")
    small, large = cells[f"{DOMAINS[0]}x{MAILBOXES[0]}"], cells[f"{DOMAINS[-1]}x{MAILBOXES[-1]}"]
    growth = large["seconds"]["median"] / small["seconds"]["median"]
    per_domain = {str(d): round(cells[f"{d}x{MAILBOXES[-1]}"]["seconds"]["median"]
                                / cells[f"{d}x{MAILBOXES[0]}"]["seconds"]["median"], 2) for d in DOMAINS}
    return {
        "cells": cells,
        "growth_smallest_to_largest": round(growth, 2),
        "memory_growth_smallest_to_largest": round(large["peak_rss_mb"] / small["peak_rss_mb"], 2),
        "mailbox_growth_500_over_5_by_domains": per_domain,
        "target_mailbox_growth": TARGET_GROWTH,
        "met": max(per_domain.values()) <= TARGET_GROWTH,
    }
