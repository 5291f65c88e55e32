"""Webmail and self-service passwords on the booted host (issue 18), as a user sees them in a browser.

The dev stack with `orgmail:webmail` boots on the internet in a box (tests/e2e/world.py). Debian's Chromium,
driven by Playwright (tests/e2e/browser.py) from the guest's network namespace, uses Roundcube on the host's
127.0.0.1:8080, where cloudflared would carry it: ann logs in with her initial password and is made to
change it, reads mail delivered from outside, sends a message (judged DKIM-signed at the Gmail stand-in) and
sets an out-of-office reply (sent once to an outside person, never to a list). Mail clients are refused
the initial password and take the new one; the new one survives a sync and a restore from backup; the
admin's reset through the config ends it. cloudflared is a stand-in here (the guest reaches no GitHub and
no Cloudflare): its download is checked against the pinned SHA-256 and it runs with the token from SSM.
Screenshots are kept under the e2e log directory (webmail/).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import harness, sink
from tests.e2e.overrides import (
    CLOUDFLARED_STANDIN_DIR,
    CLOUDFLARED_STANDIN_URL,
    MOTO_PORT,
    planned_parameters,
    serve_parameters,
    with_rewritten,
)
from tests.e2e.test_mailhost import (
    ANN,
    BOB,
    Booted,
    booted_mailbox_host,
    headed_message,
    new_client,
    plan_test_stack,
    wait_for,
)
from tests.e2e.world import PROVIDERS, TEST_DQS_KEY, World, deliver_from, provider_sinks
from tests.unit.conftest import ROOT
from tools.mockengine import PLACEHOLDER_TUNNEL_TOKEN
from tools.zonefile import zone_files

pytestmark = pytest.mark.e2e

GMAIL, MICROSOFT = PROVIDERS["gmail"], PROVIDERS["microsoft"]
SHOTS = harness.LOG_DIR / "webmail"
NEW_PASSWORD = "plum orchard 42 kites"
STANDIN = ("#!/bin/sh\n# orgmail e2e stand-in for cloudflared: says how it was started, then runs like a tunnel.\n"
           'echo "cloudflared-standin: args: $*"\n'
           'echo "cloudflared-standin: token: $(cat "$CREDENTIALS_DIRECTORY/token")"\n'
           'echo "cloudflared-standin: uid: $(id -u)"\n'
           "exec sleep infinity\n")


@dataclass
class Webmail(Booted):
    world: World
    sinks: sink.RunningSinks
    params: dict[str, tuple[str, str]]

    def browse(self, scenario: str, **args: Any) -> dict[str, Any]:
        res = self.guest.in_guest_net([sys.executable, "-m", "tests.e2e.browser"], cwd=str(ROOT), timeout=300,
                                      input=json.dumps({"scenario": scenario, "shots": str(SHOTS), **args}))
        assert res.returncode == 0, res.stderr[-3000:]
        result: dict[str, Any] = json.loads(res.stdout)
        return result

    def imap_login(self, user: str, password: str, source: str | None = None) -> dict[str, Any]:
        return self.probe("imap_fetch", user=user, password=password, source=source or new_client())


def webmail_parameters(run: Any, host: Any, standin_sha256: str) -> dict[str, tuple[str, str]]:
    def pin_standin(text: str) -> str:
        config = json.loads(text)
        config["webmail"]["cloudflared"]["url"] = CLOUDFLARED_STANDIN_URL
        config["webmail"]["cloudflared"]["sha256"] = {"amd64": standin_sha256, "arm64": standin_sha256}
        return json.dumps(config, separators=(",", ":"))

    return with_rewritten(planned_parameters(run, host), "/orgmail/e2e/config", pin_standin)


@pytest.fixture(scope="module")
def webmail() -> Iterator[Webmail]:
    harness.require_e2e(["chromium"] if not Path("/usr/bin/chromium").exists() else [])
    stack = plan_test_stack({"orgmail:webmail": True})
    outputs = stack.run.outputs
    zones = zone_files(stack.settings, outputs["dnsRecords"], outputs["hostIps"], from_plan=False)
    params = webmail_parameters(stack.run, stack.host, hashlib.sha256(STANDIN.encode()).hexdigest())
    SHOTS.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        worlds: list[World] = []

        def before_boot(guest: harness.BootedHost) -> None:
            standin = guest.root / CLOUDFLARED_STANDIN_DIR.lstrip("/")
            standin.mkdir(parents=True, exist_ok=True)
            for arch in ("amd64", "arm64"):
                (standin / f"cloudflared-linux-{arch}").write_text(STANDIN)
            url = guest.start_moto(MOTO_PORT)
            serve_parameters(guest, url, params, stack.settings.region)
            guest.create_bucket(url, stack.host.backup_bucket or "")
            worlds.append(cleanup.enter_context(World(guest, zones, outputs["hostIps"],
                                                      host_ipv4=outputs["hostIps"][stack.settings.mail_host],
                                                      dqs_keys=[TEST_DQS_KEY])))

        with booted_mailbox_host(stack, "webmail", before_boot, {25, 465, 587, 993, 995, 11332}) as booted:
            # The bootstrap's last step starts a sync, which starts webmail.
            wait_for(lambda: 8080 in booted.guest.listening_ports(), 180, "webmail on 8080")
            running = cleanup.enter_context(provider_sinks(worlds[0]))
            yield Webmail(booted.guest, booted.stack, booted.status, worlds[0], running, params)


def sync(h: Webmail) -> None:
    res = h.guest.exec(["/usr/local/sbin/orgmail-sync"], timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def deliver(h: Webmail, sender: str, to: str, subject: str, body: str = "Hello.\n", **headers: str) -> None:
    """A message from the Microsoft stand-in's MX address (its SPF names it, so it passes as mail from
    there does), delivered into `to`'s INBOX."""
    deliver_from(h.world, MICROSOFT, sender, to, headed_message(sender, to, subject, body, **headers))
    wait_for(lambda: h.guest.exec(["doveadm", "search", "-u", to, "mailbox", "INBOX", "header", "Subject",
                                   subject]).stdout, 60, f"{subject!r} delivered to {to}")


