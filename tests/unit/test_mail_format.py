"""orgmail-convert-maildir: a Maildir left from before sdbox is removed only once every message of it is found in
the mailbox by its GUID (the booted proof: tests/e2e/test_mailhost.py
test_a_maildir_from_before_sdbox_is_converted_as_clients_saw_it)."""

import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from components.shard import render_shard_files
from tests.unit.test_backup import _host_script


def _script() -> ModuleType:
    return _host_script("dovecot/convert-maildir.py", "orgmail_convert_maildir")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    maildir = tmp_path / "vmail" / "example.org" / "ann" / "Maildir"
    for sub in ("cur", "new", "tmp", ".Sent/cur"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "cur" / "1700000000.M1P1.old:2,S").write_text("Subject: old\n\nmail\n")
    return maildir


def _fake(monkeypatch: Any, script: ModuleType, source: dict[str, set[str]], converted: dict[str, set[str]],
          user: bool = True) -> list[tuple[str, ...]]:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(script.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(
        args, 0 if user else 67, "", ""))
    def doveadm(*args: str, maildir: str | None = None) -> str:
        calls.append(args)
        return ""

    monkeypatch.setattr(script, "doveadm", doveadm)
    monkeypatch.setattr(script, "guids", lambda address, maildir=None: source if maildir else converted)
    return calls


def test_a_maildir_goes_once_every_message_is_found_in_the_mailbox(monkeypatch: Any, home: Path) -> None:
    script = _script()
    both = {"INBOX": {"1700000000.M1P1.old"}, "Sent": {"g2", "g3"}}
    calls = _fake(monkeypatch, script, both, {**both, "INBOX": both["INBOX"] | {"new-since"}})
    said = script.convert("ann@example.org", str(home))
    assert said == "ann@example.org: 3 messages in 2 folders converted"
    assert calls == [("sync", "-1", "-R", "-u", "ann@example.org", f"maildir:{home}")]
    assert not home.exists()


@pytest.mark.parametrize("converted", [
    {"INBOX": {"1700000000.M1P1.old"}, "Sent": {"g2"}},  # a message missing
    {"INBOX": {"1700000000.M1P1.old"}},  # a folder missing
    {},  # nothing there
])
def test_a_maildir_stays_when_a_message_is_not_found(monkeypatch: Any, home: Path,
                                                     converted: dict[str, set[str]]) -> None:
    script = _script()
    _fake(monkeypatch, script, {"INBOX": {"1700000000.M1P1.old"}, "Sent": {"g2", "g3"}}, converted)
    with pytest.raises(RuntimeError, match="not found after the copy, Maildir kept"):
        script.convert("ann@example.org", str(home))
    assert (home / "cur" / "1700000000.M1P1.old:2,S").exists()


def test_a_maildir_of_no_mailbox_is_left_alone(monkeypatch: Any, home: Path) -> None:
    script = _script()
    calls = _fake(monkeypatch, script, {}, {}, user=False)
    assert script.convert("gone@example.org", str(home)) == "gone@example.org: not a mailbox of this host, its Maildir kept"
    assert calls == [] and home.exists()


def test_no_copy_without_room_for_it(monkeypatch: Any, home: Path) -> None:
    script = _script()
    calls = _fake(monkeypatch, script, {}, {})
    monkeypatch.setattr(script.shutil, "disk_usage", lambda path: script.shutil._ntuple_diskusage(100, 90, 10))
    with pytest.raises(RuntimeError, match="not enough free space"):
        script.convert("ann@example.org", str(home))
    assert calls == [] and home.exists()


def test_a_failed_mailbox_fails_the_run_and_the_others_still_convert(monkeypatch: Any, tmp_path: Path) -> None:
    script = _script()
    for local in ("ann", "bob", "carol"):
        (tmp_path / "example.org" / local / "Maildir").mkdir(parents=True)
    (tmp_path / "example.org" / "dave" / "mail").mkdir(parents=True)  # sdbox only: nothing to do
    monkeypatch.setattr(script, "VMAIL", str(tmp_path))
    tried = []

    def convert(address: str, maildir: str) -> str:
        tried.append(address)
        if address.startswith("bob"):
            raise RuntimeError(f"{address}: messages not found after the copy, Maildir kept")
        return f"{address}: converted"

    monkeypatch.setattr(script, "convert", convert)
    assert script.main() == 1
    assert tried == ["ann@example.org", "bob@example.org", "carol@example.org"]


def test_every_mailbox_host_and_shard_converts_after_dovecot_starts() -> None:
    """Both kinds of host that hold mail get the converter and its unit, and start it (without waiting) once
    Dovecot runs; Dovecot itself reads sdbox only."""
    from tests.unit.test_cluster_hosts import SHARD, files
    from tests.unit.test_userdata import MAILBOX, files_of
    wanted = {"/usr/local/sbin/orgmail-convert-maildir", "/etc/systemd/system/orgmail-mail-format.service"}
    start = "systemctl start --no-block orgmail-mail-format.service"
    mailbox, shard = files_of(MAILBOX), files(render_shard_files(SHARD))
    for host in (mailbox, shard):
        assert wanted <= set(host)
        boot = host["/usr/local/sbin/orgmail-bootstrap"]
        dovecot_started = max(boot.find("systemctl restart dovecot.service"), boot.find('systemctl restart "$unit"'))
        assert boot.count(start) == 1 and boot.index(start) > dovecot_started > 0
        settings = [line for line in host["/etc/dovecot/dovecot.conf"].splitlines() if not line.startswith("#")]
        assert "mail_driver = sdbox" in settings and "mail_path = ~/mail" in settings
        assert not [line for line in settings if "maildir" in line.lower()]
    unit = mailbox["/etc/systemd/system/orgmail-mail-format.service"]
    assert "Requisite=dovecot.service" in unit and "After=dovecot.service" in unit
    assert "ConditionPathExistsGlob=/srv/mail/vmail/*/*/Maildir" in unit and "Restart=on-failure" in unit
