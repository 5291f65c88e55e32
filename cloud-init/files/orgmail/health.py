#!/usr/bin/python3
"""orgmail-health: what the mailbox host reports about itself to CloudWatch every 5 minutes (issue 18),
for the stack's alarms (components/alerts.py: thresholds and what to do, README "Alarms").

  orgmail-health [--print]

Metrics (namespace orgmail, dimensions Stack and Host): QueueMessages, QueueOldestMinutes,
MailVolumeUsedPercent, RootVolumeUsedPercent, CertificateDaysLeft (the certificate Postfix serves),
SyncAgeMinutes (since orgmail-sync last succeeded), BouncePercent (of the mail sent out in the last
hour, once at least 20 messages went out) and Blocklisted (the host's address on Spamhaus ZEN, or the
DQS zone with the stack's key, checked hourly through the host's own resolver; 127.255.255.x, a
refusal, is no listing). A value that cannot be measured is left out, and said on standard error:
an alarm then keeps its state, and the sync alarm treats silence as trouble.
--print shows the values instead of sending them.
"""

import argparse
import datetime
import ipaddress
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

STATE = Path("/var/lib/orgmail")
SYNC_OK = STATE / "sync-ok"
BLOCKLIST_CACHE = STATE / "blocklist.json"
BLOCKLIST_EVERY = 3600
HOST_ENV = "/etc/orgmail/host.env"
MAIL_ROOT = "/srv/mail"
CERT = "/etc/orgmail/tls/fullchain.pem"
BOUNCE_MINIMUM = 20
STATUS_RE = re.compile(r"\bstatus=(sent|bounced)\b")
RELAY_RE = re.compile(r"\brelay=([^,\s]+)")


def env_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line and not line.startswith("#"))
    except OSError:
        return {}


