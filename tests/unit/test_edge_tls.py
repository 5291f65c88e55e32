"""orgmail-edge-tls (cloud-init/files/orgmail/edgetls.py): an edge serves the certificate the first relay publishes
only if it names the MX name, is valid for another day and comes with its own key; the key is born 0600."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from components.edge import EDGE_CERTIFICATE, EDGE_FILES, EDGE_SERVICES, edge_certificate_parameter, render_edge_files
from components.outbound_relay import RelayArgs, render_relay_files
from tests.unit.conftest import host_script
from tests.unit.test_cluster_hosts import EDGE, RELAY
from tests.verify.harness import TestCA

edgetls = host_script("edgetls.py")
MX = "mail.example.org"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


def pair(ca: TestCA, names: list[str], days: float = 60) -> tuple[str, str]:
    pem = ca.issue(names, days=days)
    return pem.cert.read_text() + ca.ca_file.read_text(), pem.key.read_text()


def test_a_certificate_for_the_mx_name_with_its_key_is_served(ca: TestCA) -> None:
    assert edgetls.problems(*pair(ca, [MX]), MX) == []
    assert edgetls.problems(*pair(ca, ["other.example.org", MX]), MX) == []


def test_what_must_not_be_served_is_refused_with_the_reason(ca: TestCA) -> None:
    assert edgetls.problems(*pair(ca, ["other.example.org"]), MX) == [f"does not name {MX}"]
    assert edgetls.problems(*pair(ca, [f"x{MX}"]), MX) == [f"does not name {MX}"]  # whole names only
    assert edgetls.problems(*pair(ca, [MX], days=0.5), MX) == ["expires within a day"]
    chain, _ = pair(ca, [MX])
    _, other_key = pair(ca, [MX])
    [found] = edgetls.problems(chain, other_key, MX)
    assert found.startswith("its key is not the certificate's")
    [found] = edgetls.problems("not a certificate", other_key, MX)
    assert found.startswith("not a certificate")


def test_install_writes_the_pair_once_the_key_born_private(ca: TestCA, tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    chain, key = pair(ca, [MX])
    assert edgetls.install(chain, key, str(tls)) is True
    assert (tls / "fullchain.pem").read_text() == chain and (tls / "privkey.pem").read_text() == key
    assert oct(os.stat(tls / "privkey.pem").st_mode & 0o777) == "0o600"
    assert edgetls.install(chain, key, str(tls)) is False  # unchanged: no reload
    assert not [p for p in tls.iterdir() if p.name.startswith(".")]


def test_the_edges_fetch_it_and_the_relays_publish_it_under_one_name() -> None:
    assert edge_certificate_parameter("/orgmail/s") == f"/orgmail/s/edge/{EDGE_CERTIFICATE}"
    edge = {f.path: f for f in render_edge_files(EDGE)}
    assert edgetls.PARAMETER == EDGE_CERTIFICATE
    assert edge["/usr/local/sbin/orgmail-edge-tls"].bundle and "orgmail-edge-tls.timer" in EDGE_SERVICES
    assert ("orgmail/edgetls.py", "/usr/local/sbin/orgmail-edge-tls", "0755") in EDGE_FILES
    assert re.search(r"^MAIL_HOST=mail\.example\.org$", edge["/etc/orgmail/host.env"].content, re.M)
    keeper = RelayArgs(**{**RELAY.__dict__, "keeps_edge_certificate": True,
                          "acme_url": "https://orgmail-acme-s.customers.example/v1/challenge"})
    relay = {f.path: f.content for f in render_relay_files(keeper)}
    assert '--name "/orgmail/s/edge/tls/certificate" --type SecureString --tier Advanced' in relay[
        "/usr/local/sbin/orgmail-edge-cert-publish"]
    assert "-d mail.example.org" in relay["/etc/systemd/system/orgmail-edge-cert.service"]
    bootstrap = relay["/usr/local/sbin/orgmail-bootstrap"]
    assert "key=$(param certbot/mail.example.org/key)" in bootstrap and "orgmail-edge-cert.timer" in bootstrap
    plain = {f.path: f.content for f in render_relay_files(RELAY)}
    assert "certbot/" not in plain["/usr/local/sbin/orgmail-bootstrap"]


def test_only_a_relay_with_the_workers_url_keeps_the_certificate() -> None:
    for url in ("", "http://x.example/v1/challenge", "https://x.example/v1/challenge\n"):
        with pytest.raises(ValueError, match="ACME Worker's URL"):
            RelayArgs(**{**RELAY.__dict__, "keeps_edge_certificate": True, "acme_url": url})
