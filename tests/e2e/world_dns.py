"""The world's two DNS servers that Knot cannot play, run in the world's network namespace:

    python -m tests.e2e.world_dns CONFIG.json

* the shared cloud resolver (a stand-in for the AWS VPC resolver at 169.254.169.253): a plain
  iterative resolver that starts at the world's root server and sends every query from its own
  address, as a shared resolver does;
* the blocklist operator's name servers (a stand-in for Spamhaus's): queries that arrive from a
  shared resolver's address get 127.255.255.254 ("query via public/open resolver, refused") for
  every A question; every other client gets the real listing, read from the operator's own Knot
  (world-internal). DQS names (``<ip>.<key>.zen.dq.spamhaus.net``) are answered for a known key
  whatever the source, as Spamhaus's Data Query Service does.

It prints ``ready`` on stdout once every socket is bound, and runs until terminated.
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

REFUSED_ANSWER = "127.255.255.254"  # Spamhaus: "query via public/open resolver"
Handler = Callable[[dns.message.Message, str], dns.message.Message]


def _error(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    return reply


class Resolver:
    """Iterative resolution from the root, sending from ``source`` (v4) / ``source6`` (v6)."""

    def __init__(self, root: str, source: str, source6: str) -> None:
        self.root, self.source, self.source6 = root, source, source6

    def ask(self, query: dns.message.Message, server: str) -> dns.message.Message:
        src = self.source6 if ":" in server else self.source
        q = dns.message.make_query(query.question[0].name, query.question[0].rdtype)
        q.flags &= ~dns.flags.RD
        reply = dns.query.udp(q, server, timeout=3, source=src)
        if reply.flags & dns.flags.TC:
            reply = dns.query.tcp(q, server, timeout=3, source=src)
        return reply

    def resolve(self, query: dns.message.Message, _client: str) -> dns.message.Message:
        server = self.root
        for _ in range(8):  # referrals followed at most
            reply = self.ask(query, server)
            referral = (not reply.answer and reply.rcode() == dns.rcode.NOERROR
                        and any(r.rdtype == dns.rdatatype.NS for r in reply.authority)
                        and not reply.flags & dns.flags.AA)
            if not referral:
                out = dns.message.make_response(query)
                out.flags |= dns.flags.RA
                out.set_rcode(reply.rcode())
                out.answer, out.authority = reply.answer, reply.authority
                return out
            glue = [rd.address for rrset in reply.additional if rrset.rdtype == dns.rdatatype.A for rd in rrset]
            if not glue:
                return _error(query, dns.rcode.SERVFAIL)
            server = glue[0]
        return _error(query, dns.rcode.SERVFAIL)


class Blocklist:
    """A DNSBL operator's public name server in front of its data (a Knot on the world's loopback)."""

    def __init__(self, data: str, data_port: int, refused_sources: list[str], dqs_keys: list[str]) -> None:
        self.data, self.data_port = data, data_port
        self.refused = set(refused_sources)
        self.dqs_keys = set(dqs_keys)

    def _data_name(self, qname: dns.name.Name) -> dns.name.Name | None:
        """``<ip>.<key>.<list>.dq.spamhaus.net`` -> ``<ip>.<list>.spamhaus.org`` for a known key; else None."""
        labels = [label.decode().lower() for label in qname.labels if label]
        if labels[-3:] != ["dq", "spamhaus", "net"] or len(labels) < 5:
            return None
        lst, key, rest = labels[-4], labels[-5], labels[:-5]
        if key not in self.dqs_keys:
            return None
        return dns.name.from_text(".".join([*rest, lst, "spamhaus", "org"]))

    def answer(self, query: dns.message.Message, client: str) -> dns.message.Message:
        question = query.question[0]
        print(f"blocklist: {question.name} {dns.rdatatype.to_text(question.rdtype)} from {client}",
              file=sys.stderr, flush=True)
        dq = question.name.is_subdomain(dns.name.from_text("dq.spamhaus.net"))
        if client in self.refused and not dq:
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            if question.rdtype == dns.rdatatype.A:
                reply.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", REFUSED_ANSWER))
            return reply
        name = self._data_name(question.name) if dq else question.name
        if name is None:
            return _error(query, dns.rcode.NXDOMAIN)
        inner = dns.message.make_query(name, question.rdtype)
        data = dns.query.udp(inner, self.data, port=self.data_port, timeout=3)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        reply.set_rcode(data.rcode())
        for rrset in data.answer:
            reply.answer.append(dns.rrset.from_rdata_list(question.name, rrset.ttl, list(rrset)))
        if not dq:
            reply.authority = data.authority  # the zone's SOA: resolvers cache NXDOMAIN and NODATA by it
        return reply


def _serve(address: str, handle: Handler) -> list[socketserver.BaseServer]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def respond(wire: bytes, client: str, udp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        try:
            reply = handle(query, client)
        except Exception as e:  # a test server: say why on stderr, answer SERVFAIL
            print(f"world_dns: {query.question} from {client}: {e!r}", file=sys.stderr, flush=True)
            reply = _error(query, dns.rcode.SERVFAIL)
        if query.edns >= 0:
            reply.use_edns(0, payload=1232)
        out = reply.to_wire()
        limit = max(query.payload, 512) if query.edns >= 0 else 512
        if udp and len(out) > limit:  # too big for UDP: the client retries over TCP
            short = dns.message.make_response(query)
            short.flags |= dns.flags.TC
            out = short.to_wire()
        return out

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            out = respond(data, self.client_address[0], udp=True)
            if out is not None:
                sock.sendto(out, self.client_address)

    class Tcp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn: socket.socket = self.request
            conn.settimeout(5)
            head = conn.recv(2)
            if len(head) < 2:
                return
            (size,) = struct.unpack("!H", head)
            wire = b""
            while len(wire) < size:
                chunk = conn.recv(size - len(wire))
                if not chunk:
                    return
                wire += chunk
            out = respond(wire, self.client_address[0], udp=False)
            if out is not None:
                conn.sendall(struct.pack("!H", len(out)) + out)

    class UdpServer(socketserver.ThreadingUDPServer):
        address_family = family
        allow_reuse_address = True
        daemon_threads = True

    class TcpServer(socketserver.ThreadingTCPServer):
        address_family = family
        allow_reuse_address = True
        daemon_threads = True

    return [UdpServer((address, 53), Udp), TcpServer((address, 53), Tcp)]


def main(config: dict[str, Any]) -> None:
    servers: list[socketserver.BaseServer] = []
    r = config["resolver"]
    resolver = Resolver(r["root"], r["listen"][0], r["listen"][1])
    for address in r["listen"]:
        servers += _serve(address, resolver.resolve)
    b = config["blocklist"]
    blocklist = Blocklist(b["data"], b["data_port"], b["refused_sources"], b["dqs_keys"])
    for address in b["listen"]:
        servers += _serve(address, blocklist.answer)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        main(json.load(f))
