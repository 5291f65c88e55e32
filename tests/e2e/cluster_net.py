"""The booted cluster's surroundings (issue 15), each in a network namespace of its own:

* :class:`Vpc`: the VPC stand-in, one bridge that every guest and helper namespace joins with a veth
  link; its addresses follow the cluster's plan (load-balancer, host and private subnets);
* :class:`LoadBalancer`: the NLB stand-in, HAProxy in TCP mode sending PROXY protocol v2 to the edges,
  health-checking them with a PROXY v2 LOCAL header (no client address), as the NLB does once proxy
  protocol v2 is on for a target group; the internet side is a second
  namespace (:attr:`LoadBalancer.clients_ns`) whose addresses play the outside clients;
* :class:`SharedStore`: the edges' shared rspamd store stand-in (ElastiCache for Valkey): Debian's redis-server,
  TLS only with a test CA's certificate for the endpoint's name, and an AUTH password;
* :class:`Postgres`: the directory stand-in, Debian's PostgreSQL in its own namespace, TLS on as RDS
  forces it, a streaming replica beside it, and the endpoint address that moves to the replica when it
  is promoted (what RDS's DNS name does on a Multi-AZ failover).

Everything is removed on exit; nothing here boots a guest (tests/e2e/harness.py does).
"""

from __future__ import annotations

import csv
import glob
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from components.load_balancer import HEALTH_CHECK_INTERVAL_SECONDS, HEALTH_CHECK_PORTS, HEALTH_CHECK_THRESHOLD

VPC_CIDR = "10.0.0.0/16"
LB_INSIDE = "10.0.0.5"  # the load balancer's node in its /27 (what the edges see connecting)
LB_PUBLIC = "198.51.100.10"  # its Elastic IP stand-in, on the internet side
INTERNET_CIDR = "198.51.100.0/24"
MAIL_PORTS = (25, 465, 587, 993, 995)


