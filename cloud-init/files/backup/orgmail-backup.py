#!/usr/bin/python3
"""orgmail-backup: restic backups of mail, keys and config to the stack's S3 bucket, and restores
(docs/backups.md).

orgmail-backup [--check] [--adopt]: back up, forget and prune by backup.env (from SSM), check 5%
weekly. Each run ends ok, warning (restic exit 3: incomplete snapshot) or failed, in
/var/lib/orgmail/backup-status.json and as CloudWatch metric orgmail/BackupResult 0/1/2. Refused
when /srv/mail is not mounted, or when the repository holds this host's snapshots and this volume
was never backed up to it (a new host: orgmail-restore all first; --adopt backs it up as it is).
orgmail-backup env: restic's environment; finish: ExecStopPost of the unit.
A cluster shard (host.env ROLE=shard) reads its bucket and retention from SSM (its SSM_PATH) before each
run, into backup.env (a mailbox host's orgmail-sync writes them); it holds only Dovecot and mail, and
backs up, stops and restores only those.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

STATUS = Path("/var/lib/orgmail/backup-status.json")
MAIL = "/srv/mail"
VMAIL = MAIL + "/vmail"
MARK = Path(MAIL, ".orgmail-repository")  # the repository this volume is backed up to
PATHS = ["/etc/postfix", "/etc/dovecot", "/etc/rspamd", "/etc/orgmail", "/etc/letsencrypt",
         MAIL, "/var/lib/rspamd", "/var/lib/redis"]
# The live queue changes under restic (a vanished file makes an incomplete snapshot) and is never
# restored: an old queue would deliver its mail a second time.
EXCLUDES = [MAIL + "/lost+found", MAIL + "/postfix", "/etc/orgmail/restic-password",
            "/etc/orgmail/acme.json", "/var/lib/rspamd/*.hs*"]  # hyperscan caches: rspamd rebuilds them
# certbot's state: on the volume, linked at /etc/letsencrypt (a link restic keeps as a link). Users' own
# passwords (orgmail-passwd) and webmail's database: on the volume too.
RESTORE = [VMAIL, "/var/lib/rspamd", "/var/lib/redis", MAIL + "/letsencrypt", "/etc/orgmail/tls",
           MAIL + "/orgmail", MAIL + "/webmail"]
SERVICES = ["postfix", "dovecot", "rspamd", "redis-server"]
# A cluster shard holds mail and Dovecot only (its Postfix, rspamd and Redis are the edges').
SHARD_PATHS = ["/etc/dovecot", "/etc/orgmail", MAIL]
SHARD_SERVICES = ["dovecot"]
RESULTS = ["ok", "warning", "failed"]
LOCK_WAIT = "2h"  # within the unit's 6 hours
USAGE = ("usage: orgmail-restore snapshots [ARGS] | mailbox ADDRESS [FOLDER] [SNAPSHOT] | all [SNAPSHOT] | add-key"
         " | migrate [SNAPSHOT] (the old repository's password on stdin)")
# Another stack's repository (a single host's, moving to a cluster), copied into this stack's bucket under
# this prefix: `orgmail-restore migrate` brings its mailboxes over (docs/cluster.md, "Migration").
MIGRATION_PREFIX = "migration"


class Refused(Exception):
    pass


def read_env(path):
    p = Path(path)
    return dict(x.split("=", 1) for x in p.read_text().splitlines() if "=" in x and x[0] != "#") if p.exists() else {}


BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
KEEP_RANGES = {"keepDaily": (1, 365), "keepWeekly": (0, 520), "keepMonthly": (0, 240)}


def backup_settings(bucket, keep):
    """backup.env's lines from a cluster shard's parameters `backup-bucket` and `backup/keep` (JSON), checked
    whole: nothing in them can reach restic's command line or the file but a bucket name and numbers."""
    if not BUCKET_RE.fullmatch(bucket):
        raise RuntimeError(f"backup-bucket in SSM is not an S3 bucket name: {bucket[:70]!r}")
    values = json.loads(keep)
    if not isinstance(values, dict) or set(values) != set(KEEP_RANGES):
        raise RuntimeError(f"backup/keep in SSM must name exactly {sorted(KEEP_RANGES)}")
    for key, (low, high) in KEEP_RANGES.items():
        if type(values[key]) is not int or not low <= values[key] <= high:
            raise RuntimeError(f"backup/keep in SSM: {key} must be a whole number {low}-{high}")
    return "".join([f"BACKUP_BUCKET={bucket}\n"] +
                   [f"KEEP_{k[4:].upper()}={values[k]}\n" for k in KEEP_RANGES])


