"""Issue 18, migration: the pure parts of orgmail-import (cloud-init/files/orgmail/import.py): the users CSV,
every option's validation and its message, the Dovecot configuration a run writes, and how doveadm's answers
are read. The booted proof, against a real old Dovecot over IMAPS, is tests/e2e/test_import.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from components.userdata import HOST_FILES, render_user_data, ssm_files
from tests.unit.conftest import host_script
from tests.unit.test_userdata import MAILBOX

IMPORT: Any = host_script("import.py")
WHERE = "users.csv"


def parse(text: str) -> list[Any]:
    return list(IMPORT.parse_users_csv(text, WHERE))


def refused(text: str) -> str:
    with pytest.raises(IMPORT.UsageError) as e:
        IMPORT.parse_users_csv(text, WHERE)
    return str(e.value)


# --- the users CSV ---------------------------------------------------------------------------------

def test_csv_rows_become_users_with_their_line_numbers() -> None:
    users = parse('password,address,login\n"p,w ""q""",Ann@Example.org, ann.old \n\nx y ,bob@example.org,\n')
    assert users == [IMPORT.ImportUser("ann@example.org", "ann.old", 'p,w "q"', 2),
                     IMPORT.ImportUser("bob@example.org", "bob@example.org", "x y ", 4)]  # empty login: the address


def test_the_header_must_name_each_column_once() -> None:
    for header in ("address,login", "address,login,password,quota", "address,address,password", "email,login,password"):
        assert refused(f"{header}\nann@example.org,a,b\n") == (
            f"users.csv line 1: must name the columns address,login,password, each once, in any order; got {header!r}")
    assert refused("") == "users.csv: empty; the first line names the columns: address,login,password"
    assert refused("address,login,password\n\n") == "users.csv: no users, only the header"


def test_every_bad_line_is_reported_at_once_and_nothing_is_copied() -> None:
    text = ("address,login,password\n"
            "ann@example.org,ann,pw\n"
            "not an address,x,y\n"
            "bob@example.org,bob\n"
            "ann@example.org,ann2,pw\n"
            "carl@example.org,carl,\n"
            "dora@example.org,dora,tab\there\n"
            "eve@example.org,\x01,pw\n")
    assert refused(text).splitlines() == [
        "users.csv line 3: address 'not an address' must be an orgmail mailbox like ann@example.org",
        "users.csv line 4: 2 cells, the header has 3 (address,login,password)",
        "users.csv line 5: ann@example.org is also on line 2",
        "users.csv line 6: password must be 1-1024 characters without control characters (kept exactly, spaces too)",
        "users.csv line 7: password must be 1-1024 characters without control characters (kept exactly, spaces too)",
        "users.csv line 8: login must be 1-255 characters without control characters (or empty: the address)",
        "nothing was copied",
    ]


def test_many_bad_lines_are_summed_up() -> None:
    lines = refused("address,login,password\n" + "x,y,z\n" * 25).splitlines()
    assert len(lines) == 22 and lines[-2:] == ["... and 5 more", "nothing was copied"]


@pytest.mark.parametrize("address", ["ann", "ann@", "@example.org", "ann@example", "ann@@example.org",
                                     "-ann@example.org", "ann@exa_mple.org", "ann@example.org\nx", "änn@example.org"])
def test_addresses_are_checked_whole(address: str) -> None:
    with pytest.raises(IMPORT.UsageError, match="must be an orgmail mailbox like ann@example.org"):
        IMPORT.mailbox_address(address, "line 2")


def test_broken_csv_quoting_is_named() -> None:
    assert refused('address,login,password\nann@example.org,"ann"x,pw\n').startswith(
        "users.csv: not valid CSV (")


def test_unknown_mailboxes_are_named_with_the_ones_that_exist() -> None:
    users = parse("address,login,password\nann@example.org,a,b\ncarl@example.org,c,d\n")
    known = IMPORT.orgmail_mailboxes("ann@example.org:{BLF-CRYPT}$2y$10$x:5000:5000::/srv/mail/vmail/example.org/ann::\n"
                                "bob@example.org:{BLF-CRYPT}$2y$10$y:5000:5000::/srv/mail/vmail/example.org/bob::"
                                "userdb_quota_storage_size=2G\n")
    assert known == {"ann@example.org", "bob@example.org"}
    assert IMPORT.unknown_mailboxes(users, known, WHERE) == [
        "users.csv line 3: carl@example.org is not a mailbox on this host (mailboxes on this host: "
        "ann@example.org, bob@example.org; a new mailbox needs its entry in the stack's mailboxes and passwordHashes, "
        "then pulumi up and a sync)"]