def run(*cmd: str, timeout: float = 60, check: bool = True, input: str | None = None,
        ) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class Namespaces:
    """Network namespaces made here, all deleted by :meth:`close` (their veth ends go with them)."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def add(self, name: str) -> str:
        run("ip", "netns", "add", name)
        self.made.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def close(self) -> None:
        for ns in reversed(self.made):
            run("ip", "netns", "delete", ns, check=False)
        self.made.clear()


class Vpc:
    """One bridge in a namespace of its own; :meth:`attach` links any namespace to it."""

    def __init__(self, tag: str, namespaces: Namespaces) -> None:
        self.ns = namespaces.add(f"vpc-{tag}")
        self._links = 0
        run("ip", "-n", self.ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.ns, "link", "set", "br0", "up")

    def attach(self, netns: str, addresses: Iterable[str], ifname: str = "eth0") -> None:
        """A veth from the bridge to ``netns`` (its end named ``ifname``), with ``addresses`` (each
        ``a.b.c.d``, in :data:`VPC_CIDR`) and a route to the whole VPC over it."""
        self._links += 1
        port = f"p{self._links}"
        run("ip", "link", "add", port, "netns", self.ns, "type", "veth", "peer", "name", ifname, "netns", netns)
        run("ip", "-n", self.ns, "link", "set", port, "master", "br0")
        run("ip", "-n", self.ns, "link", "set", port, "up")
        for address in addresses:
            assert ipaddress.ip_address(address) in ipaddress.ip_network(VPC_CIDR), address
            run("ip", "-n", netns, "addr", "add", f"{address}/16", "dev", ifname)
        run("ip", "-n", netns, "link", "set", ifname, "up")


def haproxy_config(edges: Sequence[str], ports: Sequence[int] = MAIL_PORTS, public: str = LB_PUBLIC,
                   stats_socket: Path | None = None) -> str:
    """HAProxy as the NLB: per port a TCP listener on the public address and every edge as a server
    behind it with PROXY protocol v2 (`send-proxy-v2`); HAProxy's TCP health check then sends a v2
    header with the LOCAL command and no address, as the NLB's check does. A client address sticks to one
    healthy edge (`balance source`, consistent hashing: the target groups' `source_ip` stickiness); when that
    edge fails its checks, only its clients move to another."""
    lines = [
        "global",
        "  maxconn 4096",
        *([f"  stats socket {stats_socket} mode 600 level admin"] if stats_socket else []),
        "defaults",
        "  mode tcp",
        "  timeout connect 5s",
        "  timeout client 600s",
        "  timeout server 600s",
        # The target groups' own health check (components/load_balancer.py): every 10 s, 3 to change state.
        f"  default-server inter {HEALTH_CHECK_INTERVAL_SECONDS}s fall {HEALTH_CHECK_THRESHOLD} "
        f"rise {HEALTH_CHECK_THRESHOLD}",
    ]
    for port in ports:
        lines += [f"listen mail-{port}", f"  bind {public}:{port}", "  balance source", "  hash-type consistent"]
        check = f"check port {HEALTH_CHECK_PORTS[port]}" if HEALTH_CHECK_PORTS.get(port) else "check"
        lines += [f"  server edge{k} {edge}:{port} send-proxy-v2 {check}" for k, edge in enumerate(edges, 1)]
    return "\n".join(lines) + "\n"


class LoadBalancer:
    """HAProxy between an internet namespace (the clients, :data:`INTERNET_CIDR`) and the VPC."""

    def __init__(self, tag: str, namespaces: Namespaces, vpc: Vpc, workdir: Path, edges: Sequence[str],
                 ports: Sequence[int] = MAIL_PORTS) -> None:
        self.ns = namespaces.add(f"lb-{tag}")
        self.clients_ns = namespaces.add(f"inet-{tag}")
        self.workdir = workdir
        vpc.attach(self.ns, [LB_INSIDE])
        run("ip", "link", "add", "wan0", "netns", self.ns, "type", "veth", "peer", "name", "eth0",
            "netns", self.clients_ns)
        run("ip", "-n", self.ns, "addr", "add", f"{LB_PUBLIC}/24", "dev", "wan0")
        run("ip", "-n", self.ns, "link", "set", "wan0", "up")
        run("ip", "-n", self.clients_ns, "link", "set", "eth0", "up")
        self._clients = 100
        self.config = workdir / "haproxy.cfg"
        self.stats_socket = workdir / "haproxy.sock"
        self.config.write_text(haproxy_config(edges, ports, stats_socket=self.stats_socket))
        run(*in_ns(self.ns, "haproxy", "-c", "-f", str(self.config)))
        self.log = (workdir / "haproxy.log").open("w")
        self.proc = subprocess.Popen(in_ns(self.ns, "haproxy", "-db", "-f", str(self.config)),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wanted = {f"{LB_PUBLIC}:{port}" for port in ports}
        wait_for(lambda: wanted <= set(run("ip", "netns", "exec", self.ns, "ss", "-Hltn").stdout.split()), 30,
                 f"HAProxy to listen on {sorted(wanted)}")

    def client_address(self) -> str:
        """A new outside address in the internet namespace: one per probe, so that no probe runs into
        the edges' per-client limits or fail2ban because of another."""
        self._clients += 1
        address = f"198.51.100.{self._clients}"
        run("ip", "-n", self.clients_ns, "addr", "add", f"{address}/24", "dev", "eth0")
        return address

    def server_states(self) -> dict[tuple[str, str], str]:
        """(listener, server) -> HAProxy's state of that edge by its health checks ("UP", "DOWN", ...)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = list(csv.reader(data.decode().lstrip("# ").splitlines()))
        header, body = rows[0], [r for r in rows[1:] if r]
        px, sv, status = header.index("pxname"), header.index("svname"), header.index("status")
        return {(r[px], r[sv]): r[status] for r in body if r[sv] not in ("FRONTEND", "BACKEND")}

    def _command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.stats_socket))
            s.sendall(command.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    def set_edge_state(self, edge: int, state: str) -> None:
        """Edge number `edge` (1-based, as in the configuration) on every listener into `state`: "maint" (no
        new connection goes to it, as an edge the NLB deregistered) or "ready"."""
        for listener in {px for px, _ in self.server_states()}:
            answer = self._command(f"set server {listener}/edge{edge} state {state}").strip()
            if answer:
                raise RuntimeError(f"HAProxy: set server {listener}/edge{edge} state {state}: {answer}")

    def servers_up(self) -> int:
        return sum(state == "UP" for state in self.server_states().values())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def server_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def make_ca(base: Path, name: str) -> tuple[Path, Path]:
    """A test CA's certificate and key under `base` (EC P-256, two days)."""
    ca = (base / "ca.pem", base / "ca.key")
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", str(ca[1]), "-out", str(ca[0]))
    return ca


def issue(ca: tuple[Path, Path], base: Path, san: str) -> tuple[Path, Path]:
    """A server certificate and key under `base` from `ca`, naming `san` (e.g. "DNS:a.example,IP:10.0.2.10")."""
    cert, key, csr, ext = (base / "server.crt", base / "server.key", base / "server.csr", base / "server-ext.cnf")
    run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-subj", "/CN=orgmail e2e server", "-keyout", str(key), "-out", str(csr))
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(cert))
    csr.unlink()
    ext.unlink()
    return cert, key


