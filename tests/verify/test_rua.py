"""TLS-RPT report URIs as the verifier accepts them (RFC 8460 3), internationalised TLDs included."""

from __future__ import annotations

import pytest

from tools.verify import rua_uri_valid


@pytest.mark.parametrize("uri", ["mailto:tls@example.org", "mailto:tls@example.xn--mgba3a4f16a",
                                 "https://reports.example.org/tlsrpt"])
def test_valid_report_uris(uri: str) -> None:
    assert rua_uri_valid(uri)


@pytest.mark.parametrize("uri", ["mailto:tls@example", "mailto:tls@example.123", "ftp://example.org/x",
                                 "mailto:tls@example.org\n", "mailto:a@b@example.org"])
def test_invalid_report_uris(uri: str) -> None:
    assert not rua_uri_valid(uri)
