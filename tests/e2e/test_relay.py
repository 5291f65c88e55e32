"""Layer 3 for the backup MX: boot a relay's rendered user-data (large stack, mx2)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from components.server import host_config
from components.settings import load_settings, raw_from_pulumi_config
from components.userdata import render_user_data
from tests.e2e import harness
from tests.e2e.overrides import HOST_OVERRIDES, MOTO_PORT, put_parameters
from tests.e2e.test_mailhost import message, wait_for
from tests.unit.conftest import ROOT, stack_config
from tools.mockengine import PROVIDER_BCRYPT_COST, run_program

pytestmark = pytest.mark.e2e

STACK = "e2e-relay"
KNOWN = "helpdesk@large.example"
ALIAS = "board@large.example"
SENDER = "someone@elsewhere.example"


@pytest.fixture(scope="module")
def relay() -> Iterator[harness.BootedHost]:
    harness.require_e2e()
    config = stack_config("large")
    run = run_program(config, STACK, bcrypt_cost=PROVIDER_BCRYPT_COST)
    settings = load_settings(raw_from_pulumi_config(config), STACK)
    volume_id = run.one("aws:ebs/volume:Volume", "mx2-queue").id
    host = dataclasses.replace(host_config(settings, "mx2.large.example", "relay", volume_id), **HOST_OVERRIDES)

    def serve_parameters(guest: harness.BootedHost) -> None:
        put_parameters(guest, guest.start_moto(MOTO_PORT), run, settings.region)

    with harness.boot_host(gzip.compress(render_user_data(host).encode()), name="relay", data_disk_mb=256,
                           volume_id=volume_id, boot_timeout=120, before_boot=serve_parameters) as guest:
        status = guest.wait_cloud_init(timeout=600)
        assert status["errors"] == [], status

        wait_for(lambda: {25, 11332} <= guest.listening_ports(), 240, "port 25 and the milter to listen")
        yield guest


def probe(guest: harness.BootedHost, **args: Any) -> dict[str, Any]:
    res = guest.in_guest_net([sys.executable, "-m", "tests.e2e.probes"], input=json.dumps({"probe": "smtp", **args}),
                             timeout=180, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout)
    return result


def test_relay_runs_no_mailbox_service(relay: harness.BootedHost) -> None:
    ports = relay.listening_ports()
    assert 25 in ports and not ports & {465, 587, 993, 995}
    assert relay.exec(["systemctl", "is-active", "postfix.service"]).stdout.strip() == "active"
    nft = relay.exec(["nft", "list", "table", "inet", "orgmail"]).stdout
    assert "tcp dport 25 accept" in nft and "465" not in nft


def deferred(relay: harness.BootedHost) -> list[dict[str, Any]]:
    """Queue entries, once Postfix has tried (and failed) to pass them on."""
    out = relay.exec(["postqueue", "-j"]).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    tried = all(r.get("delay_reason") for e in entries for r in e["recipients"])
    return entries if entries and tried else []


def test_relay_accepts_known_recipients_and_forwards_to_the_mailbox_host(relay: harness.BootedHost) -> None:
    session = probe(relay, port=25, source="127.0.0.2", mail_from=SENDER, rcpts=[KNOWN, ALIAS],
                    data=message(SENDER, KNOWN, "via the backup MX"))
    assert session["steps"][-1][:2] == ["DATA", 250], session

    entries = wait_for(lambda: deferred(relay), 120, "the relay's first delivery attempt")
    recipients = {r["address"]: r for e in entries for r in e["recipients"]}
    assert set(recipients) == {KNOWN, ALIAS}
    # The mailbox host is unreachable here, so the message waits for it (never bounced).
    reasons = " ".join(r.get("delay_reason", "") for r in recipients.values())
    assert "mail.large.example" in reasons, reasons
    transport = relay.read_file("/etc/postfix/orgmail/transport").decode()
    assert transport == "large.example relay:[mail.large.example]:25\n"


def test_relay_refuses_unknown_recipients_and_relaying(relay: harness.BootedHost) -> None:
    session = probe(relay, port=25, source="127.0.0.3", mail_from=SENDER,
                    rcpts=["nobody@large.example", "victim@elsewhere.example"])
    codes = [s[1] for s in session["steps"] if s[0].startswith("RCPT")]
    assert codes == [550, 554], session


def test_replaced_relay_still_holds_the_mail_for_the_mailbox_host(relay: harness.BootedHost) -> None:
    """Issue 16 item 1 on the backup MX: a new instance (fresh root disk, same user-data, same queue
    volume) still holds the mail the old one accepted for the mailbox host, under the same queue ids,
    and keeps trying to pass it on. (Delivery once the next hop answers is the same Postfix queue run
    the mailbox host's replacement test shows.)"""
    session = probe(relay, port=25, source="127.0.0.4", mail_from=SENDER, rcpts=[KNOWN],
                    data=message(SENDER, KNOWN, "held across a replacement"))
    assert session["steps"][-1][:2] == ["DATA", 250], session
    before = {e["queue_id"] for e in wait_for(lambda: deferred(relay), 120, "a deferred message")}
    relay.exec(["sh", "-c", "echo old > /root/old-instance"], check=True)

    relay.replace(timeout=120)
    status = relay.wait_cloud_init(timeout=600)
    assert status["errors"] == [], status
    assert relay.exec(["test", "-e", "/root/old-instance"]).returncode == 1  # a new root disk
    wait_for(lambda: {25, 11332} <= relay.listening_ports(), 240, "the new instance's port 25 and milter")
    queued = {json.loads(line)["queue_id"] for line in relay.exec(["postqueue", "-j"]).stdout.splitlines() if line}
    assert queued == before, (before, queued)
    assert relay.exec(["findmnt", "-n", "-o", "TARGET", "/var/spool/postfix"]).stdout.strip() == "/var/spool/postfix"
    relay.exec(["postqueue", "-f"], check=True)  # the new instance tries at once, and defers again
    after = wait_for(lambda: deferred(relay), 120, "the new instance's delivery attempt")
    assert {e["queue_id"] for e in after} == before, (before, after)
    reasons = " ".join(r.get("delay_reason", "") for e in after for r in e["recipients"])
    assert "mail.large.example" in reasons, reasons
