"""Issue 17 items 4, 5 and 9: the mail volume is formatted only when proven blank and grows with its
EBS volume (orgmail-volume); a reload orgmail-sync owes stays pending until it succeeds.

The booted proofs are tests/e2e/test_volume.py; these test the decisions and the bookkeeping."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from components.userdata import render_files, ssm_files
from tests.unit.test_backup import _host_script
from tests.unit.test_userdata import MAILBOX, RELAY

MIB = 1024 * 1024


V = _host_script("orgmail/volume.py", "orgmail_volume")


def unreadable() -> bytes:
    raise V.VolumeError("cannot read it ([Errno 5] Input/output error)")


# --- item 5: format only a volume proven blank ------------------------------------------------

def test_blank_volume_is_formatted() -> None:
    v = V
    assert v.decide(2, {}, lambda: bytes(2 * MIB)) == "format"


def test_our_file_system_is_mounted_without_reading_further() -> None:
    v = V
    assert v.decide(0, {"TYPE": "ext4", "LABEL": "orgmail-data"}, unreadable) == "mount"


def test_read_error_is_never_taken_for_blank() -> None:
    """blkid answers "nothing found" (exit 2) when it cannot read the device at all."""
    v = V
    with pytest.raises(v.VolumeError, match="cannot read it"):
        v.decide(2, {}, unreadable)


@pytest.mark.parametrize("where", [0, 4096, MIB - 1, MIB, 2 * MIB - 1])
def test_unknown_non_zero_data_is_not_formatted(where: int) -> None:
    v = V
    edges = bytearray(2 * MIB)
    edges[where] = 0x5A
    with pytest.raises(v.VolumeError, match="holds data no probe recognises"):
        v.decide(2, {}, lambda: bytes(edges))


@pytest.mark.parametrize(("rc", "found", "message"), [
    (0, {"TYPE": "xfs"}, "holds xfs, not ext4"),
    (0, {"TYPE": "crypto_LUKS"}, "holds crypto_LUKS, not ext4"),
    (0, {"PTTYPE": "gpt"}, "holds a gpt partition table"),
    (0, {}, "holds a signature"),
    (4, {}, r"blkid cannot probe it \(exit 4\)"),
    (8, {}, r"blkid cannot probe it \(exit 8\)"),  # ambivalent: more than one signature
])
def test_anything_else_is_refused_unread(rc: int, found: dict[str, str], message: str) -> None:
    v = V
    with pytest.raises(v.VolumeError, match=message):
        v.decide(rc, found, unreadable)


def test_edges_are_the_first_and_last_mib(tmp_path: Path) -> None:
    v = V
    disk = tmp_path / "disk"
    with disk.open("wb") as f:
        f.truncate(64 * MIB)
    assert v.read_edges(str(disk)) == bytes(2 * MIB)
    with disk.open("r+b") as f:
        f.seek(64 * MIB - 1)
        f.write(b"\x01")  # a RAID or backup GPT label lives at the end
    assert v.read_edges(str(disk)).strip(b"\0") == b"\x01"
    small = tmp_path / "small"
    small.write_bytes(bytes(MIB))
    with pytest.raises(v.VolumeError, match="only 1048576 bytes"):
        v.read_edges(str(small))


def test_unreadable_device_is_an_error_not_blank(tmp_path: Path) -> None:
    v = V
    with pytest.raises(v.VolumeError, match="cannot read it .*refusing to format it"):
        v.read_edges(str(tmp_path / "absent"))
    with pytest.raises(v.VolumeError, match="cannot read it .*Is a directory"):
        v.read_edges(str(tmp_path))


def test_command_fails_loudly_and_formats_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A probe that finds nothing on a device that cannot be read: exit 1, a message, and no mkfs."""
    v = V
    disk = tmp_path / "disk"
    with disk.open("wb") as f:
        f.truncate(64 * MIB)
    ran: list[list[str]] = []

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 2 if cmd[0] == "blkid" else 0, "", "")

    monkeypatch.setattr(v.subprocess, "run", run)
    def pread(fd: int, n: int, offset: int) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(v.os, "pread", pread)
    monkeypatch.setattr(v.os.path, "ismount", lambda path: False)
    assert v.main(["orgmail-volume", "prepare", str(disk)]) == 1
    assert [c[0] for c in ran] == ["blkid"]
    err = capsys.readouterr().err
    assert "cannot read it ([Errno 5] Input/output error), so it is not proven blank: refusing to format it" in err


