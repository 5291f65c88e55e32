"""A mailbox changed in the directory leaves the auth caches of the edges and shards within seconds (issue 15):
orgmail-cache-flush's plan and run with the directory and doveadm faked, and what the hosts get. The directory's
own log of changes, read over libpq as a host reads it: tests/unit/test_directory.py
(test_every_mailbox_change_is_logged_for_the_hosts_auth_caches). Booted: tests/e2e/test_cluster.py."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from components.edge import render_edge_files
from components.shard import render_shard_files
from tests.unit.conftest import host_script
from tests.unit.test_cluster_hosts import EDGE, SHARD

LOGIN = """pgsql directory.internal {
  parameters {
    dbname = orgmail
    user = shard_login
    password = Sample0Password0Only0
    sslmode = require
  }
}
"""


@pytest.fixture
def flush() -> ModuleType:
    return host_script("cache_flush.py")


def rows(*pairs: tuple[int, str]) -> list[tuple[str, ...]]:
    return [(str(i), a) for i, a in pairs]


def test_the_plan(flush: ModuleType) -> None:
    # A new host (no position): the whole cache once, then from the newest row on; an empty log: from 0.
    assert flush.plan(None, rows((7, "a@example.org"))) == (None, 7)
    assert flush.plan(None, []) == (None, 0)
    # The rows after the position, each address once, sorted.
    got = rows((5, "old@example.org"), (6, "b@example.org"), (7, "a@example.org"), (8, "b@example.org"))
    assert flush.plan(5, got) == (["a@example.org", "b@example.org"], 8)
    # Nothing new: only the newest row (the position itself) came back.
    assert flush.plan(8, rows((8, "b@example.org"))) == ([], 8)
    assert flush.plan(0, []) == ([], 0)
    # A directory made anew (its newest row older than the position): the whole cache.
    assert flush.plan(50, rows((3, "a@example.org"))) == (None, 3)
    # A shard's address changed, or too many to name: the whole cache.
    assert flush.plan(1, rows((2, "a@example.org"), (3, "*"))) == (None, 3)
    many = rows(*[(i, f"u{i}@example.org") for i in range(2, 2 + flush.FLUSH_ALL_OVER + 1)])
    assert flush.plan(1, many)[0] is None


@pytest.mark.parametrize("bad", ["a@example.org --all", "-a", "a@example.org\nb", "", "A@Example.org"])
def test_an_address_that_could_be_an_option_is_refused(flush: ModuleType, bad: str) -> None:
    with pytest.raises(ValueError, match="malformed address"):
        flush.plan(1, rows((2, bad)))


def test_the_login_from_dovecots_file(flush: ModuleType) -> None:
    settings = flush.login_settings(LOGIN)
    assert settings == {"hosts": "directory.internal", "dbname": "orgmail", "user": "shard_login",
                        "password": "Sample0Password0Only0"}
    info = flush.conninfo(settings, "orgmail-cache-flush")
    assert "sslmode='require'" in info and "application_name='orgmail-cache-flush'" in info
    with pytest.raises(ValueError, match="no password"):
        flush.login_settings(LOGIN.replace("    password = Sample0Password0Only0\n", ""))


class Doveadm:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def run(self, cmd: list[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        if self.fail:
            raise subprocess.CalledProcessError(75, cmd, "", "auth socket gone")
        return subprocess.CompletedProcess(cmd, 0, "", "")


def run_main(flush: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, answer: list[tuple[str, ...]],
             doveadm: Doveadm) -> tuple[int, list[str]]:
    login = tmp_path / "orgmail-directory.conf"
    login.write_text(LOGIN)
    queries: list[str] = []

    def fetch(info: str, query: str) -> list[tuple[str, ...]]:
        queries.append(query)
        return answer

    monkeypatch.setattr(flush, "fetch", fetch)
    monkeypatch.setattr(flush.subprocess, "run", doveadm.run)
    return flush.main(str(login), str(tmp_path / "position")), queries


def test_a_run_flushes_the_changed_users_in_batches_and_moves_on(flush: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doveadm = Doveadm()
    code, queries = run_main(flush, monkeypatch, tmp_path, rows((4, "x@example.org")), doveadm)
    assert code == 0 and doveadm.calls == [["doveadm", "auth", "cache", "flush"]]  # a new host: all, once
    assert (tmp_path / "position").read_text() == "4\n"
    assert "WHERE id > -1 " in queries[0]
    doveadm.calls.clear()
    changed = rows(*[(i, f"u{i:03}@example.org") for i in range(5, 5 + 150)])
    code, queries = run_main(flush, monkeypatch, tmp_path, changed, doveadm)
    assert code == 0 and "WHERE id > 4 " in queries[0]
    assert [len(c) - 4 for c in doveadm.calls] == [100, 50] and all(c[:4] == ["doveadm", "auth", "cache", "flush"]
                                                                   for c in doveadm.calls)
    assert (tmp_path / "position").read_text() == "154\n"
    assert "<5>orgmail-cache-flush: flushed u005@example.org" in capsys.readouterr().out
    doveadm.calls.clear()
    code, _ = run_main(flush, monkeypatch, tmp_path, rows((154, "u154@example.org")), doveadm)
    assert code == 0 and doveadm.calls == []


def test_a_failed_flush_keeps_the_position_for_the_next_run(flush: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "position").write_text("4\n")
    code, _ = run_main(flush, monkeypatch, tmp_path, rows((5, "a@example.org")), Doveadm(fail=True))
    assert code == 1 and (tmp_path / "position").read_text() == "4\n"
    assert "<3>orgmail-cache-flush: doveadm failed: auth socket gone; position 4 kept" in capsys.readouterr().err


def test_a_directory_that_does_not_answer_keeps_the_position(flush: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    (tmp_path / "position").write_text("4\n")
    login = tmp_path / "orgmail-directory.conf"
    login.write_text(LOGIN)

    def fetch(info: str, query: str) -> list[tuple[str, ...]]:
        raise RuntimeError("directory: could not connect")

    monkeypatch.setattr(flush, "fetch", fetch)
    monkeypatch.setattr(flush.subprocess, "run", lambda *a, **k: pytest.fail("doveadm ran"))
    assert flush.main(str(login), str(tmp_path / "position")) == 1
    assert (tmp_path / "position").read_text() == "4\n"


def test_edges_and_shards_run_it_every_15_seconds() -> None:
    for files in (render_edge_files(EDGE), render_shard_files(SHARD)):
        by_path = {f.path: f for f in files}
        assert by_path["/usr/local/sbin/orgmail-cache-flush"].mode == "0755"
        assert "/usr/local/lib/orgmail/orgmail_pq.py" in by_path
        timer = by_path["/etc/systemd/system/orgmail-cache-flush.timer"].content
        assert "OnUnitActiveSec=15s" in timer
        assert "LogLevelMax=notice" in by_path["/etc/systemd/system/orgmail-cache-flush.service"].content
        assert "orgmail-cache-flush.timer" in by_path["/usr/local/sbin/orgmail-bootstrap"].content
