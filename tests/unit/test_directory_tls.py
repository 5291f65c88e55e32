"""The cluster hosts verify the directory's certificate and name (issue 15): RDS's CA fetched at the first boot, and
every client of the directory (Dovecot, Postfix's proxymap, orgmail-senders, orgmail-authflush) on verify-full.
Booted: every cluster test runs against a directory whose certificate a test CA issued for its endpoint."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from components.directory import DIRECTORY_CA_FILE, rds_ca_bundle_url
from components.edge import render_edge_files
from components.shard import render_shard_files
from tests.unit.test_cluster_hosts import EDGE, SHARD

ROOT = Path(__file__).resolve().parents[2]


def files(role: str) -> dict[str, str]:
    rendered = render_edge_files(EDGE) if role == "edge" else render_shard_files(SHARD)
    return {f.path: f.content for f in rendered}


@pytest.mark.parametrize("role", ["edge", "shard"])
def test_each_directory_client_verifies_the_directorys_certificate_and_name(role: str) -> None:
    f = files(role)
    region = EDGE.region if role == "edge" else SHARD.region
    assert f"DIRECTORY_CA_URL={rds_ca_bundle_url(region)}\n" in f["/etc/orgmail/host.env"]
    assert rds_ca_bundle_url("eu-north-1") == "https://truststore.pki.rds.amazonaws.com/eu-north-1/eu-north-1-bundle.pem"
    bootstrap = f["/usr/local/sbin/orgmail-bootstrap"]
    assert f"sslmode = verify-full\\n    sslrootcert = {DIRECTORY_CA_FILE}\\n" in bootstrap
    assert "sslmode = require" not in bootstrap
    # Fetched before the first client is configured.
    assert bootstrap.index('curl -fsS --retry 5 --max-time 60 "$DIRECTORY_CA_URL"') < bootstrap.index("pgsql %s {")


def test_the_libpq_clients_name_the_ca_file_the_bootstrap_writes() -> None:
    spec = importlib.util.spec_from_file_location("orgmail_libpq", ROOT / "cloud-init/files/orgmail/orgmail_libpq.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DIRECTORY_CA_FILE == DIRECTORY_CA_FILE
    info = module.conninfo("db.example.internal", "u", "p", "orgmail", "t")
    assert f"sslmode='verify-full' sslrootcert='{DIRECTORY_CA_FILE}'" in info


def ca_fragment() -> str:
    text = files("shard")["/usr/local/sbin/orgmail-bootstrap"]
    start = text.index("ca=$(mktemp)")
    end = text.index("\n", text.index(f'install -m 0644 "$ca" {DIRECTORY_CA_FILE}')) + 1
    return text[start:end]


def run_fragment(tmp_path: Path, served: str) -> subprocess.CompletedProcess[str]:
    source = tmp_path / "served.pem"
    source.write_text(served)
    script = ca_fragment().replace(DIRECTORY_CA_FILE, str(tmp_path / "installed.pem"))
    return subprocess.run(["bash", "-c", 'set -euo pipefail\nlog() { echo "orgmail-bootstrap: $*"; }\n' + script],
                          capture_output=True, text=True, timeout=60,
                          env={"DIRECTORY_CA_URL": f"file://{source}", "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)})


def test_a_certificate_bundle_is_installed(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=test RDS CA", "-keyout", f"{ca}.key", "-out", f"{ca}.pem"],
                   check=True, capture_output=True)
    pem = Path(f"{ca}.pem").read_text()
    res = run_fragment(tmp_path, pem + pem)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "installed.pem").read_text() == pem + pem


@pytest.mark.parametrize("served", ["", "<html>Access Denied</html>\n",
                                    "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"])
def test_anything_but_certificates_stops_the_boot_and_installs_nothing(tmp_path: Path, served: str) -> None:
    res = run_fragment(tmp_path, served)
    assert res.returncode == 1 and "the directory's CA: none from file://" in res.stdout, res
    assert not (tmp_path / "installed.pem").exists()
    assert not [p for p in tmp_path.iterdir() if re.fullmatch(r"tmp\.\w+", p.name)]  # the download is removed
