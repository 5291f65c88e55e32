"""A stand-in SMTP next hop for the relay tests (aiosmtpd): STARTTLS with the given certificate, or
no TLS at all; every message it accepts is appended to a JSON-lines file.

    python -m tests.e2e.standin ADDRESS PORT HOSTNAME OUT.jsonl [CERT.pem KEY.pem]
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class Recorder:
    def __init__(self, out: str) -> None:
        self.out = out

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        record: dict[str, Any] = {"mail_from": envelope.mail_from, "rcpts": envelope.rcpt_tos,
                                  "tls": session.ssl is not None, "data": content.decode(errors="replace")}
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        return "250 2.0.0 Ok: stood in"


def main(address: str, port: int, hostname: str, out: str, cert: str | None, key: str | None) -> None:
    context = None
    if cert and key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    controller = Controller(Recorder(out), hostname=address, port=port, server_hostname=hostname,
                            tls_context=context, require_starttls=False, ready_timeout=30)
    controller.start()
    print(f"standin: listening on {address}:{port} ({'STARTTLS' if context else 'no TLS'})", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], int(args[1]), args[2], args[3], *(args[4:6] if len(args) >= 6 else (None, None)))
