"""A tiny authoritative DNS server for booted-host tests (UDP): it answers the records it is given and
NXDOMAIN for every other name, at once, so rspamd's and Postfix's lookups never wait for a timeout.

    python -m tests.e2e.tinydns ADDRESS PORT RECORDS_JSON    # {"name.": {"A": [...], "TXT": [...]}}

`start_dns()` makes a booted guest's resolver answer such records (through unbound where the guest
runs it, else with this server in the guest's network namespace).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

if TYPE_CHECKING:
    from tests.e2e.harness import BootedHost

Records = dict[str, dict[str, list[str]]]


def answer(query: bytes, records: Records) -> bytes:
    request = dns.message.from_wire(query)
    response = dns.message.make_response(request)
    response.flags |= dns.flags.AA
    question = request.question[0]
    entry = records.get(question.name.to_text().lower())
    if entry is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
    else:
        kind = dns.rdatatype.to_text(question.rdtype)
        values = [f'"{v}"' if kind == "TXT" else v for v in entry.get(kind, [])]
        if values:
            response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", kind, values))
    return response.to_wire()


def serve(address: str, port: int, records: Records) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((address, port))
        while True:
            query, peer = sock.recvfrom(4096)
            try:
                sock.sendto(answer(query, records), peer)
            except Exception as e:  # a malformed query must not stop the server
                print(f"tinydns: {type(e).__name__}: {e}", file=sys.stderr)


def start_dns(guest: BootedHost, records: Records, cwd: str | None = None) -> Callable[[], None]:
    """Make the guest's resolver (resolv.conf: 127.0.0.1) answer `records`; returns the function that
    undoes it. Where the guest runs unbound (the root has it), the records go into it as local data;
    otherwise this server answers on 127.0.0.1:53 in the guest's network namespace."""
    if guest.exec(["unbound-control", "status"]).returncode == 0:
        rows = [f'{name} 60 IN {kind} "{v}"' if kind == "TXT" else f"{name} 60 IN {kind} {v}"
                for name, kinds in records.items() for kind, values in kinds.items() for v in values]
        for row in rows:
            guest.exec(["unbound-control", "local_data", row], check=True)

        def forget() -> None:
            guest.exec(["unbound-control", "local_data_remove", *records])
        return forget

    proc = subprocess.Popen(["nsenter", f"--net={guest.netns}", "--", sys.executable, "-m", "tests.e2e.tinydns",
                             "127.0.0.1", "53", json.dumps(records)], cwd=cwd, start_new_session=True)

    def stop() -> None:
        proc.kill()
        proc.wait()

    probe = "import dns.message, dns.query; dns.query.udp(dns.message.make_query('ready.test.', 'A'), '127.0.0.1', timeout=1)"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tinydns exited with {proc.returncode}")
        if guest.in_guest_net([sys.executable, "-c", probe], cwd=cwd, timeout=10).returncode == 0:
            return stop
        time.sleep(0.3)
    stop()
    raise RuntimeError("tinydns did not answer on 127.0.0.1:53")


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
