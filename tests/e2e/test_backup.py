"""Layer 3: backups that restore. The dev stack's mailbox host boots with its backup bucket in
moto (S3 and SSM on the guest's loopback); mail is delivered, backed up with the host's own
`orgmail-backup` unit, deleted and restored with `orgmail-restore`, and read back over IMAPS.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import dkim
import pytest

from components.server import host_config
from components.settings import load_settings, raw_from_pulumi_config
from tests.e2e import harness
from tests.e2e.overrides import HOST_OVERRIDES, MOTO_PORT, put_parameters
from tests.e2e.test_mailhost import (
    ANN,
    BOB,
    OUTSIDE,
    Booted,
    PlannedStack,
    booted_mailbox_host,
    last_code,
    message,
    new_client,
    plan_test_stack,
    wait_for,
)
from tests.unit.conftest import stack_config
from tools.mockengine import PROVIDER_BCRYPT_COST, run_program
from tools.plan import user_data_text

pytestmark = pytest.mark.e2e

STATUS = "/var/lib/orgmail/backup-status.json"
URL = f"http://127.0.0.1:{MOTO_PORT}"
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def backuphost() -> Iterator[Booted]:
    harness.require_e2e()
    stack = plan_test_stack()
    assert stack.host.backup_bucket

    def serve(guest: harness.BootedHost) -> None:
        url = guest.start_moto(MOTO_PORT)
        put_parameters(guest, url, stack.run, stack.settings.region, stack.host)
        guest.create_bucket(url, stack.host.backup_bucket or "")
        # Versioned from the start, as the stack makes it (aws.s3.BucketVersioning).
        guest.aws(url, f"boto3.client('s3', endpoint_url=endpoint).put_bucket_versioning("
                       f"Bucket={stack.host.backup_bucket!r}, VersioningConfiguration={{'Status': 'Enabled'}})")

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


REPORTS = """
import datetime
cw = boto3.client('cloudwatch', endpoint_url=endpoint, region_name={region!r})
now = datetime.datetime.now(datetime.timezone.utc)
r = cw.get_metric_statistics(Namespace='orgmail', MetricName='BackupResult',
                             Dimensions=[{{'Name': 'Stack', 'Value': {stack!r}}}],
                             StartTime=now - datetime.timedelta(hours=2), EndTime=now + datetime.timedelta(minutes=5),
                             Period=1, Statistics=['Maximum'])
