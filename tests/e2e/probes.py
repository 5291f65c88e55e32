"""Mail clients run inside the booted host's network namespace.

    nsenter -t PID -n -- python -m tests.e2e.probes   (JSON request on stdin, JSON reply on stdout)

Each probe connects from a chosen loopback source address, so that every test is its own
client for postscreen, rate limits and fail2ban (127.0.0.1 is the host itself and trusted).
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import json
import os
import poplib
import smtplib
import socket
import ssl
import sys
from typing import Any

# The mail host as the probe reaches it: its loopback, or its address on a test link.
HOST = os.environ.get("PROBE_TARGET", "127.0.0.1")


def _tls(max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = max_version
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def smtp(
    port: int,
    source: str,
    mode: str = "plain",
    login: list[str] | None = None,
    mail_from: str | None = None,
    rcpts: list[str] | None = None,
    data: str | None = None,
    helo: str = "client.test.example",
    mail_options: list[str] | None = None,
) -> dict[str, Any]:
    """One SMTP session; reports features, and each step's reply until the first refusal.
    `mail_options` are MAIL FROM parameters (SMTPUTF8 also makes smtplib send UTF-8 commands)."""
    out: dict[str, Any] = {"steps": []}
    cls = smtplib.SMTP_SSL if mode == "tls" else smtplib.SMTP
    kwargs: dict[str, Any] = {"source_address": (source, 0), "timeout": 60}
    if mode == "tls":
        kwargs["context"] = _tls()
    try:
        conn = cls(HOST, port, **kwargs)
    except (smtplib.SMTPException, OSError) as e:
        out["steps"].append(["CONNECT", getattr(e, "smtp_code", 0), f"{type(e).__name__}: {e}"])
        return out
    try:
        out["banner"] = conn.ehlo(helo)[1].decode(errors="replace")
        out["features_before_tls"] = sorted(conn.esmtp_features)
        if mode == "starttls":
            code, msg = conn.starttls(context=_tls())
            out["steps"].append(["STARTTLS", code, msg.decode(errors="replace")])
            conn.ehlo(helo)
        out["features"] = sorted(conn.esmtp_features)
        out["auth"] = conn.esmtp_features.get("auth", "")
        if login:
            try:
                conn.login(login[0], login[1])
                out["steps"].append(["AUTH", 235, "ok"])
            except smtplib.SMTPException as e:
                out["steps"].append(["AUTH", getattr(e, "smtp_code", 0), str(e)])
                return out
        if mail_from is None:
            return out
        code, msg = conn.mail(mail_from, mail_options or [])
        out["steps"].append(["MAIL", code, msg.decode(errors="replace")])
        if code >= 400:
            return out
        accepted = 0
        for rcpt in rcpts or []:
            code, msg = conn.rcpt(rcpt)
            out["steps"].append(["RCPT " + rcpt, code, msg.decode(errors="replace")])
            accepted += code < 400
        if data is not None and accepted:
            code, msg = conn.data(data.encode())
            out["steps"].append(["DATA", code, msg.decode(errors="replace")])
    except (smtplib.SMTPException, OSError) as e:
        out["steps"].append(["ERROR", getattr(e, "smtp_code", 0), f"{type(e).__name__}: {e}"])
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            conn.quit()
    return out


class _IMAP4From(imaplib.IMAP4_SSL):
    """IMAPS from a chosen source address (imaplib has no source_address)."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__(HOST, 993, ssl_context=_tls(), timeout=60)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


class _POP3From(poplib.POP3_SSL):
    """POP3S from a chosen source address."""

    def __init__(self, source: str) -> None:
        self.source, self.tls = source, _tls()
        super().__init__(HOST, 995, context=self.tls, timeout=60)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.tls.wrap_socket(sock, server_hostname=self.host)


def imap_fetch(user: str, password: str, source: str, mailbox: str = "INBOX") -> dict[str, Any]:
    try:
        conn = _IMAP4From(source)
    except OSError as e:
        return {"connected": False, "login": False, "error": f"{type(e).__name__}: {e}"}
    try:
        conn.login(user, password)
    except imaplib.IMAP4.error as e:
        conn.shutdown()
        return {"connected": True, "login": False, "error": str(e)}
    conn.select(mailbox, readonly=True)
    _, ids = conn.search(None, "ALL")
    messages = []
    for num in ids[0].split():
        _, parts = conn.fetch(num, "(RFC822)")
        first = parts[0]
        assert isinstance(first, tuple)
        messages.append(base64.b64encode(first[1]).decode())
    conn.logout()
    return {"login": True, "messages": messages}