# --- item 4: grow with the volume --------------------------------------------------------------

def test_grows_only_by_a_real_size_change() -> None:
    v = V
    gib = 1024 * MIB
    assert v.needs_growth(100 * gib, 50 * gib)
    assert v.needs_growth(51 * gib, 50 * gib)
    assert not v.needs_growth(50 * gib, 50 * gib)
    assert not v.needs_growth(50 * gib + 4 * MIB, 50 * gib)  # the tail ext4 cannot use


def test_every_host_prepares_and_grows_its_volume() -> None:
    """Both roles get orgmail-volume and its boot unit through SSM; the bootstrap runs it after
    orgmail-sync --boot wrote it, and enables the boot unit; it formats nothing itself."""
    for host in (MAILBOX, RELAY):
        files = ssm_files(host.role)
        assert "/usr/local/sbin/orgmail-volume" in files and files["/usr/local/sbin/orgmail-volume"]["mode"] == "0755"
        unit = files["/etc/systemd/system/orgmail-volume.service"]["content"]
        assert "ExecStart=/usr/local/sbin/orgmail-volume grow" in unit and "RequiresMountsFor=/srv/mail" in unit
        boot = {f.path: f.content for f in render_files(host)}["/usr/local/sbin/orgmail-bootstrap"]
        assert "mkfs" not in boot and "blkid" not in boot
        assert "enable --now orgmail-sync.timer orgmail-volume.service" in boot


# --- item 9: a reload owed is kept until it succeeds -------------------------------------------

class FakeSystemctl:
    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        failed = cmd[0] == "systemctl" and cmd[2] in self.failing
        return subprocess.CompletedProcess(cmd, 1 if failed else 0, "", "Job failed." if failed else "")

    def reloads(self) -> list[str]:
        return [c[2] for c in self.calls if c[:2] == ["systemctl", "try-reload-or-restart"]]


def sync_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[ModuleType, FakeSystemctl]:
    sync = _host_script("orgmail/sync.py", "orgmail_sync")
    fake = FakeSystemctl()
    monkeypatch.setattr(sync.subprocess, "run", fake)
    monkeypatch.setattr(sync, "PENDING", tmp_path / "reload-pending")
    monkeypatch.setattr(sync, "LOCK", tmp_path / "orgmail-sync.lock")
    return sync, fake


def test_failed_reload_stays_pending_until_it_succeeds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sync, fake = sync_with(monkeypatch, tmp_path)
    fake.failing = {"postfix.service"}
    failed = sync.reload({"postfix", "rspamd"})
    assert failed == ["reload of postfix failed, kept pending: Job failed."]
    assert sorted(p.name for p in sync.PENDING.iterdir()) == ["postfix"]
    fake.calls.clear()
    assert len(sync.reload(set())) == 1  # still failing: kept
    assert fake.reloads() == ["postfix.service"] and (sync.PENDING / "postfix").exists()
    fake.failing = set()
    fake.calls.clear()
    assert sync.reload(set()) == []  # nothing changed this run: the owed reload is made all the same
    assert fake.reloads() == ["postfix.service"] and not list(sync.PENDING.iterdir())
    fake.calls.clear()
    assert sync.reload(set()) == [] and fake.reloads() == []  # and only once


def test_unknown_names_are_dropped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sync, fake = sync_with(monkeypatch, tmp_path)
    assert sync.reload({"postsrsd", "unknown"}) == []
    assert fake.reloads() == ["postsrsd.service"]
    assert not list(sync.PENDING.iterdir())


