"""Sink MX servers: stand-ins for the big providers' inbound MX hosts in the internet in a box.

Each sink listens on port 25 of its addresses (IPv4 and IPv6) with STARTTLS and judges every
message the way a receiving provider does, with lookups against the world's DNS: DKIM by dkimpy,
SPF by pyspf (for the null sender, of the HELO name: RFC 7208 2.3), and DMARC alignment of the
From: domain with a passing DKIM d= or SPF domain (relaxed: same organisational domain, RFC 7489
3.1). It appends one JSON line per message (or per refused recipient) to its log, with the raw
message, for the tests to read.

    python -m tests.e2e.sink CONFIG.json     (in the world's network namespace; prints "ready")

Policies:
- ``accept``: take every message (Microsoft's stand-in);
- ``gmail``: refuse at end of DATA, with Gmail's wording, mail from an address without a
  forward-confirmed PTR record (Gmail does so for IPv6 since 2014 and for IPv4 since 2022);
- ``tempfail``: answer every recipient 451, as a busy or throttling provider does.

Every sink refuses the recipient ``nosuchuser@...`` at RCPT, with Gmail's words for an account
that does not exist.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import ipaddress
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dkim
import dns.exception
import dns.resolver
import dns.reversename
import spf as pyspf  # type: ignore[import-untyped]
from aiosmtpd.smtp import SMTP, Envelope, Session
from publicsuffixlist import PublicSuffixList

from tools.verify_spf import PyspfLookup, through, using

POLICIES = ("accept", "gmail", "tempfail")

# Gmail's refusal (seen in bounces since 2022; RFC 7372's 5.7.25 "reverse DNS validation failed").
GMAIL_NO_PTR = (
    "550-5.7.25 [{ip}] The IP address sending this message does not have a\r\n"
    "550-5.7.25 PTR record setup, or the corresponding forward DNS entry does not\r\n"
    "550-5.7.25 point to the sending IP. As a policy, Gmail does not accept messages\r\n"
    "550-5.7.25 from IPs with missing PTR records. Please visit\r\n"
    "550-5.7.25  https://support.google.com/mail/answer/81126#ip-practices for more\r\n"
    "550 5.7.25 information. {queue_id} - gsmtp"
)
# Gmail's answer to RCPT for an account that does not exist; every sink gives it for NO_SUCH_USER.
NO_SUCH_USER = "nosuchuser"
GMAIL_NO_SUCH_USER = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
    "550-5.1.1 unnecessary spaces. Learn more at\r\n"
    "550 5.1.1  https://support.google.com/mail/?p=NoSuchUser {queue_id} - gsmtp"
)
# Microsoft's throttling answer (Exchange Online), for the tempfailing provider.
BUSY = "451 4.7.500 Server busy. Please try again later from [{ip}]. (S77714) [{host}]"


@dataclass(frozen=True)
class Sink:
    name: str  # "gmail": what the tests call the provider
    hostname: str  # the MX host name: greeting and certificate
    addresses: tuple[str, ...]  # IPv4 and IPv6 addresses it listens on
    policy: str = "accept"
    port: int = 25

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"sink {self.name}: policy {self.policy!r} is not one of {', '.join(POLICIES)}")


@dataclass(frozen=True)
class SinkConfig:
    sinks: tuple[Sink, ...]
    log: str  # JSON lines, appended
    nameserver: str  # the world's resolver
    cert: str  # PEM chain and key of a certificate naming every sink's hostname
    key: str
    dns_port: int = 53

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SinkConfig:
        raw = json.loads(text)
        raw["sinks"] = tuple(Sink(**{**s, "addresses": tuple(s["addresses"])}) for s in raw["sinks"])
        return cls(**raw)


# --- judging a message ---------------------------------------------------------------------------

_psl = PublicSuffixList()


def organisational_domain(domain: str) -> str:
    """RFC 7489 3.2 with the public suffix list; a name under an unknown TLD (.test) is its own
    label plus that TLD (the list's default rule "*")."""
    domain = domain.lower().rstrip(".")
    return str(_psl.privatesuffix(domain) or domain)


def resolver(nameserver: str, port: int = 53) -> dns.resolver.Resolver:
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = [nameserver]
    res.port = port
    res.lifetime = 10
    return res


def txt_lookup(res: dns.resolver.Resolver) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc on a given resolver."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = res.resolve(name.decode().rstrip("."), "TXT", search=False)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    return dnsfunc


def dkim_results(raw: bytes, dnsfunc: Callable[..., bytes | None]) -> list[dict[str, Any]]:
    """Every DKIM-Signature of the message, verified: [{d, s, result}]."""
    message = email.message_from_bytes(raw)
    out = []
    for idx in range(len(message.get_all("DKIM-Signature") or [])):
        d = dkim.DKIM(raw)
        try:
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
            detail = ""
        except dkim.DKIMException as e:
            ok, detail = False, str(e)
        out.append({"d": (d.domain or b"").decode(), "s": (d.selector or b"").decode(),
                    "result": "pass" if ok else "fail", "detail": detail})
    return out


def spf_result(ip: str, mail_from: str, helo: str, lookup: PyspfLookup) -> dict[str, str]:
    """check_host() for the envelope sender, or for the HELO name when the sender is null."""
    query = pyspf.query(i=ip, s=mail_from, h=helo)
    with using(lookup):
        result, _code, explanation = query.check()
    domain = query.o if query.ident == "mailfrom" else helo
    return {"result": result, "identity": query.ident, "domain": domain.lower(), "explanation": explanation}


def from_domain(raw: bytes) -> str:
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    addresses = email.utils.getaddresses(message.get_all("From") or [])
    if len(addresses) != 1 or "@" not in addresses[0][1]:
        return ""
    return addresses[0][1].rsplit("@", 1)[1].lower()


def dmarc_alignment(header_from: str, dkims: list[dict[str, Any]], spf: dict[str, str]) -> dict[str, Any]:
    """Relaxed alignment (RFC 7489 3.1): a passing identifier with the From: domain's
    organisational domain. DMARC passes when either aligns."""
    org = organisational_domain(header_from) if header_from else ""
    dkim_aligned = bool(org) and any(
        r["result"] == "pass" and organisational_domain(r["d"]) == org for r in dkims)
    spf_aligned = bool(org) and spf["result"] == "pass" and organisational_domain(spf["domain"]) == org
    return {"from_domain": header_from, "dkim_aligned": dkim_aligned, "spf_aligned": spf_aligned,
            "pass": dkim_aligned or spf_aligned}


def reverse_names(ip: str, res: dns.resolver.Resolver) -> tuple[list[str], bool]:
    """PTR names of `ip`, and whether one of them resolves back to it (forward-confirmed)."""
    try:
        ptr = res.resolve(dns.reversename.from_address(ip), "PTR", search=False)
    except dns.exception.DNSException:
        return [], False
    names = [r.target.to_text(omit_final_dot=True) for r in ptr]
    qtype = "AAAA" if ipaddress.ip_address(ip).version == 6 else "A"
    for name in names:
        try:
            forward = res.resolve(name, qtype, search=False)
        except dns.exception.DNSException:
            continue
        if any(ipaddress.ip_address(r.address) == ipaddress.ip_address(ip) for r in forward):
            return names, True
    return names, False


def judge(raw: bytes, ip: str, mail_from: str, helo: str, res: dns.resolver.Resolver) -> dict[str, Any]:
    dkims = dkim_results(raw, txt_lookup(res))
    spf = spf_result(ip, mail_from, helo, through(res))
    ptr, fcrdns = reverse_names(ip, res)
    passing = [r for r in dkims if r["result"] == "pass"]
    return {
        "dkim": dkims,
        "dkim_result": "pass" if passing else ("fail" if dkims else "none"),
        "spf": spf,
        "dmarc": dmarc_alignment(from_domain(raw), dkims, spf),
        "ptr": ptr,
        "fcrdns": fcrdns,
    }


# --- the server ------------------------------------------------------------------------------------

def peer_ip(session: Session) -> str:
    peer: tuple[str, int] = session.peer  # type: ignore[assignment]  # a (host, port, ...) tuple for TCP
    address = ipaddress.ip_address(peer[0].split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def envelope_sender(envelope: Envelope) -> str:
    """The reverse path, "" for the null sender (aiosmtpd keeps it as "<>")."""
    sender = envelope.mail_from or ""
    return "" if sender == "<>" else sender


def tls_version(session: Session) -> str | None:
    if not session.ssl:
        return None
    obj = session.ssl.get("ssl_object")
    return obj.version() if obj is not None else None


class Handler:
    def __init__(self, sink: Sink, config: SinkConfig, write: Callable[[dict[str, Any]], None]) -> None:
        self.sink, self.config, self.write = sink, config, write
        self.res = resolver(config.nameserver, config.dns_port)
        self.count = 0

    def _base(self, session: Session, envelope: Envelope) -> dict[str, Any]:
        ip = peer_ip(session)
        return {
            "sink": self.sink.name, "mx": self.sink.hostname, "time": time.time(),
            "family": "ipv6" if ":" in ip else "ipv4", "peer": ip, "helo": session.host_name,
            "tls": tls_version(session), "mail_from": envelope_sender(envelope),
        }

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        reply = ""
        if self.sink.policy == "tempfail":
            reply = BUSY.format(ip=peer_ip(session), host=self.sink.hostname)
        elif address.rsplit("@", 1)[0].lower() == NO_SUCH_USER:
            reply = GMAIL_NO_SUCH_USER.format(queue_id=f"{self.sink.name}-rcpt")
        if reply:
            self.write({**self._base(session, envelope), "rcpt_to": [address], "accepted": False, "reply": reply})
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw: bytes = envelope.original_content or b""
        record = self._base(session, envelope)
        ip = record["peer"]
        verdict = await asyncio.get_running_loop().run_in_executor(
            None, judge, raw, ip, record["mail_from"], session.host_name or "", self.res)
        self.count += 1
        queue_id = f"{self.sink.name}{self.count:06d}"
        if self.sink.policy == "gmail" and not verdict["fcrdns"]:
            reply = GMAIL_NO_PTR.format(ip=ip, queue_id=queue_id)
        else:
            reply = f"250 2.0.0 OK {queue_id} - {self.sink.name}"
        self.write({**record, "rcpt_to": list(envelope.rcpt_tos), **verdict, "accepted": reply.startswith("250"),
                    "reply": reply, "message": raw.decode("utf-8", "replace")})
        return reply


def server_tls(config: SinkConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.cert, config.key)
    return ctx


async def serve(config: SinkConfig, ready: Callable[[], None] = lambda: None,
                stop: asyncio.Event | None = None) -> None:
    """Run every sink of `config` until `stop` is set (or for ever)."""
    lock = threading.Lock()

    def write(record: dict[str, Any]) -> None:
        with lock, open(config.log, "a") as log:
            log.write(json.dumps(record) + "\n")

    loop = asyncio.get_running_loop()
    tls = server_tls(config)
    servers = []
    for sink in config.sinks:
        handler = Handler(sink, config, write)
        for address in sink.addresses:
            def factory(handler: Handler = handler, sink: Sink = sink) -> SMTP:
                return SMTP(handler, hostname=sink.hostname, ident="ESMTP", tls_context=tls,
                            require_starttls=False, decode_data=False, enable_SMTPUTF8=True)
            servers.append(await loop.create_server(factory, host=address, port=sink.port))
    ready()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        for s in servers:
            s.close()
            await s.wait_closed()


def main(argv: Sequence[str]) -> None:
    config = SinkConfig.from_json(Path(argv[0]).read_text())
    stop = asyncio.Event()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await serve(config, lambda: print("ready", flush=True), stop)

    asyncio.run(run())


# --- for the tests -----------------------------------------------------------------------------------

@dataclass
class RunningSinks:
    config: SinkConfig
    process: subprocess.Popen[str]
    _seen: int = field(default=0)

    def records(self) -> list[dict[str, Any]]:
        path = Path(self.config.log)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = 120, count: int = 1,
             what: str = "a delivery") -> list[dict[str, Any]]:
        """The first `count` records that `match`, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records() if match(r)]
            if len(found) >= count:
                return found[:count]
            if self.process.poll() is not None:
                raise AssertionError(f"the sinks exited with {self.process.returncode} waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"the sinks recorded {len(self.records())} records")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start(config: SinkConfig, workdir: Path, prefix: Sequence[str] = (), timeout: float = 30) -> RunningSinks:
    """Start the sinks of `config` as one process (in a network namespace: `prefix`, e.g.
    ["ip", "netns", "exec", "world"]); return once every listener is bound."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "sinks.json"
    conf.write_text(config.to_json())
    root = Path(__file__).resolve().parents[2]
    with open(workdir / "sinks.log", "ab") as err:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "tests.e2e.sink", str(conf)], cwd=str(root),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
    running = RunningSinks(config, proc)
    assert proc.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline() if proc.stdout else ""),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or result[0].strip() != "ready":
        running.stop()
        raise RuntimeError(f"the sinks did not start within {timeout}s; see {workdir / 'sinks.log'}")
    return running


if __name__ == "__main__":
    main(sys.argv[1:])