class SharedStore:
    """Redis in namespace ``cache-<tag>`` at `address`, as ElastiCache serves the edges' shared store: TLS only (no
    plain port) with a certificate for `name` from a test CA of its own (:attr:`ca_pem`, which the edges trust as
    they trust Amazon's), and AUTH with `password`. ``impostor``: a store the edges must refuse, its certificate
    either for another name from the same CA, or for `name` but self-signed."""

    PORT = 6379

    def __init__(self, tag: str, namespaces: Namespaces, vpc: Vpc, address: str, name: str, password: str,
                 ca: tuple[Path, Path] | None = None, impostor: str = "") -> None:
        self.ns = namespaces.add(f"cache{impostor[:3]}-{tag}")
        self.address, self.name, self.password = address, name, password
        vpc.attach(self.ns, [address])
        self.base = Path(tempfile.mkdtemp(prefix=f"orgmail-cache-{tag}-"))
        served = f"other.{name}" if impostor == "other-name" else name
        if impostor == "self-signed":  # its own CA, as far as redis-cli here is concerned
            cert, key = self.base / "server.pem", self.base / "server.key"
            run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-subj", "/CN=orgmail e2e cache", "-addext", f"subjectAltName=DNS:{served}", "-keyout", str(key),
                "-out", str(cert))
            ca = (cert, key)
        else:
            ca = ca or make_ca(self.base, "orgmail e2e cache CA")
            cert, key = issue(ca, self.base, f"DNS:{served}")
        self.ca = ca
        self.ca_pem = ca[0].read_text()
        self.log = self.base / "redis.log"
        self.command = in_ns(
            self.ns, "redis-server", "--port", "0", "--tls-port", str(self.PORT), "--bind", address,
            "--protected-mode", "no", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca[0]), "--tls-auth-clients", "no", "--requirepass", password,
            "--save", "", "--appendonly", "no", "--dir", str(self.base), "--logfile", str(self.log))
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.cli("PING", check=False) == "PONG", 30, f"the shared store at {self.address}")

    def stop(self) -> None:
        """Gone at once, as a store in an outage (its data with it: this stand-in keeps nothing on disk)."""
        self.proc.kill()
        self.proc.wait(10)

    def cli(self, *args: str, check: bool = True) -> str:
        """One redis-cli command over TLS with the password (chain verified against the store's CA)."""
        res = run(*in_ns(self.ns, "redis-cli", "--tls", "--cacert", str(self.ca[0]), "-h", self.address, "-p",
                         str(self.PORT), "--no-auth-warning", "-a", self.password, *args), check=check)
        return res.stdout.strip()

    def client_addresses(self) -> set[str]:
        """The addresses of the store's connected clients (the edges' tunnels; not this cli's own)."""
        found = set(re.findall(r"addr=([0-9.]+):\d+", self.cli("CLIENT", "LIST")))
        return found - {self.address}

    def greylisting_records(self) -> list[str]:
        return self.cli("--scan", "--pattern", "rg*").split()

    def age_greylist_records(self, seconds: int) -> int:
        """Make every rspamd greylisting record (keys rg*, holding the first attempt's time) `seconds` older, as
        if the sender's retry came that much later (their expiry kept); how many there were."""
        keys = self.greylisting_records()
        for key in keys:
            value = self.cli("GET", key)
            if value.isdigit():  # gone meanwhile: nothing to age
                assert self.cli("SET", key, str(int(value) - seconds), "KEEPTTL") == "OK"
        return len(keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.base, ignore_errors=True)


