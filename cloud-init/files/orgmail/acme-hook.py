#!/usr/bin/python3
"""certbot manual hook: ask the stack's ACME Worker to publish (present) or remove (cleanup) this
host's _acme-challenge TXT record. The host holds only its own key (/etc/orgmail/acme.json, from
SSM): it cannot change any other DNS record.

    orgmail-acme-hook present|cleanup     (certbot sets CERTBOT_DOMAIN and CERTBOT_VALIDATION)
"""

import hashlib
import hmac
import json
import os
import sys
import time
import urllib.request

CONF = "/etc/orgmail/acme.json"
USAGE = "usage: orgmail-acme-hook present|cleanup  (certbot sets CERTBOT_DOMAIN and CERTBOT_VALIDATION)"
PROPAGATION_SECONDS = 30  # Cloudflare's authoritative servers answer within seconds


def signed_request(conf: dict, action: str, domain: str, value: str, now: float) -> tuple:
    """The request body and its HMAC-SHA256 signature (hex) under the host's key."""
    body = json.dumps({"host": conf["host"], "action": action, "name": f"_acme-challenge.{domain}",
                       "value": value, "time": int(now)}, separators=(",", ":")).encode()
    return body, hmac.new(conf["key"].encode(), body, hashlib.sha256).hexdigest()


def main() -> int:
    action = sys.argv[1] if len(sys.argv) == 2 else ""
    if action not in ("present", "cleanup"):
        print(USAGE, file=sys.stderr)
        return 2
    with open(CONF) as f:
        conf = json.load(f)
    body, signature = signed_request(conf, action, os.environ["CERTBOT_DOMAIN"],
                                     os.environ["CERTBOT_VALIDATION"], time.time())
    req = urllib.request.Request(conf["url"], data=body, method="POST", headers={
        "content-type": "application/json", "x-orgmail-signature": signature})
    with urllib.request.urlopen(req, timeout=60) as res:
        print(res.read().decode().strip())
    if action == "present":
        time.sleep(PROPAGATION_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
