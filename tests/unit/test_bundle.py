"""Issue 17 item 11: a host's files beyond the bootstrap travel as its bundle in SSM, written by the
first boot only if its SHA-256 is the one the instance's user-data names."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from components.userdata import bundle_files, pack_bundle
from tests.unit.conftest import STACKS, host_script, run_stack
from tools.plan import host_env, host_files, stored_value, user_data_text

ROOT = Path(__file__).resolve().parents[2]


def unbundle_module() -> ModuleType:
    return host_script("unbundle.py")


OWN = "/orgmail/t/bundle/mx2.example.org"  # this host's bundle (BUNDLE_PATH in its host.env)


def bundle_of(tmp_path: Path, myhostname: str = "m") -> str:
    """A bundle as Pulumi stores it (gzip+base64 of the JSON)."""
    return pack_bundle(json.dumps(
        {str(tmp_path / "etc/postfix/main.cf"): {"mode": "0644", "content": f"myhostname = {myhostname}\n"},
         str(tmp_path / "sbin/orgmail-volume"): {"mode": "0755", "content": "#!/bin/sh\n"}},
        separators=(",", ":"), sort_keys=True))


def served(monkeypatch: pytest.MonkeyPatch, unbundle: ModuleType, parameters: list[dict[str, str]]) -> list[str]:
    """SSM as the host's orgmail-unbundle sees it (`parameters` under the path it asks for)."""
    asked: list[str] = []

    def fetch(env: dict[str, str]) -> list[dict[str, str]]:
        asked.append(unbundle.bundle_path(env))
        return parameters

    monkeypatch.setattr(unbundle, "fetch", fetch)
    monkeypatch.setattr(unbundle.time, "sleep", lambda _: None)
    return asked


def host_env_for(monkeypatch: pytest.MonkeyPatch, bundle: str) -> None:
    env = {"HOSTNAME": "mx2.example.org", "SSM_PATH": "/orgmail/t", "REGION": "eu-west-1", "BUNDLE_PATH": OWN,
           "BUNDLE_SHA256": hashlib.sha256(bundle.encode()).hexdigest()}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_the_named_bundle_is_written_with_its_modes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    unbundle, bundle = unbundle_module(), bundle_of(tmp_path)
    half = len(bundle) // 2
    asked = served(monkeypatch, unbundle, [{"Name": f"{OWN}/part-001", "Value": bundle[half:]},
                                           {"Name": f"{OWN}/part-000", "Value": bundle[:half]},
                                           {"Name": f"{OWN}/part-002", "Value": "-"}])
    host_env_for(monkeypatch, bundle)
    assert unbundle.main() == 0
    assert asked == [OWN]  # its own bundle, nothing else
    assert (tmp_path / "etc/postfix/main.cf").read_text() == "myhostname = m\n"
    assert stat.S_IMODE((tmp_path / "sbin/orgmail-volume").stat().st_mode) == 0o755


def test_the_bundle_is_written_when_the_bootstrap_runs_again_by_hand(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """An administrator who runs orgmail-bootstrap again has no unit's EnvironmentFile: orgmail-unbundle reads
    host.env itself (the e2e test that reruns the bootstrap failed on it), and its AWS_* reach the aws CLI."""
    unbundle, bundle = unbundle_module(), bundle_of(tmp_path)
    asked = served(monkeypatch, unbundle, [{"Name": f"{OWN}/part-000", "Value": bundle}])
    env_file = tmp_path / "host.env"
    env_file.write_text(f"# orgmail host settings\nREGION=eu-west-1\nSSM_PATH=/orgmail/t\nBUNDLE_PATH={OWN}\n"
                        f"BUNDLE_SHA256={hashlib.sha256(bundle.encode()).hexdigest()}\n"
                        "AWS_ENDPOINT_URL=http://127.0.0.1:5000\n")
    monkeypatch.setattr(unbundle, "ENV_FILE", str(env_file))
    for key in ("REGION", "SSM_PATH", "BUNDLE_PATH", "BUNDLE_SHA256", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(key, "")  # so that the test's end restores whatever was there before
        monkeypatch.delenv(key)
    assert unbundle.main() == 0
    assert asked == [OWN] and (tmp_path / "etc/postfix/main.cf").read_text() == "myhostname = m\n"
    assert unbundle.os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:5000"


@pytest.mark.parametrize("change", ["tampered", "another", "missing"])
def test_a_bundle_other_than_the_named_one_writes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str], change: str) -> None:
    """A bundle changed in SSM behind Pulumi's back (or by anyone who may write parameters), another
    deploy's bundle or none: the first boot writes nothing and fails (the bootstrap retries and reports)."""
    unbundle, bundle = unbundle_module(), bundle_of(tmp_path)
    value = {"tampered": bundle_of(tmp_path, myhostname="evil"), "another": bundle_of(tmp_path / "x"),
             "missing": None}[change]
    asked = served(monkeypatch, unbundle, [] if value is None else [{"Name": f"{OWN}/part-000", "Value": value}])
    host_env_for(monkeypatch, bundle)
    assert unbundle.main() == 1
    assert list(tmp_path.rglob("*")) == []
    assert len(asked) == 6  # retried (SSM may lag behind a deploy), then given up
    err = capsys.readouterr().err
    assert (f"no {OWN}/part-NNN parameter" if value is None else "nothing written") in err, err


@pytest.mark.parametrize("stack", STACKS)
def test_every_planned_host_gets_its_own_bundle(stack: str) -> None:
    """What `pulumi up` stores: each host's bundle joins from its parts to the bytes whose SHA-256
    its user-data names (tools.plan.host_files refuses anything else, as the host does), and holds
    every file neither user-data nor the role's parameter carries."""
    run = run_stack(stack)
    for instance in run.of_type("aws:ec2/instance:Instance"):
        env = host_env(user_data_text(instance.inputs))
        files = host_files(run, instance)
        bundle: dict[str, Any] = bundle_files(stored_value(run, f"{env['SSM_PATH']}/bundle/{env['HOSTNAME']}") or "")
        assert {"/etc/postfix/main.cf", "/etc/unbound/unbound.conf.d/orgmail.conf",
                "/etc/systemd/system/orgmail-sync.service"} <= set(bundle)
        assert all(files[path] == spec["content"] for path, spec in bundle.items())
        assert ("/etc/dovecot/dovecot.conf" in bundle) == (env["ROLE"] == "mailbox")
