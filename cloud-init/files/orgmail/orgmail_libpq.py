"""The directory's client on the cluster's hosts: libpq (libpq5, which postfix-pgsql and dovecot-pgsql
bring) through ctypes, so no other package is needed. Installed as /usr/local/lib/orgmail/orgmail_libpq.py
for orgmail-senders (edges) and orgmail-authflush (edges and shards).
"""

from __future__ import annotations

import ctypes
from typing import Any

# The directory's CA (components/directory.py DIRECTORY_CA_FILE), which the bootstrap fetches: the directory's
# certificate and name are verified.
DIRECTORY_CA_FILE = "/etc/orgmail/directory-ca.pem"
CONNECTION_OK = 0
PGRES_COMMAND_OK = 1
PGRES_TUPLES_OK = 2


def conninfo(host: str, user: str, password: str, dbname: str, application_name: str) -> str:
    """libpq's connection string: TLS with the directory's certificate and name verified (as Postfix's and Dovecot's
    `sslmode = verify-full`), and TCP keepalives, so a directory that vanished (a failover) is noticed within about a minute."""
    def quoted(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return " ".join(f"{k}={quoted(v)}" for k, v in (
        ("host", host), ("user", user), ("password", password), ("dbname", dbname), ("sslmode", "verify-full"),
        ("sslrootcert", DIRECTORY_CA_FILE),
        ("connect_timeout", "10"), ("keepalives", "1"), ("keepalives_idle", "30"), ("keepalives_interval", "10"),
        ("keepalives_count", "3"), ("application_name", application_name)))


def one_line(message: bytes) -> str:
    """libpq's message (several lines at times) on one line, for the journal."""
    return " ".join(message.decode(errors="replace").split())


class PGnotify(ctypes.Structure):
    _fields_ = [("relname", ctypes.c_char_p), ("be_pid", ctypes.c_int), ("extra", ctypes.c_char_p)]


def _library(name: str) -> Any:
    pq = ctypes.CDLL(name)
    pq.PQconnectdb.restype = ctypes.c_void_p
    pq.PQconnectdb.argtypes = [ctypes.c_char_p]
    pq.PQexec.restype = ctypes.c_void_p
    pq.PQexec.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    pq.PQerrorMessage.restype = ctypes.c_char_p
    pq.PQresultErrorMessage.restype = ctypes.c_char_p
    pq.PQgetvalue.restype = ctypes.c_char_p
    pq.PQgetvalue.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    pq.PQnotifies.restype = ctypes.POINTER(PGnotify)
    pq.PQfreemem.argtypes = [ctypes.c_void_p]
    for name in ("PQstatus", "PQerrorMessage", "PQfinish", "PQsocket", "PQconsumeInput", "PQnotifies"):
        getattr(pq, name).argtypes = [ctypes.c_void_p]
    for name in ("PQresultStatus", "PQresultErrorMessage", "PQntuples", "PQnfields", "PQclear"):
        getattr(pq, name).argtypes = [ctypes.c_void_p]
    return pq


class Connection:
    """One connection to the directory; RuntimeError (libpq's message on one line) for every failure."""

    def __init__(self, info: str, library: str = "libpq.so.5") -> None:
        self.pq = _library(library)
        self.conn = self.pq.PQconnectdb(info.encode())
        if not self.conn:
            raise RuntimeError("libpq could not allocate a connection")
        if self.pq.PQstatus(self.conn) != CONNECTION_OK:
            message = self.error()
            self.close()
            raise RuntimeError(f"directory: {message}")

    def error(self) -> str:
        return one_line(self.pq.PQerrorMessage(self.conn))

    def run(self, sql: str) -> list[tuple[str, ...]]:
        """Every row of `sql`, as strings (NULL as ""); none for a command."""
        result = self.pq.PQexec(self.conn, sql.encode())
        if not result:
            raise RuntimeError(f"directory: {self.error()}")
        try:
            status = self.pq.PQresultStatus(result)
            if status == PGRES_COMMAND_OK:
                return []
            if status != PGRES_TUPLES_OK:
                raise RuntimeError(f"directory: {one_line(self.pq.PQresultErrorMessage(result))}")
            return [tuple((self.pq.PQgetvalue(result, row, col) or b"").decode()
                          for col in range(self.pq.PQnfields(result)))
                    for row in range(self.pq.PQntuples(result))]
        finally:
            self.pq.PQclear(result)

    def socket(self) -> int:
        return int(self.pq.PQsocket(self.conn))

    def notifications(self) -> list[tuple[str, str]]:
        """(channel, payload) of every notification that arrived, after reading what the socket holds."""
        if not self.pq.PQconsumeInput(self.conn) or self.pq.PQstatus(self.conn) != CONNECTION_OK:
            raise RuntimeError(f"directory connection lost: {self.error() or 'closed'}")
        found = []
        while notify := self.pq.PQnotifies(self.conn):
            found.append(((notify.contents.relname or b"").decode(), (notify.contents.extra or b"").decode()))
            self.pq.PQfreemem(ctypes.cast(notify, ctypes.c_void_p))
        return found

    def close(self) -> None:
        if self.conn:
            self.pq.PQfinish(self.conn)
            self.conn = None


def fetch(info: str, query: str, library: str = "libpq.so.5") -> list[tuple[str, ...]]:
    """Every row of `query` on a connection of its own."""
    conn = Connection(info, library)
    try:
        return conn.run(query)
    finally:
        conn.close()
