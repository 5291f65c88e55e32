"""The internet in a box works: the booted host reaches the world's DNS and hosts over both families."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest

from tests.e2e.conftest import Internet
from tests.e2e.world import (
    GATEWAY_V4,
    GATEWAY_V6,
    PROVIDERS,
    SPAMHAUS_V4,
    SPAMHAUS_V6,
    VPC_RESOLVER_V4,
    VPC_RESOLVER_V6,
    dnsbl_name,
)

pytestmark = pytest.mark.e2e

# A world host that tells each client the address it came from.
TELL_PEER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7))
s.listen()
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode())
    c.close()
"""

CONNECT = """
import socket, sys
with socket.create_connection((sys.argv[1], 7), timeout=10) as c:
    print(c.recv(100).decode())
"""

RESOLVE = """
import json, sys
import dns.message, dns.query
def ask(name, kind):
    r = dns.query.udp(dns.message.make_query(name, kind), sys.argv[1], timeout=5)
    return [rd.to_text() for rr in r.answer for rd in rr]
mx = ask(sys.argv[2], "MX")[0].split()[1]
print(json.dumps({"mx": mx, "a": ask(mx, "A"), "aaaa": ask(mx, "AAAA")}))
"""


def test_guest_is_on_the_world_like_an_ec2_host(internet: Internet) -> None:
    routes = internet.guest.exec(["ip", "-j", "route", "show", "default"], check=True).stdout
    routes6 = internet.guest.exec(["ip", "-j", "-6", "route", "show", "default"], check=True).stdout
    assert [r["gateway"] for r in json.loads(routes)] == [GATEWAY_V4]
    assert [r["gateway"] for r in json.loads(routes6)] == [GATEWAY_V6]
    addrs = internet.guest.exec(["ip", "-j", "addr", "show", "dev", "eth0"], check=True).stdout
    local = {a["local"] for link in json.loads(addrs) for a in link["addr_info"] if a["scope"] == "global"}
    assert local == {internet.world.host_ipv4, internet.world.host_ipv6}


@pytest.mark.parametrize("resolver", [VPC_RESOLVER_V4, VPC_RESOLVER_V6])
def test_guest_resolves_a_providers_mx_through_the_world(internet: Internet, resolver: str) -> None:
    gmail = PROVIDERS["gmail"]
    res = internet.guest.in_guest_net([sys.executable, "-c", RESOLVE, resolver, gmail.domain], timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"mx": gmail.mx + ".", "a": [gmail.ipv4], "aaaa": [gmail.ipv6]}


@pytest.mark.parametrize("address", ["203.0.113.7", "2001:db8:7::7"])
def test_guest_reaches_a_world_host_from_its_public_address(internet: Internet, address: str) -> None:
    """Through the guest's own firewall (nftables) and back, seen from the world with the host's address."""
    world = internet.world
    world.add_address(address)
    server = world.popen([sys.executable, "-c", TELL_PEER, address])
    try:
        for _ in range(50):
            seen = internet.guest.exec(["python3", "-c", CONNECT, address], timeout=30)
            if seen.returncode == 0:
                break
            time.sleep(0.2)
        assert seen.returncode == 0, seen.stderr
        want = world.host_ipv6 if ":" in address else world.host_ipv4
        assert seen.stdout.strip().removeprefix("::ffff:") == want
    finally:
        server.terminate()
        server.wait(10)


ASK = """
import json, sys
import dns.message, dns.query, dns.rcode
r = dns.query.udp(dns.message.make_query(sys.argv[2], "A"), sys.argv[1], timeout=5)
print(json.dumps([dns.rcode.to_text(r.rcode()), [rd.to_text() for rr in r.answer for rd in rr]]))
"""


def test_blocklist_answers_like_spamhaus(internet: Internet) -> None:
    """A listing for the host's own queries; 127.255.255.254 through the shared resolver, listed or not."""
    world = internet.world
    world.list_address("198.51.100.7")

    def ask(server: str, name: str) -> list[Any]:
        res = internet.guest.in_guest_net([sys.executable, "-c", ASK, server, name], timeout=60)
        assert res.returncode == 0, res.stderr
        answer: list[Any] = json.loads(res.stdout)
        return answer

    listed, clean = dnsbl_name("198.51.100.7"), dnsbl_name("198.51.100.8")
    assert ask(SPAMHAUS_V4, listed) == ["NOERROR", ["127.0.0.2"]]
    assert ask(SPAMHAUS_V6, listed) == ["NOERROR", ["127.0.0.2"]]
    assert ask(SPAMHAUS_V4, clean) == ["NXDOMAIN", []]
    for name in (listed, clean):
        assert ask(VPC_RESOLVER_V4, name) == ["NOERROR", ["127.255.255.254"]]
    world.list_address("198.51.100.7", codes=())
    assert ask(SPAMHAUS_V4, listed) == ["NXDOMAIN", []]