print(json.dumps([p['Maximum'] for p in sorted(r['Datapoints'], key=lambda p: p['Timestamp'])]))
"""


def reports(h: Booted) -> list[float]:
    """Every BackupResult the host reported to CloudWatch (moto), oldest first: 0 ok, 1 warning, 2 failed."""
    settings = h.stack.settings
    values: list[float] = json.loads(h.guest.aws(URL, REPORTS.format(region=settings.region, stack=settings.stack)))
    return values


def reported_run(h: Booted, label: str) -> tuple[dict[str, Any], list[float]]:
    """One run of the backup unit; its status and the CloudWatch reports it made."""
    before = reports(h)
    status = run_backup(h, label)
    return status, reports(h)[len(before):]


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


# S3 away, CloudWatch still reachable (two endpoints on AWS; one moto here).
CLOUDWATCH = f"AWS_ENDPOINT_URL_CLOUDWATCH=http://127.0.0.1:{MOTO_PORT}\n"


def test_failed_backup_is_recorded_and_the_next_run_succeeds(backuphost: Booted) -> None:
    h = backuphost
    env_file = "/etc/orgmail/host.env"
    good = h.guest.read_file(env_file).decode()
    away = good.replace(f"127.0.0.1:{MOTO_PORT}", "127.0.0.1:5999") + CLOUDWATCH  # nothing listens there
    assert away != good
    h.sh(f"cat > {env_file} <<'EOF'\n{away}EOF")
    try:
        status = run_backup(h, "failed backup")
    finally:
        h.sh(f"cat > {env_file} <<'EOF'\n{good}EOF")
    assert status["unit_rc"] != 0 and status["backup"]["result"] == "failed", status
    assert "unreachable" in status["backup"]["error"], status
    failed = h.sh("systemctl is-failed orgmail-backup.service").stdout.strip()
    assert failed == "failed"  # visible on the host, too

    status, sent = reported_run(h, "backup after recovery")
    assert status["unit_rc"] == 0 and status["backup"]["result"] == "ok", status
    assert sent == [0], sent
    assert reports(h)[-2:] == [2, 0]  # the failure was reported off the host (moto kept it), then the recovery


def test_incomplete_snapshot_is_a_warning(backuphost: Booted) -> None:
    """restic exits 3 when it could not read some files: the snapshot is incomplete, not "ok"."""
    h = backuphost
    # A file even root cannot read (a write-only sysctl), inside a backed-up path.
    h.sh("touch /etc/orgmail/unreadable && mount --bind /proc/sys/vm/drop_caches /etc/orgmail/unreadable",
         ).check_returncode()
    try:
        assert h.sh("cat /etc/orgmail/unreadable").returncode != 0
        status, sent = reported_run(h, "backup with an unreadable file")
    finally:
        h.sh("umount /etc/orgmail/unreadable; rm -f /etc/orgmail/unreadable")
    assert status["backup"]["result"] == "warning", status
    assert "/etc/orgmail/unreadable" in status["backup"]["error"], status
    assert status["backup"].get("snapshot_id"), status  # the snapshot exists, it is just incomplete
    assert sent == [1], sent


TARPIT = "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 5998)); s.listen(64); time.sleep(3600)"


def test_run_killed_by_its_timeout_is_a_failure(backuphost: Booted) -> None:
    """S3 accepts connections and never answers; systemd kills the run at its TimeoutStartSec. The
    previous "ok" must not stand."""
    h = backuphost
    assert json.loads(h.guest.read_file(STATUS))["backup"]["result"] in ("ok", "warning")
    env_file = "/etc/orgmail/host.env"
    good = h.guest.read_file(env_file).decode()
    h.sh(f"systemd-run --unit=s3-tarpit python3 -c \"{TARPIT}\"").check_returncode()
    h.sh("mkdir -p /run/systemd/system/orgmail-backup.service.d && printf '[Service]\\nTimeoutStartSec=8s\\n' "
         "> /run/systemd/system/orgmail-backup.service.d/timeout.conf && systemctl daemon-reload").check_returncode()
    h.sh(f"cat > {env_file} <<'EOF'\n{good.replace(f'127.0.0.1:{MOTO_PORT}', '127.0.0.1:5998')}{CLOUDWATCH}EOF")
    try:
        before = reports(h)
        status = run_backup(h, "backup killed by its timeout")
        sent = reports(h)[len(before):]
        result = h.sh("systemctl show -P Result orgmail-backup.service").stdout.strip()
    finally:
        h.sh(f"cat > {env_file} <<'EOF'\n{good}EOF")
        h.sh("rm -r /run/systemd/system/orgmail-backup.service.d; systemctl daemon-reload; systemctl stop s3-tarpit")
    assert result == "timeout"
    assert status["unit_rc"] != 0 and status["backup"]["result"] == "failed", status
    assert "timeout" in status["backup"]["error"], status
    assert sent == [2], sent


def test_backup_refuses_when_the_mail_volume_is_not_mounted(backuphost: Booted) -> None:
    """/srv/mail without its volume is an empty directory on the root disk: never back that up."""
    h = backuphost
    before = reports(h)
    # In a mount namespace of its own, so the running services keep their volume.
    res = h.sh("unshare --mount --propagation private sh -c 'umount -l /srv/mail && /usr/local/sbin/orgmail-backup'",
               timeout=300)
    status = json.loads(h.guest.read_file(STATUS))
    assert res.returncode != 0, res.stdout
    assert status["backup"]["result"] == "failed" and "not mounted" in status["backup"]["error"], status
    assert reports(h)[len(before):] == [2]
    assert h.sh("mountpoint -q /srv/mail").returncode == 0  # the host itself still has it


MAILBOX_STATE = """
import imaplib, json, poplib, re, ssl, sys
user, password = sys.argv[1:3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
imap = imaplib.IMAP4_SSL('127.0.0.1', 993, ssl_context=ctx, timeout=60)
imap.login(user, password)
imap.select('INBOX', readonly=True)
validity = int(imap.response('UIDVALIDITY')[1][0])
_, data = imap.uid('FETCH', '1:*', '(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
uids = []
for item in data:
    if isinstance(item, tuple):
        subject = item[1].decode().strip().removeprefix('Subject: ')
        uids.append([int(re.search(rb'UID (\\d+)', item[0]).group(1)), subject])
imap.logout()
pop = poplib.POP3_SSL('127.0.0.1', 995, context=ctx, timeout=60)
pop.user(user)
pop.pass_(password)
uidls = []
for line in pop.uidl()[1]:
    number, uidl = line.decode().split()
    headers = [h.decode() for h in pop.top(int(number), 0)[1]]
    uidls.append([uidl, next(h[9:] for h in headers if h.startswith('Subject: '))])
pop.quit()
print(json.dumps({'uidvalidity': validity, 'imap': uids, 'pop3': uidls}))
"""


def mailbox_state(h: Booted, user: str) -> dict[str, Any]:
    """INBOX as IMAP (UIDVALIDITY, UID and subject of each message in order) and POP3 (UIDL and subject)
    clients see it."""
    res = h.guest.in_guest_net([sys.executable, "-c", MAILBOX_STATE, user, h.stack.passwords[user]], timeout=120)
    assert res.returncode == 0, res.stderr
    state: dict[str, Any] = json.loads(res.stdout)
    return state


def test_restore_keeps_newer_mail_and_uid_state(backuphost: Booted) -> None:
    """Issue 16 item 2: m1-m3, back up, m4 and m5, expunge m4 (and m2, so that there is something to
    restore), restore the mailbox. Messages restored get new UIDs; nothing newer is touched."""
    h = backuphost
    tag = f"uid{int(time.time())}"
    subjects = {n: f"{tag} m{n}" for n in range(1, 6)}
    for n in (1, 2, 3):
        deliver(h, BOB, subjects[n])
        wait_for(lambda n=n: subjects[n] in [s for _, s in mailbox_state(h, BOB)["imap"]], 90, subjects[n])
    assert run_backup(h, "backup before the UID test")["backup"]["result"] == "ok"
    for n in (4, 5):
        deliver(h, BOB, subjects[n])
        wait_for(lambda n=n: subjects[n] in [s for _, s in mailbox_state(h, BOB)["imap"]], 90, subjects[n])
    before = mailbox_state(h, BOB)
    for n in (4, 2):
        h.sh(f"doveadm expunge -u {BOB} mailbox INBOX header Subject '{subjects[n]}'").check_returncode()
    uid = {s: u for u, s in before["imap"]}
    uidl = {s: u for u, s in before["pop3"]}

    res = h.sh(f"orgmail-restore mailbox {BOB}", timeout=600)  # the whole mailbox, as in the issue
    assert res.returncode == 0, res.stderr
    after = mailbox_state(h, BOB)

    assert after["uidvalidity"] == before["uidvalidity"]
    uids = [u for u, _ in after["imap"]]
    assert uids == sorted(set(uids)), after["imap"]  # strictly increasing, unique
    now = {s: u for u, s in after["imap"]}
    assert sorted(s for _, s in after["imap"] if s.startswith(tag)) == [subjects[n] for n in (1, 2, 3, 5)]
    for n in (1, 3, 5):  # present all along: same UID, not duplicated
        assert now[subjects[n]] == uid[subjects[n]], (n, before, after)
    assert now[subjects[2]] > max(uid.values()), (before, after)  # restored: a new UID, never a reused one
    # The older messages other tests left in this INBOX kept their UIDs too.
    kept = set(now) & set(uid) - {subjects[2]}
    assert {s: now[s] for s in kept} == {s: uid[s] for s in kept}
    uidls = [u for u, _ in after["pop3"]]
    assert len(uidls) == len(set(uidls)), after["pop3"]
    pop = {s: u for u, s in after["pop3"]}
    assert pop[subjects[5]] == uidl[subjects[5]]  # a POP3 client that has m5 does not see it again
    assert pop[subjects[2]] not in uidl.values()  # and it does download the restored m2


def test_restore_of_one_folder_brings_back_only_its_missing_messages(backuphost: Booted) -> None:
    """`orgmail-restore mailbox ADDRESS FOLDER`: only that folder, only what is missing from it (matched by GUID),
    each message once; the folder's other messages keep their UIDs and other folders are untouched."""
    h = backuphost
    tag = f"folder{int(time.time())}"
    h.guest.exec(["doveadm", "mailbox", "create", "-u", ANN, f"Projects/{tag}"], check=True)
    for n in (1, 2, 3):
        h.sh(f"printf 'From: {OUTSIDE}\\nSubject: {tag} f{n}\\n\\nkept in a folder\\n' | "
             f"doveadm save -u {ANN} -m Projects/{tag}").check_returncode()
    h.sh(f"printf 'Subject: {tag} inbox\\n\\nstays\\n' | doveadm save -u {ANN} -m INBOX").check_returncode()
    assert run_backup(h, "backup before the folder test")["backup"]["result"] == "ok"

    def folder() -> dict[str, str]:
        out = h.guest.exec(["doveadm", "-f", "flow", "fetch", "-u", ANN, "uid hdr.subject", "mailbox",
                            f"Projects/{tag}", "all"], check=True).stdout
        return dict(re.findall(r"uid=(\d+) hdr\.subject=(.*)", out))

    before = folder()
    h.sh(f"doveadm expunge -u {ANN} mailbox Projects/{tag} header Subject '{tag} f2' && "
         f"doveadm expunge -u {ANN} mailbox INBOX header Subject '{tag} inbox'").check_returncode()
    res = h.sh(f"orgmail-restore mailbox {ANN} Projects/{tag}", timeout=600)
    assert res.returncode == 0, res.stderr
    assert "1 messages restored" in res.stdout, res.stdout
    after = folder()
    assert sorted(after.values()) == sorted(before.values()), (before, after)
    kept = {u: s for u, s in before.items() if not s.endswith("f2")}
    assert {u: after[u] for u in kept} == kept  # the others keep their UIDs
    assert max(int(u) for u, s in after.items() if s.endswith("f2")) > max(int(u) for u in before)
    assert not h.guest.exec(["doveadm", "search", "-u", ANN, "mailbox", "INBOX", "header", "Subject",
                             f"{tag} inbox"]).stdout.strip(), "INBOX was restored too"
    assert h.sh(f"orgmail-restore mailbox {ANN} Projects/{tag}", timeout=600).stdout.count("0 messages restored") == 1


BAD_RESTORES = [
    ["..@example.org"],
    [".@example.org"],
    ["ann@.."],
    ["nobody@example.org"],
    ["ann@example.org", ".."],
    ["ann@example.org", "."],
    ["ann@example.org", "../../bob"],
    ["ann@example.org", "Sent/../.."],
    ["ann@example.org", "INBOX", "--help"],
]


def test_restore_accepts_only_real_mailboxes_and_folders(backuphost: Booted) -> None:
    h = backuphost
    before = {user: raw_messages(h, user) for user in (ANN, BOB)}
    for args in BAD_RESTORES:
        res = h.guest.exec(["orgmail-restore", "mailbox", *args], timeout=300)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "restored" not in res.stdout, args
        assert re.search(r"not a mailbox|not a folder|not a snapshot", res.stderr), (args, res.stderr)
    assert {user: raw_messages(h, user) for user in (ANN, BOB)} == before


PASSWORDS_PART = "/orgmail/e2e/mailbox-passwords/part-000"


def test_sync_fails_closed_without_password_hashes(backuphost: Booted) -> None:
    """The password-hash parameter missing while mailboxes exist: the sync refuses, and the users
    file (everyone's login) stays as it was."""
    h = backuphost
    users = h.guest.read_file("/etc/dovecot/orgmail-users")
    assert users.count(b"{BLF-CRYPT}") == 2
    h.guest.aws(URL, f"boto3.client('ssm', endpoint_url=endpoint, region_name={h.stack.settings.region!r})"
                     f".delete_parameter(Name={PASSWORDS_PART!r})")
    try:
        res = h.sh("orgmail-sync")
    finally:
        put_parameters(h.guest, URL, h.stack.run, h.stack.settings.region, h.stack.host)
    assert res.returncode != 0 and "password" in res.stderr, (res.stdout, res.stderr)
    assert h.guest.read_file("/etc/dovecot/orgmail-users") == users
    assert raw_messages(h, ANN)  # logins still work
    assert h.sh("orgmail-sync").returncode == 0


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


RECOVERY_STACK, RECOVERY_REGION = "e2edr", "eu-west-1"


def plan_recovery_stack() -> PlannedStack:
    """The same organisation as a new stack in another region: new bucket, SSM path, restic password,
    DKIM key and initial passwords; the same mail host name and mailboxes."""
    config = {**stack_config("dev"), "orgmail:region": RECOVERY_REGION}
    run = run_program(config, RECOVERY_STACK, bcrypt_cost=PROVIDER_BCRYPT_COST)
    settings = load_settings(raw_from_pulumi_config(config), RECOVERY_STACK)
    volume_id = run.one("aws:ebs/volume:Volume", "mail-data").id
    bucket = run.one("aws:s3/bucket:Bucket", "backup-bucket").id
    host = dataclasses.replace(host_config(settings, settings.mail_host, "mailbox", volume_id, bucket),
                               **HOST_OVERRIDES)
    return PlannedStack(settings, run, host, user_data_text(run.one("aws:ec2/instance:Instance", "mail-instance").inputs))


def snapshot_ids(h: Booted) -> list[str]:
    return [s["id"] for s in json.loads(h.sh("orgmail-restore snapshots --json").stdout)]


UNDELETE = """
import datetime
s3 = boto3.client('s3', endpoint_url=endpoint, region_name={region!r})
pages = s3.get_paginator('list_object_versions').paginate(Bucket={bucket!r}, Prefix='restic/')
since = datetime.datetime.fromisoformat({since!r})
# Only the markers the attacker made: restic's own earlier deletes (locks, pruned data) stay deleted.
markers = [(m['Key'], m['VersionId']) for p in pages for m in p.get('DeleteMarkers', [])
           if m['IsLatest'] and m['LastModified'] >= since]
for key, version in markers if {undelete!r} else []:
    s3.delete_object(Bucket={bucket!r}, Key=key, VersionId=version)  # an admin's right, not the host's
print(json.dumps(len(markers)))
"""


def test_a_delete_by_the_host_leaves_the_backups_restorable(backuphost: Booted) -> None:
    """What a compromised mailbox host can do to its backups with its own rights: delete every object
    of the repository. On the versioned bucket (as the stack makes it) that only adds delete markers;
    an admin removes them (docs/backups.md) and every snapshot restores. The host's role cannot delete
    versions (explicit deny; moto does not enforce IAM, so that half is proven on the policy in
    tests/unit/test_roles.py)."""
    h = backuphost
    bucket, region = h.stack.host.backup_bucket or "", h.stack.settings.region

    def versions(since: datetime.datetime, undelete: bool = False) -> int:
        code = UNDELETE.format(region=region, bucket=bucket, since=since.isoformat(), undelete=undelete)
        return int(json.loads(h.guest.aws(URL, code)))

    deliver(h, ANN, "survives a hostile delete")
    wait_for(lambda: any(b"survives a hostile delete" in m for m in raw_messages(h, ANN)), 90, "the message")
    assert run_backup(h, "backup before the delete")["backup"]["result"] == "ok"
    kept = snapshot_ids(h)

    time.sleep(2)  # the incident starts after restic's own last delete
    incident = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    wiped = h.sh("set -a; . /etc/orgmail/host.env; aws s3 rm --recursive --region \"$REGION\" "
                 "\"s3://$BACKUP_BUCKET/restic\"", timeout=300)
    assert wiped.returncode == 0 and "delete:" in wiped.stdout, wiped.stderr
    assert h.sh("orgmail-restore snapshots --json", timeout=120).returncode != 0  # the repository is gone
    assert versions(incident) > 0  # ... as far as a reader of current objects can tell

    assert versions(incident, undelete=True) > 0
    listed = h.sh("orgmail-restore snapshots --json", timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [s["id"] for s in json.loads(listed.stdout)] == kept
    h.sh("doveadm expunge -u ann@example.org mailbox INBOX all", timeout=60).check_returncode()
    res = h.sh("orgmail-restore mailbox ann@example.org", timeout=600)
    assert res.returncode == 0, res.stderr
    assert any(b"survives a hostile delete" in m for m in raw_messages(h, ANN))


def test_region_recovery_on_a_fresh_host(backuphost: Booted, tmp_path: Any) -> None:
    """Disaster recovery as docs/backups.md tells it: a new stack in another region (new host, blank
    data volume, new bucket, new restic password) gets the old repository copied into its bucket. Mail
    arrives before anyone restores; the nightly backup runs before the restore and must refuse; the
    admin adds the new password as a key with the old one (kept offline), restores, and every mailbox
    is back over IMAPS, next to the mail that arrived meanwhile; logins and DKIM use the new stack's."""
    a = backuphost
    assert run_backup(a, "backup before disaster")["backup"]["result"] == "ok"
    expected = {user: raw_messages(a, user) for user in (ANN, BOB)}
    old_snapshots = snapshot_ids(a)
    old_password = a.guest.read_file("/etc/orgmail/restic-password").decode().strip()
    dump = str(tmp_path / "bucket")
    a.guest.aws(URL, DOWNLOAD.format(dump=dump, bucket=a.stack.host.backup_bucket or ""))  # the copy outlives the region

    new = plan_recovery_stack()
    bucket = new.host.backup_bucket or ""
    assert bucket != a.stack.host.backup_bucket and new.settings.ssm_path != a.stack.settings.ssm_path

    def serve(guest: harness.BootedHost) -> None:
        endpoint = guest.start_moto(MOTO_PORT)
        put_parameters(guest, endpoint, new.run, new.settings.region, new.host)
        # The mock engine's "random" password is the same in every stack; a real new stack's is not.
        guest.aws(endpoint, f"boto3.client('ssm', endpoint_url=endpoint, region_name={RECOVERY_REGION!r})"
                            f".put_parameter(Name={new.settings.ssm_path + '/backup/restic-password'!r}, "
                            "Value='a-new-stacks-own-restic-password', Type='SecureString', Overwrite=True)")
        guest.create_bucket(endpoint, bucket)
        guest.aws(endpoint, UPLOAD.format(dump=dump, bucket=bucket), timeout=300)

    ports = {25, 465, 993, 11332}
    with booted_mailbox_host(new, "recoveryhost", serve, ports) as b:
        assert not b.status["errors"]
        assert b.guest.read_file("/etc/orgmail/restic-password").decode().strip() != old_password
        meanwhile = "arrived before the restore"
        deliver(b, ANN, meanwhile)
        wait_for(lambda: any(meanwhile.encode() in m for m in raw_messages(b, ANN)), 90, "mail before the restore")

        res = b.guest.exec(["orgmail-restore", "add-key"], input=old_password + "\n", timeout=300)
        assert res.returncode == 0, (res.stdout, res.stderr)

        # The nightly backup comes before the restore: refused, the old snapshots untouched.
        status, sent = reported_run(b, "backup before the restore")
        assert status["unit_rc"] != 0 and status["backup"]["result"] == "failed", status
        assert "orgmail-restore all" in status["backup"]["error"], status
        assert sent == [2]
        assert snapshot_ids(b) == old_snapshots

        started = time.monotonic()
        res = b.sh("orgmail-restore all", timeout=900)
        TIMINGS["full restore on a fresh host"] = round(time.monotonic() - started, 1)
        assert res.returncode == 0, res.stderr
        assert old_snapshots[-1][:8] in res.stdout and "mail.example.org" in res.stdout, res.stdout  # what it restores
        wait_for(lambda: ports <= b.guest.listening_ports(), 240, "services back after the restore")
        assert raw_messages(b, BOB) == expected[BOB]
        got = raw_messages(b, ANN)
        assert [m for m in got if meanwhile.encode() not in m] == expected[ANN]
        assert len(got) == len(expected[ANN]) + 1  # the mail that arrived meanwhile is still there

        subject = "signed after the restore"
        session = b.probe("smtp", port=465, mode="tls", source=new_client(),
                          login=[ANN, new.passwords[ANN]], mail_from=ANN, rcpts=[BOB],
                          data=message(ANN, BOB, subject))
        assert last_code(session) == 250, session
        signed = wait_for(lambda: next((m for m in raw_messages(b, BOB) if subject.encode() in m), None), 60,
                          "the signed message")
        published = new.dkim_txt.encode()
        assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: published), "DKIM does not verify"

        status, sent = reported_run(b, "first backup after the restore")
        assert status["backup"]["result"] == "ok" and sent == [0], status
        after = snapshot_ids(b)
        assert after[0] == old_snapshots[0] and after[-1] == status["backup"]["snapshot_id"], (old_snapshots, after)
