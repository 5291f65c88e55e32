"""IMAPS client for (6), run in the guest's network namespace: LIST, SELECT, FETCH every header.

Reads {"user", "password", "runs"} as JSON on stdin; prints {"runs": [{seconds, exists, bytes}]}.
"""

from __future__ import annotations

import imaplib
import json
import ssl
import sys
import time
from typing import Any


def one_run(user: str, password: str) -> dict[str, Any]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the booted host keeps its self-signed certificate
    t0 = time.perf_counter()
    imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx, timeout=600)
    imap.login(user, password)
    imap.list()
    typ, data = imap.select("INBOX", readonly=True)
    exists = int(data[0] or 0)
    typ, fetched = imap.fetch("1:*", "(UID BODY.PEEK[HEADER])")
    size = sum(len(part[1]) for part in fetched if isinstance(part, tuple))
    imap.logout()
    return {"seconds": round(time.perf_counter() - t0, 3), "exists": exists, "bytes": size}


def main() -> None:
    args = json.load(sys.stdin)
    json.dump({"runs": [one_run(args["user"], args["password"]) for _ in range(args["runs"])]}, sys.stdout)


if __name__ == "__main__":
    main()
