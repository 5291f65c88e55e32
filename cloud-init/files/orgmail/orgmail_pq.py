"""orgmail_pq: the directory from a cluster host's scripts (orgmail-senders on the edges, orgmail-cache-flush on
edges and shards), through libpq (libpq5, which postfix-pgsql and dovecot-pgsql bring) and ctypes: no other
package on the hosts. Installed as /usr/local/lib/orgmail/orgmail_pq.py.
"""

from __future__ import annotations

import ctypes

CONNECTION_OK = 0
PGRES_TUPLES_OK = 2


def conninfo(settings: dict[str, str], application: str) -> str:
    """libpq's connection string: the login's host, user, password and database, TLS required."""
    def quoted(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    host = settings["hosts"].split()[0]
    return " ".join(f"{k}={quoted(v)}" for k, v in (
        ("host", host), ("user", settings["user"]), ("password", settings["password"]),
        ("dbname", settings["dbname"]), ("sslmode", "require"), ("connect_timeout", "10"),
        ("application_name", application)))


def one_line(message: bytes) -> str:
    """libpq's message (several lines at times) on one line, for the journal."""
    return " ".join(message.decode(errors="replace").split())


def fetch(info: str, query: str, library: str = "libpq.so.5") -> list[tuple[str, ...]]:
    """Every row of `query`, as strings (NULL as "")."""
    pq = ctypes.CDLL(library)
    pq.PQconnectdb.restype = ctypes.c_void_p
    pq.PQconnectdb.argtypes = [ctypes.c_char_p]
    pq.PQexec.restype = ctypes.c_void_p
    pq.PQexec.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    pq.PQerrorMessage.restype = ctypes.c_char_p
    pq.PQresultErrorMessage.restype = ctypes.c_char_p
    pq.PQgetvalue.restype = ctypes.c_char_p
    for name in ("PQstatus", "PQerrorMessage", "PQfinish"):
        getattr(pq, name).argtypes = [ctypes.c_void_p]
    for name in ("PQresultStatus", "PQresultErrorMessage", "PQntuples", "PQnfields", "PQclear"):
        getattr(pq, name).argtypes = [ctypes.c_void_p]
    pq.PQgetvalue.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    conn = pq.PQconnectdb(info.encode())
    if not conn:
        raise RuntimeError("libpq could not allocate a connection")
    try:
        if pq.PQstatus(conn) != CONNECTION_OK:
            raise RuntimeError(f"directory: {one_line(pq.PQerrorMessage(conn))}")
        result = pq.PQexec(conn, query.encode())
        if not result:
            raise RuntimeError(f"directory: {one_line(pq.PQerrorMessage(conn))}")
        try:
            if pq.PQresultStatus(result) != PGRES_TUPLES_OK:
                raise RuntimeError(f"directory: {one_line(pq.PQresultErrorMessage(result))}")
            return [tuple((pq.PQgetvalue(result, row, col) or b"").decode() for col in range(pq.PQnfields(result)))
                    for row in range(pq.PQntuples(result))]
        finally:
            pq.PQclear(result)
    finally:
        pq.PQfinish(conn)
