"""Issue 18, migration: orgmail-import on the booted mailbox host copies users' mail from a second, real Dovecot
acting as the old provider (tests/e2e/oldimap.py: IMAPS only, a test CA's certificate, its own network
namespace): every folder, message, flag and keyword arrives, a re-run copies only what is new, and bad input,
an unreachable or untrusted server and a too-small quota are refused, each with a clear message.

The pure parts (CSV, validation, the imapc configuration, doveadm's answers) are tested in
tests/unit/test_import.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e import harness
from tests.e2e.oldimap import GUEST_IPV4, OLD_HOST, OLD_IPV4, OldProvider, fetch_state, message
from tests.e2e.overrides import MOTO_PORT, put_parameters
from tests.e2e.test_mailhost import ANN, BOB, Booted, booted_mailbox_host, plan_test_stack, wait_for

pytestmark = pytest.mark.e2e

# Old logins and passwords. Ann's password holds what CSV must quote (comma, quotes) and what Dovecot would
# otherwise expand (%{user}) or read as a comment (#): it must reach the old server unchanged.
OLD_ANN, OLD_ANN_PASSWORD = "ann.old@old.example", 'p%{user} "q" #x,y'
OLD_BOB, OLD_BOB_PASSWORD = "bob", "bob-old-secret"
CA_FILE = "/root/old-ca.pem"
CSV_FILE = "/root/users.csv"


def fetch(user: str) -> list[str]:
    """doveadm's arguments for every message of `user`: folder, Message-ID and flags (oldimap.fetch_state)."""
    return ["-f", "tab", "fetch", "-u", user, "mailbox hdr.message-id flags", "all"]


def csv_line(*cells: str) -> str:
    return ",".join('"' + c.replace('"', '""') + '"' for c in cells) + "\n"


USERS_CSV = "address,login,password\n" + csv_line(ANN, OLD_ANN, OLD_ANN_PASSWORD) + csv_line(BOB, OLD_BOB,
                                                                                               OLD_BOB_PASSWORD)


@dataclass
class Migration:
    host: Booted
    old: OldProvider

    def write_csv(self, text: str, path: str = CSV_FILE, mode: str = "600") -> None:
        self.host.guest.exec(["sh", "-c", f"umask 077 && cat > {path} && chmod {mode} {path}"], input=text, check=True)

    def run_import(self, *args: str, csv: str = CSV_FILE) -> subprocess.CompletedProcess[str]:
        return self.host.guest.exec(["orgmail-import", "--host", OLD_HOST, *args, csv], timeout=300)

    def new_state(self, user: str) -> list[tuple[str, str, frozenset[str]]]:
        return fetch_state(self.host.guest.exec(["doveadm", *fetch(user)], check=True).stdout)

    def old_state(self, login: str) -> list[tuple[str, str, frozenset[str]]]:
        return fetch_state(self.old.doveadm(*fetch(login)).stdout)

    def imported(self, user: str, login: str) -> tuple[list[tuple[str, str, frozenset[str]]], list[tuple[str, str, frozenset[str]]]]:
        """(the old server's messages, the orgmail mailbox's messages with those Message-IDs), both sorted:
        equal when every message arrived once, in its folder, with its flags (other mail here is ignored:
        root's mail goes to the admin, ann)."""
        old = self.old_state(login)
        ids = {message_id for _, message_id, _ in old}
        return old, [row for row in self.new_state(user) if row[1] in ids]


@pytest.fixture(scope="module")
def migration() -> Iterator[Migration]:
    harness.require_e2e()
    stack = plan_test_stack()

    def serve_parameters(guest: harness.BootedHost) -> None:
        put_parameters(guest, guest.start_moto(MOTO_PORT), stack.run, stack.settings.region, stack.host)

    with booted_mailbox_host(stack, "import", serve_parameters, {993}) as booted, \
            OldProvider(booted.guest, {OLD_ANN: OLD_ANN_PASSWORD, OLD_BOB: OLD_BOB_PASSWORD}) as old:
        guest = booted.guest
        guest.exec(["sh", "-c", f"echo '{OLD_IPV4} {OLD_HOST}' >> /etc/hosts"], check=True)
        guest.exec(["sh", "-c", f"cat > {CA_FILE}"], input=old.ca_pem, check=True)
        # The old mailboxes: folders (one nested), system flags and a keyword.
        old.save(OLD_ANN, "INBOX", message("m1@old.example", "read"), "\\Seen")
        old.save(OLD_ANN, "INBOX", message("m2@old.example", "flagged"), "\\Flagged $Important")
        old.save(OLD_ANN, "INBOX", message("m3@old.example", "answered"), "\\Answered \\Seen")
        old.save(OLD_ANN, "INBOX", message("m4@old.example", "unread"))
        old.save(OLD_ANN, "Sent", message("s1@old.example", "sent", sender=OLD_ANN), "\\Seen")
        old.save(OLD_ANN, "Archive/2025", message("a1@old.example", "archived"), "\\Seen \\Flagged")
        old.save(OLD_BOB, "INBOX", message("b1@old.example", "bob's"), "\\Seen")
        old.save(OLD_BOB, "Receipts", message("r1@old.example", "receipt"))
        migration = Migration(booted, old)
        migration.write_csv(USERS_CSV)
        try:
            yield migration
        except BaseException:
            print(f"e2e: the old provider's log:\n{old.log()[-3000:]}")
            raise


