"""ACME DNS-01 without a zone-wide token on any host: the challenge Worker (run by Node.js), the
host's hook that signs its requests, and what each side may touch."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from components.acme import acme_hostname, acme_url, render_acme_worker, token_resources
from components.settings import load_settings
from tests.unit.conftest import host_script, raw_config, run_stack

NODE = shutil.which("node")
ZONE = "4d5e6f7a8b9c4d5e6f7a8b9c4d5e6f7a"  # the large example's zone
VALUE = "a" * 20 + "B-_" + "c" * 20  # 43 base64url characters, the shape of a DNS-01 value

# Runs the Worker with a stand-in for Cloudflare's API that records every call.
HARNESS = """
import worker from "./acme.mjs";
const { requests, keys } = JSON.parse(process.argv[2]);
const calls = [];
const records = [];
globalThis.fetch = async (url, init) => {
  const method = init.method;
  calls.push({ method, url, body: init.body ? JSON.parse(init.body) : null, auth: init.headers.authorization });
  let result = [];
  if (method === "POST") { const r = { id: `r${records.length}`, ...JSON.parse(init.body) }; records.push(r); result = r; }
  if (method === "GET") result = records.filter((r) => url.includes(encodeURIComponent(r.name)));
  if (method === "DELETE") { const id = url.split("/").pop(); records.splice(records.findIndex((r) => r.id === id), 1); }
  return new Response(JSON.stringify({ success: true, result, errors: [] }));
};
const env = { CF_TOKEN: "the-zone-token", HOST_KEYS: JSON.stringify(keys) };
const out = [];
for (const r of requests) {
  const res = await worker.fetch(new Request(r.url, { method: r.method, body: r.body,
    headers: r.signature ? { "x-orgmail-signature": r.signature } : {} }), env);
  out.push({ status: res.status, body: await res.json() });
}
console.log(JSON.stringify({ out, calls, records }));
"""


def load_hook() -> ModuleType:
    return host_script("acme-hook.py")


def settings(stack: str = "large"):
    return load_settings(raw_config(stack), stack)


def run_worker(tmp_path: Path, requests: list[dict[str, Any]], keys: dict[str, str]) -> dict[str, Any]:
    if NODE is None:
        pytest.fail("node is needed to run the Worker (Debian package nodejs)")
    (tmp_path / "acme.mjs").write_text(render_acme_worker(settings()))
    (tmp_path / "run.mjs").write_text(HARNESS)
    res = subprocess.run([NODE, "run.mjs", json.dumps({"requests": requests, "keys": keys})], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout)
    return result


KEYS = {"mail.large.example": "k" * 43, "mx2.large.example": "m" * 43}
URL = "https://orgmail-acme-large.large.example/v1/challenge"


def signed(host: str, action: str, domain: str, value: str = VALUE, key: str | None = None,
           now: float | None = None) -> dict[str, Any]:
    """A request exactly as the host's hook makes it."""
    conf = {"host": host, "key": key or KEYS[host], "url": URL}
    body, signature = load_hook().signed_request(conf, action, domain, value, time.time() if now is None else now)
    return {"url": URL, "method": "POST", "body": body.decode(), "signature": signature}


def test_a_host_publishes_and_removes_its_own_challenge_and_nothing_else(tmp_path: Path) -> None:
    result = run_worker(tmp_path, [
        signed("mail.large.example", "present", "mail.large.example"),
        signed("mail.large.example", "cleanup", "mail.large.example"),
    ], KEYS)
    assert [r["status"] for r in result["out"]] == [200, 200]
    created = [c for c in result["calls"] if c["method"] == "POST"]
    assert created == [{"method": "POST", "url": f"https://api.cloudflare.com/client/v4/zones/{ZONE}/dns_records",
                        "body": {"type": "TXT", "name": "_acme-challenge.mail.large.example",
                                 "content": f'"{VALUE}"', "ttl": 60, "comment": "orgmail ACME challenge"},
                        "auth": "Bearer the-zone-token"}]
    assert [c["method"] for c in result["calls"]] == ["GET", "POST", "GET", "DELETE"]
    assert result["records"] == []


