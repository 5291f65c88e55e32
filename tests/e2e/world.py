"""An internet in a box (docs/design.md, layer 4): a "world" network namespace that the booted host
reaches over IPv4 and IPv6, as an EC2 host in a dual-stack subnet reaches the internet.

    with World(guest, stack_zones) as world:      # before the guest boots (boot_host's before_boot)
        world.add_address("203.0.113.99")          # any number of internet addresses
        world.popen([...])                         # run a server there (stopped on exit)
        world.set_records("x.example.net", "A", ["203.0.113.99"])
        world.list_address("198.51.100.7")       # a Spamhaus ZEN listing

What is in it:

* a veth pair: the guest's ``eth0`` has the stack's planned Elastic IP (:data:`HOST_IPV4`
  unless told otherwise) and a global IPv6 address (:data:`HOST_IPV6`), with default routes for
  both families via the world (:data:`GATEWAY_V4`, :data:`GATEWAY_V6`);
* Knot as the root server at a.root-servers.net's real addresses (:data:`ROOT_V4`,
  :data:`ROOT_V6`), so any resolver's stock root hints find it. It serves the root zone, the
  project's own zones (tools/zonefile.py export), the big-provider stand-ins
  (:data:`PROVIDERS`: dual-stack MX hosts with their own SPF and DMARC), and the reverse zones:
  PTR for the host's IPv4 (as AWS's Elastic IP reverse DNS), none for its IPv6;
* a shared cloud resolver (:data:`VPC_RESOLVER_V4`, AWS's 169.254.169.253, and
  :data:`VPC_RESOLVER_V6`) and Spamhaus's name servers (:data:`SPAMHAUS_V4`/``_V6``, delegated
  zen/dbl.spamhaus.org and dq.spamhaus.net), both in tests/e2e/world_dns.py; the listings live in
  a second Knot on the world's loopback. To queries from the shared resolver the blocklist answers
  127.255.255.254 for everything, to the host's own address the real listing.

Every process, the namespace (with its veth) and the temporary directory are removed on exit;
every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.e2e import sink
from tests.e2e.harness import REPO, BootedHost
from tests.verify.harness import TestCA, knot_config

HOST_IPV4 = "192.0.2.10"  # the dev stack's planned Elastic IP (tools/mockengine.py)
HOST_IPV6 = "2001:db8:10::10"  # a global address in the subnet's /64; AWS gives no PTR for it
GATEWAY_V4, GATEWAY_V6 = "192.0.2.1", "2001:db8:10::1"
PREFIX_V4, PREFIX_V6 = 24, 64
ROOT_V4, ROOT_V6 = "198.41.0.4", "2001:503:ba3e::2:30"  # a.root-servers.net
VPC_RESOLVER_V4, VPC_RESOLVER_V6 = "169.254.169.253", "fd00:ec2::253"  # Amazon's DNS server
SPAMHAUS_V4, SPAMHAUS_V6 = "198.51.100.53", "2001:db8:53::53"
SPAMHAUS_ZONES = ("zen.spamhaus.org", "dbl.spamhaus.org")
TEST_DQS_KEY = "orgmailtestdqskey000000000"  # a DQS key the world's Spamhaus knows (26 characters)
LISTING_PORT = 53  # the listings' Knot, on the world's 127.0.0.1 (reached only by the blocklist server)
TTL = 300


@dataclass(frozen=True)
class Provider:
    """A big mail provider's stand-in: its domain, one dual-stack MX host, SPF and DMARC."""

    domain: str
    mx: str
    ipv4: str
    ipv6: str
    spf: str
    dmarc: str


PROVIDERS: dict[str, Provider] = {
    "gmail": Provider("gmail.example", "gmail-smtp-in.l.google.example", "203.0.113.25", "2001:db8:25::25",
                      "v=spf1 ip4:203.0.113.25 ip6:2001:db8:25::25 ~all",
                      "v=DMARC1; p=none; sp=quarantine; rua=mailto:mailauth-reports@google.example"),
    "microsoft": Provider("outlook.example", "outlook-example.mail.protection.outlook.example", "203.0.113.26",
                          "2001:db8:25::26", "v=spf1 ip4:203.0.113.26 ip6:2001:db8:25::26 -all",
                          "v=DMARC1; p=reject; rua=mailto:d@rua.outlook.example"),
}