def refresh_cluster_settings(host):
    """A shard: its bucket and retention from SSM into backup.env; the last ones kept if SSM cannot answer."""
    names = [f"{host['SSM_PATH']}/backup-bucket", f"{host['SSM_PATH']}/backup/keep"]
    env = {**os.environ, **{k: v for k, v in host.items() if k.startswith("AWS_")}}
    proc = subprocess.run(["aws", "ssm", "get-parameters", "--region", host["REGION"], "--names", *names,
                           "--with-decryption", "--output", "json"], env=env, capture_output=True, text=True,
                          timeout=120)
    path = Path("/etc/orgmail/backup.env")
    try:
        if proc.returncode:
            raise RuntimeError(f"SSM: {proc.stderr.strip()[-300:]}")
        found = {p["Name"]: p["Value"] for p in json.loads(proc.stdout)["Parameters"]}
        if set(found) != set(names):
            raise RuntimeError(f"SSM has no {sorted(set(names) - set(found))}")
        text = backup_settings(found[names[0]], found[names[1]])
    except (RuntimeError, ValueError, KeyError) as e:
        if not path.exists():
            raise
        print(f"orgmail-backup: warning: the last backup settings kept: {e}", file=sys.stderr)
        return
    path.with_suffix(".new").write_text(text)
    os.replace(path.with_suffix(".new"), path)


def restic_env():
    host = read_env("/etc/orgmail/host.env")
    if host.get("ROLE") == "shard":
        if not read_env("/etc/orgmail/backup.env").get("BACKUP_BUCKET"):  # before the first backup: a restore
            refresh_cluster_settings(host)
        host["BACKUP_BUCKET"] = read_env("/etc/orgmail/backup.env").get("BACKUP_BUCKET", "")
    if not host.get("BACKUP_BUCKET"):
        raise RuntimeError("no BACKUP_BUCKET in /etc/orgmail/host.env (a shard: in backup.env, from SSM)")
    # On EC2 restic takes the instance role's credentials from IMDS; in tests host.env has AWS_*.
    endpoint = host.get("AWS_ENDPOINT_URL") or f"https://s3.{host['REGION']}.amazonaws.com"
    env = {k: v for k, v in host.items() if k.startswith("AWS_")}
    env.update(ENDPOINT=endpoint, RESTIC_REPOSITORY=f"s3:{endpoint}/{host['BACKUP_BUCKET']}/restic",
               RESTIC_PASSWORD_FILE="/etc/orgmail/restic-password", AWS_DEFAULT_REGION=host["REGION"],
               RESTIC_CACHE_DIR="/var/cache/restic", HOSTNAME=host.get("HOSTNAME") or socket.getfqdn(),
               STACK=host["STACK"])
    return env


def shard():
    return read_env("/etc/orgmail/host.env").get("ROLE") == "shard"


def paths():
    return [p for p in (SHARD_PATHS if shard() else PATHS) if Path(p).exists()]


def services():
    """The mail services this host runs, in their stop order."""
    return SHARD_SERVICES if shard() else SERVICES


def run(env, *args, ok=(0,), timeout=6 * 3600):
    proc = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in ok:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return proc


def restic(env, *args, ok=(0,)):
    return run(env, "restic", *args, ok=ok)


def snapshots(env, *ids, any_host=False):  # this host's (or with any_host, the repository's), oldest first
    hosts = [] if any_host else ["--host", env["HOSTNAME"]]
    return json.loads(restic(env, "snapshots", "--json", *hosts, "--tag", "orgmail", *ids).stdout)


def repository_id(env):
    proc = restic(env, "cat", "config", ok=(0, 10))  # 10: no repository
    return json.loads(proc.stdout)["id"] if proc.returncode == 0 else ""


