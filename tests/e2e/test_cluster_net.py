"""The booted cluster's stand-ins work as the cloud parts they replace (tests/e2e/cluster_net.py):
HAProxy hands each edge the outside client's address in a PROXY v2 header and health-checks it with a
LOCAL header, as the NLB does; PostgreSQL streams to its replica, and after a failover the endpoint address serves
writes from the promoted replica, as RDS Multi-AZ does behind its DNS name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import harness
from tests.e2e.cluster_net import (
    LB_INSIDE,
    LB_PUBLIC,
    LoadBalancer,
    Namespaces,
    Postgres,
    Vpc,
    haproxy_config,
    in_ns,
    new_tag,
    run,
    server_binaries,
    wait_for,
)

pytestmark = pytest.mark.e2e

EDGE = "10.0.1.11"

# Accepts connections on port 25 and records, per connection, its PROXY v2 header: version, command
# (1 PROXY: on behalf of a client, whose address follows; 0 LOCAL: the balancer's own health check).
PROXY_LISTENER = r"""
import json, socket, sys
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 25)); srv.listen(16)
print("listening", flush=True)
while True:
    conn, peer = srv.accept()
    conn.settimeout(2)
    data = b""
    try:
        while len(data) < 28:
            chunk = conn.recv(64)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    seen = {"peer": peer[0]}
    if data.startswith(SIG) and len(data) >= 16:
        seen |= {"version": data[12] >> 4, "command": data[12] & 0xF, "family": data[13]}
        if data[13] == 0x11 and len(data) >= 28:
            seen["source"] = socket.inet_ntoa(data[16:20])
    else:
        seen["proxy"] = "none"
    print(json.dumps(seen), flush=True)
    conn.close()
"""


def need_tools() -> None:
    missing = [t for t in ("haproxy", "openssl") if shutil.which(t) is None]
    if server_binaries() is None:
        missing.append("PostgreSQL's server (/usr/lib/postgresql/*/bin)")
    harness.require_e2e(missing)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    need_tools()
    made = Namespaces()
    try:
        yield made
    finally:
        made.close()


def test_haproxy_config_sends_proxy_v2() -> None:
    text = haproxy_config(["10.0.1.11", "10.0.1.12"], ports=(25, 587, 993))
    assert "  bind 198.51.100.10:25" in text and "  bind 198.51.100.10:993" in text
    assert "  server edge1 10.0.1.11:25 send-proxy-v2 check\n" in text
    assert "  server edge2 10.0.1.12:993 send-proxy-v2 check\n" in text
    assert "  server edge1 10.0.1.11:587 send-proxy-v2 check port 25\n" in text  # as the target group's check
    assert "  default-server inter 10s fall 3 rise 3" in text  # the NLB target groups' check
    assert "  balance source" in text and "  hash-type consistent" in text  # the target groups' stickiness


def test_the_edge_sees_the_outside_clients_address_in_a_proxy_v2_header(namespaces: Namespaces,
                                                                        tmp_path: Path) -> None:
    tag = new_tag()
    vpc = Vpc(tag, namespaces)
    edge = namespaces.add(f"edge-{tag}")
    vpc.attach(edge, [EDGE])
    record = tmp_path / "seen.jsonl"
    with record.open("w") as out:
        listener = subprocess.Popen(in_ns(edge, sys.executable, "-u", "-c", PROXY_LISTENER, EDGE), stdout=out)
    lb = None
    try:
        lb = LoadBalancer(tag, namespaces, vpc, tmp_path, [EDGE], ports=(25,))
        client = lb.client_address()

        def seen() -> list[dict[str, object]]:
            return [json.loads(line) for line in record.read_text().splitlines() if line.startswith("{")]

        def proxied() -> bool:
            subprocess.run(in_ns(lb.clients_ns, sys.executable, "-c",
                                 "import socket,sys; s=socket.create_connection((sys.argv[1], 25), 3, (sys.argv[2], 0));"
                                 "s.recv(1)", LB_PUBLIC, client), capture_output=True, timeout=20)
            return any("source" in s for s in seen())

        wait_for(proxied, 30, "a client's connection through HAProxy", interval=1)
        wait_for(lambda: any(s.get("command") == 0 for s in seen()), 30, "a health check")
        connections = seen()
        assert [s["source"] for s in connections if "source" in s] == [client], connections
        assert all((s["version"], s["command"], s["family"]) == (2, 1, 0x11) for s in connections if "source" in s)
        # Every connection reaches the edge from the load balancer's inside address, never the client's.
        assert {s["peer"] for s in connections} == {LB_INSIDE}, connections
        # The health checks carry a header too, with command LOCAL and no address, as the NLB's do once
        # PROXY v2 is on for the target group: the edge must accept them as the balancer's own.
        checks = [s for s in connections if s.get("command") == 0]
        assert checks and all(s["version"] == 2 and "source" not in s for s in checks), connections
        assert not any(s.get("proxy") == "none" for s in connections), connections
    finally:
        if lb is not None:
            lb.stop()
        listener.kill()
        listener.wait(10)


def test_the_directory_fails_over_to_its_replica_behind_the_same_address(namespaces: Namespaces) -> None:
    tag = new_tag()
    vpc = Vpc(tag, namespaces)
    primary = Postgres(tag, "pg1", namespaces, vpc, "10.0.2.11", endpoint="10.0.2.10")
    replica = Postgres(tag, "pg2", namespaces, vpc, "10.0.2.12")
    client = namespaces.add(f"edge-{tag}")
    vpc.attach(client, [EDGE])
    password = "cluster-test-" + tag
    psql = shutil.which("psql") or str(primary.bindir / "psql")

    def over_tls(statement: str) -> subprocess.CompletedProcess[str]:
        """From the edge's namespace to the endpoint address, TLS required, as an edge connects."""
        return run(*in_ns(client, "env", f"PGPASSWORD={password}", psql,
                          "host=10.0.2.10 user=postgres dbname=postgres sslmode=require connect_timeout=3",
                          "-v", "ON_ERROR_STOP=1", "-At", "-c", statement), check=False)

    try:
        primary.init_primary(password)
        replica.init_replica(primary, password)
        made = over_tls("CREATE TABLE t (n int); INSERT INTO t VALUES (1); SELECT ssl FROM pg_stat_ssl "
                        "WHERE pid = pg_backend_pid()")
        assert made.returncode == 0 and made.stdout.strip().endswith("t"), made.stderr
        wait_for(lambda: replica.sql("SELECT count(*) FROM t") == "1", 30, "the row to reach the replica")
        assert replica.sql("SELECT pg_is_in_recovery()") == "t"

        primary.fail_over(replica)
        wait_for(lambda: replica.sql("SELECT pg_is_in_recovery()") == "f", 30, "the replica to be promoted")
        after = over_tls("INSERT INTO t VALUES (2); SELECT count(*) FROM t")
        assert after.returncode == 0 and after.stdout.splitlines()[-1] == "2", after.stdout + after.stderr
        assert over_tls("SELECT inet_server_addr()").stdout.strip() == "10.0.2.10"
        cleartext = run(*in_ns(client, "env", f"PGPASSWORD={password}", psql,
                               "host=10.0.2.10 user=postgres dbname=postgres sslmode=disable connect_timeout=3",
                               "-c", "SELECT 1"), check=False)
        assert cleartext.returncode != 0 and "no pg_hba.conf entry" in cleartext.stderr, cleartext.stderr
    finally:
        primary.close()
        replica.close()
