"""The Debian archive for a guest that has no network: a local mirror of exactly what the host's
packages need, so cloud-init installs them at the first boot as on EC2 (docs/design.md, layer 3).

scripts/e2e-rootfs.sh builds it beside the bare root (ORGMAIL_E2E_BARE): ``lists/`` holds the
archive's own signed InRelease and its indexes as apt stored them at build time (the bare root
keeps the same lists, so apt-get update at boot finds nothing new and checks Debian's real
signature), ``debs/`` every package an install of the host's packages downloads. Served over HTTP
on the guest's 127.0.0.1:80, to which the bare root's /etc/hosts template points deb.debian.org.

    python -m tests.e2e.mirror DIR PORT LOG   (in the guest's network namespace: harness.start_mirror)

Every request is logged (``GET <path> <status>``), so a test can show what the boot fetched.
"""

from __future__ import annotations

import http.server
import re
import sys
import urllib.parse
from pathlib import Path


def deb_index(debs: Path) -> dict[str, Path]:
    """Pool file name -> file. apt's cache names carry the epoch (``1%3a``), the pool's do not."""
    return {re.sub(r"_\d+%3a", "_", p.name): p for p in debs.glob("*.deb")}


def resolve(mirror: Path, debs: dict[str, Path], path: str) -> Path | None:
    """The file behind a request path of http://deb.debian.org, or None."""
    if path.endswith(".deb"):
        return debs.get(path.rsplit("/", 1)[1])
    name = "deb.debian.org" + path.replace("/", "_")
    candidate = mirror / "lists" / name
    return candidate if "/" not in name and candidate.is_file() else None


def main() -> None:
    mirror, port, log = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    debs = deb_index(mirror / "debs")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_file(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self.send_file(body=False)

        def send_file(self, body: bool) -> None:
            found = resolve(mirror, debs, urllib.parse.unquote(self.path.split("?", 1)[0]))  # apt sends + as %2b
            with log.open("a") as f:
                f.write(f"{self.command} {self.path} {200 if found else 404}\n")
            if found is None:
                self.send_error(404)
                return
            data = found.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
