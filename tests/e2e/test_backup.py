"""Layer 3: backups that restore. The dev stack's mailbox host boots with its backup bucket in
moto (S3 and SSM on the guest's loopback); mail is delivered, backed up with the host's own
`orgmail-backup` unit, deleted and restored with `orgmail-restore`, and read back over IMAPS.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import dkim
import pytest

from tests.e2e import harness
from tests.e2e.overrides import MOTO_PORT, put_parameters
from tests.e2e.test_mailhost import (
    ANN,
    BOB,
    OUTSIDE,
    Booted,
    booted_mailbox_host,
    last_code,
    message,
    new_client,
    plan_test_stack,
    wait_for,
)

pytestmark = pytest.mark.e2e

STATUS = "/var/lib/orgmail/backup-status.json"
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def backuphost() -> Iterator[Booted]:
    harness.require_e2e()
    stack = plan_test_stack()
    assert stack.host.backup_bucket

    def serve(guest: harness.BootedHost) -> None:
        url = guest.start_moto(MOTO_PORT)
        put_parameters(guest, url, stack.run, stack.settings.region)
        guest.create_bucket(url, stack.host.backup_bucket or "")

    with booted_mailbox_host(stack, "backuphost", serve, {25, 993, 11332}) as booted:
        assert not booted.status["errors"], "cloud-init failed; its logs are saved (see above)"
        yield booted
    print(f"\ne2e backup timings (s): {json.dumps(TIMINGS)}", file=sys.stderr)


def raw_messages(h: Booted, user: str) -> list[bytes]:
    res = h.probe("imap_fetch", user=user, password=h.stack.passwords[user], source=new_client())
    assert res["login"], res
    return sorted(base64.b64decode(m) for m in res["messages"])


def deliver(h: Booted, to: str, subject: str) -> None:
    session = h.probe("smtp", port=25, source=new_client(), mail_from=OUTSIDE, rcpts=[to],
                      data=message(OUTSIDE, to, subject, body=f"{subject}\n" + "line of mail text\n" * 50))
    assert last_code(session) == 250, session


def run_backup(h: Booted, label: str) -> dict[str, Any]:
    started = time.monotonic()
    res = h.sh("systemctl start orgmail-backup.service", timeout=900)
    TIMINGS[label] = round(time.monotonic() - started, 1)
    status: dict[str, Any] = json.loads(h.guest.read_file(STATUS))
    status["unit_rc"] = res.returncode
    return status


def test_backup_timer_enabled_and_status_starts_ok(backuphost: Booted) -> None:
    res = backuphost.guest.exec(["systemctl", "is-enabled", "orgmail-backup.timer"])
    assert res.stdout.strip() == "enabled"
    assert backuphost.guest.read_file("/etc/orgmail/restic-password").strip()
    keep = backuphost.guest.read_file("/etc/orgmail/backup.env").decode()
    assert keep == "KEEP_DAILY=7\nKEEP_MONTHLY=12\nKEEP_WEEKLY=4\n"


def test_restore_one_mailbox_byte_identical(backuphost: Booted) -> None:
    h = backuphost
    subjects = [f"keep me {n}" for n in range(3)]
    for s in subjects:
        deliver(h, ANN, s)
    wait_for(lambda: len(raw_messages(h, ANN)) >= 3, 90, "three messages in ann's INBOX")
    before = raw_messages(h, ANN)
    bob_before = raw_messages(h, BOB)

    status = run_backup(h, "first backup")
    assert status["unit_rc"] == 0 and status["backup"]["result"] == "ok", status
    assert status["check"]["result"] == "ok", status  # the first run checks a sample at once
    TIMINGS["first backup data_added (bytes)"] = status["backup"]["data_added"]

    h.sh("doveadm expunge -u ann@example.org mailbox INBOX all", timeout=60).check_returncode()
    assert raw_messages(h, ANN) == []

    started = time.monotonic()
    res = h.sh("orgmail-restore mailbox ann@example.org", timeout=600)
    TIMINGS["restore one mailbox"] = round(time.monotonic() - started, 1)
    assert res.returncode == 0, res.stderr
    assert raw_messages(h, ANN) == before
    assert raw_messages(h, BOB) == bob_before  # other mailboxes untouched


def test_second_backup_is_incremental(backuphost: Booted) -> None:
    h = backuphost
    first = json.loads(h.guest.read_file(STATUS))["backup"]
    deliver(h, BOB, "one new message")
    wait_for(lambda: any(b"one new message" in m for m in raw_messages(h, BOB)), 90, "the new message")
    status = run_backup(h, "second backup")
    second = status["backup"]
    assert second["result"] == "ok" and second["snapshot_id"] != first["snapshot_id"], status
    TIMINGS["second backup data_added (bytes)"] = second["data_added"]
    TIMINGS["second backup data_blobs"] = second["data_blobs"]
    # Only what changed is uploaded: the message, Dovecot's index updates, the Redis dump and
    # rspamd's statistics (a handful of data blobs, ~30 KiB); data_added also counts the
    # directory trees restic rewrites along the changed paths.
    assert second["data_blobs"] <= 12 < first["data_blobs"], (first, second)
    assert second["data_added"] < 1024 * 1024, (first, second)
    assert second["files_new"] <= 10 and second["files_unmodified"] > 10 * second["files_new"], second
    # Retention ran: both are kept (restic 0.18 keeps the newest of the day and, while fewer than
    # keepDaily days exist, the oldest snapshot too).
    snapshots = json.loads(h.sh("orgmail-restore snapshots --json").stdout)
    assert [s["id"] for s in snapshots] == [first["snapshot_id"], second["snapshot_id"]]


def test_failed_backup_is_recorded_and_the_next_run_succeeds(backuphost: Booted) -> None:
    h = backuphost
    env_file = "/etc/orgmail/host.env"
    good = h.guest.read_file(env_file).decode()
    away = good.replace(f"127.0.0.1:{MOTO_PORT}", "127.0.0.1:5999")  # nothing listens there
    assert away != good
    h.sh(f"cat > {env_file} <<'EOF'\n{away}EOF")
    try:
        status = run_backup(h, "failed backup")
    finally:
        h.sh(f"cat > {env_file} <<'EOF'\n{good}EOF")
    assert status["unit_rc"] != 0 and status["backup"]["result"] == "error", status
    assert "unreachable" in status["backup"]["error"], status
    failed = h.sh("systemctl is-failed orgmail-backup.service").stdout.strip()
    assert failed == "failed"  # visible to monitoring, too

    status = run_backup(h, "backup after recovery")
    assert status["unit_rc"] == 0 and status["backup"]["result"] == "ok", status


UPLOAD = """
import pathlib
s3 = boto3.client('s3', endpoint_url=endpoint)
root = pathlib.Path({dump!r})
for p in sorted(root.rglob('*')):
    if p.is_file():
        s3.put_object(Bucket={bucket!r}, Key=str(p.relative_to(root)), Body=p.read_bytes())