# Gmail's second domain, as a provider whose first MX has only an IPv6 address: a host that may
# deliver over IPv6 always tries it first, so defect 1 shows on every message, not on half of them.
GOOGLEMAIL, V6_FIRST_MX, V6_FIRST_IP = "googlemail.example", "alt1.gmail-smtp-in.l.google.example", "2001:db8:25::27"
# A provider that answers every recipient 451 (a throttling or busy receiver).
BUSY, BUSY_MX, BUSY_V4, BUSY_V6 = "busy.example", "mx.busy.example", "203.0.113.28", "2001:db8:25::28"


def reverse_name(ip: str) -> str:
    """The PTR owner of an address (in-addr.arpa or ip6.arpa), without the final dot."""
    import ipaddress

    return ipaddress.ip_address(ip).reverse_pointer


def dnsbl_name(ip: str, zone: str = "zen.spamhaus.org") -> str:
    """The DNSBL question for an IPv4 address: 7.100.51.198.zen.spamhaus.org."""
    return ".".join(reversed(ip.split("."))) + "." + zone


def _records_of_zonefile(text: str) -> list[str]:
    """Record lines of a tools/zonefile.py export (its $ORIGIN/$TTL lines and comments dropped;
    every owner there is absolute)."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("$", ";"))]


def world_zones(project_zones: Mapping[str, str], host_ips: Mapping[str, str],
                host_ipv6: str = HOST_IPV6) -> dict[str, list[str]]:
    """Zone -> record lines (no SOA/NS) of the root server: the internet as the host sees it."""
    del host_ipv6  # named to say it: the host's IPv6 address has no PTR, as on AWS
    root = [f"a.root-servers.net. {TTL} IN A {ROOT_V4}", f"a.root-servers.net. {TTL} IN AAAA {ROOT_V6}"]
    for zone in (*SPAMHAUS_ZONES, "dq.spamhaus.net"):
        ns = f"ns.{zone}."
        root += [f"{zone}. {TTL} IN NS {ns}", f"{ns} {TTL} IN A {SPAMHAUS_V4}", f"{ns} {TTL} IN AAAA {SPAMHAUS_V6}"]
    zones: dict[str, list[str]] = {".": root}
    for zone, text in project_zones.items():
        zones[zone] = _records_of_zonefile(text)
    reverse_v4 = [f"{reverse_name(ip)}. {TTL} IN PTR {host}." for host, ip in host_ips.items()]
    reverse_v6: list[str] = []
    for p in PROVIDERS.values():
        zones[p.domain] = [f"{p.domain}. {TTL} IN MX 5 {p.mx}.", f'{p.domain}. {TTL} IN TXT "{p.spf}"',
                           f'_dmarc.{p.domain}. {TTL} IN TXT "{p.dmarc}"']
        mx_zone = ".".join(p.mx.split(".")[-2:])
        zones.setdefault(mx_zone, [])
        zones[mx_zone] += [f"{p.mx}. {TTL} IN A {p.ipv4}", f"{p.mx}. {TTL} IN AAAA {p.ipv6}"]
        reverse_v4.append(f"{reverse_name(p.ipv4)}. {TTL} IN PTR {p.mx}.")
        reverse_v6.append(f"{reverse_name(p.ipv6)}. {TTL} IN PTR {p.mx}.")
    zones["in-addr.arpa"] = reverse_v4
    zones["ip6.arpa"] = reverse_v6
    # Delegations to the same server: without them "org.", "test." and "arpa." would not exist in
    # the root zone, and a resolver minimising its questions (RFC 9156) would stop at NXDOMAIN.
    root += [f"{zone}. {TTL} IN NS a.root-servers.net." for zone in zones if zone != "."]
    return zones


def listing_zones() -> dict[str, list[str]]:
    """Spamhaus's data: only the RFC 5782 test entries until a test lists an address."""
    zen = [f"{dnsbl_name('127.0.0.2')}. {TTL} IN A 127.0.0.2",
           f'{dnsbl_name("127.0.0.2")}. {TTL} IN TXT "https://www.spamhaus.org/query/ip/127.0.0.2"']
    dbl = [f"dbltest.com.dbl.spamhaus.org. {TTL} IN A 127.0.1.2"]
    return {"zen.spamhaus.org": zen, "dbl.spamhaus.org": dbl}


