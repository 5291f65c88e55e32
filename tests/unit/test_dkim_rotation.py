"""DKIM key rotation with overlap (README, "Rotate the DKIM key"), step by step on the mock engine.

Step 0 signs with s2026. Step 1 signs with s2027 and keeps s2026 published (orgmail:dkimRetiring).
Step 2, after that date, drops s2026. Dropping a selector straight away is refused by Pulumi, because
the signing key and its records are protected.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from components.dns_records import dkim_public_key_b64, dkim_rotation, unquote_txt
from components.settings import load_settings, raw_from_pulumi_config
from tests.unit.conftest import stack_config
from tools.mockengine import MockRun, Registered, run_program
from tools.verify import OK, WARNING, Expected, check_dkim

KEY = "tls:index/privateKey:PrivateKey"
RECORD = "cloudflare:index/dnsRecord:DnsRecord"
PARAM = "aws:ssm/parameter:Parameter"
UNTIL = "2027-01-15"


def step_config(selector: str, retiring: dict[str, str] | None = None) -> dict[str, Any]:
    config = stack_config("dev")
    config["orgmail:dkimSelector"] = selector
    if retiring:
        config["orgmail:dkimRetiring"] = retiring
    return config


STEPS = {
    "0: s2026": step_config("s2026"),
    "1: s2027, s2026 retiring": step_config("s2027", {"s2026": UNTIL}),
    "2: s2027": step_config("s2027"),
    "s2027 without retiring s2026": step_config("s2027"),  # straight from step 0: refused
}
_runs: dict[str, MockRun] = {}


def run(step: str) -> MockRun:
    if step not in _runs:
        _runs[step] = run_program(STEPS[step], "dev")
    return _runs[step]


def dkim_of(r: MockRun, selector: str) -> tuple[Registered, list[Registered]]:
    key = r.one(KEY, f"secrets-dkim-{selector}")
    records = [rec for rec in r.of_type(RECORD) if rec.inputs["name"].startswith(f"{selector}._domainkey.")]
    return key, records


def deleted(old: MockRun, new: MockRun) -> list[Registered]:
    """What `pulumi up` from `old` to `new` deletes: resources of old whose URN new no longer has."""
    kept = {r.urn for r in new.resources}
    return [r for r in old.resources if r.urn not in kept]


def refused(old: MockRun, new: MockRun) -> list[str]:
    """Pulumi refuses to delete a resource protected in the state (its `pulumi preview` already fails)."""
    return sorted(r.name for r in deleted(old, new) if r.protect)


@pytest.mark.parametrize(("step", "signing", "retiring"), [
    ("0: s2026", "s2026", []), ("1: s2027, s2026 retiring", "s2027", ["s2026"]), ("2: s2027", "s2027", [])])
def test_every_published_key_has_its_records_and_only_the_signing_one_is_protected(
        step: str, signing: str, retiring: list[str]) -> None:
    r = run(step)
    assert sorted(k.name for k in r.of_type(KEY)) == sorted(f"secrets-dkim-{s}" for s in [signing, *retiring])
    for selector in (signing, *retiring):
        key, records = dkim_of(r, selector)
        assert [rec.inputs["name"] for rec in records] == [f"{selector}._domainkey.example.org"]
        for rec in records:
            assert unquote_txt(rec.inputs["content"]).endswith("p=" + dkim_public_key_b64(key.outputs["publicKeyPem"]))
            # The record is made from the key: Pulumi deletes the record before the key, never the other way.
            assert key.urn in rec.dependencies
        assert key.protect == (selector == signing)
        assert all(rec.protect == (selector == signing) for rec in records)


@pytest.mark.parametrize("step", ["0: s2026", "1: s2027, s2026 retiring", "2: s2027"])
def test_the_host_signs_with_a_selector_only_after_its_records_exist(step: str) -> None:
    r = run(step)
    signing = "s2026" if step.startswith("0") else "s2027"
    switch = r.one(PARAM, "dns-dkim-selector")
    assert switch.inputs["name"] == "/orgmail/dev/dkim-selector" and switch.inputs["value"] == signing
    _, records = dkim_of(r, signing)
    assert records and {rec.urn for rec in records} <= set(switch.dependencies)
    # Only the signing key goes to the host; a retiring one is no longer used there.
    assert sorted(p.inputs["name"] for p in r.of_type(PARAM) if "/dkim/" in p.inputs["name"]) == [
        f"/orgmail/dev/dkim/{signing}"]


def test_step_1_publishes_the_new_key_and_keeps_the_old_one() -> None:
    before, after = run("0: s2026"), run("1: s2027, s2026 retiring")
    gone = deleted(before, after)
    assert not [r.name for r in gone if r.type in (KEY, RECORD)], "no DKIM key or record goes in step 1"
    assert refused(before, after) == []
    old, kept = dkim_of(before, "s2026")[0], dkim_of(after, "s2026")[0]
    assert (old.urn, old.inputs) == (kept.urn, kept.inputs)  # the same resource, unchanged: the same key


def test_step_2_drops_the_retired_key_and_its_records() -> None:
    before, after = run("1: s2027, s2026 retiring"), run("2: s2027")
    assert sorted(r.name for r in deleted(before, after) if r.type in (KEY, RECORD)) == [
        "dns-txt-s2026-domainkey-example-org", "secrets-dkim-s2026"]
    assert refused(before, after) == []


def test_changing_the_selector_without_retiring_the_old_one_is_refused() -> None:
    assert refused(run("0: s2026"), run("s2027 without retiring s2026")) == [
        "dns-txt-s2026-domainkey-example-org", "secrets-dkim-s2026"]


def test_plan_and_verifier_say_where_the_rotation_stands() -> None:
    settings = load_settings(raw_from_pulumi_config(STEPS["1: s2027, s2026 retiring"]), "dev")
    assert dkim_rotation(settings) == [
        "signs with s2027 (orgmail:dkimSelector), from the first sync after its records are published",
        f"retiring s2026: published, not signed with, until {UNTIL}; after that date remove it from "
        "orgmail:dkimRetiring"]

    class Published:
        def query(self, name: str, rdtype: str) -> Any:
            from tools.verify import Answer
            key = dkim_of(run("1: s2027, s2026 retiring"), name.split(".")[0])[0].outputs["publicKeyPem"]
            return Answer("ok", [f"v=DKIM1; k=rsa; p={dkim_public_key_b64(key)}"])

    old_key = dkim_public_key_b64(dkim_of(run("1: s2027, s2026 retiring"), "s2026")[0].outputs["publicKeyPem"])
    exp = Expected(settings=settings, records=[], host_ips={}, dkim_key_b64=None, source="test",
                   retiring_keys_b64={"s2026": old_key})
    day = datetime.date.fromisoformat(UNTIL)
    current = check_dkim(exp, Published(), "example.org", "s2026", today=day)  # type: ignore[arg-type]
    assert (current.check, current.status) == ("dkim-retiring", OK) and f"published until {UNTIL}" in current.found
    late = check_dkim(exp, Published(), "example.org", "s2026", today=day + datetime.timedelta(days=1))  # type: ignore[arg-type]
    assert late.status == WARNING and "remove s2026 from orgmail:dkimRetiring" in late.fix
