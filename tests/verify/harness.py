"""A live test bed for tools.verify: Knot DNS on loopback, a test CA, and TLS stub servers.

Test-only overrides, all listed here:
- the Elastic IPs are loopback addresses (HOST_IPS), substituted for the plan's placeholders;
- the zones add SOA/NS, the A records Cloudflare creates for the Worker's custom domains
  (mta-sts./autoconfig.) pointing at the local HTTPS stub, a reverse zone for the PTRs (set at AWS
  in reality) and DNSBL zones that list only the RFC 5782 test entry 127.0.0.2 (the real lists are
  not reachable, nor queried);
- the SPF records of large senders (tests/verify/spf_corpus.py) in zones of their own;
- the services listen on high ports (PORTS) and the verifier is told so with --port/--https-port;
- certificates come from a CA made here, passed to the verifier with --ca-file.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from components.settings import load_settings, raw_from_pulumi_config
from tests.verify import spf_corpus
from tools.mockengine import run_program
from tools.plan import plan_document
from tools.stackfile import load_stack_config, stack_name
from tools.zonefile import zone_files

HERE = Path(__file__).resolve().parent
STACK_FILE = HERE / "fixtures" / "Pulumi.verifytest.yaml"
DNS_ADDR = ("127.0.53.53", 5353)
HOST_IPS = {"mail.example.org": "127.0.53.10", "mx2.example.org": "127.0.53.11"}
WEB_IP = "127.0.53.20"
PORTS = {25: 10025, 465: 10465, 587: 10587, 993: 10993, 995: 10995}
HTTPS_PORT = 10443
DNSBL_ZONES = ("zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org")
REVERSE_ZONE = "127.in-addr.arpa"


def require(tool: str, package: str) -> str | None:
    """Why the live tests cannot run here (None if they can). In CI (CI=true) that is a failure."""
    if shutil.which(tool) is None:
        return f"{tool} not installed (apt-get install {package})"
    return None


# ------------------------------------------------------------------ the stack and its zones


@dataclass
class Stack:
    outputs: dict[str, Any]  # as `pulumi stack output --json` prints them, with loopback addresses
    zones: dict[str, list[str]]  # zone -> record lines (no SOA/NS), the good set


def build_stack() -> Stack:
    stack = stack_name(STACK_FILE)
    config = load_stack_config(STACK_FILE)
    settings = load_settings(raw_from_pulumi_config(config), stack)
    doc = plan_document(run_program(config, stack), Path(os.environ.get("TMPDIR", "/tmp")) / "orgmail-verify-plan")
    text = json.dumps(doc["outputs"])
    for host, placeholder in doc["outputs"]["hostIps"].items():
        text = text.replace(f'"{placeholder}"', f'"{HOST_IPS[host]}"')
    outputs = json.loads(text)
    exported = zone_files(settings, outputs["dnsRecords"], outputs["hostIps"], from_plan=False)
    zones: dict[str, list[str]] = {}
    for zone, bind in exported.items():
        lines = [ln for ln in bind.splitlines() if ln and not ln.startswith(("$", ";"))]
        lines += [f"mta-sts.{zone}. 300 IN A {WEB_IP}", f"autoconfig.{zone}. 300 IN A {WEB_IP}"]
        zones[zone] = lines
    zones[REVERSE_ZONE] = [f"{'.'.join(reversed(ip.split('.')))}.in-addr.arpa. 300 IN PTR {host}."
                           for host, ip in HOST_IPS.items()]
    for z in DNSBL_ZONES:
        zones[z] = [f"2.0.0.127.{z}. 300 IN A 127.0.0.2", f'2.0.0.127.{z}. 300 IN TXT "RFC 5782 test entry"']
    for z, lines in spf_corpus.ZONES.items():
        zones[z] = list(lines)
    return Stack(outputs=outputs, zones=zones)


def owner_type(line: str) -> tuple[str, str]:
    parts = line.split()
    return parts[0].rstrip(".").lower(), parts[3].upper()


def zone_of(name: str, zones: dict[str, list[str]]) -> str:
    return max((z for z in zones if name == z or name.endswith("." + z)), key=len)


def set_records(zones: dict[str, list[str]], name: str, type_: str, rdatas: list[str], ttl: int = 300) -> None:
    """Replace the name's records of that type (an empty list deletes them)."""
    zone = zone_of(name, zones)
    zones[zone] = [ln for ln in zones[zone] if owner_type(ln) != (name, type_)]
    zones[zone] += [f"{name}. {ttl} IN {type_} {r}" for r in rdatas]


def add_records(zones: dict[str, list[str]], name: str, type_: str, rdatas: list[str], ttl: int = 300) -> None:
    zone = zone_of(name, zones)
    zones[zone] += [f"{name}. {ttl} IN {type_} {r}" for r in rdatas]


