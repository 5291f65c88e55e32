"""Submission load client for (5), run in the guest's network namespace: port 587, STARTTLS, AUTH.

Each of ``sessions`` threads connects from its own source address, as a mail client does for every
message: EHLO, STARTTLS, EHLO, AUTH PLAIN, MAIL FROM (the login's own address), RCPT TO, DATA, QUIT.
smtp-source cannot do TLS or AUTH, hence this client.

Reads {"user", "password", "sources", "recipients", "messages", "bytes"} as JSON on stdin (one
recipient and one source address per thread); prints {"sent", "failed", "errors", "seconds"}.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import sys
import threading
import time
from email.message import EmailMessage
from typing import Any


def one_message(sender: str, to: str, n: int, size: int) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, f"submission benchmark {n}"
    msg["Message-ID"] = f"<bench-submit-{n}-{time.monotonic_ns()}@bench.example>"
    line = "The quick brown fox jumps over the lazy dog, and the benchmark counts it.\n"
    msg.set_content(line * max(1, size // len(line)))
    return msg.as_bytes()


def worker(args: dict[str, Any], source: str, rcpt: str, count: int, out: dict[str, Any], lock: threading.Lock) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the booted host keeps its self-signed certificate
    for n in range(count):
        try:
            with smtplib.SMTP("127.0.0.1", 587, timeout=120, source_address=(source, 0)) as smtp:
                smtp.ehlo("client.bench.example")
                smtp.starttls(context=ctx)
                smtp.ehlo("client.bench.example")
                smtp.login(args["user"], args["password"])
                smtp.sendmail(args["user"], [rcpt], one_message(args["user"], rcpt, n, args["bytes"]))
            with lock:
                out["sent"] += 1
        except (smtplib.SMTPException, OSError) as e:
            with lock:
                out["failed"] += 1
                if len(out["errors"]) < 5:
                    out["errors"].append(f"{type(e).__name__}: {e}")


def main() -> None:
    args = json.load(sys.stdin)
    sources, rcpts = args["sources"], args["recipients"]
    per_thread = args["messages"] // len(sources)
    out: dict[str, Any] = {"sent": 0, "failed": 0, "errors": []}
    lock = threading.Lock()
    threads = [threading.Thread(target=worker, args=(args, s, rcpts[k % len(rcpts)], per_thread, out, lock))
               for k, s in enumerate(sources)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["seconds"] = round(time.perf_counter() - t0, 3)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