def queue_figures(entries: list, now: float) -> tuple:
    """(messages waiting, minutes the oldest has waited) from `postqueue -j` entries."""
    if not entries:
        return 0, 0
    oldest = min(int(e.get("arrival_time", now)) for e in entries)
    return len(entries), max(0, int((now - oldest) // 60))


def bounce_percent(lines: list) -> int | None:
    """Of `postfix/smtp` lines (the last hour): bounced out of all finished deliveries to other servers,
    in percent; None below BOUNCE_MINIMUM (a few bounces of little mail say nothing)."""
    sent = bounced = 0
    for line in lines:
        status = STATUS_RE.search(line)
        relay = RELAY_RE.search(line)
        if not status or (relay and relay.group(1).startswith("127.0.0.1")):
            continue  # the SRS loopback hop is no delivery out
        sent += status.group(1) == "sent"
        bounced += status.group(1) == "bounced"
    total = sent + bounced
    return None if total < BOUNCE_MINIMUM else bounced * 100 // total


def certificate_days(not_after: str, now: datetime.datetime) -> int:
    """Days left from openssl's `notAfter=Mar  3 12:00:00 2027 GMT`."""
    when = datetime.datetime.strptime(not_after.split("=", 1)[1].strip(), "%b %d %H:%M:%S %Y %Z")
    return (when.replace(tzinfo=datetime.UTC) - now).days


def listing(answers: list) -> int | None:
    """1 listed (127.0.0.2-11, ZEN's listing codes), 0 not listed (no answer), None if the answer is a
    refusal (127.255.255.x: the query came through a resolver Spamhaus refuses) or not understood."""
    if not answers:
        return 0
    codes = [ipaddress.ip_address(a) for a in answers]
    if any(c in ipaddress.ip_network("127.255.255.0/24") for c in codes):
        return None
    return 1 if any(ipaddress.ip_address("127.0.0.2") <= c <= ipaddress.ip_address("127.0.0.11") for c in codes) else 0


def _skip_name(msg: bytes, pos: int) -> int:
    while msg[pos] and msg[pos] & 0xC0 != 0xC0:
        pos += 1 + msg[pos]
    return pos + (2 if msg[pos] else 1)


def dns_a(name: str, server: str = "127.0.0.1", timeout: float = 5) -> list | None:
    """The A records of `name` from the host's own resolver, asked directly: the system's lookup would read
    /etc/hosts, which names the host itself 127.0.1.1. [] for no such name, None for no usable answer.
    (The host has no DNS library; one A question needs none.)"""
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split(".")) + b"\0"
    query = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(query, (server, 53))
            reply = s.recv(4096)
        rid, flags, qdcount, ancount = struct.unpack(">HHHH", reply[:8])
        if rid != qid or not flags & 0x8000:
            return None
        if flags & 0xF == 3:
            return []  # NXDOMAIN
        if flags & 0xF:
            return None
        pos = 12
        for _ in range(qdcount):
            pos = _skip_name(reply, pos) + 4
        found = []
        for _ in range(ancount):
            pos = _skip_name(reply, pos)
            rtype, _, _, length = struct.unpack(">HHIH", reply[pos:pos + 10])
            pos += 10
            if rtype == 1 and length == 4:
                found.append(socket.inet_ntoa(reply[pos:pos + 4]))
            pos += length
        return found
    except (OSError, struct.error, IndexError, UnicodeError):
        return None


def blocklisted(mail_host: str, now: float) -> int | None:
    """The host's published address on ZEN (through the host's resolver), at most hourly (cached)."""
    try:
        cached = json.loads(BLOCKLIST_CACHE.read_text())
        if now - cached["time"] < BLOCKLIST_EVERY:
            return cached["value"]
    except (OSError, ValueError, KeyError):
        pass
    addresses = dns_a(mail_host)
    if not addresses:
        return None
    address = addresses[0]
    # The zone postscreen queries: Spamhaus's public ZEN or, with the stack's key, its DQS zone.
    zone = subprocess.run(["postconf", "-h", "orgmail_zen"], capture_output=True, text=True).stdout.strip()
    zone = zone or "zen.spamhaus.org"
    name = ".".join(reversed(address.split("."))) + "." + zone
    answers = dns_a(name)
    value = None if answers is None else listing(sorted(set(answers)))
    if value is not None:
        BLOCKLIST_CACHE.write_text(json.dumps({"time": int(now), "value": value}) + "\n")
    return value


def used_percent(path: str) -> int:
    usage = shutil.disk_usage(path)
    return usage.used * 100 // usage.total


def measure(env: dict, problems: list) -> dict:
    now = time.time()
    values: dict = {}
    proc = subprocess.run(["postqueue", "-j"], capture_output=True, text=True)
    if proc.returncode == 0:
        entries = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        values["QueueMessages"], values["QueueOldestMinutes"] = queue_figures(entries, now)
    else:
        problems.append(f"queue: postqueue exited {proc.returncode}")
    for metric, path in (("MailVolumeUsedPercent", MAIL_ROOT), ("RootVolumeUsedPercent", "/")):
        if path == MAIL_ROOT and not os.path.ismount(MAIL_ROOT):
            problems.append(f"{MAIL_ROOT} is not mounted")
            continue
        values[metric] = used_percent(path)
    proc = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", CERT], capture_output=True, text=True)
    if proc.returncode == 0:
        values["CertificateDaysLeft"] = certificate_days(proc.stdout, datetime.datetime.now(datetime.UTC))
    else:
        problems.append(f"certificate: {CERT} unreadable")
    if SYNC_OK.exists():
        values["SyncAgeMinutes"] = int((now - SYNC_OK.stat().st_mtime) // 60)
    else:
        problems.append("sync: no successful run yet")
    proc = subprocess.run(["journalctl", "-t", "postfix/smtp", "--since", "-1h", "--no-pager", "-o", "cat"],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        values["BouncePercent"] = bounce_percent(proc.stdout.splitlines()) or 0
    else:
        problems.append(f"bounces: journalctl exited {proc.returncode}")
    listed = blocklisted(env.get("MAIL_HOST", ""), now)
    if listed is None:
        problems.append("blocklist: no usable answer (resolver or DNSBL unreachable, or the query was refused)")
    else:
        values["Blocklisted"] = listed
    return values


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(prog="orgmail-health", description="report the host's health to CloudWatch")
    parser.add_argument("--print", action="store_true", help="print the values instead of sending them")
    args = parser.parse_args(argv[1:])
    env = env_file(HOST_ENV)
    problems: list = []
    values = measure(env, problems)
    for problem in problems:
        print(f"orgmail-health: not measured: {problem}", file=sys.stderr)
    if args.print:
        print(json.dumps(values, sort_keys=True))
        return 0
    dimensions = [{"Name": "Stack", "Value": env.get("STACK", "")}, {"Name": "Host", "Value": env.get("HOSTNAME", "")}]
    data = [{"MetricName": name, "Dimensions": dimensions, "Value": float(value)} for name, value in sorted(values.items())]
    proc = subprocess.run(["aws", "cloudwatch", "put-metric-data", "--namespace", "orgmail", "--region",
                           env.get("REGION", ""), "--metric-data", json.dumps(data)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        print(f"orgmail-health: put-metric-data failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return 1
    print("orgmail-health: " + ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
