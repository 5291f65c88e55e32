"""Provider credentials (the deploying Cloudflare token, AWS keys) are refused in stack config.

Every `pulumi preview`, a pull request's included, holds the passphrase that decrypts the stack
config; the deploying token belongs to the deploy job's environment (docs/pull-requests.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.settings import PROVIDER_CREDENTIALS, ConfigError
from tests.unit.conftest import ROOT, stack_config
from tools.mockengine import run_program
from tools.plan import plan_stack_file


@pytest.mark.parametrize("key", sorted(PROVIDER_CREDENTIALS))
def test_the_program_refuses_a_provider_credential_in_config(key: str) -> None:
    config = {**stack_config("dev"), key: "decrypted-by-the-engine"}
    with pytest.raises(ConfigError) as e:
        run_program(config, "dev")
    assert f"{key}: a provider credential must not be in the stack config" in str(e.value)
    assert PROVIDER_CREDENTIALS[key] in str(e.value)


def test_the_offline_plan_refuses_an_encrypted_token(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())
    doc["config"]["cloudflare:apiToken"] = {"secure": "v1:AAAA:BBBB"}  # as `pulumi config set --secret` writes it
    stack_file = tmp_path / "Pulumi.dev.yaml"
    stack_file.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="cloudflare:apiToken: a provider credential"):
        plan_stack_file(stack_file)
    result = subprocess.run([sys.executable, "-m", "tools.plan", str(stack_file)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "give the deploy job CLOUDFLARE_API_TOKEN instead" in result.stderr


def test_no_example_stack_holds_a_provider_credential() -> None:
    for stack_file in sorted(ROOT.glob("Pulumi.*.yaml")):
        if stack_file.name != "Pulumi.yaml":
            config = yaml.safe_load(stack_file.read_text())["config"]
            assert not set(config) & set(PROVIDER_CREDENTIALS), stack_file.name
