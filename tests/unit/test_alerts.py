"""Alarms and the health report (issue 18): the alarm table in the plan, each alarm's condition as
orgmail-health measures it, and the runbook in the README. Booted (the conditions staged on the host,
the values read back from moto's CloudWatch and judged by each alarm's own definition):
tests/e2e/test_mailhost.py::test_each_health_alarm_fires_when_its_condition_is_staged."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from components.alerts import HEALTH_ALARMS, HEALTH_PERIOD
from components.userdata import HOST_FILES
from tests.unit.conftest import ROOT, host_script, raw_config, run_stack, stack_config
from tools.mockengine import run_program

ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"


def test_the_mailbox_host_has_each_health_alarm_mailed_to_the_admin() -> None:
    cfg = dict(stack_config("dev"))
    cfg["orgmail:backup"] = {**cfg.get("orgmail:backup", {}), "alarmEmail": True}
    run = run_program(cfg, "dev")
    alarms = {r.name: r.inputs for r in run.of_type(ALARM)}
    topic = [r for r in run.of_type("aws:sns/topic:Topic")]
    assert len(topic) == 1
    for a in HEALTH_ALARMS:
        inputs = alarms[f"mail-{a.slug}"]
        assert inputs["namespace"] == "orgmail" and inputs["metricName"] == a.metric
        assert inputs["dimensions"] == {"Stack": "dev", "Host": "mail.example.org"}
        assert inputs["period"] == HEALTH_PERIOD and inputs["evaluationPeriods"] == a.periods
        assert (inputs["comparisonOperator"], inputs["threshold"]) == (a.comparison, a.threshold)
        assert inputs["statistic"] == ("Minimum" if a.comparison.startswith("Less") else "Maximum")
        assert len(inputs["alarmActions"]) == 1 and inputs["alarmActions"] == inputs["okActions"]
        assert inputs["alarmDescription"] == f"mail.example.org: {a.runbook}"
    # Silence is trouble for exactly one alarm: a host that reports nothing at all.
    assert [a.slug for a in HEALTH_ALARMS if a.missing == "breaching"] == ["sync"]


def test_relays_have_no_health_alarms() -> None:
    names = [r.name for r in run_stack("large").of_type(ALARM)]
    assert sorted(n for n in names if n.startswith("mx2-")) == ["mx2-bootstrap", "mx2-instance-check", "mx2-system-check"]


def test_health_runs_on_the_mailbox_host_every_five_minutes() -> None:
    rows = {h.path: h for h in HOST_FILES if "health" in h.path}
    assert set(rows) == {"/usr/local/sbin/orgmail-health", "/etc/systemd/system/orgmail-health.service",
                         "/etc/systemd/system/orgmail-health.timer"}
    assert all(h.roles == ("mailbox",) and h.via_ssm for h in rows.values())
    timer = (ROOT / "cloud-init/files/systemd/orgmail-health.timer").read_text()
    assert "OnUnitActiveSec=5min" in timer and HEALTH_PERIOD == 300


def test_queue_figures() -> None:
    health = host_script("health.py")
    now = 1_800_000_000
    assert health.queue_figures([], now) == (0, 0)
    entries = [{"arrival_time": now - 600}, {"arrival_time": now - 4 * 3600 - 59}, {"arrival_time": now}]
    assert health.queue_figures(entries, now) == (3, 240)


def test_bounce_percent_counts_only_real_deliveries_out() -> None:
    health = host_script("health.py")
    sent = "to=<a@x.example>, relay=mx.x.example[192.0.2.1]:25, status=sent (250 ok)"
    bounced = "to=<b@x.example>, relay=mx.x.example[192.0.2.1]:25, status=bounced (550 5.1.1 unknown)"
    srs = "to=<c@x.example>, relay=127.0.0.1[127.0.0.1]:10027, status=sent (250 ok)"
    assert health.bounce_percent([sent] * 17 + [bounced] * 2 + [srs] * 30) is None  # 19 < 20: too few to judge
    assert health.bounce_percent([sent] * 15 + [bounced] * 5) == 25
    assert health.bounce_percent(["deferred lines", "status=deferred"] * 30) is None


def test_certificate_days() -> None:
    health = host_script("health.py")
    now = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)
    assert health.certificate_days("notAfter=Dec 20 11:00:00 2026 GMT\n", now) == 13
    assert health.certificate_days("notAfter=Mar  3 12:00:00 2027 GMT", now) == 87


@pytest.mark.parametrize(("answers", "value"), [
    ([], 0), (["127.0.0.2"], 1), (["127.0.0.4", "127.0.0.11"], 1), (["127.0.0.10"], 1),
    (["127.255.255.254"], None), (["127.255.255.252", "127.0.0.2"], None), (["127.0.1.2"], 0),
])
def test_a_refusal_is_no_listing(answers: list[str], value: int | None) -> None:
    assert host_script("health.py").listing(answers) == value


def test_the_blocklist_is_asked_at_most_hourly(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    health = host_script("health.py")
    monkeypatch.setattr(health, "BLOCKLIST_CACHE", tmp_path / "blocklist.json")
    asked: list[str] = []
    monkeypatch.setattr(health.subprocess, "run", lambda *a, **k: type("P", (), {"stdout": "zen.spamhaus.org\n"})())

    def dns_a(name: str) -> list[str]:
        if name == "mail.example.org":
            return ["192.0.2.25"]
        asked.append(name)
        return ["127.0.0.4"]

    monkeypatch.setattr(health, "dns_a", dns_a)
    assert health.blocklisted("mail.example.org", 1_000_000) == 1
    assert asked == ["25.2.0.192.zen.spamhaus.org"]
    assert health.blocklisted("mail.example.org", 1_000_000 + 3599) == 1 and len(asked) == 1
    assert json.loads((tmp_path / "blocklist.json").read_text()) == {"time": 1_000_000, "value": 1}
    health.blocklisted("mail.example.org", 1_000_000 + 3600)
    assert len(asked) == 2


def test_the_readme_runbook_is_the_alarm_table() -> None:
    readme = (ROOT / "README.md").read_text()
    for a in HEALTH_ALARMS:
        assert f"- `mail-{a.slug}` ({a.metric}): {a.runbook}" in readme.replace("\n  ", " "), a.slug
    assert raw_config("dev")  # the dev stack plans (fixture sanity)


def test_dns_a_asks_the_resolver_itself_and_reads_its_answer() -> None:
    """The host's published address comes from DNS, never /etc/hosts (which names the host 127.0.1.1): a
    question to a resolver on 127.0.0.1:53 is answered here by a stand-in on another port."""
    import socket
    import struct
    import threading

    health = host_script("health.py")
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    names: list[bytes] = []

    def answer() -> None:
        for rcode, addresses in ((0, ["192.0.2.25", "192.0.2.26"]), (3, []), (2, [])):
            query, peer = server.recvfrom(512)
            qid, end = query[:2], query.index(b"\0", 12) + 5
            names.append(query[12:end - 4])
            flags = 0x8180 | rcode
            reply = qid + struct.pack(">HHHHH", flags, 1, len(addresses), 0, 0) + query[12:end]
            for a in addresses:  # each answer names the question by a pointer to offset 12
                reply += struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(a)
            server.sendto(reply, peer)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    real_sendto = socket.socket.sendto

    class Redirect(socket.socket):
        def sendto(self, data: bytes, address: Any) -> int:  # type: ignore[override]
            return real_sendto(self, data, ("127.0.0.1", port))

    original = health.socket.socket
    health.socket.socket = Redirect
    try:
        assert health.dns_a("mail.example.org", timeout=5) == ["192.0.2.25", "192.0.2.26"]
        assert health.dns_a("25.2.0.192.zen.spamhaus.org", timeout=5) == []
        assert health.dns_a("servfail.example", timeout=5) is None
    finally:
        health.socket.socket = original
        server.close()
    assert names[0] == b"\x04mail\x07example\x03org\x00"
