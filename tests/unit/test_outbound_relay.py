"""Issue 14, the host's side: with orgmail:outbound.relay = ses, Postfix sends mail from our domains,
the host's own and bounces through SES's SMTP endpoint (587, TLS verified, SASL from SSM); with
"direct" it delivers itself. orgmail-sync writes the maps, so switching is a reload, never a new host."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from types import ModuleType

import pytest

from tests.unit.conftest import host_script
from tests.unit.test_backup_mx import main_cf
from tests.unit.test_userdata import MAILBOX, RELAY, files_of

ROOT = Path(__file__).resolve().parents[2]
SES = {"relay": "ses", "host": "email-smtp.eu-west-1.amazonaws.com", "port": 587}
LOGIN = {"username": "AKIAEXAMPLE", "password": "BSecret+/=word"}
CONFIG = {"domains": ["example.org", "example.net"], "mailHost": "mail.example.org"}


@pytest.fixture
def sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = host_script("sync.py")
    for name in ("RELAYHOST_MAP", "SASL_PASSWORDS", "TLS_POLICY"):
        monkeypatch.setattr(module, name, str(tmp_path / Path(getattr(module, name)).name))
    return module


def applied(sync: ModuleType, outbound: dict[str, object] | None, params: dict[str, str]) -> set[str]:
    changed: set[str] = set()
    sync.apply_outbound({**CONFIG, **({"outbound": outbound} if outbound else {})}, params, changed)
    return changed


def test_ses_sends_our_domains_the_hosts_own_mail_and_bounces_through_ses(sync: ModuleType) -> None:
    assert applied(sync, SES, {"ses/smtp": json.dumps(LOGIN)}) == {"postfix"}
    nexthop = "[email-smtp.eu-west-1.amazonaws.com]:587"
    assert Path(sync.RELAYHOST_MAP).read_text().splitlines() == [
        "/^SRS[01][-+=]/ DUNNO", f"/^<>$/ {nexthop}", rf"/@(example\.net|example\.org|mail\.example\.org)$/ {nexthop}"]
    # The login for that next hop only (Postfix looks it up by the relay host), readable by root only.
    assert Path(sync.SASL_PASSWORDS).read_text() == f"{nexthop} AKIAEXAMPLE:BSecret+/=word\n"
    assert stat.S_IMODE(Path(sync.SASL_PASSWORDS).stat().st_mode) == 0o600
    # TLS required and the certificate verified against the endpoint's name.
    assert Path(sync.TLS_POLICY).read_text() == f"{nexthop} secure match=nexthop\n"
    assert applied(sync, SES, {"ses/smtp": json.dumps(LOGIN)}) == set()  # unchanged: no reload


def test_direct_empties_the_maps_and_reloads_postfix(sync: ModuleType) -> None:
    applied(sync, SES, {"ses/smtp": json.dumps(LOGIN)})
    assert applied(sync, {"relay": "direct"}, {"ses/smtp": json.dumps(LOGIN)}) == {"postfix"}
    assert [Path(p).read_text() for p in (sync.RELAYHOST_MAP, sync.SASL_PASSWORDS, sync.TLS_POLICY)] == ["", "", ""]
    assert applied(sync, None, {}) == set()  # a config from before the setting: direct


def test_ses_without_its_credentials_changes_nothing_and_says_so(sync: ModuleType) -> None:
    """SES answers 530 to a client that does not log in, and Postfix bounces a 5xx: the relay map never
    comes without its login. What was there stays (here: direct); the sync reports the error."""
    with pytest.raises(RuntimeError, match=r"ses but its SMTP credentials \(ses/smtp\) are missing"):
        applied(sync, SES, {})
    assert [Path(p).read_text() for p in (sync.RELAYHOST_MAP, sync.SASL_PASSWORDS, sync.TLS_POLICY)] == ["", "", ""]
    applied(sync, SES, {"ses/smtp": json.dumps(LOGIN)})
    before = Path(sync.RELAYHOST_MAP).read_text()
    with pytest.raises(RuntimeError):
        applied(sync, SES, {})
    assert Path(sync.RELAYHOST_MAP).read_text() == before  # the last good login keeps working
    with pytest.raises(RuntimeError, match="'smarthost' is not known"):
        applied(sync, {"relay": "smarthost"}, {})


def test_postfix_reads_the_maps_on_the_mailbox_host_only() -> None:
    main = files_of(MAILBOX)["/etc/postfix/main.cf"]
    for line in ("sender_dependent_relayhost_maps = regexp:/etc/postfix/orgmail/relayhost",
                 "smtp_tls_policy_maps = texthash:/etc/postfix/orgmail/tls_policy",
                 "smtp_sasl_password_maps = texthash:/etc/postfix/orgmail/sasl_passwd",
                 "smtp_sasl_auth_enable = yes", "smtp_sasl_security_options = noanonymous",
                 "smtp_sasl_auth_soft_bounce = yes", "smtp_tls_mandatory_protocols = >=TLSv1.2"):
        assert f"\n{line}\n" in main, line
    # A backup MX never sends outside itself: no relay map, no login (see the next test).
    assert "relayhost" not in files_of(RELAY)["/etc/postfix/main.cf"]
    assert "smtp_sasl" not in files_of(RELAY)["/etc/postfix/main.cf"]


def test_a_relay_hands_its_own_mail_to_the_mailbox_host_which_relays_only_its_notices() -> None:
    """A relay's own mail (root's, a notice to an outside sender) leaves from the mail host's name to the
    mailbox host, over the relay transport (verified TLS); the mailbox host relays, for a relay's address
    only, the null sender: nothing else a relay hands on goes outside, and no other client's notice."""
    relay, mailbox = main_cf(RELAY), main_cf(MAILBOX)
    assert relay["myorigin"] == "mail.example.org"
    assert relay["default_transport"] == "relay:[mail.example.org]:25"
    assert relay["smtpd_relay_restrictions"] == "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
    assert (mailbox["myorigin"], mailbox.get("default_transport")) == ("$myhostname", None)
    assert mailbox["smtpd_relay_restrictions"] == ("permit_mynetworks, permit_sasl_authenticated, "
                                                   "check_sender_access inline:{ <>=orgmail_relay_notices }, "
                                                   "reject_unauth_destination")
    assert mailbox["smtpd_restriction_classes"] == "orgmail_relay_notices, orgmail_quota_check"
    assert mailbox["orgmail_relay_notices"] == "check_client_access cidr:/etc/postfix/orgmail/relay_clients"


