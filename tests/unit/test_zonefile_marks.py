"""tools.zonefile never passes a plan's stand-in values off as records to publish (issue 17, item 14):
without the deployed outputs, the mock DKIM keys and placeholder addresses are commented out and
marked; with `--outputs` (pulumi stack output --json) the zones hold the real values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dns.rdatatype
import dns.zone

from tests.unit.conftest import ROOT, run_stack


def zonefile(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.zonefile", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def _live(text: str, origin: str) -> set[tuple[str, str, str]]:
    z = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=False)
    return {(str(n).rstrip("."), dns.rdatatype.to_text(rds.rdtype), rd.to_text())
            for n, node in z.nodes.items() for rds in node.rdatasets for rd in rds}


def test_plan_values_are_commented_out_and_marked(tmp_path: Path) -> None:
    result = zonefile("Pulumi.dev.yaml", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "example.org.zone").read_text()
    live = _live(text, "example.org")
    assert not [r for r in live if r[1] == "A"], "a placeholder address must not be a live record"
    assert not [r for r in live if "_domainkey" in r[0]], "the plan's mock DKIM key must not be a live record"
    assert ("example.org", "MX", "10 mail.example.org.") in live  # records without stand-ins stay
    assert "; PLACEHOLDER (Elastic IP, known after pulumi up): mail.example.org." in text
    assert "; PLACEHOLDER (mock DKIM key of the offline plan): s2026._domainkey.example.org." in text
    assert text.splitlines()[0].startswith("; NOT FOR PUBLISHING AS IS:")
    assert "placeholder" in result.stderr.lower() and "--outputs" in result.stderr


def test_deployed_outputs_give_complete_zones(tmp_path: Path) -> None:
    run = run_stack("dev")
    outputs = {k: v for k, v in run.outputs.items() if k in ("hostIps", "dnsRecords", "dkimPublicKey")}
    outputs["hostIps"] = {"mail.example.org": "198.51.100.7"}
    for r in outputs["dnsRecords"]:
        if r["type"] == "A":
            r["content"] = "198.51.100.7"
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(outputs))
    result = zonefile("Pulumi.dev.yaml", "--outputs", str(path), "--out", str(tmp_path / "z"))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "z" / "example.org.zone").read_text()
    assert "PLACEHOLDER" not in text and "NOT FOR PUBLISHING" not in text
    live = _live(text, "example.org")
    assert ("mail.example.org", "A", "198.51.100.7") in live
    assert any("_domainkey" in r[0] for r in live)
    assert "; PTR of 198.51.100.7 -> mail.example.org. is set at AWS" in text


def test_help_says_what_the_default_output_is() -> None:
    result = zonefile("--help")
    assert "--outputs" in result.stdout and "placeholder" in result.stdout.lower()
