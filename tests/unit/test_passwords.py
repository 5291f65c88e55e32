"""Self-service passwords (issue 18): orgmail-passwd (webmail's password changes), the users' own passwords
kept by orgmail-sync until the admin resets one, and initial passwords refused to mail clients."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import bcrypt
import pytest

from components.secrets import host_config
from components.settings import load_settings
from components.userdata import ssm_files
from components.webmail import CLOUDFLARED_SHA256, CLOUDFLARED_URL, CLOUDFLARED_VERSION
from tests.unit.conftest import ROOT, host_script, raw_config

ANN, BOB = "ann@example.org", "bob@example.org"
CONFIGURED = {ANN: "{BLF-CRYPT}$2y$10$" + "a" * 53, BOB: "{BLF-CRYPT}$2y$10$" + "b" * 53}
MAILBOXES = [{"address": ANN, "quota": "1G"}, {"address": BOB, "quota": ""}]


def sync() -> ModuleType:
    return host_script("sync.py")


def passwd() -> ModuleType:
    return host_script("passwd.py")


def users_of(text: str) -> dict[str, str]:
    return {line.split(":")[0]: line.split(":")[1] for line in text.splitlines()}


# --- orgmail-sync: whose password counts ------------------------------------------------------------


def test_a_users_own_password_counts_until_the_admin_resets_it() -> None:
    s = sync()
    own = {ANN: {"hash": "{BLF-CRYPT}$2b$10$own", "replaces": s.fingerprint(CONFIGURED[ANN])}}
    users, _, initial = s.dovecot_users(MAILBOXES, CONFIGURED, own, require_change=True)
    assert users_of(users) == {ANN: "{BLF-CRYPT}$2b$10$own", BOB: CONFIGURED[BOB]}
    assert initial == f"{BOB}\n"  # bob still has the configured one: webmail only, until he changes it
    # The admin's reset: a new hash in the configuration replaces ann's own, and hers is initial again.
    reset = {**CONFIGURED, ANN: "{BLF-CRYPT}$2y$10$" + "c" * 53}
    users, _, initial = s.dovecot_users(MAILBOXES, reset, own, require_change=True)
    assert users_of(users)[ANN] == reset[ANN] and initial == f"{ANN}\n{BOB}\n"
    assert s.current_own_passwords(own, reset) == {}
    # Without the requirement (or without webmail) nobody is initial, and own passwords still count.
    users, _, initial = s.dovecot_users(MAILBOXES, CONFIGURED, own, require_change=False)
    assert users_of(users)[ANN] == "{BLF-CRYPT}$2b$10$own" and initial == ""
    # A mailbox that is gone takes its own password along.
    assert s.current_own_passwords(own, {BOB: CONFIGURED[BOB]}) == {}


def test_a_shared_mailbox_is_never_initial_and_never_takes_a_password() -> None:
    s = sync()
    shared = [{"address": "desk@example.org", "quota": "", "sharedWith": [ANN]}, *MAILBOXES]
    users, _, initial = s.dovecot_users(shared, CONFIGURED, {}, require_change=True)
    assert users_of(users)["desk@example.org"] == "" and "desk@" not in initial


def test_sync_writes_the_initial_list_and_prunes_what_no_longer_holds(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    s = sync()
    store = tmp_path / "passwords.json"
    own = {ANN: {"hash": "{BLF-CRYPT}$2b$10$own", "replaces": s.fingerprint(CONFIGURED[ANN])},
           "gone@example.org": {"hash": "x", "replaces": "y"}}
    store.write_text(json.dumps(own))
    monkeypatch.setattr(s, "OWN_PASSWORDS", store)
    assert s.own_passwords() == own
    kept = s.current_own_passwords(s.own_passwords(), CONFIGURED)
    assert list(kept) == [ANN]
    store.unlink()
    assert s.own_passwords() == {}  # no file (no volume yet, or nobody changed): the configured ones


def test_the_passdb_refuses_an_initial_password_to_anything_but_webmail() -> None:
    lua = ssm_files("mailbox")["/etc/dovecot/orgmail-passdb.lua"]["content"]
    assert 'local INITIAL = "/etc/dovecot/orgmail-initial"' in lua
    verify = lua.split("function auth_password_verify(req, password)", 1)[1]
    # Only after the password matched, and answered as an expired password (IMAP: NO [EXPIRED]).
    matched = verify.index("if ok == 1 then")
    assert matched < verify.index("if not webmail(req.remote_ip) and initial(req.user) then") < \
        verify.index("PASSDB_RESULT_PASS_EXPIRED")


# --- orgmail-passwd -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("new", "problem"), [
    ("short-1A", "at least 12 characters"),
    ("ann-is-my-name-2026", "must not contain the user name"),
    ("same-as-before-42", "is the current one"),
    ("aaaaaaaaaaaaaaaa", "repeats too few characters"),
    ("tab\there-and-more", "control character"),
    ("ü" * 37, "fit in 72 bytes"),
])
def test_a_weak_new_password_is_refused_with_the_reason(new: str, problem: str) -> None:
    assert problem in passwd().password_problem(ANN, new, "same-as-before-42")


def test_a_good_new_password_passes() -> None:
    assert passwd().password_problem(ANN, "correct horse battery", "old-one-1234") is None


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[ModuleType, dict[str, Any]]:
    p = passwd()
    users = tmp_path / "orgmail-users"
    users.write_text("".join(f"{a}:{h}:5000:5000::/srv/mail/vmail/example.org/{a.split('@')[0]}::\n"
                             for a, h in CONFIGURED.items()) + "desk@example.org::5000:5000::/x::\n")
    initial = tmp_path / "orgmail-initial"
    initial.write_text(f"{ANN}\n{BOB}\n")
    seen: dict[str, Any] = {"auth": [], "flushed": []}
    monkeypatch.setattr(p, "USERS", users)
    monkeypatch.setattr(p, "INITIAL", initial)
    monkeypatch.setattr(p, "STORE", tmp_path / "orgmail" / "passwords.json")
    monkeypatch.setattr(p, "LOCK", str(tmp_path / "lock"))
    monkeypatch.setattr(p, "BCRYPT_COST", 4)
    monkeypatch.setattr(p.os, "chown", lambda *a: None)

    def auth(user: str, password: str) -> str:
        seen["auth"].append((user, password))
        return "ok" if password == "the-right-one" else "fail"

    monkeypatch.setattr(p, "dovecot_auth", auth)
    monkeypatch.setattr(p.subprocess, "run", lambda cmd, **kw: seen["flushed"].append(cmd))
    return p, seen


def request(p: ModuleType, monkeypatch: pytest.MonkeyPatch, path: str, **form: str) -> tuple[int, str]:
    import urllib.parse

    body = urllib.parse.urlencode(form).encode()
    raw = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    out = io.BytesIO()
    monkeypatch.setattr(p.sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    monkeypatch.setattr(p.sys, "stdout", io.TextIOWrapper(out))
    p.main()
    head, _, text = out.getvalue().decode().partition("\r\n\r\n")
    return int(head.split()[1]), text.strip()


def test_a_change_takes_effect_at_once_and_is_kept_with_what_it_replaced(
        host: tuple[ModuleType, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    p, seen = host
    assert request(p, monkeypatch, "/initial", user=ANN, curpass="the-right-one") == (200, "initial")
    status, text = request(p, monkeypatch, "/change", user=ANN, curpass="the-right-one", newpass="correct horse battery")
    assert (status, text) == (200, "ok")
    new_hash = users_of(p.USERS.read_text())[ANN]
    assert new_hash.startswith("{BLF-CRYPT}$2b$") and bcrypt.checkpw(b"correct horse battery", new_hash[11:].encode())
    assert users_of(p.USERS.read_text())[BOB] == CONFIGURED[BOB]
    assert p.INITIAL.read_text() == f"{BOB}\n"  # mail clients take ann's new password
    store = json.loads(p.STORE.read_text())
    assert store[ANN]["hash"] == new_hash
    assert store[ANN]["replaces"] == hashlib.sha256(CONFIGURED[ANN].encode()).hexdigest()
    assert p.STORE.stat().st_mode & 0o777 == 0o600
    assert ["doveadm", "auth", "cache", "flush", ANN] in seen["flushed"]
    # A second change still names the configured hash it all replaced: the sync keeps the newest.
    request(p, monkeypatch, "/change", user=ANN, curpass="the-right-one", newpass="another good phrase")
    again = json.loads(p.STORE.read_text())[ANN]
    assert again["replaces"] == store[ANN]["replaces"] and again["hash"] != store[ANN]["hash"]
    assert request(p, monkeypatch, "/initial", user=ANN, curpass="the-right-one") == (200, "changed")
    # orgmail-sync, reading that store, gives ann her own password and bob his initial one.
    users, _, initial = sync().dovecot_users(MAILBOXES, CONFIGURED, json.loads(p.STORE.read_text()), True)
    assert users_of(users)[ANN] == again["hash"] and initial == f"{BOB}\n"


@pytest.mark.parametrize(("path", "form", "expected"), [
    ("/change", {"user": ANN, "curpass": "wrong", "newpass": "correct horse battery"},
     (403, "the current password is wrong")),
    ("/change", {"user": ANN, "curpass": "the-right-one", "newpass": "short"},
     (400, "the new password must have at least 12 characters")),
    ("/change", {"user": "desk@example.org", "curpass": "the-right-one", "newpass": "correct horse battery"},
     (403, "no such login")),
    ("/change", {"user": ANN}, (400, "user and curpass are required")),
    ("/initial", {"user": ANN, "curpass": "wrong"}, (403, "the current password is wrong")),
    ("/other", {"user": ANN, "curpass": "the-right-one"}, (404, "no such path")),
])
def test_a_refused_change_changes_nothing(host: tuple[ModuleType, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
                                          path: str, form: dict[str, str], expected: tuple[int, str]) -> None:
    p, _ = host
    before = p.USERS.read_text()
    assert request(p, monkeypatch, path, **form) == expected
    assert p.USERS.read_text() == before and not p.STORE.exists()
    assert p.INITIAL.read_text() == f"{ANN}\n{BOB}\n"


def test_a_weak_password_is_refused_before_dovecot_is_asked(host: tuple[ModuleType, dict[str, Any]],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    p, seen = host
    request(p, monkeypatch, "/change", user=ANN, curpass="the-right-one", newpass="short")
    assert seen["auth"] == []


# --- webmail on the host ---------------------------------------------------------------------------------


def test_the_host_config_carries_webmail_and_the_pinned_cloudflared() -> None:
    raw = raw_config("dev")
    assert "webmail" not in host_config(load_settings(raw, "dev"))
    raw["webmail"] = {"requirePasswordChange": False}
    web = host_config(load_settings(raw, "dev"))["webmail"]
    assert web["hostname"] == "webmail.example.org" and web["requirePasswordChange"] is False
    assert web["cloudflared"] == {"version": CLOUDFLARED_VERSION, "url": CLOUDFLARED_URL, "sha256": CLOUDFLARED_SHA256}
    assert CLOUDFLARED_URL.startswith("https://github.com/cloudflare/cloudflared/releases/download/")
    assert set(CLOUDFLARED_SHA256) == {"amd64", "arm64"}
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in CLOUDFLARED_SHA256.values())


def test_roundcube_verifies_the_hosts_certificate_and_speaks_to_loopback_only() -> None:
    s = sync()
    conf = s.roundcube_config({"productName": "Ann's Mail", "requirePasswordChange": True}, "mail.example.org",
                              "k" * 24)
    assert "include '/etc/orgmail/webmail/roundcube.inc.php';" in conf
    assert "$config['product_name'] = 'Ann\\'s Mail';" in conf  # quoted for PHP
    for key in ("imap_conn_options", "smtp_conn_options", "managesieve_conn_options"):
        assert f"$config['{key}'] = ['ssl' => ['peer_name' => 'mail.example.org', 'verify_peer' => true" in conf
    assert "$config['password_force_new_user'] = true;" in conf
    settings = ssm_files("mailbox")["/etc/orgmail/webmail/roundcube.inc.php"]["content"]
    for line in ("$config['imap_host'] = 'ssl://127.0.0.1:993';", "$config['smtp_host'] = 'ssl://127.0.0.1:465';",
                 "$config['managesieve_host'] = 'tls://127.0.0.1:4190';",
                 "$config['password_httpapi_url'] = 'http://127.0.0.1:8026/change';",
                 "$config['db_dsnw'] = 'sqlite:////srv/mail/webmail/roundcube.db?mode=0640';"):
        assert line in settings
    site = ssm_files("mailbox")["/etc/orgmail/webmail/nginx-site.conf"]["content"]
    assert [line.strip() for line in site.splitlines() if line.strip().startswith("listen")] == ["listen 127.0.0.1:8080;"]
    socket_unit = ssm_files("mailbox")["/etc/systemd/system/orgmail-passwd.socket"]["content"]
    assert "ListenStream=127.0.0.1:8026\n" in socket_unit
    tunnel = ssm_files("mailbox")["/etc/systemd/system/orgmail-tunnel.service"]["content"]
    assert "--token-file" in tunnel and "TUNNEL_TOKEN=" not in tunnel  # never on the command line
    assert not any("webmail" in path or "passwd" in path for path in ssm_files("relay"))


def test_cloudflared_is_installed_only_with_the_pinned_checksum(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    s = sync()
    monkeypatch.setattr(s, "CLOUDFLARED", tmp_path / "cloudflared")
    served = {"body": b"the real binary"}

    def fake_run(cmd: list[str], **kw: Any) -> Any:
        class Done:
            returncode, stdout, stderr = 0, "amd64\n", ""
        if cmd[0] == "curl":
            Path(cmd[cmd.index("-o") + 1]).write_bytes(served["body"])
        return Done()

    monkeypatch.setattr(s.subprocess, "run", fake_run)
    pin = {"version": "1", "url": "https://example.invalid/{version}/{arch}",
           "sha256": {"amd64": hashlib.sha256(b"the real binary").hexdigest()}}
    assert s.ensure_cloudflared(pin) is True and (tmp_path / "cloudflared").read_bytes() == b"the real binary"
    assert s.ensure_cloudflared(pin) is False  # already the pinned one
    (tmp_path / "cloudflared").unlink()
    served["body"] = b"something else"
    with pytest.raises(RuntimeError, match="is not the pinned"):
        s.ensure_cloudflared(pin)
    assert not (tmp_path / "cloudflared").exists() and not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="no pinned build for amd64"):
        s.ensure_cloudflared({**pin, "sha256": {"arm64": "0" * 64}})


def test_the_plugin_and_scripts_are_where_the_config_names_them() -> None:
    files = ssm_files("mailbox")
    plugin = files["/etc/orgmail/webmail/orgmail_password/orgmail_password.php"]["content"]
    assert "class orgmail_password extends rcube_plugin" in plugin and "http://127.0.0.1:8026/initial" in plugin
    assert "/usr/local/sbin/orgmail-passwd" in files
    assert (ROOT / "cloud-init/files/orgmail/passwd.py").read_text().startswith("#!/usr/bin/python3\n")


def test_webmails_packages_install_with_nothing_started_and_never_apache(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """Installed on a running host when webmail is turned on: Debian's nginx would serve its default site on
    port 80 as it installs, so the install runs under a policy-rc.d that starts nothing (removed after, also when
    apt fails); php-fpm is named before roundcube-core (else apt satisfies PHP with Apache's module)."""
    s = sync()
    guard = tmp_path / "policy-rc.d"
    monkeypatch.setattr(s, "POLICY_RC", guard)
    monkeypatch.setattr(s, "installed", lambda package: False)
    seen: dict[str, Any] = {}

    def fake_run(cmd: list[str], **kw: Any) -> Any:
        class Done:
            returncode, stdout, stderr = 0, "", ""
        if cmd[0] == "debconf-set-selections":
            seen["debconf"] = kw["input"]
        if cmd[0] == "apt-get":
            seen["apt"] = cmd
            seen["guarded"] = guard.exists() and guard.read_text() == "#!/bin/sh\nexit 101\n"
            Done.returncode, Done.stderr = 100, "E: no network"
        return Done()

    monkeypatch.setattr(s.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="webmail: apt-get install failed: E: no network"):
        s.apply_webmail({"webmail": {"cloudflared": {}}}, {}, set(), boot=False)
    assert seen["guarded"] and not guard.exists()
    packages = seen["apt"][seen["apt"].index("DPkg::Lock::Timeout=600") + 1:]
    assert packages.index("php-fpm") < packages.index("roundcube-core") and "apache2" not in packages
    assert "roundcube-core roundcube/dbconfig-install boolean false" in seen["debconf"]
