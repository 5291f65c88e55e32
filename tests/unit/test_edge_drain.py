"""An edge leaving its Auto Scaling group delivers its queue first (issue 15): orgmail-drain's logic with
Postfix, awscli and the clock faked, and what the edge's user-data gives it. Booted: tests/e2e/test_cluster.py,
test_a_leaving_edge_delivers_its_queue_before_it_lets_the_group_terminate_it."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from types import ModuleType
from typing import Any

import pytest

from components.edge import DRAIN_HEARTBEAT_SECONDS, DRAIN_HOOK, group_name, render_edge_files
from tests.unit.conftest import host_script
from tests.unit.test_cluster_hosts import EDGE

ENV = {"REGION": "eu-west-1", "AUTOSCALING_GROUP": "orgmail-s-edges", "DRAIN_HOOK": DRAIN_HOOK,
       "DRAIN_HEARTBEAT_SECONDS": str(DRAIN_HEARTBEAT_SECONDS)}


class FakeEdge:
    """Postfix's queue (a list of counts, one per look) and the aws commands, as the drain sees them."""

    def __init__(self, counts: list[int], failing: set[str] | None = None) -> None:
        self.counts = counts
        self.calls: list[list[str]] = []
        self.failing = failing or set()
        self.disabled = ""

    def run(self, cmd: list[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        out, rc = "", 0
        if cmd[:2] == ["postqueue", "-j"]:
            n = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
            out = "".join('{"queue_id": "X"}\n' for _ in range(n))
        elif cmd[:3] == ["postconf", "-h", "master_service_disable"]:
            out = self.disabled + "\n"
        elif cmd[:2] == ["postconf", "-e"]:
            self.disabled = cmd[2].split("=", 1)[1]
        elif cmd[0] == "aws" and cmd[2] in self.failing:
            rc = 254
            self.failing.discard(cmd[2])  # fails once
        return subprocess.CompletedProcess(cmd, rc, out, "throttled" if rc else "")

    def aws(self) -> list[list[str]]:
        return [c for c in self.calls if c[0] == "aws"]


@pytest.fixture
def drain() -> ModuleType:
    return host_script("drain.py")


def run_drain(module: ModuleType, edge: FakeEdge, monkeypatch: pytest.MonkeyPatch, step: float = 10) -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += step

    monkeypatch.setattr(module.subprocess, "run", edge.run)
    module.drain(ENV, "i-0abc", clock=lambda: now[0], sleep=sleep)


def test_it_stops_taking_mail_first_and_completes_only_once_the_queue_is_empty(
        drain: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    edge = FakeEdge([3, 2, 1, 0])
    run_drain(drain, edge, monkeypatch)
    assert edge.calls[:3] == [["postconf", "-h", "master_service_disable"],
                              ["postconf", "-e", "master_service_disable=inet"], ["postfix", "reload"]]
    flushes = [i for i, c in enumerate(edge.calls) if c == ["postqueue", "-f"]]
    assert len(flushes) == 3, edge.calls
    assert edge.aws() == [["aws", "autoscaling", "complete-lifecycle-action", "--region", "eu-west-1",
                           "--auto-scaling-group-name", "orgmail-s-edges", "--lifecycle-hook-name", DRAIN_HOOK,
                           "--instance-id", "i-0abc", "--lifecycle-action-result", "CONTINUE"]]
    assert edge.calls.index(edge.aws()[0]) > flushes[-1]


def test_an_empty_queue_completes_at_once_and_listeners_already_off_are_left_alone(
        drain: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    edge = FakeEdge([0])
    edge.disabled = "inet"  # a drain started again after a restart
    run_drain(drain, edge, monkeypatch)
    assert ["postfix", "reload"] not in edge.calls and ["postqueue", "-f"] not in edge.calls
    assert [c[2] for c in edge.aws()] == ["complete-lifecycle-action"]


def test_while_mail_remains_it_extends_the_hook_and_never_completes(drain: ModuleType,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard down for two hours: 720 flushes 10 s apart, the heartbeat renewed every third of the hook's
    timeout (one failed renewal retried at the next flush), then the queue empties and the action completes."""
    edge = FakeEdge([5] * 720 + [0], failing={"record-lifecycle-action-heartbeat"})
    run_drain(drain, edge, monkeypatch)
    actions = [c[2] for c in edge.aws()]
    assert actions[-1] == "complete-lifecycle-action" and actions.count("complete-lifecycle-action") == 1
    beats = [i for i, c in enumerate(edge.calls) if c[:3] == ["aws", "autoscaling", "record-lifecycle-action-heartbeat"]]
    # Due every 1,200 s: at 1,200 s (fails), tried again at 1,210, then 2,410, 3,610, 4,810 and 6,010; none
    # once the queue is empty at 7,200 s.
    assert len(beats) == 6, actions
    assert all(edge.calls[i][-2:] == ["--instance-id", "i-0abc"] for i in beats)


def test_a_failed_completion_is_tried_again(drain: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    edge = FakeEdge([0], failing={"complete-lifecycle-action"})
    run_drain(drain, edge, monkeypatch)
    assert [c[2] for c in edge.aws()] == ["complete-lifecycle-action", "complete-lifecycle-action"]


def test_it_waits_for_terminated_and_does_nothing_before(drain: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """InService, a metadata service that does not answer for a while, then Terminated: only then a drain."""
    answers = iter(["InService", None, None, "InService", "Terminated", "i-0abc"])
    asked: list[str] = []
    drained: list[tuple[dict, str]] = []

    def metadata(path: str) -> str | None:
        asked.append(path)
        return next(answers)

    monkeypatch.setattr(drain, "metadata", metadata)
    monkeypatch.setattr(drain, "drain", lambda env, instance: drained.append((env, instance)))
    monkeypatch.setattr(drain.time, "sleep", lambda s: None)
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    assert drain.main() == 0
    assert asked == ["autoscaling/target-lifecycle-state"] * 5 + ["instance-id"]
    assert [instance for _, instance in drained] == ["i-0abc"]


def test_without_its_group_in_the_env_file_it_refuses_to_start(drain: ModuleType,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOSCALING_GROUP", raising=False)
    monkeypatch.setattr(drain, "metadata", lambda path: pytest.fail("asked the metadata"))
    assert drain.main() == 1


def test_the_edge_gets_the_drain_its_group_and_hook() -> None:
    files = {f.path: f for f in render_edge_files(EDGE)}
    env = files["/etc/orgmail/host.env"].content
    assert f"AUTOSCALING_GROUP={EDGE.autoscaling_group}\n" in env and f"DRAIN_HOOK={DRAIN_HOOK}\n" in env
    assert f"DRAIN_HEARTBEAT_SECONDS={DRAIN_HEARTBEAT_SECONDS}\n" in env
    assert files["/usr/local/sbin/orgmail-drain"].mode == "0755"
    unit = files["/etc/systemd/system/orgmail-drain.service"].content
    assert "EnvironmentFile=/etc/orgmail/host.env" in unit and "Restart=on-failure" in unit
    bootstrap = files["/usr/local/sbin/orgmail-bootstrap"].content
    assert "orgmail-drain.service" in bootstrap  # enabled and started with the edge's services
    assert group_name("isp") == "orgmail-isp-edges"


@pytest.mark.parametrize("bad", ["", "-edges", "orgmail edges", "orgmail-edges\nDRAIN_HOOK=x", "a:b", "x" * 256])
def test_a_group_name_that_could_break_the_env_file_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="Auto Scaling group"):
        replace(EDGE, autoscaling_group=bad)
