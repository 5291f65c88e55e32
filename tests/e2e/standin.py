"""A stand-in SMTP next hop for the relay tests (aiosmtpd): STARTTLS with the given certificate, or
no TLS at all; every message it accepts is appended to a JSON-lines file.

    python -m tests.e2e.standin ADDRESS PORT HOSTNAME OUT.jsonl [CERT.pem KEY.pem [LOGINS]]

With LOGINS (a file of "user:password" lines, read at every attempt so a test can rotate them) it
stands in for SES's SMTP endpoint: AUTH (PLAIN or LOGIN) only after STARTTLS, and no mail without a
login, answered "530 Authentication required" as SES does; a wrong login gets SES's 535.
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


def login_of(session: Session) -> str | None:
    data = session.auth_data
    return data.login.decode() if session.authenticated and isinstance(data, LoginPassword) else None


class Recorder:
    def __init__(self, out: str) -> None:
        self.out = out

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        record: dict[str, Any] = {"mail_from": "" if envelope.mail_from == "<>" else envelope.mail_from, "rcpts": envelope.rcpt_tos,
                                  "tls": session.ssl is not None, "data": content.decode(errors="replace"),
                                  "login": login_of(session)}
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        return "250 2.0.0 Ok: stood in"


class Logins:
    """SES's SMTP credentials as this stand-in knows them (the file is read at every attempt)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
        known = set(Path(self.path).read_text().split())
        if isinstance(auth_data, LoginPassword) and \
                f"{auth_data.login.decode()}:{auth_data.password.decode()}" in known:
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False, message="535 Authentication Credentials Invalid")


def main(address: str, port: int, hostname: str, out: str, cert: str | None, key: str | None,
         logins: str | None = None) -> None:
    context = None
    if cert and key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    auth: dict[str, Any] = {"authenticator": Logins(logins), "auth_required": True,
                            "auth_require_tls": True} if logins else {}
    controller = Controller(Recorder(out), hostname=address, port=port, server_hostname=hostname,
                            tls_context=context, require_starttls=bool(logins), ready_timeout=30, **auth)
    controller.start()
    print(f"standin: listening on {address}:{port} ({'STARTTLS' if context else 'no TLS'})", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    args = sys.argv[1:]
    cert, key = args[4:6] if len(args) >= 6 else (None, None)
    main(args[0], int(args[1]), args[2], args[3], cert, key, args[6] if len(args) >= 7 else None)
