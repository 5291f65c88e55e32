"""The offline plan command: table and JSON, secrets masked, placeholders marked, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.unit.conftest import ROOT


def plan(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.plan", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_json_plan(tmp_path: Path) -> None:
    result = plan("Pulumi.large.yaml", "--json", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"resources", "dns", "userData", "outputs", "placeholders", "beforeFirstDeploy"} <= set(doc)
    types = {r["type"] for r in doc["resources"]}
    assert "aws:ec2/instance:Instance" in types and "cloudflare:index/dnsRecord:DnsRecord" in types
    assert all({"type", "name", "inputs"} <= set(r) for r in doc["resources"])
    mx = sorted((d["content"], d["priority"]) for d in doc["dns"] if d["type"] == "MX")
    assert mx == [("mail.large.example", 10), ("mx2.large.example", 20)]
    assert all({"type", "name", "content", "priority", "ttl"} <= set(d) for d in doc["dns"])
    for name, ud in doc["userData"].items():
        text = Path(ud["path"]).read_text()
        assert text.startswith("#cloud-config") and ud["gzipBytes"] < 16384, name
    assert doc["outputs"]["initialPasswords"] == "[secret]"
    cost = doc["cost"]
    assert cost["estimate"]["total"] > 0 if "estimate" in cost else cost


def test_secrets_masked(tmp_path: Path) -> None:
    doc = json.loads(plan("Pulumi.dev.yaml", "--json", "--out", str(tmp_path)).stdout)
    out = json.dumps({k: v for k, v in doc.items() if k != "placeholders"})
    assert "PRIVATE KEY" not in out and "BLF-CRYPT" not in out and "placeholder-cloudflare-token" not in out
    params = {r["inputs"]["name"]: r["inputs"]["value"] for r in doc["resources"]
              if r["type"] == "aws:ssm/parameter:Parameter"}
    assert params["/orgmail/dev/dkim/s2026"] == "[secret]"
    assert params["/orgmail/dev/certbot/mail.example.org/key"] == "[secret]"


def test_table_marks_placeholders(tmp_path: Path) -> None:
    result = plan("Pulumi.dev.yaml", "--out", str(tmp_path))
    assert result.returncode == 0
    assert "192.0.2.10*" in result.stdout
    assert "placeholder, known only at deploy time" in result.stdout
    assert "mail-instance.user-data.yaml" in result.stdout
    assert "Estimated monthly cost (eu-central-1" in result.stdout and "per mailbox" in result.stdout
    assert "Before the first `pulumi up`" in result.stdout and "L-1216C47A" in result.stdout


def test_invalid_stack_file_gives_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text((ROOT / "Pulumi.dev.yaml").read_text().replace("tier: small", "tier: enormous"))
    result = plan(str(bad), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "orgmail:tier: must be one of small, medium, large, isp, got 'enormous'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_plan_says_which_settings_replace_which_hosts(tmp_path: Path) -> None:
    """Issue 17 item 7: in plain words, per host, from what feeds user-data (not a hand list)."""
    from components.server import replacing_settings

    result = plan("Pulumi.large.yaml", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    names = ", ".join(replacing_settings())
    for host in ("mail.large.example", "mx2.large.example"):
        assert (f"  - this replaces host {host} (minutes without service) when any of these changes: {names}"
                in result.stdout)
    assert "  - hosts are replaced one after another, mailbox host first, never together" in result.stdout
    assert "orgmail:admin" not in names and "orgmail:upgrades" not in names


def test_plan_explains_the_ses_sandbox_quotas_and_cost(tmp_path: Path) -> None:
    """Issue 14: the offline plan says how outside mail leaves, and with ses what the account must do first."""
    import yaml

    config = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())
    config["config"]["orgmail:outbound"] = {"relay": "ses", "sesRegion": "eu-west-1"}
    stack_file = tmp_path / "Pulumi.sesdev.yaml"
    stack_file.write_text(yaml.safe_dump(config))
    (tmp_path / "Pulumi.yaml").write_text((ROOT / "Pulumi.yaml").read_text())
    result = plan(str(stack_file), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Outbound mail:" in out
    assert "email-smtp.eu-west-1.amazonaws.com:587" in out
    assert "SES sandbox" in out and "at most 200 messages in 24 hours" in out and "Request production access" in out
    assert "sending quotas" in out and "Amazon SES relay (eu-west-1): 0.1 USD per 1,000 messages" in out
    direct = plan("Pulumi.dev.yaml", "--out", str(tmp_path / "direct"))
    assert "direct (orgmail:outbound.relay)" in direct.stdout and "SES sandbox" not in direct.stdout


def test_the_plans_outbound_notes_name_who_sends_in_a_cluster() -> None:
    """A cluster has no mailbox host: its outbound relays send, directly or through SES with their own key."""
    from components.settings import load_settings
    from tests.unit.conftest import raw_config
    from tools.plan import outbound_notes
    raw = raw_config("isp")
    assert "the outbound relays deliver outside mail on port 25" in outbound_notes(load_settings(raw, "isp"))[0]
    raw["outbound"] = {"relay": "ses"}
    [who, *_] = outbound_notes(load_settings(raw, "isp"))
    assert "the outbound relays relay our domains' mail" in who and "/orgmail/isp/relay/ses/smtp" in who
    assert "mailbox host" not in who