def save_status(status):
    STATUS.parent.mkdir(parents=True, exist_ok=True)
    STATUS.with_suffix(".new").write_text(json.dumps(status, indent=1) + "\n")
    os.replace(STATUS.with_suffix(".new"), STATUS)


def report(env, result):
    # By stack (a mailbox host's alarms) and by stack and host (each cluster shard's).
    data = [{"MetricName": "BackupResult", "Dimensions": dimensions, "Value": RESULTS.index(result)}
            for dimensions in ([{"Name": "Stack", "Value": env["STACK"]}],
                               [{"Name": "Stack", "Value": env["STACK"]}, {"Name": "Host", "Value": env["HOSTNAME"]}])]
    try:
        run(env, "aws", "cloudwatch", "put-metric-data", "--namespace", "orgmail", "--region",
            env["AWS_DEFAULT_REGION"], "--metric-data", json.dumps(data), timeout=120)
    except (RuntimeError, subprocess.SubprocessError) as e:
        print(e, file=sys.stderr)


def reachable(endpoint):
    """Fail fast when S3 cannot be reached: restic itself retries for many minutes."""
    url = urlsplit(endpoint)
    for attempt in range(3):
        try:
            return socket.create_connection((url.hostname, url.port or 443), timeout=10).close()
        except OSError as e:
            if attempt == 2:
                raise RuntimeError(f"S3 endpoint {endpoint} unreachable: {e}") from e
            time.sleep(10)


def backup(env, adopt):
    if not os.path.ismount(MAIL):
        raise Refused(f"{MAIL} is not mounted")
    reachable(env["ENDPOINT"])
    repo = repository_id(env)
    if not repo:
        restic(env, "init")
        repo = repository_id(env)
    restic(env, "unlock")  # locks left by a killed run
    snaps = snapshots(env)
    # A new host's volume (empty, or only the mail since) must never become "latest".
    if snaps and not adopt and not (MARK.exists() and MARK.read_text().strip() == repo):
        raise Refused(f"this volume was never backed up to repository {repo[:8]} ({len(snaps)} snapshots): "
                      "orgmail-restore all first, or orgmail-backup --adopt")
    if not shard():
        subprocess.run(["redis-cli", "save"], capture_output=True, timeout=300)  # consistent dump.rdb
    out = restic(env, "backup", "--json", "--retry-lock", LOCK_WAIT, "--tag", "orgmail", "--host", env["HOSTNAME"],
                 *(f"--exclude={e}" for e in EXCLUDES), *paths(), ok=(0, 3))
    MARK.write_text(repo + "\n")
    summary = next(m for m in map(json.loads, out.stdout.splitlines()) if m.get("message_type") == "summary")
    keep = read_env("/etc/orgmail/backup.env")
    # A cluster's shards share the repository: one's prune (an exclusive lock) waits for another's backup.
    restic(env, "forget", "--prune", "--retry-lock", LOCK_WAIT, "--tag", "orgmail", "--host", env["HOSTNAME"],
           *(x for k in ("DAILY", "WEEKLY", "MONTHLY") for x in (f"--keep-{k.lower()}", keep.get(f"KEEP_{k}", "7"))))
    result = {k: summary[k] for k in ("snapshot_id", "data_added", "data_blobs", "files_new", "files_changed",
                                      "files_unmodified", "total_files_processed") if k in summary}
    if out.returncode == 3:  # some files could not be read
        result.update(result="warning", error=f"incomplete snapshot: {out.stderr.strip()[-400:]}")
    return result