def test_what_was_written_before_an_error_is_reloaded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A run that fails half-way (here after Postfix's maps) still reloads what it wrote, and the
    error is recorded: the next run would find the files unchanged and owe nothing."""
    sync, fake = sync_with(monkeypatch, tmp_path)
    monkeypatch.setattr(sync, "STATUS", tmp_path / "sync-status.json")
    monkeypatch.setattr(sync, "LAST_OK", tmp_path / "sync-ok")
    monkeypatch.setattr(sync, "host_env", lambda: {"ROLE": "mailbox", "SSM_PATH": "/orgmail/t"})
    monkeypatch.setattr(sync, "fetch", lambda env: {"config": "{}", "files/mailbox": "{}"})
    monkeypatch.setattr(sync, "refuse_incomplete", lambda env, params: None)

    def apply(env: dict[str, str], params: dict[str, str], changed: set[str]) -> None:
        changed.add("postfix")
        raise RuntimeError("sievec failed")

    monkeypatch.setattr(sync, "apply", apply)
    monkeypatch.setattr(sync.sys, "argv", ["orgmail-sync"])
    assert sync.main() == 1
    assert fake.reloads() == ["postfix.service"]
    assert ["/usr/local/sbin/orgmail-volume", "grow"] in fake.calls
    assert json.loads(sync.STATUS.read_text())["error"] == "sievec failed"


def test_certificate_reloads_are_kept_pending_too() -> None:
    """The deploy hook's reloads after a renewal: certbot runs it once per certificate, so a failed
    reload would serve the old certificate until it expired."""
    for host, services in ((MAILBOX, "postfix dovecot"), (RELAY, "postfix")):
        hook = {f.path: f.content for f in render_files(host)}["/usr/local/sbin/orgmail-cert-deploy"]
        assert f"for s in {services}; do" in hook
        assert "p=/var/lib/orgmail/reload-pending\n" in hook
        assert hook.index("touch $p/$s") < hook.index("systemctl try-reload-or-restart $s.service && rm -f $p/$s")


def test_a_marker_another_process_removed_meanwhile_is_no_error(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """The certificate hook reloads Postfix and removes its marker while orgmail-sync is reloading
    it too (a CI run failed on FileNotFoundError from exactly that): the reload is done, not failed."""
    sync, fake = sync_with(monkeypatch, tmp_path)

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        (sync.PENDING / cmd[2].removesuffix(".service")).unlink()  # the other process's rm -f
        return fake(cmd, **kwargs)

    monkeypatch.setattr(sync.subprocess, "run", run)
    assert sync.reload({"postfix", "unknown"}) == []
    assert fake.reloads() == ["postfix.service"] and not list(sync.PENDING.iterdir())


def test_runs_of_orgmail_sync_take_turns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The timer's run and an administrator's never write and reload at once: the second waits until
    the first has ended (a CI run failed when a manual run and the timer's removed each other's markers)."""
    sync, fake = sync_with(monkeypatch, tmp_path)
    monkeypatch.setattr(sync, "STATUS", tmp_path / "sync-status.json")
    monkeypatch.setattr(sync, "LAST_OK", tmp_path / "sync-ok")
    monkeypatch.setattr(sync, "host_env", lambda: {"ROLE": "mailbox", "SSM_PATH": "/orgmail/t"})
    monkeypatch.setattr(sync, "fetch", lambda env: {"config": '{"admin": {"ssmSessionManager": false}}',
                                                      "files/mailbox": "{}"})
    monkeypatch.setattr(sync, "refuse_incomplete", lambda env, params: None)
    monkeypatch.setattr(sync, "apply", lambda env, params, changed: changed.add("postfix"))
    monkeypatch.setattr(sync, "apply_ssm_agent", lambda env, wanted: None)
    monkeypatch.setattr(sync.sys, "argv", ["orgmail-sync"])
    other = os.open(sync.LOCK, os.O_RDWR | os.O_CREAT)  # another run holds the lock
    fcntl.flock(other, fcntl.LOCK_EX)
    results: list[int] = []
    second = threading.Thread(target=lambda: results.append(sync.main()))
    second.start()
    second.join(2)
    assert second.is_alive() and fake.calls == [] and not sync.STATUS.exists()  # waiting, nothing done
    os.close(other)  # the first run ends
    second.join(30)
    assert results == [0]
    assert fake.reloads() == ["postfix.service"]
    assert json.loads(sync.STATUS.read_text())["result"] == "ok"
