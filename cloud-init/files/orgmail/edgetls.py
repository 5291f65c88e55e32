#!/usr/bin/python3
"""orgmail-edge-tls: serve the MX name's certificate that the first outbound relay publishes for every edge.

The edges of a cluster come and go with their Auto Scaling group, and Let's Encrypt issues at most 5
certificates for the same names a week: they do not order their own. The first relay (it keeps its certbot
state on its volume) renews the certificate and publishes it as SSM_PATH/tls/certificate (SecureString,
JSON {"fullchain": PEM, "privkey": PEM}). Each edge installs it at boot and every 10 minutes
(orgmail-edge-tls.timer), only if it names the MX name, is valid for at least another day and its key is the
certificate's key; then reloads Postfix and Dovecot. Until one is published (the parameter holds "none") or
while what is published fails a check, the edge keeps what it serves (a self-signed certificate at first).

    orgmail-edge-tls [--no-reload]
exit 0: serving the published certificate; 2: none published yet; 1: what is published is not served (the log
says why) or SSM did not answer
"""

import json
import os
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Mapping

TLS = "/etc/orgmail/tls"
PARAMETER = "tls/certificate"  # under the edges' SSM path (components/edge.py EDGE_CERTIFICATE)
MIN_VALID_SECONDS = 86400
UNITS = ("postfix", "dovecot")



def published(env: Mapping[str, str]) -> str:
    res = subprocess.run(["aws", "ssm", "get-parameter", "--region", env["REGION"], "--name",
                          f"{env['SSM_PATH']}/{PARAMETER}", "--with-decryption", "--query", "Parameter.Value",
                          "--output", "text"], capture_output=True, text=True, timeout=120)
    if res.returncode:
        raise RuntimeError(f"aws ssm get-parameter: {res.stderr.strip()[-300:]}")
    return res.stdout.strip()


def problems(fullchain: str, privkey: str, name: str) -> list:
    """Why this certificate must not be served for `name` (empty: it may)."""
    with tempfile.TemporaryDirectory() as tmp:
        chain, key = os.path.join(tmp, "fullchain.pem"), os.path.join(tmp, "privkey.pem")
        with open(chain, "w") as f:
            f.write(fullchain)
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(privkey)
        found = []
        names = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", chain],
                               capture_output=True, text=True)
        if names.returncode:
            return [f"not a certificate: {names.stderr.strip()[-200:]}"]
        if f"DNS:{name}" not in [n.strip() for n in names.stdout.replace("\n", ",").split(",")]:
            found.append(f"does not name {name}")
        if subprocess.run(["openssl", "x509", "-noout", "-checkend", str(MIN_VALID_SECONDS), "-in", chain],
                          capture_output=True).returncode:
            found.append("expires within a day")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(chain, key)
        except ssl.SSLError as e:
            found.append(f"its key is not the certificate's ({e.reason})")
        return found


def install(fullchain: str, privkey: str, tls: str = TLS) -> bool:
    """Write the pair (the key born 0600); False if it is already the one served."""
    paths = {"fullchain.pem": (fullchain, 0o644), "privkey.pem": (privkey, 0o600)}
    current = {}
    for name in paths:
        try:
            with open(os.path.join(tls, name)) as f:
                current[name] = f.read()
        except OSError:
            current[name] = None
    if all(current[name] == content for name, (content, _) in paths.items()):
        return False
    os.makedirs(tls, exist_ok=True)
    for name in ("privkey.pem", "fullchain.pem"):  # the key first: Postfix reads both at its next reload
        content, mode = paths[name]
        tmp = os.path.join(tls, f".{name}.new")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, os.path.join(tls, name))
    return True


def main() -> int:
    env = os.environ  # host.env, through the unit's EnvironmentFile (the bootstrap's too)
    try:
        value = published(env)
        if value == "none":
            print("orgmail-edge-tls: no certificate published yet (the first relay publishes it)", file=sys.stderr)
            return 2
        pair = json.loads(value)
        fullchain, privkey = pair["fullchain"], pair["privkey"]
    except (RuntimeError, subprocess.SubprocessError, OSError, KeyError, TypeError, ValueError) as e:
        print(f"orgmail-edge-tls: {e}", file=sys.stderr)
        return 1
    found = problems(fullchain, privkey, env["MAIL_HOST"])
    if found:
        print(f"orgmail-edge-tls: the published certificate is not served: {'; '.join(found)}", file=sys.stderr)
        return 1
    if not install(fullchain, privkey):
        return 0
    print("orgmail-edge-tls: serving the published certificate")
    if "--no-reload" not in sys.argv:
        for unit in UNITS:
            subprocess.run(["systemctl", "try-reload-or-restart", f"{unit}.service"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