def assert_clear(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"


def test_bad_input_is_refused_with_its_line_and_what_is_valid(migration: Migration) -> None:
    before = migration.new_state(ANN)
    migration.write_csv(USERS_CSV, "/root/readable.csv", mode="644")
    assert_clear(migration.run_import(csv="/root/readable.csv"), 2,
                 "must be owned by root and readable by nobody else", "mode 0644", "chmod 600 /root/readable.csv")
    migration.write_csv("address,login\nann@example.org,ann\n", "/root/bad.csv")
    assert_clear(migration.run_import(csv="/root/bad.csv"), 2, "/root/bad.csv line 1: must name the columns "
                 "address,login,password")
    migration.write_csv(USERS_CSV + csv_line("not an address", "x", "y"), "/root/bad.csv")
    assert_clear(migration.run_import(csv="/root/bad.csv"), 2, "/root/bad.csv line 4: address 'not an address' "
                 "must be an orgmail mailbox like ann@example.org", "nothing was copied")
    migration.write_csv(USERS_CSV + csv_line("carl@example.org", "carl", "y"), "/root/bad.csv")
    assert_clear(migration.run_import(csv="/root/bad.csv"), 2, "line 4: carl@example.org is not a mailbox on "
                 "this host", "ann@example.org, bob@example.org")
    assert_clear(migration.run_import("--port", "99999"), 2, "--port '99999' must be a TCP port")
    assert_clear(migration.run_import("--ca-file", "/root/missing.pem"), 2, "--ca-file /root/missing.pem: cannot read it")
    assert migration.new_state(ANN) == before  # nothing was copied


def test_an_unreachable_or_untrusted_server_stops_before_copying(migration: Migration) -> None:
    before = migration.new_state(ANN)
    assert_clear(migration.run_import("--ca-file", CA_FILE, "--port", "994"), 1,
                 f"cannot reach {OLD_HOST}:994 (Connection refused)")
    # Verified against the system CAs by default: the old provider's private CA is not among them.
    assert_clear(migration.run_import(), 1, "certificate is not trusted here", "--ca-file")
    # A name its certificate does not carry.
    migration.host.guest.exec(["sh", "-c", f"echo '{OLD_IPV4} other.old.example' >> /etc/hosts"], check=True)
    res = migration.host.guest.exec(["orgmail-import", "--host", "other.old.example", "--ca-file", CA_FILE, CSV_FILE])
    assert_clear(res, 1, "certificate does not name --host")
    migration.write_csv("address,login,password\n" + csv_line(ANN, OLD_ANN, "wrong"), "/root/wrong.csv")
    assert_clear(migration.run_import("--ca-file", CA_FILE, csv="/root/wrong.csv"), 1,
                 "FAILED: ann@example.org (old login ann.old@old.example): the old server refused this login",
                 "nothing copied")
    assert migration.new_state(ANN) == before
    assert GUEST_IPV4  # the guest's side of the link (oldimap.py)


def test_check_lists_the_old_mailboxes_and_copies_nothing(migration: Migration) -> None:
    before = migration.new_state(ANN)
    assert_clear(migration.run_import("--ca-file", CA_FILE, "--check"), 0,
                 f"ok: {ANN} (old login {OLD_ANN}): login ok; 3 folders, 6 messages",
                 "Archive/2025 1, INBOX 4, Sent 1", f"ok: {BOB} (old login {OLD_BOB}): login ok; 2 folders, 2 messages",
                 "summary: checked 2 of 2 users")
    assert migration.new_state(ANN) == before


def test_every_folder_message_and_flag_arrives(migration: Migration) -> None:
    res = migration.run_import("--ca-file", CA_FILE)
    assert_clear(res, 0, f"ok: {ANN} (old login {OLD_ANN}): 6 messages copied",
                 f"ok: {BOB} (old login {OLD_BOB}): 2 messages copied", "summary: 8 messages copied for 2 of 2 users")
    for user, login in ((ANN, OLD_ANN), (BOB, OLD_BOB)):
        old, new = migration.imported(user, login)
        assert len(old) == (6 if user == ANN else 2)
        assert new == old
        old_folders = set(migration.old.doveadm("-f", "tab", "mailbox", "list", "-u", login).stdout.split()[1:])
        new_folders = set(migration.host.guest.exec(["doveadm", "-f", "tab", "mailbox", "list", "-u", user],
                                                    check=True).stdout.split()[1:])
        assert old_folders <= new_folders, (old_folders, new_folders)
    assert ("Archive/2025", "<a1@old.example>", frozenset({"\\Seen", "\\Flagged"})) in migration.new_state(ANN)
    assert ("INBOX", "<m2@old.example>", frozenset({"\\Flagged", "$Important"})) in migration.new_state(ANN)
    # The run's private files (login, password, configuration) are gone.
    assert not migration.host.guest.exec(["sh", "-c", "ls -d /run/orgmail-import.* 2>/dev/null"]).stdout


def test_a_rerun_copies_only_what_is_new(migration: Migration) -> None:
    ann_before = migration.new_state(ANN)
    migration.old.save(OLD_ANN, "INBOX", message("m5@old.example", "new since"), "\\Flagged")
    migration.old.doveadm("flags", "add", "-u", OLD_ANN, "\\Seen", "mailbox", "INBOX", "header", "Message-ID",
                          "<m4@old.example>")
    res = migration.run_import("--ca-file", CA_FILE)
    assert_clear(res, 0, f"ok: {ANN} (old login {OLD_ANN}): 1 messages copied into 1 folders (0 new here)",
                 f"ok: {BOB} (old login {OLD_BOB}): 0 messages copied", "summary: 1 messages copied for 2 of 2 users")
    old, new = migration.imported(ANN, OLD_ANN)
    assert new == old  # m5 once, m4 now \Seen there too, nothing twice
    ann_after = migration.new_state(ANN)
    assert len(ann_after) == len(ann_before) + 1
    assert sorted(r[1] for r in ann_after if r[1] not in {b[1] for b in ann_before}) == ["<m5@old.example>"]
    assert len({r[1] for r in ann_after}) == len(ann_after)  # no Message-ID twice


def set_users_file(guest: harness.BootedHost, text: str, bob_quota: str | None) -> None:
    """Dovecot's users file as orgmail-sync writes it, and wait until Dovecot answers from it (it re-reads a
    changed file only when it last looked more than a second before)."""
    guest.exec(["sh", "-c", "cat > /etc/dovecot/orgmail-users.new && mv /etc/dovecot/orgmail-users.new "
                "/etc/dovecot/orgmail-users && doveadm auth cache flush"], input=text, check=True)

    def answered() -> bool:
        guest.exec(["doveadm", "auth", "cache", "flush"], check=True)
        fields = guest.exec(["doveadm", "-f", "tab", "user", "-f", "quota_storage_size", BOB], check=True).stdout
        return (bob_quota or "") == "".join(fields.splitlines()[1:]).strip()

    wait_for(answered, 30, f"Dovecot to see bob's quota {bob_quota}")


def test_an_old_mailbox_bigger_than_the_quota_is_not_copied(migration: Migration) -> None:
    """Dovecot does not enforce quota on a sync's saves (`doveadm sync` filled a 1 KiB quota 3 times over when
    tried), so orgmail-import refuses a user whose old mailbox does not fit, and says what to do."""
    guest = migration.host.guest
    migration.old.save(OLD_BOB, "INBOX", message("b2@old.example", "big " + "x" * 4000))
    bob_before = migration.new_state(BOB)
    with guest.sync_paused():
        users = guest.read_file("/etc/dovecot/orgmail-users").decode()
        # bob's extra fields (unlimited: userdb_quota_ignore=yes) replaced by a 2 KiB quota.
        small = "".join((":".join(line.split(":", 7)[:7] + ["userdb_quota_storage_size=2k"])
                         if line.startswith(f"{BOB}:") else line) + "\n" for line in users.splitlines())
        assert small != users and f"{BOB}:" in users, users.count("\n")
        try:
            set_users_file(guest, small, "2k")
            migration.write_csv("address,login,password\n" + csv_line(BOB, OLD_BOB, OLD_BOB_PASSWORD), "/root/bob.csv")
            res = migration.run_import("--ca-file", CA_FILE, csv="/root/bob.csv")
        finally:
            set_users_file(guest, users, None)
    assert_clear(res, 1, f"FAILED: {BOB} (old login {OLD_BOB}): 2 folders, 3 messages",
                 "more than its quota of 2.0 KiB: nothing copied; raise its quota",
                 f"summary: 0 messages copied for 0 of 1 users; failed: {BOB}")
    assert migration.new_state(BOB) == bob_before