def main_backup(args):
    status = json.loads(STATUS.read_text()) if STATUS.exists() else {}
    started = time.time()
    status["backup"] = {"time": int(started), "result": "running"}  # if killed: "failed" (finish)
    save_status(status)
    env = {}
    try:
        host = read_env("/etc/orgmail/host.env")
        if host.get("ROLE") == "shard":
            refresh_cluster_settings(host)
        env = restic_env()
        status["backup"] = {"time": int(started), "result": "ok", **backup(env, "--adopt" in args),
                            "seconds": round(time.time() - started, 1)}
        print(f"orgmail-backup: {json.dumps(status['backup'])}")
        result = status["backup"]["result"]
        if "--check" in args or time.time() - status.get("check", {}).get("time", 0) > 7 * 86400:
            status["check"] = {"time": int(time.time()), "result": "failed"}
            restic(env, "check", "--retry-lock", LOCK_WAIT, "--read-data-subset=5%")
            status["check"]["result"] = "ok"
    except Exception as e:  # any failure must show, on the host and off it
        result = "failed"
        status["check" if status["backup"]["result"] != "running" else "backup"].update(result=result, error=str(e))
        print(f"orgmail-backup: failed: {e}", file=sys.stderr)
    save_status(status)
    if env:
        report(env, result)
    return int(result == "failed")


def finish():
    """ExecStopPost: a run killed (timeout, signal) before it recorded its end has failed."""
    status = json.loads(STATUS.read_text())
    if status["backup"]["result"] == "running":
        status["backup"].update(result="failed", error=f"killed ({os.environ.get('SERVICE_RESULT')})")
        save_status(status)
        report(restic_env(), "failed")
    return 0


def mail_home(address):
    """A mailbox's home on the volume; nothing that leaves it."""
    if not re.fullmatch(r"[a-z0-9_+-]+(\.[a-z0-9_+-]+)*@[a-z0-9-]+(\.[a-z0-9-]+)+", address):
        raise Refused(f"not a mailbox address: {address!r}")
    local, domain = address.split("@")
    return f"{VMAIL}/{domain}/{local}"


def checked_folder(folder, dots=True):
    """A folder name that stays inside the mailbox: no empty, "." or ".." part, none that starts with a dot, no
    backslash, control or wildcard character; with dots=False (Maildir, where "." separates folders) no dot."""
    part = r"[^./\\\0-\x1f*%][^/\\\0-\x1f*%]*" if dots else r"[^./\\\0-\x1f*%]+"
    if folder not in ("", "INBOX") and not re.fullmatch(rf"{part}(/{part})*", folder):
        raise Refused(f"not a folder name: {folder!r}")
    return folder


def mail_dir(address, folder):
    """Where a mailbox ("") or one folder's messages are (sdbox: ~/mail, one directory per folder, its
    messages in dbox-Mails beside the folders below it)."""
    root = f"{mail_home(address)}/mail/mailboxes"
    return root if checked_folder(folder) == "" else f"{root}/{folder}/dbox-Mails"


def maildir(address, folder):
    """The same in a Maildir, as orgmail kept mail before sdbox (snapshots from then)."""
    home = f"{mail_home(address)}/Maildir"
    return home if checked_folder(folder, dots=False) in ("", "INBOX") else f"{home}/.{folder.replace('/', '.')}"


def pick(env, snapshot, any_host=False):
    """`latest` or a snapshot by id, of this host or with any_host of any host in the repository (a cluster's
    shards share one: a user's mail from before a move is in the old shard's snapshots)."""
    if not re.fullmatch(r"latest|[0-9a-f]{8,64}", snapshot):
        raise Refused(f"not a snapshot id: {snapshot!r}")
    found = snapshots(env, *([] if snapshot == "latest" else [snapshot]), any_host=any_host)
    if not found:
        raise RuntimeError(f"no snapshot {snapshot} of {env['HOSTNAME']}")
    s = found[-1]
    print(f"orgmail-restore: snapshot {s['short_id']} of {s['hostname']} at {s['time'][:19]}")
    return s


def in_snapshot(env, snapshot_id, path):
    return any(json.loads(n).get("path") == path
               for n in restic(env, "ls", "--json", snapshot_id, path).stdout.splitlines() if n.strip())


def names(folder):  # messages of a Maildir folder, without flags: their GUIDs
    return {n.split(":")[0] for sub in ("cur", "new") if os.path.isdir(f"{folder}/{sub}")
            for n in os.listdir(f"{folder}/{sub}")}


def dbox_messages(path):  # messages of sdbox folders below path
    return sum(1 for _, _, files in os.walk(path) for n in files if n.startswith("u."))


def doveadm_lines(*args):
    return [line for line in run({}, "doveadm", *args).stdout.splitlines() if line.strip()]