"""
DOWNLOAD = """
import pathlib
s3 = boto3.client('s3', endpoint_url=endpoint)
root = pathlib.Path({dump!r})
for page in s3.get_paginator('list_objects_v2').paginate(Bucket={bucket!r}):
    for o in page.get('Contents', []):
        p = root / o['Key']
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(s3.get_object(Bucket={bucket!r}, Key=o['Key'])['Body'].read())
"""


def test_full_restore_on_a_fresh_host(backuphost: Booted, tmp_path: Any) -> None:
    """Disaster recovery: a second host, booted from the same render with a blank data volume,
    gets every mailbox back with `orgmail-restore all`; logins and DKIM signing work there."""
    a = backuphost
    bucket = a.stack.host.backup_bucket or ""
    url = f"http://127.0.0.1:{MOTO_PORT}"
    assert run_backup(a, "backup before disaster")["backup"]["result"] == "ok"
    expected = {user: raw_messages(a, user) for user in (ANN, BOB)}
    dump = str(tmp_path / "bucket")
    a.guest.aws(url, DOWNLOAD.format(dump=dump, bucket=bucket))  # the bucket outlives the host

    stack = a.stack

    def serve(guest: harness.BootedHost) -> None:
        endpoint = guest.start_moto(MOTO_PORT)
        put_parameters(guest, endpoint, stack.run, stack.settings.region)
        guest.create_bucket(endpoint, bucket)
        guest.aws(endpoint, UPLOAD.format(dump=dump, bucket=bucket), timeout=300)

    ports = {25, 465, 993, 11332}
    with booted_mailbox_host(stack, "restorehost", serve, ports) as b:
        assert not b.status["errors"]

        def listening() -> bool:
            return ports <= b.guest.listening_ports()
        assert raw_messages(b, ANN) == []

        started = time.monotonic()
        res = b.sh("orgmail-restore all", timeout=900)
        TIMINGS["full restore on a fresh host"] = round(time.monotonic() - started, 1)
        assert res.returncode == 0, res.stderr
        wait_for(listening, 240, "services back after the restore")
        for user, messages in expected.items():
            assert raw_messages(b, user) == messages, user

        subject = "signed after the restore"
        session = b.probe("smtp", port=465, mode="tls", source=new_client(),
                          login=[ANN, stack.passwords[ANN]], mail_from=ANN, rcpts=[BOB],
                          data=message(ANN, BOB, subject))
        assert last_code(session) == 250, session
        got = wait_for(lambda: next((m for m in raw_messages(b, BOB) if subject.encode() in m), None), 60,
                       "the signed message")
        published = stack.dkim_txt.encode()
        assert dkim.verify(got, dnsfunc=lambda name, timeout=5: published), "DKIM does not verify"
