"""(4)-(7) on the booted host: boot-to-ready, inbound throughput vs a peer and stock Postfix, IMAPS, memory.

The orgmail host is the dev stack's mailbox host booted exactly as tests/e2e boot it (the same
harness and the same overrides in tests/e2e/overrides.py), with benchmark settings in its own
generated stack config (see BENCH_SETTINGS). Two baselines are booted at the same time from the same
Debian 13 root: the peer (bench/peer.py: the same packages wired as mailcow and docker-mailserver
wire them) and stock Debian Postfix ("Internet Site", dpkg-reconfigure) with local delivery to mbox.
Load runs rotate among the three guests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from bench import peer
from bench.common import ROOT, compare, cpu_ratio, cpu_times, log, median, steal_pct, summary
from components.edge import CACHE_TUNNEL
from components.server import host_config
from components.settings import load_settings, raw_from_pulumi_config
from components.userdata import HostConfig, render_user_data
from tests.e2e import harness
from tests.e2e.overrides import HOST_OVERRIDES, MOTO_PORT, put_parameters
from tools.mockengine import PROVIDER_BCRYPT_COST, MockRun, run_program
from tools.stackfile import load_stack_config

STACK = "bench"
DOMAIN = "example.org"
CLIENTS = 8  # load generators, each from its own loopback address (postscreen and anvil count per client)
SESSIONS_PER_CLIENT = 2
RECIPIENTS = [f"bench{k}@{DOMAIN}" for k in range(CLIENTS)]
SUBMIT_RECIPIENTS = [f"submit{k}@{DOMAIN}" for k in range(CLIENTS)]  # their own, to check every message is signed
SUBMITTER = f"ann@{DOMAIN}"  # a dev-stack mailbox; sends as itself
BIGBOX = f"bigbox@{DOMAIN}"
SENDER = "sender@elsewhere.example"
MESSAGE_BYTES = 2048
MAIL_PORTS = (25, 465, 587, 993, 995, 11332)
DATA_DISK_MB = 2048  # the mail volume of orgmail's host, and the peers' disk for their mail alike
# Benchmark settings, only in the benchmark's own stack config: the default per-client limits
# (10 connections, 60 messages a minute) would measure the limits, not the host.
BENCH_SETTINGS: dict[str, Any] = {
    "orgmail:rateLimits": {"connectionsPerMinute": 10000, "messagesPerMinute": 100000,
                           "recipientsPerMinute": 100000, "authPerMinute": 10000,
                           # The submission figure sends several hundred messages as one login.
                           "messagesPerUserHour": 1000000, "recipientsPerUserHour": 1000000},
}
TARGET_BOOT_SECONDS = 30.0
TARGET_RATIO = 0.5  # orgmail / stock Postfix
TARGET_PEER_RATIO = 0.9  # orgmail / the peer (issue 13)
TARGET_IDLE_MB = 1000
SMALL_TIER_MB = 4096
SERVICES = ("postfix", "dovecot", "rspamd", "redis")


def bench_config() -> dict[str, Any]:
    config = load_stack_config(ROOT / "Pulumi.dev.yaml")
    # Without a quota, as the peer's mailboxes (said outright: unset would be the tier's defaultQuota, and
    # Postfix would ask Dovecot's quota service about every recipient).
    config["orgmail:mailboxes"] = list(config["orgmail:mailboxes"]) + [
        {"address": a, "quota": "unlimited"} for a in RECIPIENTS + SUBMIT_RECIPIENTS + [BIGBOX]]
    config.update(BENCH_SETTINGS)
    return config


@dataclasses.dataclass
class Planned:
    run: MockRun
    user_data: bytes
    volume_id: str
    region: str
    host: HostConfig

    @property
    def passwords(self) -> dict[str, str]:
        return dict(self.run.outputs["initialPasswords"])


def plan_bench_stack() -> Planned:
    config = bench_config()
    run = run_program(config, STACK, bcrypt_cost=PROVIDER_BCRYPT_COST)  # Dovecot checks real-cost hashes on AUTH
    settings = load_settings(raw_from_pulumi_config(config), STACK)
    volume_id = run.one("aws:ebs/volume:Volume", "mail-data").id
    host = dataclasses.replace(host_config(settings, settings.mail_host, "mailbox", volume_id), **HOST_OVERRIDES)
    return Planned(run, gzip.compress(render_user_data(host).encode()), volume_id, settings.region, host)


WAIT_PORTS = """
import socket, sys, time
ports = [int(p) for p in sys.argv[1:]]
deadline = time.monotonic() + 300
while ports and time.monotonic() < deadline:
    for p in list(ports):
        try:
            socket.create_connection(("127.0.0.1", p), timeout=1).close()
            ports.remove(p)
        except OSError:
            pass
    time.sleep(0.05)