# ------------------------------------------------------------------ Knot



def knot_config(workdir: Path, listen: Sequence[tuple[str, int]], zone_files: Mapping[str, str], journal: str) -> str:
    """knotd's configuration: serve `zone_files` (zone -> file under workdir/zones) on `listen`, controlled
    through workdir/run/knot.sock; zone files are never written back, `journal` is its journal-content."""
    addresses = "[ " + ", ".join(f"{addr}@{port}" for addr, port in listen) + " ]"
    entries = "".join(f'\n  - domain: "{zone}"\n    file: {name}' for zone, name in zone_files.items())
    return f"""server:
    rundir: "{workdir}/run"
    listen: {addresses}
database:
    storage: "{workdir}/db"
control:
    listen: "{workdir}/run/knot.sock"
log:
  - target: "{workdir}/knot.log"
    any: info
template:
  - id: default
    storage: "{workdir}/zones"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: {journal}
    semantic-checks: off
zone:{entries}
"""


class Knot:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.conf = workdir / "knot.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self.serial = int(time.time()) % 1_000_000_000
        self._served: dict[str, str] = {}

    def _zone_text(self, zone: str, lines: list[str]) -> str:
        head = [f"$ORIGIN {zone}.", "$TTL 300",
                f"@ 300 IN SOA ns.verify.test. hostmaster.verify.test. {self.serial} 3600 600 86400 60",
                "@ 300 IN NS ns.verify.test."]
        return "\n".join(head + lines) + "\n"

    def start(self, zones: dict[str, list[str]]) -> None:
        for sub in ("zones", "db", "run"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(knot_config(self.dir, [DNS_ADDR], {z: f"{z}.zone" for z in zones}, "none"))
        self._write(zones)
        self.proc = subprocess.Popen(["knotd", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "knotd.stderr", "wb"))  # noqa: SIM115
        self._wait(zones)

    def _write(self, zones: dict[str, list[str]]) -> None:
        self.serial += 1
        for zone, lines in zones.items():
            (self.dir / "zones" / f"{zone}.zone").write_text(self._zone_text(zone, lines))
        self._served = {z: "\n".join(lines) for z, lines in zones.items()}

    def serve(self, zones: dict[str, list[str]]) -> None:
        """Publish these zone contents (reload Knot and wait until every zone answers the new serial)."""
        if {z: "\n".join(lines) for z, lines in zones.items()} == self._served:
            return
        self._write(zones)
        subprocess.run(["knotc", "-c", str(self.conf), "zone-reload"], check=True, capture_output=True)
        self._wait(zones)

    def _serial(self, zone: str) -> int | None:
        try:
            q = dns.message.make_query(zone + ".", dns.rdatatype.SOA)
            r = dns.query.udp(q, DNS_ADDR[0], port=DNS_ADDR[1], timeout=0.5)
            for rrset in r.answer:
                for rd in rrset:
                    return int(rd.serial)
        except (OSError, dns.exception.DNSException):
            return None
        return None

    def _wait(self, zones: dict[str, list[str]]) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("knotd exited: " + (self.dir / "knotd.stderr").read_text()
                                   + (self.dir / "knot.log").read_text() if (self.dir / "knot.log").exists() else "")
            if all(self._serial(z) == self.serial for z in zones):
                return
            time.sleep(0.05)
        log = (self.dir / "knot.log").read_text() if (self.dir / "knot.log").exists() else ""
        raise RuntimeError(f"Knot did not serve serial {self.serial} in time:\n{log[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# ------------------------------------------------------------------ certificates


@dataclass
class Pem:
    cert: Path
    key: Path


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orgmail verify test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = workdir / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._n = 0

    def issue(self, names: list[str], days: float = 60, self_signed: bool = False) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(subject if self_signed else self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        cert = builder.sign(key if self_signed else self.key, hashes.SHA256())
        self._n += 1
        pem = Pem(self.dir / f"leaf{self._n}.crt", self.dir / f"leaf{self._n}.key")
        pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        return pem


def server_context(pem: Pem) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pem.cert), str(pem.key))
    return ctx


# ------------------------------------------------------------------ stub servers


@dataclass
class Service:
    """What one stub answers; tests change these fields to break the host."""

    kind: str  # smtp | smtps | imaps | pop3s | https
    name: str  # the host name it greets with
    ctx: ssl.SSLContext
    http: dict[str, Any] = field(default_factory=dict)  # https: status, content_type, body, location


def _recv_line(sock: socket.socket | ssl.SSLSocket) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < 4096:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1").strip()


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        svc = self.server.service
        sock: socket.socket | ssl.SSLSocket = self.request
        sock.settimeout(5)
        try:
            if svc.kind == "smtp":
                self._smtp(sock, svc)
                return
            tls = svc.ctx.wrap_socket(sock, server_side=True)
            if svc.kind == "https":
                self._https(tls, svc)
                return
            greeting = {"smtps": f"220 {svc.name} ESMTP stub", "imaps": "* OK [CAPABILITY IMAP4rev1] ready",
                        "pop3s": "+OK ready"}[svc.kind]
            tls.sendall(greeting.encode() + b"\r\n")
            _recv_line(tls)
            tls.close()
        except (OSError, ssl.SSLError):
            pass

    def _smtp(self, sock: socket.socket | ssl.SSLSocket, svc: Service) -> None:
        sock.sendall(f"220 {svc.name} ESMTP stub\r\n".encode())
        secure = False
        while True:
            line = _recv_line(sock).upper()
            if not line or line.startswith("QUIT"):
                sock.sendall(b"221 bye\r\n")
                return
            if line.startswith("EHLO"):
                ext = "250 AUTH PLAIN" if secure else "250 STARTTLS"
                sock.sendall(f"250-{svc.name}\r\n250-PIPELINING\r\n{ext}\r\n".encode())
            elif line.startswith("STARTTLS") and not secure:
                sock.sendall(b"220 ready\r\n")
                sock = svc.ctx.wrap_socket(sock, server_side=True)
                secure = True
            else:
                sock.sendall(b"502 no\r\n")

    def _https(self, tls: ssl.SSLSocket, svc: Service) -> None:
        while _recv_line(tls):
            pass
        h = svc.http
        body = str(h.get("body", "")).encode()
        head = [f"HTTP/1.1 {h.get('status', 200)} X", f"Content-Type: {h.get('content_type', 'text/plain')}",
                f"Content-Length: {len(body)}", "Connection: close"]
        if h.get("location"):
            head.append(f"Location: {h['location']}")
        tls.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        tls.close()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], service: Service) -> None:
        self.service = service
        super().__init__(addr, _Handler)