def guids(address, folder, where=()):
    """uid -> GUID of a folder's messages (`where`: doveadm's -o options for another mail location)."""
    out = {}
    for line in doveadm_lines(*where, "-f", "flow", "fetch", "-u", address, "uid guid", "mailbox", folder, "all"):
        fields = dict(f.split("=", 1) for f in line.split())
        out[int(fields["uid"])] = fields["guid"]
    return out


def live_guids(address, folder):
    """The GUIDs in a folder of the mailbox now (none if the folder is gone)."""
    if folder not in doveadm_lines("mailbox", "list", "-u", address):
        return set()
    return set(guids(address, folder).values())


def stage_folders(where, address):
    """The folders with messages in a staging area (a parent that only holds folders has none of its own)."""
    rows = doveadm_lines(*where, "-f", "tab", "mailbox", "status", "-u", address, "messages", "*")[1:]
    return [name for name, count in (row.rsplit("\t", 1) for row in rows) if int(count)]


def uid_set(uids):
    """1,3:5 for [1, 3, 4, 5]."""
    ranges, uids = [], sorted(uids)
    for uid in uids:
        if ranges and ranges[-1][1] == uid - 1:
            ranges[-1][1] = uid
        else:
            ranges.append([uid, uid])
    return ",".join(f"{a}" if a == b else f"{a}:{b}" for a, b in ranges)


def restore_mailbox(env, address, folder, snapshot):
    """Restore into a staging area and import only what is missing from the mailbox (by GUID, which
    Dovecot keeps through copies): restored mail gets new UIDs; the mailbox's UIDs, UIDVALIDITY and
    newer mail stay as they are."""
    home, src = mail_home(address), mail_dir(address, folder)
    if subprocess.run(["doveadm", "user", address], capture_output=True).returncode:
        raise Refused(f"not a mailbox: {address}")
    s = pick(env, snapshot, any_host=snapshot != "latest")  # latest: this host's
    if not in_snapshot(env, s["id"], f"{home}/mail") and in_snapshot(env, s["id"], f"{home}/Maildir"):
        return restore_from_maildir(env, address, folder, s)
    stage = tempfile.mkdtemp(prefix=".restore-", dir=MAIL)
    mail, where = f"{stage}/mail", ["-o", f"mail_path={stage}/mail"]
    try:
        restic(env, "restore", f"{s['id']}:{src}", "--target", mail + src[len(home) + len("/mail"):])
        for d, _, files in os.walk(mail):  # the backup's UID state is never used: rebuilt from the files
            for n in files:
                if n.startswith("dovecot"):
                    os.remove(f"{d}/{n}")
        run(env, "chown", "-R", "vmail:vmail", stage)
        run(env, "doveadm", *where, "force-resync", "-u", address, "*")
        restored = 0
        for name in stage_folders(where, address):
            if folder not in ("", name):
                continue
            live = live_guids(address, name)
            missing = [uid for uid, guid in guids(address, name, where).items() if guid not in live]
            if missing:
                run(env, "doveadm", "import", "-u", address, f"sdbox:{mail}", "", "mailbox", name,
                    "uid", uid_set(missing))
            restored += len(missing)
        print(f"orgmail-restore: {restored} messages restored")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def restore_from_maildir(env, address, folder, s):
    """restore_mailbox from a snapshot of the time mail was kept in Maildirs: the same, from a staging Maildir."""
    src = maildir(address, folder)
    root = f"{mail_home(address)}/Maildir"
    stage = tempfile.mkdtemp(prefix=".restore-", dir=MAIL) + "/Maildir"
    try:
        for sub in ["/cur", "/new"] if folder == "INBOX" else [""]:  # INBOX: not the folders below it
            restic(env, "restore", f"{s['id']}:{src}{sub}", "--target", stage + src[len(root):] + sub)
        restored = 0
        for d in [stage] + [e.path for e in os.scandir(stage) if e.is_dir() and e.name[0] == "."]:
            name = "INBOX" if d == stage else os.path.basename(d)[1:].replace(".", "/")
            live = live_guids(address, name)
            for n in os.listdir(d):  # the backup's UID state is never imported
                if n.startswith("dovecot") and n != "dovecot-keywords":
                    os.remove(f"{d}/{n}")
            for sub in ("tmp", "cur", "new"):
                os.makedirs(f"{d}/{sub}", exist_ok=True)
                for n in os.listdir(f"{d}/{sub}") if sub != "tmp" else []:
                    if n.split(":")[0] in live:
                        os.remove(f"{d}/{sub}/{n}")  # still in the mailbox
                    else:
                        restored += 1
        run(env, "chown", "-R", "vmail:vmail", os.path.dirname(stage))
        run(env, "doveadm", "import", "-u", address, f"maildir:{stage}", "", "all")
        print(f"orgmail-restore: {restored} messages restored")
    finally:
        shutil.rmtree(os.path.dirname(stage), ignore_errors=True)