sys.exit(1 if ports else 0)
"""


def wait_ports(guest: harness.BootedHost, ports: tuple[int, ...]) -> None:
    res = guest.in_guest_net([sys.executable, "-c", WAIT_PORTS, *map(str, ports)], timeout=330)
    if res.returncode:
        raise harness.E2EError(f"ports {ports} did not all accept within 300 s: {res.stderr}")


def stage_seconds(guest: harness.BootedHost) -> dict[str, float]:
    """cloud-init's own per-stage times, from /run/cloud-init/status.json."""
    try:
        v1 = json.loads(guest.read_file("/run/cloud-init/status.json"))["v1"]
    except (OSError, ValueError, KeyError):
        return {}
    return {stage: round(v1[stage]["finished"] - v1[stage]["start"], 2)
            for stage in ("init-local", "init", "modules-config", "modules-final")
            if isinstance(v1.get(stage), dict) and v1[stage].get("start") and v1[stage].get("finished")}


def start_dns_stub(guest: harness.BootedHost, stubs: list[subprocess.Popen[bytes]]) -> None:
    """bench.dns_stub on the guest's 127.0.0.1:53 (a benchmark setting; see its docstring)."""
    stubs.append(subprocess.Popen(["nsenter", f"--net={guest.netns}", "--", sys.executable, "-m", "bench.dns_stub"],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def stop_dns_stubs(stubs: list[subprocess.Popen[bytes]]) -> None:
    for proc in stubs:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


@contextlib.contextmanager
def boot_orgmail(planned: Planned, name: str = "bench-mail") -> Iterator[tuple[harness.BootedHost, dict[str, Any]]]:
    marks: dict[str, float] = {}
    stubs: list[subprocess.Popen[bytes]] = []

    # A host with its own resolver (unbound on 127.0.0.1:53) boots with it; once it is up, the stub
    # takes unbound's place, so every guest's lookups get the same instant answers.
    own_resolver = b"unbound" in gzip.decompress(planned.user_data)

    def before(guest: harness.BootedHost) -> None:
        if not own_resolver:
            start_dns_stub(guest, stubs)
        put_parameters(guest, guest.start_moto(MOTO_PORT), planned.run, planned.region, planned.host)
        marks["start"] = time.monotonic()  # boot_host starts systemd-nspawn right after this

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(stop_dns_stubs, stubs)
        guest = cleanup.enter_context(harness.boot_host(
            planned.user_data, name=name, volume_id=planned.volume_id, data_disk_mb=DATA_DISK_MB, boot_timeout=120,
            before_boot=before))
        t_systemd = time.monotonic()
        status = guest.wait_cloud_init(timeout=600)
        t_cloud_init = time.monotonic()
        wait_ports(guest, MAIL_PORTS)
        t_ready = time.monotonic()
        if own_resolver:
            guest.exec(["systemctl", "stop", "unbound"], check=True, timeout=120)
            start_dns_stub(guest, stubs)
        blame = guest.exec(["cloud-init", "analyze", "blame"]).stdout.splitlines()
        timing = {
            "systemd": round(t_systemd - marks["start"], 2),
            "cloud_init": round(t_cloud_init - marks["start"], 2),
            "ready": round(t_ready - marks["start"], 2),
            "status": status.get("extended_status", status.get("status")),
            "stages": stage_seconds(guest),
            "blame_top": [line.strip() for line in blame if "s (" in line][:8],
        }
        log(f"boot: ready in {timing['ready']} s ({timing['status']})")
        yield guest, timing


BASELINE_USER_DATA = "#cloud-config\n" + json.dumps({
    "runcmd": [
        # Only Postfix: the other mail services are in the shared root but have no part here.
        # --no-block: they wait for cloud-config to finish, and a blocking stop would wait on them.
        ["systemctl", "disable", "--now", "--no-block", "rspamd", "dovecot", "redis-server", "fail2ban", "unbound",
         "postsrsd"],
        ["sh", "-c", "printf '%s\\n' 'postfix postfix/main_mailer_type select Internet Site' "
         "'postfix postfix/mailname string mail.example.org' "
         "'postfix postfix/destinations string mail.example.org, example.org, localhost' | debconf-set-selections"],
        ["sh", "-c", "DEBIAN_FRONTEND=noninteractive dpkg-reconfigure postfix"],
        # The one edit every admin makes: the mail domain is a local destination.
        ["postconf", "-e", "myhostname = mail.example.org",
         "mydestination = $myhostname, example.org, localhost.localdomain, localhost"],
        ["sh", "-c", " && ".join(f"useradd -M -s /usr/sbin/nologin {r.split('@')[0]}" for r in RECIPIENTS)],
        ["systemctl", "restart", "postfix"],
    ],
}) + "\n"


@contextlib.contextmanager
def boot_with_dns_stub(user_data: bytes, name: str, what: str,
                       data_disk_mb: int | None = None) -> Iterator[tuple[harness.BootedHost, dict[str, Any]]]:
    """A guest whose resolver is the benchmark's DNS stub, with a blank data disk of `data_disk_mb` or none;
    yields it and its cloud-init status once cloud-init has finished."""
    stubs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(stop_dns_stubs, stubs)
        guest = cleanup.enter_context(harness.boot_host(
            user_data, name=name, data_disk_mb=data_disk_mb, boot_timeout=120,
            before_boot=lambda g: start_dns_stub(g, stubs)))
        status = guest.wait_cloud_init(timeout=600)
        log(f"{what} guest: cloud-init {status.get('extended_status')}")
        yield guest, status


@contextlib.contextmanager
def boot_peer(quota_at_rcpt: bool = False) -> Iterator[harness.BootedHost]:
    name = "bench-peer-dms" if quota_at_rcpt else "bench-peer"
    # The peer's mail on the same kind of disk as orgmail's (a loop device with ext4, as the orgmail host's mail
    # volume): on the guest's root (overlayfs) its Dovecot spent 0.3-1 ms more a message (docs/benchmarks.md run 18).
    user_data = peer.user_data(RECIPIENTS, quota_at_rcpt, data_disk=harness.ebs_by_id_path()).encode()
    with boot_with_dns_stub(user_data, name, "peer", data_disk_mb=DATA_DISK_MB) as (guest, status):
        if status.get("extended_status") != "done":
            raise harness.E2EError(f"peer guest: cloud-init {status}: {guest.read_file('/var/log/cloud-init-output.log')[-3000:]!r}")
        if guest.exec(["findmnt", "-n", "-o", "FSTYPE", peer.VMAIL_HOME]).stdout.strip() != "ext4":
            raise harness.E2EError(f"peer guest: {peer.VMAIL_HOME} is not on its data disk")
        if guest.exec(["test", "-s", peer.SIEVE_AFTER.removesuffix(".sieve") + ".svbin"]).returncode:
            raise harness.E2EError("peer guest: the Sieve script was not compiled")
        wait_ports(guest, (25, 11332, 65265) if quota_at_rcpt else (25, 11332))
        for unit in ("postfix", "dovecot", "rspamd", "redis-server"):
            if guest.exec(["systemctl", "is-active", unit]).stdout.strip() != "active":
                raise harness.E2EError(f"peer guest: {unit} is not running: {guest.journal(unit)[-3000:]}")
        yield guest


@contextlib.contextmanager
def boot_baseline() -> Iterator[harness.BootedHost]:
    with boot_with_dns_stub(BASELINE_USER_DATA.encode(), "bench-stock", "baseline") as (guest, _status):
        wait_ports(guest, (25,))
        guest.exec(["systemctl", "stop", "rspamd", "dovecot", "redis-server", "fail2ban"], timeout=120)
        yield guest


def add_client_addresses(guest: harness.BootedHost) -> list[str]:
    """Loopback addresses without a preferred source, so a connection to 127.0.0.k comes from it."""
    addrs = [f"127.0.0.{10 + k}" for k in range(CLIENTS)]
    for a in addrs:
        guest.exec(["ip", "route", "replace", "local", f"{a}/32", "dev", "lo", "table", "local"], check=True)
    return addrs


def stored_count(guest: harness.BootedHost, homes: list[str]) -> int:
    """Messages in each home's INBOX and Junk (a Sieve filing spam there must not hide a delivery), kept as sdbox
    (orgmail: a file u.<uid> each beside Dovecot's index) or as Maildir (the peers)."""
    dirs = [f"{h}/{d}" for h in homes for d in ("mail/mailboxes/INBOX/dbox-Mails", "mail/mailboxes/Junk/dbox-Mails",
                                                "Maildir/new", "Maildir/cur", "Maildir/.Junk/new", "Maildir/.Junk/cur")]
    res = guest.exec(["sh", "-c", f"ls -U {' '.join(dirs)} 2>/dev/null ; true"])
    return sum(1 for line in res.stdout.splitlines()
               if line and not line.endswith(":") and not line.startswith("dovecot"))


def baseline_count(guest: harness.BootedHost, _homes: list[str]) -> int:
    res = guest.exec(["sh", "-c", "cat /var/mail/bench* 2>/dev/null | grep -c '^From ' ; true"])
    return int(res.stdout.split()[0]) if res.stdout.split() else 0


# postsrsd: orgmail's SRS daemon, which Postfix's cleanup asks for every recipient (the peers run none). A cluster
# edge's stunnel carries rspamd's Redis traffic to the edges' shared store (components/edge_cache.py).
CPU_UNITS = ("postfix.service", "dovecot.service", "rspamd.service", "redis-server.service", "fail2ban.service",
             "systemd-journald.service", "postsrsd.service", f"stunnel@{CACHE_TUNNEL}.service")


CPU_SCRIPT = r"""
tck=$(getconf CLK_TCK)
ps -eo pid=,unit= | while read -r pid unit; do
  case " $UNITS " in
    *" $unit "*) sed 's/.*) //' /proc/$pid/stat 2>/dev/null | awk -v u="$unit" -v t="$tck" '{print u, ($12+$13+$14+$15)/t}';;
  esac
done
"""


def cpu_seconds(guest: harness.BootedHost) -> dict[str, float]:
    """CPU seconds used so far by each unit's processes, with their reaped children (utime, stime,
    cutime, cstime from /proc): Postfix's and Dovecot's short-lived processes count through their
    master. Works on cgroup v1 and v2 hosts alike."""
    usage: dict[str, float] = {}
    for line in guest.exec(["sh", "-c", CPU_SCRIPT], env={"UNITS": " ".join(CPU_UNITS)}).stdout.splitlines():
        unit, _, seconds = line.partition(" ")
        usage[unit.removesuffix(".service")] = usage.get(unit.removesuffix(".service"), 0.0) + float(seconds)
    return usage


def load_run(guest: harness.BootedHost, addrs: list[str], messages: int, count: Any, homes: list[str],
             timeout: float = 300) -> dict[str, Any]:
    """smtp-source from every client address in parallel; timed until every message is in a mailbox."""
    before = count(guest, homes)
    cpu_before = cpu_seconds(guest)
    machine_before = cpu_times()
    per_client = messages // len(addrs)
    total = per_client * len(addrs)
    cmds = [f"smtp-source -s {SESSIONS_PER_CLIENT} -m {per_client} -l {MESSAGE_BYTES} -f {SENDER} "
            f"-t {RECIPIENTS[k]} -M client{k}.elsewhere.example {a}:25 &" for k, a in enumerate(addrs)]
    t0 = time.monotonic()
    sent = guest.exec(["sh", "-c", " ".join(cmds) + " wait"], timeout=timeout)
    t_accepted = time.monotonic() - t0
    if sent.returncode:
        raise harness.E2EError(f"smtp-source: {sent.stdout[-1000:]} {sent.stderr[-1000:]}")
    delivered = count(guest, homes) - before
    flushes, polls = 0, 0
    while delivered < total and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
        polls += 1
        if polls % 10 == 0 and guest.exec(["sh", "-c", "postqueue -j | grep -q delay_reason"]).returncode == 0:
            # Dovecot's per-user LMTP concurrency limit defers a message now and then when 16
            # sessions feed 8 mailboxes; Postfix would retry it only after its 5-minute backoff,
            # which would measure that backoff. Retried at once instead, on every server alike.
            guest.exec(["postqueue", "-f"])
            flushes += 1
        delivered = count(guest, homes) - before
    seconds = time.monotonic() - t0
    if delivered < total:
        raise harness.E2EError(f"only {delivered} of {total} messages delivered in {timeout} s")
    cpu_after = cpu_seconds(guest)
    stolen = steal_pct(machine_before, cpu_times())
    cpu_ms = {u: round((cpu_after[u] - cpu_before[u]) * 1000 / total, 2) for u in cpu_after if u in cpu_before}
    return {"messages": total, "seconds": round(seconds, 2), "accepted_seconds": round(t_accepted, 2),
            "msgs_per_s": round(total / seconds, 1), "cpu_ms_per_msg": cpu_ms, "queue_flushes": flushes,
            "steal_pct": stolen}


def submission_run(guest: harness.BootedHost, addrs: list[str], password: str, messages: int,
                   homes: list[str], timeout: float = 900) -> dict[str, Any]:
    """bench.submit_client: one client per address, STARTTLS + AUTH on 587, one message per connection;
    timed until every message is in its mailbox. Then counts delivered messages without a DKIM signature."""
    before = stored_count(guest, homes)
    request = {"user": SUBMITTER, "password": password, "sources": addrs, "recipients": SUBMIT_RECIPIENTS,
               "messages": messages, "bytes": MESSAGE_BYTES}
    t0 = time.monotonic()
    res = guest.in_guest_net([sys.executable, "-m", "bench.submit_client"], cwd=str(ROOT), timeout=timeout,
                             input=json.dumps(request))
    if res.returncode:
        raise harness.E2EError(f"submission client: {res.stderr[-2000:]}")
    sent = json.loads(res.stdout)
    if sent["failed"]:
        raise harness.E2EError(f"submission: {sent['failed']} of {messages} failed: {sent['errors']}")
    delivered = stored_count(guest, homes) - before
    while delivered < sent["sent"] and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
        delivered = stored_count(guest, homes) - before
    seconds = time.monotonic() - t0
    if delivered < sent["sent"]:
        raise harness.E2EError(f"only {delivered} of {sent['sent']} submitted messages delivered in {timeout} s")
    unsigned = guest.exec(["sh", "-c", "grep -L -s '^DKIM-Signature:' "
                           + " ".join(f"{h}/mail/mailboxes/INBOX/dbox-Mails/u.*" for h in homes) + " | wc -l"]).stdout
    return {"messages": sent["sent"], "seconds": round(seconds, 2), "accepted_seconds": sent["seconds"],
            "msgs_per_s": round(sent["sent"] / seconds, 1), "unsigned": int(unsigned.strip() or 0)}


def submission(guest: harness.BootedHost, password: str, messages: int, runs: int) -> dict[str, Any]:
    addrs = add_client_addresses(guest)
    homes = mail_homes(guest, SUBMIT_RECIPIENTS)
    submission_run(guest, addrs, password, CLIENTS, homes)  # warm-up, untimed
    done = []
    for i in range(runs):
        log(f"submission run {i + 1}/{runs}")
        done.append(submission_run(guest, addrs, password, messages, homes))
        log(f"  submission {done[-1]}")
    return {"runs": done, "msgs_per_s": summary([r["msgs_per_s"] for r in done], 1),
            "unsigned": sum(r["unsigned"] for r in done), "clients": CLIENTS, "message_bytes": MESSAGE_BYTES,
            "auth": "AUTH PLAIN after STARTTLS, bcrypt cost 10 (pulumi-random's) checked by Dovecot per connection"}


MEMORY_SCRIPT = r"""
ps -eo pid=,unit=,rss= | while read -r pid unit rss; do
  case "$unit" in
    postfix*|dovecot*|rspamd*|redis*)
      pss=$(awk '/^Pss:/{print $2}' /proc/$pid/smaps_rollup 2>/dev/null)
      echo "$unit $rss ${pss:-0}";;
  esac
done
"""


def memory_snapshot(guest: harness.BootedHost) -> dict[str, Any]:
    """Resident (RSS, summed: shared pages counted per process) and proportional (PSS) memory, in MB."""
    per: dict[str, dict[str, float]] = {s: {"rss_mb": 0.0, "pss_mb": 0.0, "processes": 0} for s in SERVICES}
    for line in guest.exec(["sh", "-c", MEMORY_SCRIPT]).stdout.splitlines():
        unit, rss, pss = line.split()
        service = next((s for s in SERVICES if unit.startswith(s)), None)
        if service:
            per[service]["rss_mb"] += int(rss) / 1024
            per[service]["pss_mb"] += int(pss) / 1024
            per[service]["processes"] += 1
    return {"rss_mb": round(sum(p["rss_mb"] for p in per.values()), 1),
            "pss_mb": round(sum(p["pss_mb"] for p in per.values()), 1),
            "services": {s: {k: round(v, 1) for k, v in p.items()} for s, p in per.items()}}


def wait_quiet(idle_pct: float = 90, timeout: float = 180, window: float = 3) -> dict[str, float]:
    """Wait until the machine's CPUs are at least `idle_pct` idle over `window` seconds (at most `timeout`)."""
    start = time.monotonic()
    while True:
        before = cpu_times()
        time.sleep(window)
        delta = [b - a for a, b in zip(before, cpu_times(), strict=True)]
        idle = round(100 * (delta[3] + delta[4]) / max(1, sum(delta[:8])), 1)
        waited = round(time.monotonic() - start, 1)
        if idle >= idle_pct or waited >= timeout:
            return {"waited_s": waited, "idle_pct": idle}


class MemorySampler(threading.Thread):
    """Peak of memory_snapshot() while a load runs."""

    def __init__(self, guest: harness.BootedHost, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.guest, self.interval = guest, interval
        self.peak: dict[str, Any] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(Exception):
                snap = memory_snapshot(self.guest)
                if snap["rss_mb"] > self.peak.get("rss_mb", 0):
                    self.peak = snap
            self.stopped.wait(self.interval)


def imap_measure(guest: harness.BootedHost, password: str, messages: int, runs: int) -> dict[str, Any]:
    log(f"imap: delivering {messages} messages to {BIGBOX} over LMTP")
    t0 = time.monotonic()
    guest.exec(["smtp-source", "-L", "-s", "4", "-m", str(messages), "-l", str(MESSAGE_BYTES), "-f", SENDER,
                "-t", BIGBOX, "unix:/var/spool/postfix/private/dovecot-lmtp"], timeout=1800, check=True)
    fill = time.monotonic() - t0
    res = guest.in_guest_net([sys.executable, "-m", "bench.imap_client"], cwd=str(ROOT), timeout=1800,
                             input=json.dumps({"user": BIGBOX, "password": password, "runs": runs + 1}))
    if res.returncode:
        raise harness.E2EError(f"imap client: {res.stderr[-2000:]}")
    out = json.loads(res.stdout)
    times = [r["seconds"] for r in out["runs"]]
    return {"messages": out["runs"][0]["exists"], "fill_seconds": round(fill, 1),
            "fill_msgs_per_s": round(messages / fill, 1), "cold_seconds": times[0], "seconds": summary(times[1:]),
            "header_bytes": out["runs"][-1]["bytes"]}


def mail_homes(guest: harness.BootedHost, recipients: list[str] = RECIPIENTS) -> list[str]:
    return [guest.exec(["doveadm", "user", "-f", "home", r], check=True).stdout.strip() for r in recipients]


def doveadm_total(guest: harness.BootedHost) -> int:
    total = 0
    for r in RECIPIENTS:
        out = guest.exec(["doveadm", "-f", "flow", "mailbox", "status", "-u", r, "messages", "INBOX"]).stdout
        total += int(out.split("messages=")[1].split()[0]) if "messages=" in out else 0
    return total


def measure(parts: list[str], boot_runs: int = 5, messages: int = 4000, load_runs: int = 5,
            imap_messages: int = 10000, submit_messages: int = 800, profile_runs: int = 3) -> dict[str, Any]:
    harness.require_e2e()
    planned = plan_bench_stack()
    results: dict[str, Any] = {}
    boots: list[dict[str, Any]] = []
    extra_boots = boot_runs - 1 if "boot" in parts else 0
    for i in range(extra_boots):
        log(f"boot {i + 1}/{boot_runs}")
        with boot_orgmail(planned) as (_guest, timing):
            boots.append(timing)
    if "boot" in parts:
        log(f"boot {boot_runs}/{boot_runs} (kept for the load parts)")
    with boot_orgmail(planned) as (guest, timing):
        boots.append(timing)
        if "boot" in parts:
            results["boot"] = boot_results(boots)
        if "memory" in parts:
            time.sleep(20)  # let rspamd finish its post-start work
            idle = [memory_snapshot(guest) for _ in range(5)]
            idle_med = sorted(idle, key=lambda s: s["rss_mb"])[len(idle) // 2]
            results["memory"] = {"idle": idle_med, "target_idle_mb": TARGET_IDLE_MB, "small_tier_mb": SMALL_TIER_MB,
                                 # PSS: resident memory with each shared page counted once, split among its
                                 # sharers; the RSS sum counts rspamd's shared pages once per process.
                                 "target_basis": "pss",
                                 "met": (idle_med["pss_mb"] <= TARGET_IDLE_MB) if idle_med["pss_mb"] else None}
            if "throughput" not in parts:  # memory under the same load, without the baseline
                addrs, homes = add_client_addresses(guest), mail_homes(guest)
                load_run(guest, addrs, CLIENTS * 4, stored_count, homes)
                sampler = MemorySampler(guest)
                sampler.start()
                results["memory"]["load_run"] = load_run(guest, addrs, messages, stored_count, homes)
                sampler.stopped.set()
                sampler.join()
                results["memory"]["load"] = sampler.peak
        if "throughput" in parts:
            results["throughput"] = throughput(guest, messages, load_runs, results.get("memory"),
                                               profile_runs=profile_runs)
            results["throughput"]["submission"] = submission(guest, planned.passwords[SUBMITTER], submit_messages,
                                                             max(1, load_runs - 2))
        if "imap" in parts:
            results["imap"] = imap_measure(guest, planned.passwords[BIGBOX], imap_messages, 5)
    return results


def boot_results(boots: list[dict[str, Any]]) -> dict[str, Any]:
    stages = sorted({s for b in boots for s in b["stages"]})
    ready = summary([b["ready"] for b in boots], 2)
    return {
        "systemd_seconds": summary([b["systemd"] for b in boots], 2),
        "cloud_init_seconds": summary([b["cloud_init"] for b in boots], 2),
        "ready_seconds": ready,
        "stages_median": {s: round(median([b["stages"][s] for b in boots if s in b["stages"]]), 2) for s in stages},
        "statuses": [b["status"] for b in boots],
        "blame_top_last_boot": boots[-1]["blame_top"],
        "target_seconds": TARGET_BOOT_SECONDS,
        "met": ready["median"] <= TARGET_BOOT_SECONDS,
    }


def cpu_medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median CPU milliseconds per message of each unit that used any."""
    units = sorted({u for r in runs for u in r.get("cpu_ms_per_msg", {})})
    meds = {u: round(median([r["cpu_ms_per_msg"][u] for r in runs if u in r.get("cpu_ms_per_msg", {})]), 2)
            for u in units}
    return {u: v for u, v in meds.items() if v > 0}


# Stages orgmail has and the peer has not, taken off the orgmail guest one after another (each step
# keeps the ones before) to see what each costs; restored afterwards (RESTORE).
ABLATIONS: list[tuple[str, str]] = [
    ("without fail2ban", "systemctl stop fail2ban"),
    ("without fail2ban and postscreen (smtpd on port 25)",
     "postconf -M 'smtp/inet=smtp inet n - y - - smtpd' && postfix reload"),
]
RESTORE = "postconf -M 'smtp/inet=smtp inet n - y - 1 postscreen' && postfix reload && systemctl start fail2ban"


def profile_stages(servers: dict[str, Any], messages: int, runs: int) -> dict[str, Any]:
    """orgmail with its extra stages taken off, each step in rounds paired with a peer run."""
    guest, addrs, count, homes = servers["orgmail"]
    peer_guest, peer_addrs, peer_count, peer_homes = servers["peer"]
    steps: dict[str, Any] = {}
    try:
        for name, command in ABLATIONS:
            guest.exec(["sh", "-c", command], check=True, timeout=120)
            time.sleep(2)
            load_run(guest, addrs, CLIENTS * 4, count, homes)  # untimed: smtpd processes started afresh
            ours: list[dict[str, Any]] = []
            theirs: list[dict[str, Any]] = []
            for i in range(runs):
                log(f"profile: orgmail {name}, round {i + 1}/{runs}")
                pair = [(guest, addrs, count, homes, ours), (peer_guest, peer_addrs, peer_count, peer_homes, theirs)]
                for g, a, c, h, out in pair if i % 2 == 0 else pair[::-1]:
                    out.append(load_run(g, a, messages, c, h))
                log(f"  {ours[-1]['msgs_per_s']} vs peer {theirs[-1]['msgs_per_s']} msg/s")
            steps[name] = {"runs": ours, "peer_runs": theirs, "msgs_per_s": summary([r["msgs_per_s"] for r in ours], 1),
                           "cpu_ms_per_msg": cpu_medians(ours),
                           "vs_peer": compare(ours, theirs, TARGET_PEER_RATIO) | {
                               "cpu_ratio": cpu_ratio(cpu_medians(ours), cpu_medians(theirs))},
                           "command": command}
    finally:
        guest.exec(["sh", "-c", RESTORE], timeout=120)
    return steps


def throughput(guest: harness.BootedHost, messages: int, runs: int, memory: dict[str, Any] | None,
               profile_runs: int = 0) -> dict[str, Any]:
    addrs = add_client_addresses(guest)
    homes = mail_homes(guest)
    peer_homes = [peer.home(r) for r in RECIPIENTS]
    with boot_peer() as peer_guest, boot_peer(quota_at_rcpt=True) as dms_guest, boot_baseline() as stock:
        servers: dict[str, tuple[harness.BootedHost, list[str], Any, list[str]]] = {
            "orgmail": (guest, addrs, stored_count, homes),
            "peer": (peer_guest, add_client_addresses(peer_guest), stored_count, peer_homes),
            "peer-dms": (dms_guest, add_client_addresses(dms_guest), stored_count, peer_homes),
            "stock": (stock, add_client_addresses(stock), baseline_count, []),
        }
        # Warm-up, untimed: postscreen's pregreet test holds each new client address ~6 s once,
        # then caches it; every server gets one small run.
        for g, a, count, h in servers.values():
            load_run(g, a, CLIENTS * 4, count, h)
        done: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        names = list(servers)
        # The guests booted last are still busy starting (rspamd compiles its Hyperscan databases for a minute):
        # the first timed run would share the CPU with that.
        quiet = wait_quiet()
        log(f"machine quiet after {quiet['waited_s']} s ({quiet['idle_pct']} % idle)")
        for i in range(runs):
            # Each round runs every server, in reverse order every other round (ABCD DCBA): a drift of
            # the shared machine's speed that is linear over two rounds lands on every server alike.
            for name in names if i % 2 == 0 else names[::-1]:
                log(f"throughput run {i + 1}/{runs}: {name}")
                g, a, count, h = servers[name]
                done[name].append(load_run(g, a, messages, count, h))
                log(f"  {name} {done[name][-1]}")
        # The memory figure's peak under the same load, in a run of its own, untimed: sampling every process's
        # memory map costs CPU, which slowed the timed run it once shared (orgmail's first, up to 0.7 x the others).
        sampler = MemorySampler(guest)
        sampler.start()
        load_run(guest, addrs, messages, stored_count, homes)
        sampler.stopped.set()
        sampler.join()
        peer_total, dms_total = doveadm_total(peer_guest), doveadm_total(dms_guest)
        profile = profile_stages(servers, messages, profile_runs) if profile_runs else None
    if memory is not None:
        memory["load"] = sampler.peak
    sides: dict[str, dict[str, Any]] = {
        name: {"runs": r, "msgs_per_s": summary([x["msgs_per_s"] for x in r], 1), "cpu_ms_per_msg": cpu_medians(r),
               "steal_pct": summary([x["steal_pct"] for x in r], 1)}
        for name, r in done.items()}
    sides["orgmail"]["doveadm_inbox_total"] = doveadm_total(guest)
    sides["peer"]["doveadm_inbox_total"] = peer_total
    sides["peer-dms"]["doveadm_inbox_total"] = dms_total
    vs_stock = compare(done["orgmail"], done["stock"], TARGET_RATIO)
    vs_peer = compare(done["orgmail"], done["peer"], TARGET_PEER_RATIO)
    vs_stock["cpu_ratio"] = cpu_ratio(sides["orgmail"]["cpu_ms_per_msg"], sides["stock"]["cpu_ms_per_msg"])
    vs_peer["cpu_ratio"] = cpu_ratio(sides["orgmail"]["cpu_ms_per_msg"], sides["peer"]["cpu_ms_per_msg"])
    vs_dms = compare(done["orgmail"], done["peer-dms"], TARGET_PEER_RATIO)
    vs_dms["cpu_ratio"] = cpu_ratio(sides["orgmail"]["cpu_ms_per_msg"], sides["peer-dms"]["cpu_ms_per_msg"])
    return {"orgmail": sides["orgmail"], "peer": sides["peer"], "peer_dms": sides["peer-dms"], "vs_peer_dms": vs_dms,
            "baseline": sides["stock"],
            "ratio": vs_stock["ratio"], "target_ratio": TARGET_RATIO, "met": vs_stock["met"], "vs_stock": vs_stock,
            "vs_peer": vs_peer, "profile": profile, "peer_config": {"postfix_main": peer.POSTFIX_MAIN, "files": peer.files(RECIPIENTS),
                                                      "quota_at_rcpt": {"postfix_main": peer.postfix_main(True),
                                                                        "dovecot": peer.QUOTA_STATUS_CONF}},
            "quiet_before_rounds": quiet, "clients": CLIENTS, "sessions_per_client": SESSIONS_PER_CLIENT,
            "message_bytes": MESSAGE_BYTES, "settings": BENCH_SETTINGS}