# --- webmail on the host ------------------------------------------------------------------------------


def test_webmail_listens_on_loopback_only_and_opens_no_port(webmail: Webmail) -> None:
    listening = webmail.guest.exec(["ss", "-Hltn"]).stdout.splitlines()
    web = [line.split()[3] for line in listening if line.split()[3].rsplit(":", 1)[1] in ("80", "443", "8080", "8026")]
    assert sorted(web) == ["127.0.0.1:8026", "127.0.0.1:8080"], listening
    page = webmail.sh("curl -fsS http://127.0.0.1:8080/").stdout
    assert 'id="rcmloginuser"' in page and f"{webmail.stack.settings.organization} Mail" in page, page[:2000]
    # The firewall's accepted ports are the mail ports, as without webmail; Apache never came with it.
    listed = webmail.sh("nft -nn list chain inet orgmail input")
    assert listed.returncode == 0, listed.stderr
    accepted = [set(map(int, re.findall(r"\d+", m))) for m in re.findall(r"tcp dport \{([^}]*)\} accept", listed.stdout)]
    assert accepted == [{25, 465, 587, 993, 995}], listed.stdout
    assert webmail.sh("dpkg-query -W -f='${Status}' apache2 2>/dev/null").stdout != "install ok installed"
    assert webmail.sh("systemctl is-active nginx orgmail-passwd.socket orgmail-tunnel").stdout.split() == ["active"] * 3


