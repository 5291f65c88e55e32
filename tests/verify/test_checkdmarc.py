"""An independent validator (checkdmarc, from PyPI) on the exported zones, served by the same Knot.

checkdmarc's DNS goes to the test Knot through its `nameservers` option. Its MTA-STS policy fetch
(requests, https://mta-sts.<domain>/ on port 443) is sent to the local HTTPS stub by redirecting
that one TCP connection, and trusts the test CA through REQUESTS_CA_BUNDLE: checkdmarc still
downloads and parses the policy itself.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import checkdmarc  # type: ignore[import-untyped]
import checkdmarc.utils  # type: ignore[import-untyped]
import dns.nameserver
import pytest
import urllib3.util.connection

from tests.verify import harness
from tests.verify.conftest import Bed

DOMAINS = ("example.org", "example.net")


@pytest.fixture
def validator(bed: Bed, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bed]:
    real = urllib3.util.connection.create_connection

    def to_stub(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host, port = address
        if host.startswith("mta-sts.") and port == 443:
            address = (harness.WEB_IP, harness.HTTPS_PORT)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", to_stub)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bed.stubs.ca.ca_file))
    checkdmarc.utils.DNS_CACHE.clear()  # checkdmarc caches answers process-wide; each test edits the zones
    yield bed
    checkdmarc.utils.DNS_CACHE.clear()


def _ns() -> list[Any]:
    return [dns.nameserver.Do53Nameserver(harness.DNS_ADDR[0], harness.DNS_ADDR[1])]


def _run(domain: str) -> dict[str, dict[str, Any]]:
    return {
        "spf": dict(checkdmarc.check_spf(domain, nameservers=_ns())),
        "dmarc": dict(checkdmarc.check_dmarc(domain, nameservers=_ns())),
        "tls-rpt": dict(checkdmarc.check_smtp_tls_reporting(domain, nameservers=_ns())),
        "mta-sts": dict(checkdmarc.check_mta_sts(domain, nameservers=_ns())),
    }


def test_checkdmarc_finds_no_error_or_warning_in_the_exported_zones(validator: Bed) -> None:
    validator.knot.serve(validator.zones)
    for domain in DOMAINS:
        results = _run(domain)
        for name, r in results.items():
            assert r.get("valid") is True and "error" not in r, (domain, name, r)
            assert not r.get("warnings"), (domain, name, r["warnings"])
        assert results["spf"]["record"] == "v=spf1 mx -all"
        assert results["dmarc"]["tags"]["p"]["value"] == "reject"
        assert results["mta-sts"]["policy"] == {"version": "STSv1", "mode": "enforce", "max_age": 14 * 86400,
                                                "mx": ["mail.example.org", "mx2.example.org"]}
        assert results["tls-rpt"]["tags"]["rua"]["value"] == ["mailto:dmarc@example.org"]


def test_checkdmarc_is_really_looking_at_the_test_server(validator: Bed) -> None:
    """Negative control: the same validator rejects broken records served by the same Knot and stub."""
    harness.add_records(validator.zones, "example.org", "TXT", ['"v=spf1 a -all"'])
    harness.set_records(validator.zones, "_smtp._tls.example.org", "TXT", ['"v=TLSRPTv1; rua=dmarc@example.org"'])
    validator.stubs.web.http.update(body="version: STSv2\r\nmode: enforce\r\nmx: mail.example.org\r\nmax_age: 86400\r\n")
    validator.knot.serve(validator.zones)
    results = _run("example.org")
    assert results["spf"]["valid"] is False, results["spf"]
    assert results["tls-rpt"]["valid"] is False
    assert results["mta-sts"]["valid"] is False