def imap_move(user: str, password: str, source: str, message_id: str, src: str, dst: str) -> dict[str, Any]:
    """Move the message with this Message-ID from mailbox `src` to `dst` (UID MOVE, as clients do)."""
    conn = _IMAP4From(source)
    conn.login(user, password)
    conn.select(src)
    _, found = conn.uid("SEARCH", "HEADER", "Message-ID", message_id)
    uids = found[0].split()
    result = conn.uid("MOVE", uids[0], dst) if len(uids) == 1 else ("NO", [f"found {uids!r}".encode()])
    conn.logout()
    return {"status": result[0], "reply": [str(r) for r in result[1]]}


IMAP_COMMANDS = ("list", "select", "examine", "create", "delete", "append", "namespace", "status", "search", "uid")


def imap_session(user: str, password: str, source: str, commands: list[list[Any]]) -> dict[str, Any]:
    """Log in and run imaplib commands in turn (["select", "INBOX"], ["append", "Box", None, None, "text"]...);
    each reply as [type, [data...]], a command refused with a NO or BAD as ["NO", [error]]."""
    conn = _IMAP4From(source)
    try:
        conn.login(user, password)
    except imaplib.IMAP4.error as e:
        conn.shutdown()
        return {"login": False, "error": str(e)}
    replies: list[list[Any]] = []
    for name, *args in commands:
        if name not in IMAP_COMMANDS:
            raise ValueError(f"imap_session: {name!r} is not one of {IMAP_COMMANDS}")
        if name == "append":
            args[-1] = args[-1].encode()
        if name == "examine":
            name, args = "select", [*args, True]
        try:
            typ, data = getattr(conn, name)(*args)
        except imaplib.IMAP4.error as e:
            typ, data = "NO", [str(e)]
        replies.append([typ, [d.decode(errors="replace") if isinstance(d, bytes) else str(d) for d in data]])
    conn.logout()
    return {"login": True, "replies": replies}


def managesieve(user: str, password: str, source: str, scripts: dict[str, str], active: str | None,
                port: int = 4190) -> dict[str, Any]:
    """ManageSieve (RFC 5804) as webmail speaks it: STARTTLS, AUTHENTICATE PLAIN, PUTSCRIPT each script,
    SETACTIVE `active` (or none: ""), LISTSCRIPTS; every command's final response line."""
    out: dict[str, Any] = {"steps": []}
    try:
        sock = socket.create_connection((HOST, port), 30, source_address=(source, 0))
    except OSError as e:
        return {"connected": False, "error": f"{type(e).__name__}: {e}"}
    reader = sock.makefile("rb")

    def response() -> list[str]:
        got = []
        while True:
            line = reader.readline().decode(errors="replace").rstrip("\r\n")
            got.append(line)
            if not line or line.split(" ", 1)[0] in ("OK", "NO", "BYE"):
                return got

    def command(text: str, name: str) -> list[str]:
        sock.sendall(text.encode() + b"\r\n")
        got = response()
        out["steps"].append([name, got[-1]])
        return got

    out["greeting"] = response()
    command("STARTTLS", "STARTTLS")
    sock = _tls().wrap_socket(sock, server_hostname=HOST)
    reader = sock.makefile("rb")
    out["capabilities"] = response()
    plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    if not command(f'AUTHENTICATE "PLAIN" "{plain}"', "AUTHENTICATE")[-1].startswith("OK"):
        sock.close()
        return out
    for name, text in scripts.items():
        crlf = text.replace("\r\n", "\n").replace("\n", "\r\n")
        command(f'PUTSCRIPT "{name}" {{{len(crlf.encode())}+}}\r\n{crlf}', f"PUTSCRIPT {name}")
    if active is not None:
        command(f'SETACTIVE "{active}"', "SETACTIVE")
    out["scripts"] = command("LISTSCRIPTS", "LISTSCRIPTS")[:-1]
    command("LOGOUT", "LOGOUT")
    sock.close()
    return out


def pop3_fetch(user: str, password: str, source: str) -> dict[str, Any]:
    try:
        conn = _POP3From(source)
    except OSError as e:
        return {"connected": False, "login": False, "error": f"{type(e).__name__}: {e}"}
    try:
        conn.user(user)
        conn.pass_(password)
    except poplib.error_proto as e:
        conn.close()
        return {"connected": True, "login": False, "error": str(e)}
    count = len(conn.list()[1])
    messages = [base64.b64encode(b"\r\n".join(conn.retr(i + 1)[1]) + b"\r\n").decode() for i in range(count)]
    conn.quit()
    return {"login": True, "messages": messages}