def restore_all(env, snapshot):
    """A new host: everything in place, with the snapshot's UIDs (on a live host that would roll
    every mailbox back: restore mailboxes one by one there); then backups may run."""
    repo = repository_id(env)
    s = pick(env, snapshot)
    units = services()
    run(env, "systemctl", "stop", *units)
    for path in RESTORE:
        if any(json.loads(n).get("path") == path for n in restic(env, "ls", "--json", s["id"], path).stdout.splitlines()):
            restic(env, "restore", f"{s['id']}:{path}", "--target", path)
    count = dbox_messages(VMAIL) + sum(len(names(d)) for d, _, _ in os.walk(VMAIL) if "/Maildir" in d)
    print(f"orgmail-restore: {count} messages restored")
    # Owners by name: a rebuilt host may number its system users differently.
    for owner, path in [("vmail:vmail", VMAIL), ("redis:redis", "/var/lib/redis"),
                        ("_rspamd:_rspamd", "/var/lib/rspamd"), ("root:_rspamd", "/var/lib/rspamd/dkim"),
                        ("root:root", MAIL + "/orgmail"), ("www-data:www-data", MAIL + "/webmail")]:
        if os.path.exists(path):
            run(env, "chown", "-R", owner, path)
    if os.path.exists("/usr/local/sbin/orgmail-sync"):  # a mailbox host (a shard has no sync)
        subprocess.run(["/usr/local/sbin/orgmail-sync"])  # this stack's keys, users and maps from SSM win
    run(env, "systemctl", "start", *reversed(units))
    run(env, "doveadm", "force-resync", "-A", "*")
    # A snapshot from before sdbox: its Maildirs become sdbox now, each checked message by message.
    if run(env, "/usr/local/sbin/orgmail-convert-maildir", ok=(0, 1)).returncode:
        print("orgmail-restore: some Maildirs are not converted yet (journalctl -u orgmail-mail-format); "
              "orgmail-mail-format.service tries again", file=sys.stderr)
        run(env, "systemctl", "start", "--no-block", "orgmail-mail-format.service")
    MARK.write_text(repo + "\n")  # backups may run again
    print("orgmail-restore: done")


def migration_env(env, password):
    """restic's environment for the copied repository: this bucket's MIGRATION_PREFIX, the old password."""
    if not password:
        raise Refused("migrate: the old repository's password must come on stdin")
    bucket = env["RESTIC_REPOSITORY"].rsplit("/", 1)[0]
    moved = {k: v for k, v in env.items() if k != "RESTIC_PASSWORD_FILE"}
    return {**moved, "RESTIC_REPOSITORY": f"{bucket}/{MIGRATION_PREFIX}", "RESTIC_PASSWORD": password}


def children(env, snapshot_id, path):
    """The directories directly in `path` in a snapshot."""
    out = restic(env, "ls", "--json", snapshot_id, path).stdout
    nodes = [json.loads(line) for line in out.splitlines() if line.strip()]
    return sorted(n["name"] for n in nodes if n.get("struct_type") == "node" and n.get("type") == "dir"
                  and os.path.dirname(n.get("path", "")) == path)


def mailboxes_in(env, snapshot_id):
    """Every mailbox address in a snapshot (/srv/mail/vmail/<domain>/<local part>)."""
    return [f"{local}@{domain}" for domain in children(env, snapshot_id, VMAIL)
            for local in children(env, snapshot_id, f"{VMAIL}/{domain}")]


