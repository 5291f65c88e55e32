"""Dovecot's auth cache (issue 13, defect 11): a repeated login costs no bcrypt check, and a changed
password replaces the cached one at the next orgmail-sync. The booted proof is in
tests/e2e/test_mailhost.py (test_a_repeated_login_costs_no_bcrypt_check,
test_a_changed_password_replaces_the_cached_one_at_once)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from components.userdata import ssm_files
from tests.unit.test_backup_mx import files
from tests.unit.test_rate_limits import sync_module
from tests.unit.test_userdata import MAILBOX

LUA = "/etc/dovecot/orgmail-passdb.lua"


def test_the_passdb_verifies_itself_so_the_cache_never_holds_the_bcrypt_hash() -> None:
    """A passdb that returns the hash (passwd-file) makes Dovecot cache the hash, and every cache hit
    verifies bcrypt again; a Lua passdb with auth_password_verify returns no password, so the cache
    keeps a fast hash of the password that succeeded (Dovecot 2.4 auth-request.c)."""
    conf = files(MAILBOX)["/etc/dovecot/dovecot.conf"]
    passdbs = re.findall(r"^passdb (\S+) \{", conf, re.M)
    assert passdbs == ["lua"], passdbs
    assert re.search(r"^passdb lua \{\n  lua_file = " + re.escape(LUA) + r"\n\}", conf, re.M)
    assert re.search(r"^auth_cache_size = [1-9]\d*M$", conf, re.M)
    lua = ssm_files("mailbox")[LUA]["content"]
    assert "function auth_password_verify(req, password)" in lua
    assert "function auth_passdb_lookup" not in lua  # would hand the hash to the cache
    # The cache key: one entry per login and way in (webmail on 127.0.0.1, or a mail client), so that a
    # webmail login with an initial password is never a cache hit for a mail client (orgmail-initial).
    assert 'return "%{user}\\t%{remote_ip | if(\'eq\', \'127.0.0.1\', \'webmail\', \'client\')}"' in lua
    assert 'return ip == "127.0.0.1"' in lua
    assert "req:password_verify(hash, password)" in lua
    assert LUA not in ssm_files("relay")


def test_sync_flushes_the_auth_cache_when_the_users_file_changes(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """A changed users file owes a flush of Dovecot's auth cache, kept pending until it succeeds."""
    sync = sync_module()
    monkeypatch.setattr(sync, "PENDING", tmp_path / "reload-pending")
    calls: list[list[str]] = []
    flush_works = False

    def run(cmd: list[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        failed = cmd[:2] == ["doveadm", "auth"] and not flush_works
        return subprocess.CompletedProcess(cmd, 1 if failed else 0, "", "auth socket gone" if failed else "")
    monkeypatch.setattr(sync.subprocess, "run", run)
    assert sync.reload({"dovecot-auth"}) != []  # the flush failed: owed still
    assert ["doveadm", "auth", "cache", "flush"] in calls, calls
    assert (tmp_path / "reload-pending" / "dovecot-auth").exists()
    assert not [c for c in calls if "try-reload-or-restart" in c], calls  # no service is reloaded for it
    flush_works, calls[:] = True, []
    assert sync.reload(set()) == []  # retried at the next run, then done
    assert ["doveadm", "auth", "cache", "flush"] in calls
    assert not (tmp_path / "reload-pending" / "dovecot-auth").exists()