def test_cloudflared_is_the_pinned_build_and_runs_with_the_token_from_ssm(webmail: Webmail) -> None:
    installed = webmail.guest.read_file("/usr/local/bin/cloudflared")
    assert hashlib.sha256(installed).hexdigest() == hashlib.sha256(STANDIN.encode()).hexdigest()
    log = wait_for(lambda: "cloudflared-standin: uid" in (j := webmail.guest.journal("orgmail-tunnel.service")) and j,
                   60, "the tunnel's start in its journal")
    assert ("cloudflared-standin: args: tunnel --no-autoupdate run --token-file "
            "/run/credentials/orgmail-tunnel.service/token") in log
    assert f"cloudflared-standin: token: {PLACEHOLDER_TUNNEL_TOKEN}" in log
    assert "cloudflared-standin: uid: 0" not in log  # a dynamic user, not root
    cmdlines = webmail.sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '").stdout
    assert "sleep infinity" in cmdlines and "nginx: master" in cmdlines  # every process was read
    assert PLACEHOLDER_TUNNEL_TOKEN not in cmdlines  # never on a command line
    assert webmail.sh("stat -c '%a %U' /etc/orgmail/tunnel-token").stdout.strip() == "600 root"


def test_a_cloudflared_that_is_not_the_pinned_build_is_never_installed(webmail: Webmail) -> None:
    standin = f"{CLOUDFLARED_STANDIN_DIR}/cloudflared-linux-amd64"
    webmail.sh(f"cp {standin} /root/standin && printf '# tampered\\n' >> {standin} && "
               "systemctl stop orgmail-tunnel && rm /usr/local/bin/cloudflared").check_returncode()
    try:
        res = webmail.guest.exec(["/usr/local/sbin/orgmail-sync"], timeout=300)
        assert res.returncode != 0
        assert "is not the pinned" in res.stderr and "not installed" in res.stderr, res.stderr
        assert webmail.sh("ls /usr/local/bin/").stdout.split().count("cloudflared") == 0
        assert webmail.sh("systemctl is-active orgmail-tunnel").stdout.strip() != "active"
    finally:
        webmail.sh(f"cp /root/standin {standin}").check_returncode()
    sync(webmail)
    assert webmail.sh("systemctl is-active orgmail-tunnel").stdout.strip() == "active"


# --- passwords ----------------------------------------------------------------------------------------


def test_an_initial_password_is_refused_to_mail_clients_but_not_to_webmail(webmail: Webmail) -> None:
    initial = webmail.stack.passwords[BOB]
    refused = webmail.imap_login(BOB, initial)
    assert not refused["login"] and "[EXPIRED]" in refused["error"], refused
    session = webmail.probe("smtp", port=587, mode="starttls", source=new_client(), login=[BOB, initial])
    assert session["steps"][-1][1] == 535, session
    # The way webmail logs in (127.0.0.1), and only that one.
    assert webmail.imap_login(BOB, initial, source="127.0.0.1")["login"]
    assert "[EXPIRED]" in webmail.imap_login(BOB, initial)["error"]  # not let in by the cached webmail login
    # Not a guesser: fail2ban bans nobody for it.
    jail = webmail.sh("fail2ban-client status dovecot").stdout
    assert re.search(r"Currently failed:\s+0\b", jail) and re.search(r"Currently banned:\s+0\b", jail), jail


def test_in_the_browser_ann_must_change_her_initial_password_and_then_clients_take_it(webmail: Webmail) -> None:
    initial = webmail.stack.passwords[ANN]
    result = webmail.browse("first_login", user=ANN, password=initial, new_password=NEW_PASSWORD)
    assert "error" not in result, result
    assert "_action=plugin.password" in result["landed"], result
    assert webmail.imap_login(ANN, NEW_PASSWORD)["login"]
    old = webmail.imap_login(ANN, initial)
    assert not old["login"] and "[EXPIRED]" not in old["error"], old  # simply wrong now
    store = json.loads(webmail.guest.read_file("/srv/mail/orgmail/passwords.json"))
    assert list(store) == [ANN] and store[ANN]["hash"].startswith("{BLF-CRYPT}$2b$10$")
    # The sync never overwrites it.
    sync(webmail)
    assert webmail.imap_login(ANN, NEW_PASSWORD)["login"]
    assert ANN not in webmail.guest.read_file("/etc/dovecot/orgmail-initial").decode().split()


