"""Network probes for the verifier: SMTP banner and STARTTLS, implicit TLS, the MTA-STS policy fetch.

Every probe connects to an explicit address (the host's expected IP) and verifies the server's
certificate for the host *name* (SNI and hostname check), against the system CAs or a given CA file.
"""

from __future__ import annotations

import datetime as dt
import http.client
import socket
import ssl
from dataclasses import dataclass

TIMEOUT = 8.0


@dataclass
class TlsResult:
    ok: bool  # connected, handshake done and certificate valid for the name
    greeting: str = ""  # the server's first line (SMTP 220 / IMAP * OK / POP3 +OK)
    error: str = ""  # why not ok
    not_after: dt.datetime | None = None
    subject: str = ""

    def days_left(self, now: dt.datetime | None = None) -> float | None:
        if self.not_after is None:
            return None
        now = now or dt.datetime.now(dt.UTC)
        return (self.not_after - now).total_seconds() / 86400


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _cert_info(sock: ssl.SSLSocket, result: TlsResult) -> None:
    cert = sock.getpeercert() or {}
    not_after = cert.get("notAfter")
    if isinstance(not_after, str):
        result.not_after = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), dt.UTC)
    names: list[str] = []
    for rdn in cert.get("subject", ()):
        for pair in rdn:
            if isinstance(pair, tuple) and pair[0] == "commonName":
                names.append(str(pair[1]))
    for san in cert.get("subjectAltName", ()):
        if isinstance(san, tuple) and san[0] == "DNS":
            names.append(str(san[1]))
    result.subject = ", ".join(dict.fromkeys(names))


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate not valid: {e.verify_message}"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    return f"{type(e).__name__}: {e}"


def _readline(f: socket.socket | ssl.SSLSocket, limit: int = 4096) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = f.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1").rstrip("\r\n")


def _smtp_reply(sock: socket.socket | ssl.SSLSocket) -> tuple[int, list[str]]:
    lines: list[str] = []
    while True:
        line = _readline(sock)
        if len(line) < 3 or not line[:3].isdigit():
            raise ConnectionError(f"not an SMTP reply: {line!r}")
        lines.append(line[4:])
        if len(line) == 3 or line[3] != "-":
            return int(line[:3]), lines


def smtp_starttls(ip: str, port: int, host: str, ctx: ssl.SSLContext, helo: str = "verify.orgmail.invalid",
                  timeout: float = TIMEOUT) -> TlsResult:
    """Connect, read the 220 banner, EHLO, STARTTLS, verify the certificate for `host`."""
    result = TlsResult(ok=False)
    try:
        with socket.create_connection((ip, port), timeout=timeout) as raw:
            code, lines = _smtp_reply(raw)
            result.greeting = f"{code} {lines[0]}" if lines else str(code)
            if code != 220:
                result.error = f"banner is not 220: {result.greeting}"
                return result
            raw.sendall(f"EHLO {helo}\r\n".encode())
            code, lines = _smtp_reply(raw)
            if code != 250 or not any(ln.upper().startswith("STARTTLS") for ln in lines):
                result.error = "STARTTLS not offered in the EHLO reply"
                return result
            raw.sendall(b"STARTTLS\r\n")
            code, lines = _smtp_reply(raw)
            if code != 220:
                result.error = f"STARTTLS refused: {code} {' '.join(lines)}"
                return result
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                _cert_info(tls, result)
                tls.sendall(f"EHLO {helo}\r\n".encode())
                _smtp_reply(tls)
                tls.sendall(b"QUIT\r\n")
            result.ok = True
    except (OSError, ConnectionError, ValueError) as e:
        result.error = _describe(e)
    return result


def implicit_tls(ip: str, port: int, host: str, ctx: ssl.SSLContext, timeout: float = TIMEOUT) -> TlsResult:
    """TLS from the first byte (465 SMTPS, 993 IMAPS, 995 POP3S): handshake, certificate, greeting."""
    result = TlsResult(ok=False)
    try:
        with socket.create_connection((ip, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            _cert_info(tls, result)
            result.greeting = _readline(tls)
            result.ok = True
    except (OSError, ValueError) as e:
        result.error = _describe(e)
    return result


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a given address, with SNI, Host header and certificate check for the name."""

    def __init__(self, name: str, ip: str, port: int, ctx: ssl.SSLContext, timeout: float) -> None:
        super().__init__(name, port, timeout=timeout, context=ctx)
        self._ip = ip
        self._ctx = ctx

    def connect(self) -> None:
        raw = socket.create_connection((self._ip, self.port or 443), self.timeout)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host)


@dataclass
class HttpResult:
    status: int = 0
    content_type: str = ""
    body: str = ""
    location: str = ""
    error: str = ""


def https_get(name: str, ip: str, port: int, path: str, ctx: ssl.SSLContext, timeout: float = TIMEOUT) -> HttpResult:
    """GET https://name/path from ip:port without following redirects (RFC 8461 3.3 forbids them)."""
    out = HttpResult()
    conn = _PinnedHTTPSConnection(name, ip, port, ctx, timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "orgmail-verify", "Accept": "text/plain"})
        resp = conn.getresponse()
        out.status = resp.status
        out.content_type = resp.getheader("Content-Type", "") or ""
        out.location = resp.getheader("Location", "") or ""
        out.body = resp.read(65536).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException, ValueError) as e:
        out.error = _describe(e)
    finally:
        conn.close()
    return out