class Stubs:
    """Every mail port of every host, and the MTA-STS web server, as TLS stubs on loopback."""

    def __init__(self, ca: TestCA, policy: str) -> None:
        self.ca = ca
        self.policy = policy
        self.good_certs = {h: server_context(ca.issue([h])) for h in HOST_IPS}
        self.web_ctx = server_context(ca.issue(["mta-sts.example.org", "mta-sts.example.net",
                                                "autoconfig.example.org", "autoconfig.example.net"]))
        self.services: dict[tuple[str, int], Service] = {}
        self.servers: dict[tuple[str, int], _Server] = {}
        for host, ip in HOST_IPS.items():
            kinds = {25: "smtp", 465: "smtps", 587: "smtp", 993: "imaps", 995: "pop3s"}
            for port, kind in kinds.items():
                if port != 25 and host != "mail.example.org":
                    continue
                self.services[(ip, PORTS[port])] = Service(kind, host, self.good_certs[host])
        self.services[(WEB_IP, HTTPS_PORT)] = Service(
            "https", "mta-sts", self.web_ctx, {"status": 200, "content_type": "text/plain", "body": policy})
        self._good = {addr: copy.copy(svc) for addr, svc in self.services.items()}
        for addr in self.services:
            self._start(addr)

    def _start(self, addr: tuple[str, int]) -> None:
        server = _Server(addr, self.services[addr])
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers[addr] = server

    def service(self, host: str, port: int) -> Service:
        return self.services[(HOST_IPS[host], PORTS[port])]

    @property
    def web(self) -> Service:
        return self.services[(WEB_IP, HTTPS_PORT)]

    def stop(self, host: str, port: int) -> None:
        addr = (HOST_IPS[host], PORTS[port])
        server = self.servers.pop(addr)
        server.shutdown()
        server.server_close()

    def reset(self) -> None:
        for addr, good in self._good.items():
            svc = self.services[addr]
            svc.kind, svc.name, svc.ctx, svc.http = good.kind, good.name, good.ctx, dict(good.http)
            if addr not in self.servers:
                self._start(addr)

    def close(self) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()
        self.servers.clear()


def verify_args(outputs_file: Path, ca_file: Path) -> list[str]:
    """The command line that points tools.verify at this test bed."""
    args = [str(STACK_FILE), "--outputs", str(outputs_file), "--nameserver", f"{DNS_ADDR[0]}:{DNS_ADDR[1]}",
            "--ca-file", str(ca_file), "--https-port", str(HTTPS_PORT), "--timeout", "3"]
    for service, port in PORTS.items():
        args += ["--port", f"{service}={port}"]
    return args
