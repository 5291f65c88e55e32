"""The Worker that serves MTA-STS and autoconfig, run by a real JavaScript engine (Node.js)."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from components.dns_records import mta_sts_policy
from components.settings import load_settings
from components.web import autoconfig_xml, render_worker
from tests.unit.conftest import raw_config

NODE = shutil.which("node")

HARNESS = """
import worker from "./worker.mjs";
const requests = JSON.parse(process.argv[2]);
const out = [];
for (const [method, url] of requests) {
  const res = await worker.fetch(new Request(url, { method }));
  out.push({ status: res.status, type: res.headers.get("content-type"), body: await res.text() });
}
console.log(JSON.stringify(out));
"""


def settings(stack: str = "medium", **changes: Any):
    cfg = raw_config(stack)
    cfg.update(changes)
    return load_settings(cfg, stack)


def serve(tmp_path: Path, worker: str, requests: list[tuple[str, str]]) -> list[dict[str, Any]]:
    if NODE is None:
        pytest.fail("node is needed to run the Worker (Debian package nodejs)")
    (tmp_path / "worker.mjs").write_text(worker)
    (tmp_path / "run.mjs").write_text(HARNESS)
    res = subprocess.run([NODE, "run.mjs", json.dumps(requests)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    result: list[dict[str, Any]] = json.loads(res.stdout)
    return result


def test_serves_the_policy_for_every_domain(tmp_path: Path) -> None:
    s = settings()
    replies = serve(tmp_path, render_worker(s), [
        ("GET", "https://mta-sts.medium.example/.well-known/mta-sts.txt"),
        ("GET", "https://mta-sts.medium-brand.example/.well-known/mta-sts.txt"),
        ("GET", "https://mta-sts.other.example/.well-known/mta-sts.txt"),
        ("GET", "https://mta-sts.medium.example/"),
        ("POST", "https://mta-sts.medium.example/.well-known/mta-sts.txt"),
    ])
    for r in replies[:2]:
        assert r["status"] == 200 and r["type"] == "text/plain; charset=utf-8"
        assert r["body"] == mta_sts_policy(s)
        assert r["body"].endswith("\r\n") and "\n" not in r["body"].replace("\r\n", "")
    assert [r["status"] for r in replies[2:]] == [404, 404, 405]


def test_serves_autoconfig(tmp_path: Path) -> None:
    s = settings()
    replies = serve(tmp_path, render_worker(s), [
        ("GET", "https://autoconfig.medium-brand.example/mail/config-v1.1.xml"),
        ("GET", "https://autoconfig.unknown.example/mail/config-v1.1.xml"),
    ])
    assert replies[0]["status"] == 200 and replies[0]["type"] == "application/xml; charset=utf-8"
    root = ET.fromstring(replies[0]["body"])
    provider = root.find("emailProvider")
    assert provider is not None and provider.get("id") == "medium-brand.example"
    servers = {(e.get("type"), e.findtext("port"), e.findtext("socketType"))
               for e in [*provider.findall("incomingServer"), *provider.findall("outgoingServer")]}
    assert servers == {("imap", "993", "SSL"), ("pop3", "995", "SSL"), ("smtp", "465", "SSL"),
                       ("smtp", "587", "STARTTLS")}
    assert {e.findtext("hostname") for e in provider.iter() if e.tag.endswith("Server")} == {"mail.medium.example"}
    assert replies[1]["status"] == 404


def test_organisation_name_is_escaped() -> None:
    xml = autoconfig_xml(settings(organization="Smith & Sons"), "medium.example")
    assert ET.fromstring(xml).findtext("emailProvider/displayName") == "Smith & Sons"


def test_opt_out_serves_a_none_policy(tmp_path: Path) -> None:
    """RFC 8461 8.3: senders replace their cached policy with "mode: none" instead of keeping it."""
    s = settings(mtaSts={"mode": "none"})
    replies = serve(tmp_path, render_worker(s), [("GET", "https://mta-sts.medium.example/.well-known/mta-sts.txt"),
                                                 ("GET", "https://mta-sts.medium-brand.example/.well-known/mta-sts.txt")])
    for r in replies:
        assert r["status"] == 200 and r["type"] == "text/plain; charset=utf-8"
        assert r["body"] == ("version: STSv1\r\nmode: none\r\n" + "".join(f"mx: {h}\r\n" for h in s.mx_hosts)
                             + "max_age: 86400\r\n")
