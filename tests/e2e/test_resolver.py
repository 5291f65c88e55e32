"""Issue 13, defect 2: blocklists refuse queries that come through shared cloud resolvers.

The host runs its own resolver (unbound on loopback) and points /etc/resolv.conf, Postfix's chroot
copy and rspamd at it, so Spamhaus sees the host's own address and answers with real listings. On
the shared resolver (Amazon's, as DHCP announces it) every question gets 127.255.255.254, which
must never block mail, and listings do not work at all.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Internet
from tests.e2e.overrides import MOTO_PORT
from tests.e2e.test_mailhost import ANN, CONTROLLER, OUTSIDE, message, wait_for
from tests.e2e.world import TEST_DQS_KEY, VPC_RESOLVER_V4

pytestmark = pytest.mark.e2e

MOTO_URL = f"http://127.0.0.1:{MOTO_PORT}"
OWN = "nameserver 127.0.0.1\noptions edns0 trust-ad\n"
GETHOST = "import socket, sys\ntry:\n    print(socket.gethostbyname(sys.argv[1]))\nexcept OSError as e:\n    print(e)\n"


def resolve(h: Internet, name: str) -> str:
    """What the host's system resolver (/etc/resolv.conf) says a name's IPv4 address is."""
    return h.guest.exec(["python3", "-c", GETHOST, name], timeout=60).stdout.strip()


def rspamd_symbols(h: Internet, ip: str) -> str:
    msg = message(OUTSIDE, ANN, "rbl check")
    return h.guest.exec(["rspamc", "--connect", CONTROLLER, "--ip", ip, "symbols"], input=msg, timeout=120).stdout


def smtp_from(h: Internet, source: str) -> dict[str, tuple[int, str]]:
    session = h.world.probe("smtp", source, port=25, mail_from=OUTSIDE, rcpts=[ANN])
    return {step[0]: (int(step[1]), step[2]) for step in session["steps"]}


def test_host_resolves_through_its_own_resolver(internet: Internet) -> None:
    g = internet.guest
    assert g.exec(["test", "-L", "/etc/resolv.conf"]).returncode != 0  # a plain file: nothing rewrites it
    assert g.read_file("/etc/resolv.conf").decode() == OWN
    assert g.read_file("/var/spool/postfix/etc/resolv.conf").decode() == OWN  # smtp, postscreen's dnsblog
    listening = g.exec(["ss", "-Hlnu", "sport", "=", ":53"], check=True).stdout.split("\n")
    assert {line.split()[3].rsplit(":", 1)[0] for line in listening if line} <= {"127.0.0.1", "[::1]"}
    assert "unbound" in g.exec(["ss", "-Hlnup", "sport", "=", ":53"]).stdout
    assert resolve(internet, "gmail-smtp-in.l.google.example") == "203.0.113.25"
    # Spamhaus's RFC 5782 test entry: the listing, not the open-resolver refusal.
    assert resolve(internet, "2.0.0.127.zen.spamhaus.org") == "127.0.0.2"


def test_listed_client_refused_by_postscreen_and_scored_by_rspamd(internet: Internet) -> None:
    listed, clean = "198.51.100.77", "198.51.100.79"
    internet.world.list_address(listed)
    steps = smtp_from(internet, listed)
    code, text = steps[f"RCPT {ANN}"]
    assert code == 550 and "blocked using zen.spamhaus.org" in text, steps
    assert smtp_from(internet, clean)[f"RCPT {ANN}"][0] == 250
    symbols = rspamd_symbols(internet, listed)
    assert "RBL_SPAMHAUS_SBL" in symbols, symbols


@pytest.fixture
def shared_resolver(internet: Internet) -> Iterator[None]:
    """The host as it was before defect 2 was fixed: resolv.conf (and Postfix's chroot copy) naming
    Amazon's resolver as DHCP announces it, and rspamd reading resolv.conf. Restored afterwards."""
    g = internet.guest
    options = g.read_file("/etc/rspamd/local.d/options.inc").decode()
    old_options = options.split("\n# The host's own resolver", 1)[0] + "\n"

    def use(resolv: str, rspamd_options: str) -> None:
        root = Path(f"/proc/{g.pid}/root")
        (root / "etc/resolv.conf").write_text(resolv)
        (root / "etc/rspamd/local.d/options.inc").write_text(rspamd_options)
        g.exec(["systemctl", "restart", "postfix.service", "rspamd.service"], check=True, timeout=120)
        wait_for(lambda: 11332 in g.listening_ports()
                 and g.exec(["test", "-S", CONTROLLER]).returncode == 0, 180, "rspamd")
        assert g.read_file("/var/spool/postfix/etc/resolv.conf").decode() == resolv

    with g.sync_paused():  # options.inc is the sync's: it would restore the own resolver mid-test
        try:  # restored even when switching fails half-way: later tests need the host's own resolver
            use(f"nameserver {VPC_RESOLVER_V4}\n", old_options)
            yield
        finally:
            use(OWN, options)


@pytest.mark.usefixtures("shared_resolver")
def test_shared_resolver_refusals_never_block_mail_and_listings_go_unseen(internet: Internet) -> None:
    listed, clean = "198.51.100.81", "198.51.100.83"
    internet.world.list_address(listed)
    assert resolve(internet, "2.0.0.127.zen.spamhaus.org") == "127.255.255.254"  # the refusal
    time.sleep(1)
    # postscreen counts only 127.0.0.[2..11] from zen: the refusal blocks nobody, and the listing
    # is never seen.
    assert smtp_from(internet, clean)[f"RCPT {ANN}"][0] == 250
    assert smtp_from(internet, listed)[f"RCPT {ANN}"][0] == 250
    # rspamd 3.12 names the refusal and scores it 0 (its rbl module's own return codes).
    symbols = rspamd_symbols(internet, listed)
    assert "RBL_SPAMHAUS_BLOCKED_OPENRESOLVER" in symbols and "RBL_SPAMHAUS_SBL" not in symbols, symbols
    assert re.search(r"RBL_SPAMHAUS_BLOCKED_OPENRESOLVER \(0\.0+\)", symbols), symbols


def sync(h: Internet) -> None:
    res = h.guest.exec(["/usr/local/sbin/orgmail-sync"], timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr


def test_spamhaus_dqs_key_from_ssm_is_used_and_never_shown(internet: Internet) -> None:
    """orgmail:spamhausDqsKey, a day-2 change: the SecureString appears in SSM, orgmail-sync points
    postscreen and rspamd at the DQS zones, and a listed client is refused naming the public zone."""
    g, world = internet.guest, internet.world
    name = f"{internet.stack.settings.ssm_path}/spamhaus/dqs-key"
    g.put_ssm_parameter(MOTO_URL, name, TEST_DQS_KEY)
    try:
        sync(internet)
        zen = f"{TEST_DQS_KEY}.zen.dq.spamhaus.net"
        assert g.exec(["postconf", "-h", "orgmail_zen"], check=True).stdout.strip() == zen
        assert zen in g.exec(["postconf", "-x", "-h", "postscreen_dnsbl_sites"], check=True).stdout
        rbl = g.read_file("/etc/rspamd/local.d/rbl.conf").decode()
        assert zen in rbl and f"{TEST_DQS_KEY}.dbl.dq.spamhaus.net" in rbl
        mode = g.exec(["stat", "-c", "%a %U:%G", "/etc/rspamd/local.d/rbl.conf"], check=True).stdout.split()
        assert mode == ["640", "root:_rspamd"]
        wait_for(lambda: 11332 in g.listening_ports(), 180, "rspamd after the reload")
        listed = "198.51.100.85"
        world.list_address(listed)
        steps = smtp_from(internet, listed)
        code, text = steps[f"RCPT {ANN}"]
        assert code == 550 and "blocked using zen.spamhaus.org" in text and TEST_DQS_KEY not in text, steps
        asked = [q for q in world.blocklist_queries() if q.startswith(f"85.100.51.198.{zen}. A from")]
        own = (f"from {world.host_ipv4}", f"from {world.host_ipv6}")  # unbound uses either family
        assert asked and all(q.endswith(own) for q in asked), world.blocklist_queries()[-20:]
        assert "RBL_SPAMHAUS_SBL" in rspamd_symbols(internet, listed)
    finally:
        g.aws(MOTO_URL, f"boto3.client('ssm', endpoint_url=endpoint, region_name={internet.stack.settings.region!r})"
                        f".delete_parameter(Name={name!r})")
        sync(internet)
    assert g.exec(["postconf", "-h", "orgmail_zen"], check=True).stdout.strip() == "zen.spamhaus.org"
    assert g.read_file("/etc/rspamd/local.d/rbl.conf") == b""
    wait_for(lambda: 11332 in g.listening_ports(), 180, "rspamd after the reload")


def test_the_health_report_sees_the_hosts_own_address_listed(internet: Internet) -> None:
    """Issue 18: orgmail-health looks up the host's published address on ZEN through the host's own resolver
    (not the shared one Spamhaus refuses): listed, Blocklisted is 1 and the `blocklisted` alarm's rule holds;
    delisted, 0."""
    import json

    from components.alerts import HEALTH_ALARMS
    from tests.e2e.test_mailhost import fires
    g, world = internet.guest, internet.world
    alarm = next(a for a in HEALTH_ALARMS if a.slug == "blocklisted")

    def blocklisted() -> int:
        # A fresh look: no hourly cache, and no answer unbound kept from an earlier health run.
        g.exec(["rm", "-f", "/var/lib/orgmail/blocklist.json"], check=True)
        g.exec(["unbound-control", "flush_zone", "zen.spamhaus.org"], check=True)
        res = g.exec(["/usr/local/sbin/orgmail-health", "--print"], check=True)
        value: int = json.loads(res.stdout)["Blocklisted"]
        return value

    # The system's lookup says 127.0.1.1 (/etc/hosts names the host so); the published address is in DNS.
    assert resolve(internet, internet.stack.settings.mail_host) == "127.0.1.1"
    world.list_address(world.host_ipv4)
    try:
        assert blocklisted() == 1 and fires(alarm, [1.0])
        own = (f"from {world.host_ipv4}", f"from {world.host_ipv6}")
        name = ".".join(reversed(world.host_ipv4.split("."))) + ".zen.spamhaus.org. A from"
        asked = [q for q in world.blocklist_queries() if q.startswith(name)]
        assert asked and all(q.endswith(own) for q in asked), world.blocklist_queries()[-20:]
    finally:
        world.list_address(world.host_ipv4, codes=())
    assert blocklisted() == 0 and not fires(alarm, [0.0])
    g.exec(["rm", "-f", "/var/lib/orgmail/blocklist.json"], check=True)
