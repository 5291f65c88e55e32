"""A resolver stub for the booted guests: answers every query at once with NXDOMAIN.

The guests have no DNS (resolv.conf points at 127.0.0.1, where nothing listens). Postfix fails
such lookups at once, but rspamd's resolver waits out its timeout and retransmits (about 5 s per
message), so without this the throughput figure would measure a missing resolver. On AWS the VPC
resolver answers in about a millisecond; "no such name" is the answer it gives for the test names.
Run in the guest's network namespace: ``python -m bench.dns_stub [port]``.
"""

from __future__ import annotations

import socket
import struct
import sys


def answer(query: bytes) -> bytes | None:
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    end = 12
    for _ in range(qdcount):  # copy the question section
        while end < len(query) and query[end]:
            end += query[end] + 1
        end += 5
    rd = flags & 0x0100
    header = struct.pack("!HHHHHH", ident, 0x8000 | 0x0400 | rd | 0x0080 | 3, qdcount, 0, 0, 0)
    return header + query[12:end]


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 53
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    while True:
        data, peer = sock.recvfrom(4096)
        reply = answer(data)
        if reply:
            sock.sendto(reply, peer)


if __name__ == "__main__":
    main()