def _stat(mode: int, uid: int = 0) -> Any:
    return SimpleNamespace(st_mode=mode, st_uid=uid)


def test_the_csv_holds_passwords_so_only_root_may_read_it() -> None:
    IMPORT.check_private("/root/users.csv", _stat(stat.S_IFREG | 0o600))
    IMPORT.check_private("/root/users.csv", _stat(stat.S_IFREG | 0o400))
    with pytest.raises(IMPORT.UsageError) as e:
        IMPORT.check_private("/root/users.csv", _stat(stat.S_IFREG | 0o644))
    assert str(e.value) == ("/root/users.csv: holds passwords, so it must be owned by root and readable by nobody else "
                            "(it is uid 0, mode 0644): chown root: /root/users.csv && chmod 600 /root/users.csv")
    with pytest.raises(IMPORT.UsageError, match="uid 1000, mode 0600"):
        IMPORT.check_private("/root/users.csv", _stat(stat.S_IFREG | 0o600, uid=1000))
    with pytest.raises(IMPORT.UsageError, match="not a regular file"):
        IMPORT.check_private("/root", _stat(stat.S_IFDIR | 0o700))


@pytest.mark.skipif(os.geteuid() != 0, reason="the file must be root's: needs root to create one")
def test_a_private_csv_file_is_read_with_its_bom(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    path.write_bytes("\ufeffaddress,login,password\nann@example.org,ann,pw\n".encode())
    path.chmod(0o600)
    assert IMPORT.read_users(str(path)) == [IMPORT.ImportUser("ann@example.org", "ann", "pw", 2)]
    path.chmod(0o640)
    with pytest.raises(IMPORT.UsageError, match="mode 0640"):
        IMPORT.read_users(str(path))


# --- the options --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [("imap.old.example", "imap.old.example"),
                                                 ("IMAP.Old-Provider.example", "imap.old-provider.example"),
                                                 ("192.0.2.7", "192.0.2.7"), ("2001:db8::7", "2001:db8::7")])
def test_good_hosts(value: str, expected: str) -> None:
    assert IMPORT.server_host(value) == expected


@pytest.mark.parametrize("value", ["", "imap old.example", "-imap.example", "imap_1.example", "imap.example.",
                                   " imap.example", "imap.example\n", "imap.example:993", "a" * 64 + ".example"])
def test_bad_hosts(value: str) -> None:
    with pytest.raises(IMPORT.UsageError) as e:
        IMPORT.server_host(value)
    assert str(e.value) == (f"--host {value!r} must be the old server's name as its certificate names it, like "
                            "imap.old-provider.example (labels of a-z, 0-9 and inner '-'), or an IP address")


def test_ports() -> None:
    assert IMPORT.server_port("993") == 993 and IMPORT.server_port("143") == 143
    for value in ("0", "65536", "99a", "+993", " 993", "", "1" * 6):
        with pytest.raises(IMPORT.UsageError) as e:
            IMPORT.server_port(value)
        assert str(e.value) == f"--port {value!r} must be a TCP port, 1-65535 (IMAPS is 993, IMAP with STARTTLS 143)"