def _zone_of(name: str, zones: Sequence[str]) -> str:
    name = name.rstrip(".").lower()
    return max((z for z in zones if z == "." or name == z or name.endswith("." + z)),
               key=lambda z: 0 if z == "." else len(z))


class Knot:
    """One knotd in the world's namespace, controlled through its socket in ``workdir``."""

    def __init__(self, world: World, workdir: Path, listen: Sequence[tuple[str, int]], ns_name: str) -> None:
        self.world, self.dir, self.listen, self.ns_name = world, workdir, listen, ns_name
        self.conf = workdir / "knot.conf"
        self.zones: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def _file(self, zone: str) -> str:
        return "root.zone" if zone == "." else f"{zone}.zone"

    def start(self, zones: Mapping[str, list[str]], timeout: float = 30) -> None:
        for sub in ("zones", "db", "run"):
            (self.dir / sub).mkdir(parents=True)
        serial = int(time.time())
        for zone, lines in zones.items():
            apex = "." if zone == "." else zone + "."
            head = [f"{apex} {TTL} IN SOA {self.ns_name} hostmaster.world.test. {serial} 3600 600 86400 60",
                    f"{apex} {TTL} IN NS {self.ns_name}"]
            (self.dir / "zones" / self._file(zone)).write_text("\n".join(head + lines) + "\n")
        self.zones = list(zones)
        self.conf.write_text(knot_config(self.dir, self.listen, {z: self._file(z) for z in zones}, "changes"))
        self.proc = self.world.popen(["knotd", "-c", str(self.conf)], log=self.dir / "knotd.stderr")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"knotd exited {self.proc.returncode}: {self.log()}")
            if all(self.knotc("zone-read", z, "@", "SOA", check=False).returncode == 0 for z in zones):
                return
            time.sleep(0.1)
        raise RuntimeError(f"Knot did not load its zones within {timeout}s: {self.log()}")

    def log(self) -> str:
        return "".join(p.read_text()[-3000:] for p in (self.dir / "knotd.stderr", self.dir / "knot.log") if p.exists())

    def knotc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["knotc", "-c", str(self.conf), "-t", "10", *args],
                             capture_output=True, text=True, timeout=30, check=False)
        if check and (res.returncode != 0 or "error" in res.stdout.lower()):
            raise RuntimeError(f"knotc {' '.join(args)}: {res.stdout}{res.stderr}")
        return res

    def set_records(self, name: str, type_: str, rdatas: Sequence[str], ttl: int = TTL) -> None:
        """Replace ``name``'s records of ``type_`` (none: delete them), in one zone transaction."""
        zone = _zone_of(name, self.zones)
        owner = name.rstrip(".") + "."
        self.knotc("zone-begin", zone)
        try:
            self.knotc("zone-unset", zone, owner, type_, check=False)  # fails when there are none
            for rdata in rdatas:
                self.knotc("zone-set", zone, owner, str(ttl), type_, rdata)
            self.knotc("zone-commit", zone)
        except BaseException:
            self.knotc("zone-abort", zone, check=False)
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.knotc("stop", check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


class World:
    """The world namespace attached to ``guest`` (see the module's doc). Enter it before the guest
    boots; leaving it stops every process and deletes the namespace and the temporary directory."""

    def __init__(self, guest: BootedHost, project_zones: Mapping[str, str], host_ips: Mapping[str, str],
                 host_ipv4: str = HOST_IPV4, host_ipv6: str = HOST_IPV6,
                 dqs_keys: Sequence[str] = ()) -> None:
        self.guest = guest
        self.name = f"world-{guest.name[-6:]}"
        self.netns = f"/run/netns/{self.name}"
        self.host_ipv4, self.host_ipv6 = host_ipv4, host_ipv6
        self.zones = world_zones(project_zones, host_ips, host_ipv6)
        self.dqs_keys = list(dqs_keys)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self._procs: list[subprocess.Popen[bytes]] = []
        self._netns_made = False
        self.root: Knot | None = None
        self.listings: Knot | None = None

    # -- life cycle ---------------------------------------------------------

    def __enter__(self) -> World:
        try:
            self._link()
            self.root = Knot(self, self.dir / "root", [(ROOT_V4, 53), (ROOT_V6, 53)], "a.root-servers.net.")
            self.root.start(self.zones)
            self.listings = Knot(self, self.dir / "listings", [("127.0.0.1", LISTING_PORT)], "ns.zen.spamhaus.org.")
            self.listings.start(listing_zones())
            self._start_dns_servers()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    def _link(self) -> None:
        guest_ns = self.guest.netns.rsplit("/", 1)[1]
        self._ip("netns", "add", self.name)
        self._netns_made = True
        w, g = f"{self.name[-6:]}-w", f"{self.name[-6:]}-g"
        self._ip("-n", self.name, "link", "set", "lo", "up")
        self._ip("link", "add", w, "netns", self.name, "type", "veth", "peer", "name", g, "netns", guest_ns)
        self._ip("-n", guest_ns, "link", "set", g, "name", "eth0")
        self._ip("-n", self.name, "link", "set", w, "up")
        self._ip("-n", guest_ns, "link", "set", "eth0", "up")
        self._ip("-n", self.name, "addr", "add", f"{GATEWAY_V4}/{PREFIX_V4}", "dev", w)
        self._ip("-n", self.name, "addr", "add", f"{GATEWAY_V6}/{PREFIX_V6}", "dev", w, "nodad")
        self._ip("-n", guest_ns, "addr", "add", f"{self.host_ipv4}/{PREFIX_V4}", "dev", "eth0")
        self._ip("-n", guest_ns, "addr", "add", f"{self.host_ipv6}/{PREFIX_V6}", "dev", "eth0", "nodad")
        self._ip("-n", guest_ns, "route", "add", "default", "via", GATEWAY_V4)
        self._ip("-n", guest_ns, "-6", "route", "add", "default", "via", GATEWAY_V6)
        # Addresses nobody serves answer at once (ICMP unreachable) instead of timing out.
        self.exec(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"], check=True)
        for ip in (ROOT_V4, ROOT_V6, VPC_RESOLVER_V4, VPC_RESOLVER_V6, SPAMHAUS_V4, SPAMHAUS_V6):
            self.add_address(ip)
        for p in PROVIDERS.values():
            self.add_address(p.ipv4)
            self.add_address(p.ipv6)
        # What DHCP hands an EC2 host (and Debian's image puts in /etc/resolv.conf): Amazon's resolver.
        (self.guest.root / "etc/resolv.conf").unlink(missing_ok=True)
        (self.guest.root / "etc/resolv.conf").write_text(f"nameserver {VPC_RESOLVER_V4}\n")

    def _start_dns_servers(self, timeout: float = 30) -> None:
        config = {
            "resolver": {"root": ROOT_V4, "listen": [VPC_RESOLVER_V4, VPC_RESOLVER_V6]},
            "blocklist": {"listen": [SPAMHAUS_V4, SPAMHAUS_V6], "data": "127.0.0.1", "data_port": LISTING_PORT,
                          "refused_sources": [VPC_RESOLVER_V4, VPC_RESOLVER_V6], "dqs_keys": self.dqs_keys},
        }
        path = self.dir / "world_dns.json"
        path.write_text(json.dumps(config))
        proc = self.popen([sys.executable, "-m", "tests.e2e.world_dns", str(path)], log=self.dir / "world_dns.log",
                          stdout=subprocess.PIPE)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(proc.stdout.fileno(), False)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"world_dns exited: {(self.dir / 'world_dns.log').read_text()[-3000:]}")
            if b"ready" in (proc.stdout.read() or b""):
                return
            time.sleep(0.1)
        raise RuntimeError(f"world_dns not ready within {timeout}s")

    def close(self) -> None:
        for knot in (self.root, self.listings):
            if knot is not None:
                knot.stop()
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, 9)
                    proc.wait(10)
        self._procs.clear()
        if self._netns_made:
            subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True, timeout=30)
            self._netns_made = False
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the world's hosts ----------------------------------------------------

    def add_address(self, ip: str) -> None:
        """Make ``ip`` an address of the world (an internet host the guest can reach)."""
        plen, extra = ("128", ["nodad"]) if ":" in ip else ("32", [])
        self._ip("-n", self.name, "addr", "replace", f"{ip}/{plen}", "dev", "lo", *extra)

    def _argv(self, cmd: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net={self.netns}", "--", *cmd]

    def exec(self, cmd: Sequence[str], input: str | None = None, timeout: float = 60,
             check: bool = False, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a host program in the world's network namespace (cwd: the repository)."""
        res = subprocess.run(self._argv(cmd), input=input, capture_output=True, text=True, timeout=timeout,
                             check=False, cwd=str(REPO), env=None if env is None else {**os.environ, **env})
        if check and res.returncode != 0:
            raise RuntimeError(f"{list(cmd)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def popen(self, cmd: Sequence[str], log: Path | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a host program in the world's network namespace; it is stopped when the world closes.
        Its stderr (and stdout, unless given) go to ``log`` (default: a file in the world's directory)."""
        log = log or self.dir / f"proc-{len(self._procs)}.log"
        out: IO[bytes] = open(log, "ab")  # noqa: SIM115 - the child keeps it
        kwargs.setdefault("stdout", out)
        kwargs.setdefault("cwd", str(REPO))
        proc = subprocess.Popen(self._argv(cmd), stdin=subprocess.DEVNULL, stderr=out, start_new_session=True,
                                **kwargs)
        out.close()
        self._procs.append(proc)
        return proc

    # -- DNS ------------------------------------------------------------------

    def set_records(self, name: str, type_: str, rdatas: Sequence[str], ttl: int = TTL) -> None:
        """Replace ``name``'s records of ``type_`` (an empty list deletes them) where they are served:
        Spamhaus's data for names in its lists, the root server for everything else."""
        lists = [z for z in listing_zones() if name.rstrip(".").lower().endswith("." + z)]
        knot = self.listings if lists else self.root
        assert knot is not None, "the world is not running"
        knot.set_records(name, type_, rdatas, ttl)

    def list_address(self, ip: str, codes: Sequence[str] = ("127.0.0.2",), zone: str = "zen.spamhaus.org") -> None:
        """List an IPv4 address in a Spamhaus zone (``codes=()`` delists it)."""
        self.set_records(dnsbl_name(ip, zone), "A", codes)

    def probe(self, kind: str, source: str, **args: Any) -> dict[str, Any]:
        """A tests/e2e/probes.py client at world address ``source`` (added if new), to the host's IPv4."""
        self.add_address(source)
        res = self.exec([sys.executable, "-m", "tests.e2e.probes"], timeout=180,
                        input=json.dumps({"probe": kind, "source": source, **args}),
                        env={"PROBE_TARGET": self.host_ipv4})
        assert res.returncode == 0, res.stderr
        result: dict[str, Any] = json.loads(res.stdout)
        return result

    def blocklist_queries(self) -> list[str]:
        """Every question Spamhaus's name servers were asked: "<name> <type> from <address>"."""
        log = (self.dir / "world_dns.log").read_text()
        return [ln.removeprefix("blocklist: ") for ln in log.splitlines() if ln.startswith("blocklist: ")]

    def query(self, name: str, type_: str = "A", server: str = ROOT_V4, source: str | None = None) -> dict[str, Any]:
        """Ask ``server`` from inside the world: {"rcode": "NOERROR", "answer": [rdata, ...]}."""
        script = ("import dns.message, dns.query, dns.rcode, json, sys\n"
                  "q = dns.message.make_query(sys.argv[1], sys.argv[2])\n"
                  "r = dns.query.udp(q, sys.argv[3], timeout=5, source=sys.argv[4] or None)\n"
                  "print(json.dumps({'rcode': dns.rcode.to_text(r.rcode()),"
                  " 'answer': [rd.to_text() for rr in r.answer for rd in rr]}))")
        res = self.exec([sys.executable, "-c", script, name, type_, server, source or ""], timeout=30, check=True)
        result: dict[str, Any] = json.loads(res.stdout)
        return result


@contextlib.contextmanager
def provider_sinks(world: World) -> Iterator[sink.RunningSinks]:
    """The providers' MX hosts in ``world`` (tests/e2e/sink.py), on IPv4 and IPv6, with STARTTLS (a
    test CA's certificate): Gmail's (refuses senders without reverse DNS), Microsoft's, and a busy one."""
    gmail, microsoft = PROVIDERS["gmail"], PROVIDERS["microsoft"]
    for ip in (V6_FIRST_IP, BUSY_V4, BUSY_V6):
        world.add_address(ip)
    world.set_records(GOOGLEMAIL, "MX", [f"5 {V6_FIRST_MX}.", f"10 {gmail.mx}."])
    world.set_records(V6_FIRST_MX, "AAAA", [V6_FIRST_IP])
    world.set_records(BUSY, "MX", [f"10 {BUSY_MX}."])
    world.set_records(BUSY_MX, "A", [BUSY_V4])
    world.set_records(BUSY_MX, "AAAA", [BUSY_V6])
    work = world.dir / "sinks"
    work.mkdir()
    pem = TestCA(work).issue([gmail.mx, V6_FIRST_MX, microsoft.mx, BUSY_MX])
    config = sink.SinkConfig(
        sinks=(sink.Sink("gmail", gmail.mx, (gmail.ipv4, gmail.ipv6, V6_FIRST_IP), "gmail"),
               sink.Sink("microsoft", microsoft.mx, (microsoft.ipv4, microsoft.ipv6), "accept"),
               sink.Sink("busy", BUSY_MX, (BUSY_V4, BUSY_V6), "tempfail")),
        log=str(work / "deliveries.jsonl"), nameserver=VPC_RESOLVER_V4, cert=str(pem.cert), key=str(pem.key))
    running = sink.start(config, work, prefix=["nsenter", f"--net={world.netns}", "--"])
    try:
        yield running
    finally:
        running.stop()


# An outside MX host delivering to ours: one SMTP session from `source` in the world, with STARTTLS and any
# ESMTP options (e.g. RFC 3461's RET/ENVID/NOTIFY).
OUTSIDE_CLIENT = """
import json, smtplib, ssl, sys
req = json.loads(sys.stdin.read())
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
with smtplib.SMTP(req["host"], 25, local_hostname=req["helo"], source_address=(req["source"], 0), timeout=120) as c:
    c.ehlo(req["helo"])
    c.starttls(context=ctx)
    c.ehlo(req["helo"])
    c.mail(req["from"], req["mail_options"])
    rcpt = c.rcpt(req["to"], req["rcpt_options"])
    data = c.data(req["data"].encode()) if rcpt[0] == 250 else (0, b"")
print(json.dumps({"rcpt": [rcpt[0], rcpt[1].decode()], "data": [data[0], data[1].decode()]}))
"""


def deliver_from(world: World, provider: Provider, sender: str, to: str, data: str,
                 mail_options: Sequence[str] = (), rcpt_options: Sequence[str] = ()) -> dict[str, Any]:
    """`data` from `provider`'s MX address (its SPF names it) to our host, retried while postscreen or
    greylisting asks a new client to come back; the last replies to RCPT and DATA."""
    request = {"host": world.host_ipv4, "source": provider.ipv4, "helo": provider.mx, "from": sender, "to": to,
               "data": data, "mail_options": list(mail_options), "rcpt_options": list(rcpt_options)}
    reply: dict[str, Any] = {}
    for _ in range(3):
        res = world.exec([sys.executable, "-c", OUTSIDE_CLIENT], input=json.dumps(request), timeout=180)
        assert res.returncode == 0, res.stderr
        reply = json.loads(res.stdout)
        if reply["data"][0] == 250:
            return reply
        time.sleep(5)
    raise AssertionError(f"our host did not take the outside message: {reply}")