def test_the_relay_map_as_postfix_reads_it(sync: ModuleType) -> None:
    """The regexp map, matched as Postfix matches it (whole key, case-insensitive): our domains and the
    mail host (not their look-alikes) and the null sender go to SES; forwarded mail (its SRS sender)
    and everyone else get no relay host, since SES refuses an unverified From:."""
    import re
    applied(sync, SES, {"ses/smtp": json.dumps(LOGIN)})
    rules = [(re.compile(line.split(" ")[0][1:-1], re.I), line.split(" ", 1)[1])
             for line in Path(sync.RELAYHOST_MAP).read_text().splitlines()]

    def lookup(key: str) -> str | None:
        return next((result for pattern, result in rules if pattern.search(key)), None)

    nexthop = "[email-smtp.eu-west-1.amazonaws.com]:587"
    for key in ("ann@example.org", "@example.org", "root@mail.example.org", "<>", "Bob@Example.NET"):
        assert lookup(key) == nexthop, key
    assert lookup("SRS0=HHH=TT=gmail.com=someone@example.org") == "DUNNO"
    for key in ("ann@example.org.evil", "ann@notexample.org", "x@gmail.com"):
        assert lookup(key) is None, key


@pytest.mark.parametrize("role", ["relay", "edge", "shard"])
def test_cluster_mode_applies_only_what_the_roles_config_holds(sync: ModuleType, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, role: str) -> None:
    """`orgmail-sync --cluster`, a cluster host's: it asks SSM for its role's config (SES's credentials, the DQS
    key) only, writes admin.sshCidrs' nftables sets (an edge also its sshd jail: its fail2ban reads the journal,
    and the DQS key), on a relay orgmail:outbound's maps, reloads what changed, and nothing of a single host's
    set-up (apply) runs."""
    asked: list[tuple[str, ...]] = []
    reloaded: list[set[str]] = []
    config = {**CONFIG, "outbound": SES, "admin": {"sshCidrs": ["203.0.113.0/24", "2001:db8::/48"]},
              "upgrades": {"autoReboot": True, "rebootTime": "04:30", "rebootTimes": {f"{role}1.example.org": "05:30"}}}
    served = {"config": json.dumps(config), "ses/smtp": json.dumps(LOGIN)}

    def fetch(env: dict[str, str], names: tuple[str, ...] = ()) -> dict[str, str]:
        asked.append(names)
        return dict(served)

    def reload(services: set[str]) -> list[str]:
        reloaded.append(set(services))
        return []

    for name in ("SSH_SETS", "SSHD_JAIL", "UPGRADES"):
        monkeypatch.setattr(sync, name, str(tmp_path / Path(getattr(sync, name)).name))
    monkeypatch.setattr(sync, "host_env", lambda: {"ROLE": role, "REGION": "eu-west-1", "SSM_PATH": f"/o/s/{role}",
                                                   "HOSTNAME": f"{role}1.example.org"})
    monkeypatch.setattr(sync, "fetch", fetch)
    monkeypatch.setattr(sync, "apply", lambda *a: pytest.fail("a single host's set-up ran"))
    monkeypatch.setattr(sync, "reload", reload)
    grown: list[bool] = []

    def grow_volume() -> list[str]:
        grown.append(True)
        return []

    monkeypatch.setattr(sync, "grow_volume", grow_volume)
    dqs: list[str] = []
    monkeypatch.setattr(sync, "apply_dqs", lambda params, changed: dqs.append(params.get("spamhaus/dqs-key", "")))
    limited: list[str] = []
    monkeypatch.setattr(sync, "apply_limits", lambda role, config, changed: limited.append(role))
    served["spamhaus/dqs-key"] = "k" * 26
    monkeypatch.setattr(sync, "STATUS", tmp_path / "sync-status.json")
    monkeypatch.setattr(sync, "LAST_OK", tmp_path / "sync-ok")
    monkeypatch.setattr(sync.sys, "argv", ["orgmail-sync", "--cluster"])
    assert sync.run() == 0  # main() is this under orgmail-sync's lock
    assert asked == [("config", "ses", "spamhaus")]
    assert dqs == (["k" * 26] if role == "edge" else [])  # the edges run postscreen and rspamd
    assert limited == (["edge"] if role == "edge" else [])  # rateLimits: the edges take the mail
    assert reloaded == [{"nftables", *({"postfix"} if role == "relay" else ()), *({"fail2ban"} if role == "edge" else ())}]
    assert "add element inet orgmail ssh4 { 203.0.113.0/24 }" in Path(sync.SSH_SETS).read_text()
    assert "add element inet orgmail ssh6 { 2001:db8::/48 }" in Path(sync.SSH_SETS).read_text()
    assert Path(sync.SSHD_JAIL).exists() == (role == "edge")
    assert Path(sync.SASL_PASSWORDS).exists() == (role == "relay")
    if role == "relay":
        assert Path(sync.SASL_PASSWORDS).read_text() == "[email-smtp.eu-west-1.amazonaws.com]:587 AKIAEXAMPLE:BSecret+/=word\n"
    assert grown == ([] if role == "edge" else [True])  # an edge has no volume to grow
    # A shard or relay reboots after updates at its own time; an edge is replaced, never rebooted.
    upgrades = Path(sync.UPGRADES).read_text() if Path(sync.UPGRADES).exists() else None
    if role == "edge":
        assert upgrades is None
    else:
        assert upgrades is not None and 'Unattended-Upgrade::Automatic-Reboot-Time "05:30";' in upgrades
        assert 'Unattended-Upgrade::Automatic-Reboot "true";' in upgrades
    # Without its config nothing is written and the run fails (the timer tries again).
    Path(sync.SSH_SETS).unlink()
    served.pop("config")
    assert sync.run() == 1
    assert not Path(sync.SSH_SETS).exists()
    assert json.loads((tmp_path / "sync-status.json").read_text())["result"] == "error"