def test_ca_file(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert IMPORT.ca_file(str(pem)) == str(pem)
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(IMPORT.UsageError, match=r"holds no PEM certificate \(-----BEGIN CERTIFICATE-----\)"):
        IMPORT.ca_file(str(tmp_path / "key.pem"))
    with pytest.raises(IMPORT.UsageError, match="cannot read it"):
        IMPORT.ca_file(str(tmp_path / "missing.pem"))
    for value in ("ca.pem", "/etc/ssl/my ca.pem", "/etc/ssl/ca.pem\n", "/etc/ssl/\"ca\".pem"):
        with pytest.raises(IMPORT.UsageError, match="must be an absolute path"):
            IMPORT.ca_file(value)


def test_list_prefix() -> None:
    assert IMPORT.list_prefix("INBOX") == "INBOX"
    for value in ("", "INBOX.", "IN BOX", "INBOX\n", 'IN"BOX', "x" * 65):
        if value == "INBOX.":
            assert IMPORT.list_prefix(value) == value  # Courier's namespace prefix, dot and all
            continue
        with pytest.raises(IMPORT.UsageError, match="must be 1-64 letters, digits and"):
            IMPORT.list_prefix(value)


def test_bad_options_end_with_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(IMPORT.os, "geteuid", lambda: 0)
    assert IMPORT.main(["--host", "imap.old.example", "--port", "99999", "users.csv"]) == 2
    assert capsys.readouterr().err == ("orgmail-import: --port '99999' must be a TCP port, 1-65535 "
                                       "(IMAPS is 993, IMAP with STARTTLS 143)\n")
    monkeypatch.setattr(IMPORT.os, "geteuid", lambda: 1000)
    assert IMPORT.main(["--host", "imap.old.example", "users.csv"]) == 2
    assert "run it as root" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        IMPORT.main(["--host", "imap.old.example", "--tls", "none", "users.csv"])
    assert e.value.code == 2
    assert "argument --tls: invalid choice: 'none'" in capsys.readouterr().err


# --- the run's Dovecot configuration ---------------------------------------------------------------

def test_the_configuration_version_comes_from_the_main_configuration() -> None:
    main = (Path(__file__).resolve().parents[2] / "cloud-init/files/dovecot/dovecot.conf.j2").read_text()
    assert IMPORT.config_version(main) == "2.4.0"
    with pytest.raises(IMPORT.UsageError, match="no dovecot_config_version line"):
        IMPORT.config_version("protocols = imap\n")


def test_imapc_configuration_verifies_tls_and_keeps_secrets_in_files() -> None:
    server = IMPORT.Server("imap.old.example", 993, "imaps")
    conf = IMPORT.imapc_config("2.4.0", server, "/run/orgmail-import.x/login", "/run/orgmail-import.x/password")
    assert conf == ("dovecot_config_version = 2.4.0\n"
                    "!include /etc/dovecot/dovecot.conf\n"
                    "imapc_host = imap.old.example\n"
                    "imapc_port = 993\n"
                    "imapc_ssl = imaps\n"
                    "imapc_user = </run/orgmail-import.x/login\n"
                    "imapc_password = </run/orgmail-import.x/password\n"
                    "ssl_client_require_valid_cert = yes\n")
    with_ca = IMPORT.imapc_config("2.4.0", IMPORT.Server("192.0.2.7", 143, "starttls", "/root/old-ca.pem", "INBOX"),
                             "/l", "/p")
    assert with_ca.splitlines()[2:] == ["imapc_host = 192.0.2.7", "imapc_port = 143", "imapc_ssl = starttls",
                                        "imapc_user = </l", "imapc_password = </p",
                                        "ssl_client_require_valid_cert = yes",
                                        "ssl_client_ca_file = /root/old-ca.pem", 'imapc_list_prefix = "INBOX"']
    # Dovecot 2.4 dropped imapc_ssl_verify (ssl_client_require_valid_cert replaces it): never written.
    assert "imapc_ssl_verify" not in conf + with_ca


def test_values_read_from_files_survive_dovecot_expansion() -> None:
    # `imapc_password = <FILE` is read exactly, then %{...} is expanded: `%%{` is Dovecot's escape for `%{`.
    assert IMPORT.file_value('p%{user} "q" #x,y') == 'p%%{user} "q" #x,y'
    assert IMPORT.file_value("%%{x}") == "%%%{x}"
    assert IMPORT.file_value("50% off $SET:x") == "50% off $SET:x"


def test_host_default_ports() -> None:
    assert IMPORT.DEFAULT_PORTS == {"imaps": 993, "starttls": 143}


# --- doveadm's answers -------------------------------------------------------------------------------

def test_mailbox_status_and_quota_are_read() -> None:
    assert IMPORT.parse_status("mailbox\tmessages\tvsize\nINBOX\t3\t414\nProjects/2025\t1\t138\n") == {
        "INBOX": (3, 414), "Projects/2025": (1, 138)}
    with pytest.raises(ValueError, match="unexpected mailbox status output"):
        IMPORT.parse_status("Error: something\n")
    quota = "Quota name\tType\tValue\tLimit\t%\nUser quota\tSTORAGE\t3\t2048\t0\nUser quota\tMESSAGE\t4\t-\t0\n"
    assert IMPORT.parse_quota(quota) == (3 * 1024, 2048 * 1024)
    assert IMPORT.parse_quota("Quota name\tType\tValue\tLimit\t%\nUser quota\tSTORAGE\t3\t-\t0\n") == (3 * 1024, None)
    assert IMPORT.size_text(690) == "690 bytes" and IMPORT.size_text(2048) == "2.0 KiB" and IMPORT.size_text(3 << 30) == "3.0 GiB"


# Lines doveadm 2.4.1 wrote when tried against a Dovecot 2.4.1 IMAPS server (tests/e2e/test_import.py meets them).
UNTRUSTED = ("dsync(ann@example.org): Error: imapc(imap.old.example:993): SSL handshake failed: SSL_shutdown() failed: "
             "error:0A000123:SSL routines::application data after close notify+Received invalid SSL certificate: "
             "unable to get local issuer certificate: /CN=imap.old.example (check ssl_client_ca_* settings?)")
WRONG_NAME = ("dsync(ann@example.org): Error: imapc(localhost:993): SSL handshake failed: SSL_shutdown() failed: "
              "error:0A000123:SSL routines::application data after close notify+SSL certificate doesn't match "
              "expected host name localhost: Malformed input")
REFUSED = ("dsync(ann@example.org): Error: imapc(imap.old.example:994): connect(127.0.0.1, 994) failed: "
           "Connection refused - disconnecting")
NO_NAME = ("dsync(ann@example.org): Error: imapc(nowhere.invalid:993): dns_lookup(nowhere.invalid) failed: "
           "Temporary failure in name resolution")
AUTH = ("dsync(carl@example.org): Error: imapc(imap.old.example:993): Authentication failed: [AUTHENTICATIONFAILED] "
        "Authentication failed.")


def test_doveadm_failures_are_said_in_the_admins_words() -> None:
    assert IMPORT.classify(AUTH, 77) == ("the old server refused this login and password: check the CSV line", False)
    assert IMPORT.classify(UNTRUSTED, 75) == (
        "the old server's certificate is not trusted here (its CA is not in the system store): use --ca-file with its "
        "CA certificate, never switch verification off", True)
    assert IMPORT.classify(WRONG_NAME, 75) == (
        "the old server's certificate does not name --host: give the name its certificate carries", True)
    assert IMPORT.classify(REFUSED, 75) == ("cannot connect to --host and --port", True)
    assert IMPORT.classify(NO_NAME, 75) == ("--host does not resolve from this host", True)
    assert IMPORT.classify("doveadm(ann@example.org): Error: cmd sync: Mailbox INBOX: something odd\n", 75) == (
        "doveadm failed (cmd sync: Mailbox INBOX: something odd)", False)
    assert IMPORT.classify("", 70) == ("doveadm failed (exit 70)", False)


# --- how it reaches the host ---------------------------------------------------------------------------

def test_orgmail_import_reaches_the_mailbox_host_through_ssm_only() -> None:
    [row] = [f for f in HOST_FILES if f.path == "/usr/local/sbin/orgmail-import"]
    assert (row.template, row.mode, row.roles, row.via_ssm, row.user_data) == (
        "orgmail/import.py", "0755", ("mailbox",), True, False)
    assert "/usr/local/sbin/orgmail-import" in ssm_files("mailbox")
    assert "/usr/local/sbin/orgmail-import" not in ssm_files("relay")
    assert "orgmail-import" not in render_user_data(MAILBOX)


def test_a_server_problem_stops_the_run_with_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    users = [IMPORT.ImportUser(f"{n}@example.org", n, "pw", line) for line, n in enumerate(("ann", "bob", "carl"), 2)]
    (tmp_path / "users").write_text("".join(f"{u.address}:{{BLF-CRYPT}}x:5000:5000::/srv/mail/vmail/example.org/"
                                            f"{u.login}::\n" for u in users))
    (tmp_path / "dovecot.conf").write_text("dovecot_config_version = 2.4.0\n")
    monkeypatch.setattr(IMPORT, "USERS_FILE", str(tmp_path / "users"))
    monkeypatch.setattr(IMPORT, "DOVECOT_CONF", str(tmp_path / "dovecot.conf"))
    monkeypatch.setattr(IMPORT.os, "geteuid", lambda: 0)
    monkeypatch.setattr(IMPORT, "read_users", lambda path: users)
    monkeypatch.setattr(IMPORT, "reach", lambda server: None)

    def import_user(user: Any, server: Any, version: str, check_only: bool, progress: float) -> Any:
        assert version == "2.4.0" and server == IMPORT.Server("imap.old.example", 993, "imaps")
        if user.login == "bob":
            raise IMPORT.ServerError("imap.old.example:993: cannot connect to --host and --port")
        return IMPORT.Outcome(user.address, True, f"{user.address}: 3 messages copied", 3)

    monkeypatch.setattr(IMPORT, "import_user", import_user)
    assert IMPORT.main(["--host", "imap.old.example", "users.csv"]) == 1
    out = capsys.readouterr()
    assert out.out == ("orgmail-import: ok: ann@example.org: 3 messages copied\n"
                       "orgmail-import: summary: 3 messages copied for 1 of 3 users; not done: 2\n")
    assert out.err == ("orgmail-import: imap.old.example:993: cannot connect to --host and --port; "
                       "stopped before bob@example.org\n")