def migrate_mailbox(env, snapshot_id, address):
    """One mailbox from the old host's snapshot into this host's, by dsync: the old UIDs, UIDVALIDITY and flags
    kept where the mailbox is new here (IMAP and POP3 clients download nothing again); mail that arrived here
    stays; a later run adds only what is new since (one-way: nothing here is changed back or removed). The old
    host's mail is sdbox, or Maildir in a snapshot from before orgmail used sdbox."""
    home = mail_home(address)
    kind = "sdbox" if in_snapshot(env, snapshot_id, f"{home}/mail") else "maildir"
    src = f"{home}/mail" if kind == "sdbox" else maildir(address, "")
    stage = tempfile.mkdtemp(prefix=".migrate-", dir=MAIL)
    try:
        restic(env, "restore", f"{snapshot_id}:{src}", "--target", f"{stage}/mail")
        if kind == "sdbox":
            count = dbox_messages(f"{stage}/mail")
        else:
            count = sum(len(names(d)) for d, _, _ in os.walk(f"{stage}/mail"))
        run(env, "chown", "-R", "vmail:vmail", stage)
        run(env, "doveadm", "sync", "-1", "-R", "-u", address, f"{kind}:{stage}/mail")
        return count
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def migrate(env, snapshot, password):
    """Every mailbox of the old host's snapshot that this host serves (a shard: its users in the directory);
    the others are listed as skipped (another shard's, or not imported). Safe to run again until the cutover."""
    env = migration_env(env, password)
    s = pick(env, snapshot, any_host=True)
    failed, skipped, moved = [], [], 0
    for address in mailboxes_in(env, s["id"]):
        try:
            mail_home(address)
        except Refused:
            skipped.append(address)
            print(f"orgmail-restore: skipped {address!r}: not a mailbox address", file=sys.stderr)
            continue
        if subprocess.run(["doveadm", "user", address], capture_output=True).returncode:
            skipped.append(address)
            print(f"orgmail-restore: skipped {address}: not a mailbox of this host")
            continue
        try:
            n = migrate_mailbox(env, s["id"], address)
            moved += 1
            print(f"orgmail-restore: migrated {address} ({n} messages in the snapshot)")
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            failed.append(address)
            print(f"orgmail-restore: failed {address}: {e}", file=sys.stderr)
    print(f"orgmail-restore: {moved} mailboxes migrated, {len(skipped)} skipped, {len(failed)} failed")
    if failed:
        raise RuntimeError(f"migrate: {len(failed)} mailboxes failed: {' '.join(failed[:20])}")


def main():
    args = sys.argv[1:]
    cmd, rest = (args + ["", ""])[1], args[2:]
    if args == ["finish"]:
        return finish()
    if args == ["env"] or args[:1] == ["restore"]:
        env = restic_env()
        if args == ["env"]:
            return print("".join(f"{k}={v}\n" for k, v in env.items()), end="") or 0
        if cmd == "snapshots":
            rest = ["snapshots", "--host", env["HOSTNAME"], "--tag", "orgmail", *rest]
        if cmd == "add-key":  # the old password on stdin; this host's becomes a key too
            del env["RESTIC_PASSWORD_FILE"]
            rest = ["key", "add", "--new-password-file", "/etc/orgmail/restic-password"]
        if cmd in ("snapshots", "add-key"):
            os.execvpe("restic", ["restic", *rest], {**os.environ, **env})
    with open("/run/orgmail-backup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # one backup or restore at a time
        if args[:1] != ["restore"]:
            return main_backup(args)
        try:
            if cmd == "mailbox" and 1 <= len(rest) <= 3:
                restore_mailbox(env, *(rest + ["", "latest"][len(rest) - 1:]))
            elif cmd == "migrate" and len(rest) <= 1:
                migrate(env, (rest + ["latest"])[0], sys.stdin.readline().strip())
            elif cmd == "all" and len(rest) <= 1:
                restore_all(env, (rest + ["latest"])[0])
            else:
                raise Refused(USAGE)
        except Refused as e:
            print(f"orgmail-restore: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