class Postgres:
    """A PostgreSQL server in namespace ``<name>-<tag>``, listening on every address of it, TLS on.

    The primary carries the endpoint address (:attr:`endpoint`) besides its own; :meth:`fail_over`
    stops it, moves the endpoint to the replica and promotes the replica, as RDS Multi-AZ does behind
    its DNS name."""

    def __init__(self, tag: str, name: str, namespaces: Namespaces, vpc: Vpc, address: str,
                 endpoint: str | None = None) -> None:
        bindir = server_binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb)")
        self.bindir = bindir
        self.ns = namespaces.add(f"{name}-{tag}")
        self.address = address
        self.endpoint = endpoint
        vpc.attach(self.ns, [address])
        if endpoint:
            # The endpoint address on a link of its own, which moves to the replica on a failover with its
            # MAC address, so the clients' ARP caches stay right (RDS changes its DNS name instead).
            vpc.attach(self.ns, [endpoint], ifname="endpoint0")
        # Its own directory under /tmp: the postgres user must reach it (a test's tmp_path is root's only).
        self.base = Path(tempfile.mkdtemp(prefix=f"orgmail-{name}-{tag}-"))
        owner = pwd.getpwnam("postgres")
        os.chown(self.base, owner.pw_uid, owner.pw_gid)
        self.base.chmod(0o700)
        self.data = self.base / "data"
        self.logfile = self.base / "server.log"
        self.as_owner = ["runuser", "-u", "postgres", "--"]

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(*in_ns(self.ns, *self.as_owner, str(self.bindir / tool), *args), timeout=timeout)

    def init_primary(self, password: str, ca: tuple[Path, Path] | None = None) -> None:
        """A new cluster: superuser `postgres` (password auth over TCP, trust on its own socket only) and
        a `replicator` role for the replica; a certificate from `ca` (RDS's is its own CA's, which the hosts
        verify) naming the endpoint address, which the replica's copy serves after a failover; without `ca`
        a self-signed one."""
        pwfile = self.base / "pw"
        pwfile.write_text(password + "\n")
        shutil.chown(pwfile, "postgres")
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", f"--pwfile={pwfile}", "--auth-local=trust",
                 "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C")
        pwfile.unlink()
        if ca is None:
            run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-days", "2", "-subj", "/CN=directory.cluster.test", "-keyout", str(self.data / "server.key"),
                "-out", str(self.data / "server.crt"))
        else:
            issue(ca, self.data, f"IP:{self.endpoint or self.address},IP:{self.address}")
        for f in ("server.key", "server.crt"):
            shutil.chown(self.data / f, "postgres")
            (self.data / f).chmod(0o600)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("listen_addresses = '*'\nssl = on\nwal_level = replica\nmax_wal_senders = 5\n"
                       "hot_standby = on\nfsync = off\nfull_page_writes = off\n"
                       f"unix_socket_directories = '{self.base}'\n")
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"hostssl all all {VPC_CIDR} scram-sha-256\n"
                      f"hostssl replication replicator {VPC_CIDR} scram-sha-256\n")
        self.start()
        self.sql(f"CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD '{password}'")

    def init_replica(self, primary: Postgres, password: str) -> None:
        """A streaming replica of ``primary`` (pg_basebackup -R), started."""
        env_pass = self.base / "pgpass"
        env_pass.write_text(f"{primary.address}:5432:replication:replicator:{password}\n")
        shutil.chown(env_pass, "postgres")
        env_pass.chmod(0o600)
        run(*in_ns(self.ns, "env", f"PGPASSFILE={env_pass}", "PGSSLMODE=require", *self.as_owner,
                   str(self.bindir / "pg_basebackup"), "-h", primary.address, "-U", "replicator", "-D",
                   str(self.data), "-R", "-X", "stream", "-w"), timeout=180)
        with (self.data / "postgresql.conf").open("a") as conf:  # the copy names the primary's socket directory
            conf.write(f"unix_socket_directories = '{self.base}'\n")
        self.start()

    def start(self) -> None:
        try:
            self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "start")
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.logfile.read_text() if self.logfile.exists() else ''}") from None

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def sql(self, statement: str, database: str = "postgres") -> str:
        """One statement as the superuser over the local socket; its rows as psql prints them unaligned."""
        return run(*in_ns(self.ns, *self.as_owner, str(self.bindir / "psql"), "-h", str(self.base), "-d",
                          database, "-v", "ON_ERROR_STOP=1", "-At", "-c", statement)).stdout.strip()

    def fail_over(self, replica: Postgres) -> None:
        """The primary stops at once (mode immediate, as a lost instance), the endpoint address moves to the
        replica, and the replica is promoted."""
        assert self.endpoint is not None
        self.stop("immediate")
        run("ip", "-n", self.ns, "link", "set", "endpoint0", "netns", replica.ns)  # its address stays behind
        run("ip", "-n", replica.ns, "addr", "add", f"{self.endpoint}/16", "dev", "endpoint0")
        run("ip", "-n", replica.ns, "link", "set", "endpoint0", "up")
        replica.endpoint, self.endpoint = self.endpoint, None
        replica._pg("pg_ctl", "-D", str(replica.data), "-w", "promote")

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def wait_for(check: Callable[..., Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """The first true value `check` returns, or TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout} s")


def new_tag() -> str:
    return uuid.uuid4().hex[:6]


def new_workdir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"cluster-{tag}-"))
