"""The edges' From: check (docs/cluster.md, "The edges' From: check"): rspamd's orgmail_from.lua, the single host's,
reading a map that orgmail-senders (cloud-init/files/orgmail/senders.py) writes from the directory, at rspamd's start
and every minute. Here: what the edge renders, and the script's fail-closed writing. Against a real PostgreSQL
(the export equals Postfix's smtpd_sender_login_maps, a directory down or empty keeps the last map):
tests/unit/test_directory.py, "the edges' sender map"."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from components.directory import SENDER_LOGINS_EXPORT
from components.edge import (
    EDGE_SERVICES,
    PGSQL_MAPS,
    SENDERS_MAP,
    SENDERS_QUERY,
    edge_cluster_host,
    render_edge_files,
)
from components.userdata import EC2_USER_DATA_LIMIT, cluster_user_data, compress_user_data, ssm_files
from tests.unit.conftest import host_script
from tests.unit.test_cluster_hosts import EDGE, code

senders = host_script("senders.py")
LUA = "/etc/rspamd/lua.local.d/orgmail_from.lua"


def edge_files() -> dict[str, tuple[str, str]]:
    return {f.path: (f.mode, f.content) for f in render_edge_files(EDGE)}


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in code(text).splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(key.strip(), []).append(value.strip())
    return out


# --- what the edge gets -------------------------------------------------------------------------------------


def test_the_edge_runs_the_single_hosts_from_check_on_the_map_orgmail_senders_writes() -> None:
    f = edge_files()
    mode, lua = f[LUA]
    assert mode == "0644"
    assert lua == ssm_files("mailbox")[LUA]["content"], "the same lua as the single host's"
    assert f'url = "{SENDERS_MAP}"' in lua
    mode, script = f["/usr/local/sbin/orgmail-senders"]
    assert mode == "0755" and script.startswith("#!/usr/bin/python3\n")
    # The script's paths are the edge's: the map the lua reads, the query rendered beside it, and the login
    # orgmail-bootstrap completes from the rendered .cf.in (the same login Postfix's sender check uses).
    assert f'\nMAP = "{SENDERS_MAP}"\n' in script and f'\nQUERY = "{SENDERS_QUERY}"\n' in script
    assert f'\nLOGIN = "{PGSQL_MAPS}/smtpd_sender_login_maps.cf"\n' in script
    assert f"{PGSQL_MAPS}/smtpd_sender_login_maps.cf.in" in f
    assert f[SENDERS_QUERY] == ("0644", SENDER_LOGINS_EXPORT + "\n")
    # Its directory client, beside it on the edge (and on the shards, for orgmail-authflush), requires TLS.
    assert '"/usr/local/lib/orgmail"' in script
    mode, library = f["/usr/local/lib/orgmail/orgmail_libpq.py"]
    assert mode == "0644" and "'sslmode', 'verify-full'" in library.replace('"', "'")


def test_the_map_is_refreshed_every_minute_and_before_rspamd_starts() -> None:
    f = edge_files()
    mode, timer = f["/etc/systemd/system/orgmail-senders.timer"]
    assert mode == "0644"
    t = unit_settings(timer)
    assert t["OnUnitActiveSec"] == ["1min"] and t["OnBootSec"] == ["1min"] and t["WantedBy"] == ["timers.target"]
    mode, service = f["/etc/systemd/system/orgmail-senders.service"]
    assert mode == "0644"
    s = unit_settings(service)
    assert s["ExecStart"] == ["/usr/local/sbin/orgmail-senders"] and s["Type"] == ["oneshot"]
    assert s["Before"] == ["rspamd.service"] and s["WantedBy"] == ["rspamd.service"]  # at every start of rspamd
    assert s["ProtectSystem"] == ["strict"] and s["ReadWritePaths"] == [os.path.dirname(SENDERS_MAP)]
    assert "orgmail-senders.timer" in EDGE_SERVICES  # enabled and started by the bootstrap
    boot = code(f["/usr/local/sbin/orgmail-bootstrap"][1])
    # The first export after the directory login is written and before the services (rspamd) start; a
    # directory that does not answer yet must not stop the boot.
    first = boot.index("systemctl start orgmail-senders.service || log ")
    assert boot.index("secret_file \"${query%.in}\" postfix") < first < boot.index("for unit in ")
    assert "systemctl enable orgmail-senders.service\n" in boot


def test_without_a_map_authenticated_mail_waits() -> None:
    """rspamd reads no map yet (a new edge whose directory does not answer): a 4xx for authenticated mail, never
    signed unchecked, never a bounce. orgmail-senders never writes an empty map, so empty means not read."""
    lua = edge_files()[LUA][1]
    guard = re.search(r"if not senders or senders:get_nelts\(\) == 0 then\n(.*?)\n    end\n", lua, re.S)
    assert guard and 'action = "soft reject"' in guard[1] and "return" in guard[1]
    assert lua.index("local login = task:get_user()") < guard.start() < lua.index("local why")


def test_the_edges_user_data_stays_under_ec2s_limit() -> None:
    size = len(compress_user_data(cluster_user_data(edge_cluster_host(EDGE), render_edge_files(EDGE))))
    assert size <= EC2_USER_DATA_LIMIT, size


# --- orgmail-senders' writing: atomic, only when changed, never empty -----------------------------------------


def test_a_map_is_replaced_atomically_and_only_when_it_changed(tmp_path: Path) -> None:
    target = tmp_path / "senders"
    assert senders.write(str(target), "a@example.org a@example.org\n") is True
    assert (target.stat().st_mode & 0o777) == 0o640
    inode = target.stat().st_ino
    assert senders.write(str(target), "a@example.org a@example.org\n") is False
    assert target.stat().st_ino == inode
    (tmp_path / "senders.orgmail-new").write_text("left over from a crash")
    assert senders.write(str(target), "b@example.org b@example.org\n") is True
    assert target.read_text() == "b@example.org b@example.org\n" and target.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["senders"]


def test_a_failed_write_leaves_the_old_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "senders"
    target.write_text("a@example.org a@example.org\n")

    def broken(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(senders.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        senders.write(str(target), "b@example.org b@example.org\n")
    assert target.read_text() == "a@example.org a@example.org\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["senders"]


@pytest.mark.parametrize("rows", [
    [],  # a directory without mailboxes, or the wrong database: nobody could send, so nothing is learnt
    [("a@example.org", "")],
    [("a@example.org", "b@example.org c@example.org")],
    [("a@example.org b@example.org", "b@example.org")],
    [("a@example.org\nb@example.org", "b@example.org")],
    [("A@example.org", "a@example.org")],
])
def test_an_empty_or_malformed_answer_is_refused(rows: list[tuple[str, ...]]) -> None:
    with pytest.raises(ValueError, match="the last map is kept"):
        senders.render(rows)


def test_render_is_the_single_hosts_senders_format() -> None:
    assert senders.render([("a@example.org", "a@example.org"), ("s@example.org", "a@example.org,b@example.org")]) == (
        "a@example.org a@example.org\ns@example.org a@example.org,b@example.org\n")


def test_the_login_is_read_from_postfixs_map_file_and_quoted_for_libpq() -> None:
    text = ("hosts = db.example.internal\nuser = orgmail_edge\npassword = it's\\secret\ndbname = orgmail\n"
            "query = SELECT address FROM mailboxes WHERE address = lower('%u@%d')\n")
    info = senders.conninfo(senders.login_settings(text))
    assert info == ("host='db.example.internal' user='orgmail_edge' password='it\\'s\\\\secret' dbname='orgmail' "
                    "sslmode='verify-full' sslrootcert='/etc/orgmail/directory-ca.pem' connect_timeout='10' "
                    "keepalives='1' keepalives_idle='30' "
                    "keepalives_interval='10' keepalives_count='3' application_name='orgmail-senders'")
    with pytest.raises(ValueError, match="no password"):
        senders.login_settings("hosts = h\nuser = u\ndbname = d\n")