@pytest.mark.parametrize(("request_", "status", "says"), [
    # a relay's key asking for the mailbox host's name
    (lambda: signed("mx2.large.example", "present", "mail.large.example"), 403, "may publish only"),
    # the mailbox host asking for any other record of the zone
    (lambda: signed("mail.large.example", "present", "www.large.example"), 403, "may publish only"),
    # a key that is not the host's
    (lambda: signed("mail.large.example", "present", "mail.large.example", key="x" * 43), 403, "bad signature"),
    # a host the Worker does not know
    (lambda: signed("evil.example", "present", "evil.example", key="x" * 43), 403, "unknown host"),
    # a replayed request from ten minutes ago
    (lambda: signed("mail.large.example", "present", "mail.large.example", now=time.time() - 600), 401, "stale"),
    # a value that is no DNS-01 value (e.g. an SPF record smuggled into TXT)
    (lambda: signed("mail.large.example", "present", "mail.large.example", value="v=spf1 +all"), 400, "not an ACME"),
    (lambda: {"url": URL, "method": "GET", "body": None, "signature": None}, 405, "POST only"),
    (lambda: {"url": URL.replace("/v1/challenge", "/"), "method": "POST", "body": "{}", "signature": None}, 404, ""),
])
def test_everything_else_is_refused_before_cloudflare_is_called(tmp_path: Path, request_: Any, status: int,
                                                                says: str) -> None:
    result = run_worker(tmp_path, [request_()], KEYS)
    [out] = result["out"]
    assert out["status"] == status and says in out["body"]["message"]
    assert result["calls"] == []


def test_a_tampered_body_fails_its_signature(tmp_path: Path) -> None:
    req = signed("mail.large.example", "present", "mail.large.example")
    req["body"] = req["body"].replace('"present"', '"cleanup"')
    result = run_worker(tmp_path, [req], KEYS)
    assert result["out"][0]["status"] == 403 and result["calls"] == []


@pytest.mark.parametrize("stack", ["dev", "isp-single"])
def test_the_token_lives_only_in_the_worker_and_each_host_has_its_own_key(stack: str) -> None:
    run = run_stack(stack)
    s = settings(stack)
    [token] = run.of_type("cloudflare:index/apiToken:ApiToken")
    assert json.loads(token.inputs["policies"][0]["resources"]) == json.loads(token_resources(s))
    [worker] = [w for w in run.of_type("cloudflare:index/workersScript:WorkersScript")
                if w.inputs["scriptName"] == f"orgmail-{stack}-acme"]
    bindings = {b["name"]: b for b in worker.inputs["bindings"]}
    assert bindings["CF_TOKEN"]["type"] == "secret_text" and bindings["CF_TOKEN"]["text"] == token.outputs["value"]
    keys = json.loads(bindings["HOST_KEYS"]["text"])
    assert set(keys) == set(s.mx_hosts) and len(set(keys.values())) == len(keys)
    params = {p.inputs["name"]: p.inputs["value"] for p in run.of_type("aws:ssm/parameter:Parameter")}
    for host, key in keys.items():
        assert params[f"/orgmail/{stack}/certbot/{host}/key"] == key
    assert token.outputs["value"] not in params.values()
    [domain] = [d for d in run.of_type("cloudflare:index/workersCustomDomain:WorkersCustomDomain")
                if d.inputs["service"] == f"orgmail-{stack}-acme"]
    assert domain.inputs["hostname"] == acme_hostname(s) and domain.inputs["zoneId"] == s.primary_domain.zone_id
    config = json.loads("".join(v for n, v in sorted(params.items()) if n.startswith(f"/orgmail/{stack}/config/")
                                and v != "-"))
    assert config["acmeUrl"] == acme_url(s)


def test_certbot_uses_the_hook_not_a_dns_token() -> None:
    from components.userdata import packages, render_files
    from tests.unit.test_userdata import MAILBOX

    [unit] = [f.content for f in render_files(MAILBOX) if f.path == "/etc/systemd/system/orgmail-cert.service"]
    assert '--manual-auth-hook "/usr/local/sbin/orgmail-acme-hook present"' in unit
    assert '--manual-cleanup-hook "/usr/local/sbin/orgmail-acme-hook cleanup"' in unit
    assert "dns-cloudflare" not in unit and "python3-certbot-dns-cloudflare" not in packages(MAILBOX)