def plaintext_login(port: int, user: str, password: str, source: str) -> dict[str, Any]:
    """Try a cleartext IMAP (143) or POP3 (110) login; report how far it got."""
    try:
        sock = socket.create_connection((HOST, port), timeout=10, source_address=(source, 0))
    except OSError as e:
        return {"connected": False, "error": str(e)}
    sock.close()
    try:
        if port == 143:
            conn = imaplib.IMAP4(HOST, port, timeout=10)
            conn.login(user, password)
        else:
            pop = poplib.POP3(HOST, port, timeout=10)
            pop.user(user)
            pop.pass_(password)
        return {"connected": True, "login": True}
    except (imaplib.IMAP4.error, poplib.error_proto, OSError) as e:
        return {"connected": True, "login": False, "error": str(e)}


def tls_handshake(port: int, version: str, starttls: str | None, source: str) -> dict[str, Any]:
    """Handshake with the highest protocol capped at `version` (e.g. TLSv1_1)."""
    ctx = _tls(getattr(ssl.TLSVersion, version))
    try:
        sock = socket.create_connection((HOST, port), timeout=30, source_address=(source, 0))
    except OSError as e:
        return {"handshake": False, "connected": False, "error": str(e)}
    try:
        f = sock.makefile("rb")
        if starttls == "smtp":
            f.readline()
            sock.sendall(b"EHLO client.test.example\r\n")
            while f.readline()[3:4] != b" ":
                pass
            sock.sendall(b"STARTTLS\r\n")
            f.readline()
        tls = ctx.wrap_socket(sock, server_hostname="mail.example.org")
        result = {
            "handshake": True,
            "version": tls.version(),
            "cert": ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True) or b""),
        }
        tls.close()
        return result
    except (ssl.SSLError, OSError) as e:
        return {"handshake": False, "error": str(e)}
    finally:
        sock.close()


def raw_smtp(port: int, source: str, chunks: list[str]) -> dict[str, Any]:
    """Send `chunks` byte for byte (no client-side line fixing); return everything the server said."""
    sock = socket.create_connection((HOST, port), timeout=30, source_address=(source, 0))
    received = b""

    def read_until_quiet(first: float, quiet: float = 1.0) -> bytes:
        """Wait up to `first` seconds for a reply, then read until `quiet` seconds pass in silence."""
        data = b""
        sock.settimeout(first)
        while True:
            try:
                part = sock.recv(65536)
            except (TimeoutError, OSError):
                return data
            if not part:
                return data
            data += part
            sock.settimeout(quiet)

    try:
        # The greeting may come in parts (postscreen's "220-" then "220 "): wait for its last line.
        sock.settimeout(30)
        while not any(line[3:4] == b" " for line in received.splitlines()):
            part = sock.recv(65536)
            if not part:
                break
            received += part
        for chunk in chunks:
            sock.sendall(chunk.encode())
            received += read_until_quiet(3)
    finally:
        sock.close()
    return {"replies": received.decode(errors="replace").splitlines()}


def port_open(port: int, source: str) -> dict[str, Any]:
    try:
        socket.create_connection((HOST, port), timeout=5, source_address=(source, 0)).close()
        return {"open": True}
    except OSError as e:
        return {"open": False, "error": f"{type(e).__name__}: {e}"}


def tls_watch(ports: list[list[Any]], stop_file: str, seconds: float, first_source: int) -> dict[str, Any]:
    """Handshake on every [port, starttls] again and again, from a new source address each time (port
    25's rate limits count per address), until `stop_file` exists or `seconds` have passed: which
    certificate the host served from the first connection it accepted. One entry per attempt:
    [port, time, sha256 of the certificate or None when no handshake completed]."""
    import hashlib
    import time

    attempts: list[list[Any]] = []
    deadline, n = time.monotonic() + seconds, first_source
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        for port, starttls in ports:
            n += 1
            hs = tls_handshake(port, "TLSv1_3", starttls, f"127.0.{n // 254 % 256}.{n % 254 + 2}")
            der = ssl.PEM_cert_to_DER_cert(hs["cert"]) if hs["handshake"] else b""
            attempts.append([port, time.time(), hashlib.sha256(der).hexdigest() if der else None])
        time.sleep(0.2)
    return {"attempts": attempts}


def main() -> None:
    request = json.load(sys.stdin)
    probes: dict[str, Any] = {
        "smtp": smtp,
        "imap_fetch": imap_fetch,
        "imap_move": imap_move,
        "imap_session": imap_session,
        "managesieve": managesieve,
        "pop3_fetch": pop3_fetch,
        "plaintext_login": plaintext_login,
        "tls_handshake": tls_handshake,
        "raw_smtp": raw_smtp,
        "port_open": port_open,
        "tls_watch": tls_watch,
    }
    json.dump(probes[request.pop("probe")](**request), sys.stdout)


if __name__ == "__main__":
    main()