def test_in_the_browser_ann_reads_her_mail_and_sends_mail_gmail_accepts(webmail: Webmail) -> None:
    deliver(webmail, f"pen.pal@{MICROSOFT.domain}", ANN, "letter from outside", "Dear Ann, the plums are ripe.\n")
    result = webmail.browse("read_and_send", user=ANN, password=NEW_PASSWORD, subject="letter from outside",
                            to=f"ann.friend@{GMAIL.domain}", send_subject="sent from webmail")
    assert "error" not in result, result
    assert "the plums are ripe" in result["body"]
    r = webmail.sinks.wait(lambda r: r["sink"] == "gmail" and "sent from webmail" in r.get("message", ""),
                           what="the webmail message at Gmail")[0]
    assert r["accepted"] and r["tls"] in ("TLSv1.2", "TLSv1.3"), r
    assert [(d["d"], d["result"]) for d in r["dkim"]] == [("example.org", "pass")], r["dkim"]
    assert r["spf"]["result"] == "pass" and r["dmarc"]["dkim_aligned"], r


def test_in_the_browser_ann_sets_an_out_of_office_reply_sent_once_never_to_lists(webmail: Webmail) -> None:
    result = webmail.browse("vacation", user=ANN, password=NEW_PASSWORD, vacation_subject="Away",
                            vacation_body="I am away until Monday.")
    assert "error" not in result, result
    person, announce = f"carol@{MICROSOFT.domain}", f"announce@{MICROSOFT.domain}"
    deliver(webmail, person, ANN, "are you there")
    replies = webmail.sinks.wait(lambda r: r["rcpt_to"] == [person] and "Subject: Away" in r.get("message", ""),
                                 what="the out-of-office reply at the sender's provider")
    assert "Auto-Submitted: auto-replied" in replies[0]["message"]
    assert [(d["d"], d["result"]) for d in replies[0]["dkim"]] == [("example.org", "pass")]
    deliver(webmail, person, ANN, "are you there still")
    deliver(webmail, announce, ANN, "list traffic", List_Id="<announce.lists.example>")
    time.sleep(10)
    to_person = [r for r in webmail.sinks.records() if r["rcpt_to"] == [person]]
    to_list = [r for r in webmail.sinks.records() if r["rcpt_to"] == [announce]]
    assert len(to_person) == 1 and to_list == [], (to_person, to_list)


def test_ann_keeps_her_password_through_a_restore_and_the_admin_can_reset_it(webmail: Webmail) -> None:
    h = webmail
    assert h.sh("systemctl start orgmail-backup.service", timeout=900).returncode == 0
    # Lost (a volume rebuilt from nothing): the configured password comes back, initial again.
    h.sh("rm /srv/mail/orgmail/passwords.json").check_returncode()
    sync(h)
    assert not h.imap_login(ANN, NEW_PASSWORD)["login"]
    res = h.sh("orgmail-restore all", timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: h.imap_login(ANN, NEW_PASSWORD)["login"], 120, "ann's own password after the restore")
    assert ANN not in h.guest.read_file("/etc/dovecot/orgmail-initial").decode().split()
    # The admin's reset: a new hash for ann in the config replaces her own at the next sync.
    import bcrypt

    reset = "reset by the admin 7"
    new_hash = "{BLF-CRYPT}" + bcrypt.hashpw(reset.encode(), bcrypt.gensalt(10)).decode()

    def with_reset(text: str) -> str:
        return json.dumps({**json.loads(text), ANN: new_hash}, separators=(",", ":"))

    params = with_rewritten(h.params, "/orgmail/e2e/mailbox-passwords", with_reset)
    serve_parameters(h.guest, f"http://127.0.0.1:{MOTO_PORT}", params, h.stack.settings.region)
    sync(h)
    assert not h.imap_login(ANN, NEW_PASSWORD)["login"]
    assert "[EXPIRED]" in h.imap_login(ANN, reset)["error"]  # initial again: webmail first
    assert json.loads(h.guest.read_file("/srv/mail/orgmail/passwords.json")) == {}
