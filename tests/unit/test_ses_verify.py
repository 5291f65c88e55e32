"""The verifier with outbound.relay ses (issue 14): the SES MAIL FROM records in DNS, and whether the
account is still in the SES sandbox (sesv2 GetAccount, here through botocore's Stubber: no AWS call)."""

from __future__ import annotations

from typing import Any

import botocore.session
import pytest
from botocore.stub import Stubber

from components.dns_records import PLACEHOLDER_PEM, all_records, ses_records
from components.settings import Settings, load_settings
from tests.unit.conftest import raw_config
from tools import verify
from tools.verify import ERROR, OK, WARNING, Answer, Expected, Options, check_ses_account, check_ses_mail_from


def ses_settings(**outbound: Any) -> Settings:
    raw = raw_config()
    raw["outbound"] = {"relay": "ses", **outbound}
    return load_settings(raw, "dev")


def expected(settings: Settings) -> Expected:
    records = [{"type": r.type, "name": r.name, "content": r.content, "priority": r.priority, "ttl": r.ttl}
               for r in all_records(settings, {h: "198.51.100.7" for h in settings.mx_hosts}, PLACEHOLDER_PEM)]
    return Expected(settings=settings, records=records, host_ips={}, dkim_key_b64=None, source="test")


class FakeResolver:
    """Answers from a table {(name, type): [values]}; anything else is NXDOMAIN."""

    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        self.zone = zone

    def query(self, name: str, rdtype: str) -> Answer:
        values = self.zone.get((name, rdtype))
        return Answer("ok", values) if values else Answer("nxdomain", [])

    def values(self, name: str, rdtype: str) -> list[str]:
        return self.query(name, rdtype).values


GOOD = {("bounce.example.org", "MX"): ["10 feedback-smtp.eu-central-1.amazonses.com."],
        ("bounce.example.org", "TXT"): ["v=spf1 include:amazonses.com -all"]}


def test_the_mail_from_records_as_published_pass() -> None:
    checks = check_ses_mail_from(expected(ses_settings()), FakeResolver(GOOD), "example.org")  # type: ignore[arg-type]
    assert [(c.check, c.subject, c.status) for c in checks] == [
        ("ses-mail-from-mx", "bounce.example.org", OK), ("ses-mail-from-spf", "bounce.example.org", OK)]


@pytest.mark.parametrize(("zone", "check", "fix"), [
    ({**GOOD, ("bounce.example.org", "MX"): []}, "ses-mail-from-mx",
     "publish exactly: bounce.example.org. 300 IN MX 10 feedback-smtp.eu-central-1.amazonses.com."),
    ({**GOOD, ("bounce.example.org", "MX"): ["10 feedback-smtp.us-east-1.amazonses.com."]}, "ses-mail-from-mx",
     "and delete bounce.example.org. IN MX 10 feedback-smtp.us-east-1.amazonses.com."),
    ({**GOOD, ("bounce.example.org", "TXT"): ["v=spf1 include:amazonses.com ~all"]}, "ses-mail-from-spf",
     'bounce.example.org. 300 IN TXT "v=spf1 include:amazonses.com -all"'),
    ({**GOOD, ("bounce.example.org", "TXT"): ["v=spf1 include:amazonses.com -all", "v=spf1 -all"]},
     "ses-mail-from-spf", "and delete the others"),
])
def test_a_wrong_mail_from_record_is_an_error_with_its_fix(zone: dict[tuple[str, str], list[str]], check: str,
                                                          fix: str) -> None:
    checks = {c.check: c for c in check_ses_mail_from(expected(ses_settings()), FakeResolver(zone), "example.org")}  # type: ignore[arg-type]
    assert checks[check].status == ERROR and fix in checks[check].fix, checks[check]


def _stubbed(response: dict[str, Any] | None = None, error: str | None = None) -> tuple[Any, Stubber]:
    client = botocore.session.get_session().create_client(
        "sesv2", region_name="eu-central-1", aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="example")
    stub = Stubber(client)
    if error:
        stub.add_client_error("get_account", service_error_code=error, http_status_code=403)
    else:
        stub.add_response("get_account", response or {}, {})
    stub.activate()
    return client, stub


QUOTA = {"Max24HourSend": 200.0, "MaxSendRate": 1.0, "SentLast24Hours": 3.0}


@pytest.mark.parametrize(("response", "status", "found"), [
    ({"ProductionAccessEnabled": False, "SendingEnabled": True, "EnforcementStatus": "HEALTHY", "SendQuota": QUOTA},
     WARNING, "in the SES sandbox: only verified recipients; quota 200 a day, 1 a second, 3 sent in 24 h"),
    ({"ProductionAccessEnabled": True, "SendingEnabled": True, "EnforcementStatus": "HEALTHY",
      "SendQuota": {"Max24HourSend": 50000.0, "MaxSendRate": 14.0, "SentLast24Hours": 120.0}},
     OK, "production access; quota 50000 a day, 14 a second, 120 sent in 24 h"),
    ({"ProductionAccessEnabled": True, "SendingEnabled": True, "EnforcementStatus": "PROBATION", "SendQuota": QUOTA},
     WARNING, "production access; enforcement status PROBATION"),
    ({"ProductionAccessEnabled": True, "SendingEnabled": False, "EnforcementStatus": "SHUTDOWN", "SendQuota": QUOTA},
     ERROR, "sending is paused (SHUTDOWN)"),
])
def test_the_account_check_reads_get_account(response: dict[str, Any], status: str, found: str) -> None:
    client, stub = _stubbed(response)
    check = check_ses_account("eu-central-1", client)
    stub.assert_no_pending_responses()
    assert check.check == "ses-account" and check.subject == "ses eu-central-1"
    assert check.status == status and check.found.startswith(found), check
    if status == WARNING and "sandbox" in found:
        assert "Request production access" in check.fix


def test_no_permission_is_a_warning_never_a_failed_run() -> None:
    client, _ = _stubbed(error="AccessDeniedException")
    check = check_ses_account("eu-central-1", client)
    assert check.status == WARNING and check.found.startswith("not checked: ClientError")


def test_run_checks_adds_the_ses_checks_only_with_ses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "Resolver", lambda *_: FakeResolver(GOOD))
    client, _ = _stubbed({"ProductionAccessEnabled": True, "SendingEnabled": True, "EnforcementStatus": "HEALTHY",
                          "SendQuota": QUOTA})
    settings = ses_settings()
    checks = verify.run_checks(expected(settings), Options(skip_host=True, dnsbls=(), ses_client=client))
    ses = [(c.check, c.subject, c.status) for c in checks if c.check.startswith("ses-")]
    assert ses == [("ses-mail-from-mx", "bounce.example.org", OK), ("ses-mail-from-spf", "bounce.example.org", OK),
                   ("ses-account", "ses eu-central-1", OK)]
    assert {r.name for r in ses_records(settings)} == {"bounce.example.org"}
    direct = load_settings(raw_config(), "dev")
    assert not [c for c in verify.run_checks(expected(direct), Options(skip_host=True, dnsbls=()))
                if c.check.startswith("ses-")]
