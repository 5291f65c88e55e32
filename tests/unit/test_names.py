"""Resource names (issue 17, items 6 and 10): by role, never by host name; aliases for existing stacks;
no two resources from one name; names unique per account across Pulumi projects. All on the mock engine."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from components.names import name_collisions
from components.settings import ConfigError, load_settings
from tests.unit.conftest import ROOT, STACKS, raw_config, stack_config
from tests.unit.test_deploy_checks import LONGEST_STACK, edge_config
from tests.unit.test_stack import user_data
from tools import deploy_checks as dc
from tools.mockengine import MockRun, run_program
from tools.plandiff import compare, snapshot

DATA = Path(__file__).parent / "data"
EIP_PTR = "aws:ec2/eipDomainName:EipDomainName"
SSM_PARAMETER = "aws:ssm/parameter:Parameter"
SALT = b"test-names"


def renamed(stack: str, mail_host: str, extra_domain: str | None = None) -> dict[str, Any]:
    cfg = copy.deepcopy(stack_config(stack))
    cfg["orgmail:mailHost"] = mail_host
    if extra_domain:
        cfg["orgmail:domains"] = [*cfg["orgmail:domains"], {"name": extra_domain, "zoneId": "e" * 32}]
    return cfg


@functools.cache
def large_runs() -> dict[str, MockRun]:
    """The large example (a relay) as it is, with its mail host renamed, and with the mail host moved to
    another domain (whose zone then holds the relay's name, mx2.<zone>, too)."""
    return {
        "as is": run_program(renamed("large", "mail.large.example", "other.example"), "large"),
        "renamed": run_program(renamed("large", "post.large.example", "other.example"), "large"),
        "moved": run_program(renamed("large", "mail.other.example", "other.example"), "large"),
    }


def names(run: MockRun) -> set[tuple[str, str]]:
    return {(r.type, r.name) for r in run.resources}


# --- Item 6: a renamed host keeps its resources -----------------------------------------------

def test_resource_names_do_not_change_when_host_names_change() -> None:
    runs = large_runs()
    assert runs["renamed"].outputs["mxHosts"] == ["post.large.example", "mx2.large.example"]
    assert runs["moved"].outputs["mxHosts"] == ["mail.other.example", "mx2.other.example"]
    assert names(runs["renamed"]) == names(runs["as is"])
    assert names(runs["moved"]) == names(runs["as is"])


def test_the_single_host_of_small_stacks_too() -> None:
    before = run_program(renamed("dev", "mail.example.org"), "dev")
    after = run_program(renamed("dev", "smtp.example.org"), "dev")
    assert names(after) == names(before)


@pytest.mark.parametrize("change", ["renamed", "moved"])
def test_a_renamed_host_updates_its_ptr_in_place(change: str) -> None:
    """The PTR (and the A record it waits for) change their inputs; nothing is created and deleted, and the
    protected address and volume are not touched."""
    runs = large_runs()
    diff = compare(snapshot(runs["as is"], SALT), snapshot(runs[change], SALT))
    assert diff["resources"]["added"] == [] and diff["resources"]["removed"] == []
    assert diff["dns"]["added"] == [] and diff["dns"]["removed"] == []
    changed = {c["name"]: {ch["key"]: (ch["old"], ch["new"]) for ch in c["changes"]}
               for c in diff["resources"]["changed"]}
    old_host, new_host = runs["as is"].outputs["mxHosts"][0], runs[change].outputs["mxHosts"][0]
    assert changed["dns-ptr-mail"] == {"domainName": (old_host, new_host)}
    if change == "moved":  # the relay's name follows the mail host's zone
        assert changed["dns-ptr-mx2"] == {"domainName": ("mx2.large.example", "mx2.other.example")}
    else:
        assert "dns-ptr-mx2" not in changed
    a_record = next(c for c in diff["dns"]["changed"] if c["resource"] == "dns-a-mail")
    assert {"key": "name", "old": old_host, "new": new_host} in a_record["changes"]
    for untouched in ("mail-ip", "mail-data", "mx2-ip", "mx2-queue"):
        assert untouched not in changed or set(changed[untouched]) == {"tags.Name"}, changed.get(untouched)
    ptr = runs[change].one(EIP_PTR, "dns-ptr-mail")
    a_urn = runs[change].one("cloudflare:index/dnsRecord:DnsRecord", "dns-a-mail").urn
    assert a_urn in ptr.dependencies  # AWS sets reverse DNS only once the A record resolves


def old_urns() -> dict[str, list[str]]:
    doc: dict[str, Any] = json.loads((DATA / "urns-before-role-names.json").read_text())
    return doc["urns"]


def smtp_variant(stack: str) -> dict[str, Any]:
    cfg = copy.deepcopy(stack_config(stack))
    cfg["orgmail:mailHost"] = cfg["orgmail:mailHost"].replace("mail.", "smtp.", 1)
    return cfg


RECORDED_AS = {"isp-single": "isp"}


@pytest.mark.parametrize("case", [*STACKS, "dev/smtp", "large/smtp"])
def test_existing_stacks_keep_every_resource_through_aliases(case: str) -> None:
    """Every URN the program made before resources were named by role (recorded from that version, in
    tests/unit/data) is the URN, or an alias, of exactly one resource now: Pulumi moves its state, so an
    existing stack sees no create, delete or replace from the renaming. '/smtp': a mail host not named
    mail.<domain>, whose resources were all named smtp-* before."""
    stack = case.split("/")[0]
    # Recorded when the single-host ISP example was the stack "isp" (Pulumi.isp.yaml is the cluster now): the
    # stacks deployed from it are still named so.
    recorded = RECORDED_AS.get(stack, stack)
    run = run_program(smtp_variant(stack) if case.endswith("/smtp") else stack_config(stack), recorded)
    before = old_urns()[case.replace(stack, recorded, 1)]
    claims: dict[str, list[str]] = {}
    for r in run.resources:
        for urn in {r.urn, *r.alias_urns}:
            claims.setdefault(urn, []).append(r.name)
    assert [u for u in before if len(claims.get(u, [])) != 1] == []
    # No host's resource, PTR or protected resource is new (later changes may add others, e.g. SSM parts:
    # a host's bundle is stored under it, and a new parameter replaces nothing).
    new = [r for r in run.resources if not {r.urn, *r.alias_urns} & set(before) and r.type != SSM_PARAMETER]
    assert [r.name for r in new if r.protect or r.type in (EIP_PTR, "orgmail:index:MailHost")
            or "$orgmail:index:MailHost$" in r.urn or "::orgmail:index:MailHost$" in r.urn] == []


def test_the_aliases_name_the_old_host_named_resources() -> None:
    run = run_program(smtp_variant("large"), "large")
    ptr = run.one(EIP_PTR, "dns-ptr-mail")
    assert any(u.endswith("::dns-ptr-smtp-large-example") for u in ptr.alias_urns)
    eip = run.one("aws:ec2/eip:Eip", "mail-ip")
    assert any(u.endswith("$aws:ec2/eip:Eip::smtp-ip") for u in eip.alias_urns) and eip.protect
    assert run.one("orgmail:index:MailHost", "mail").alias_urns[0].endswith("::smtp")
    assert run.one("aws:ec2/eip:Eip", "mx2-ip").alias_urns == []  # relays were always mx<n>


# --- Item 10: no two resources from one name --------------------------------------------------

def problems_of(change: Any, base: str = "dev") -> list[str]:
    cfg = raw_config(base)
    change(cfg)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, base)
    return err.value.problems


def test_mailboxes_whose_names_differ_only_in_dot_and_dash_are_refused() -> None:
    [problem] = problems_of(lambda c: c["mailboxes"].extend([{"address": "a.b@example.org"},
                                                             {"address": "a-b@example.org"}]))
    assert problem.startswith("orgmail:mailboxes[2].address (a.b@example.org) and "
                              "orgmail:mailboxes[3].address (a-b@example.org) give generated password resources "
                              "the same name 'password-a-b-at-example-org'")
    assert "passwordHashes" in problem


def test_a_password_hash_for_one_of_them_lifts_it() -> None:
    cfg = raw_config("dev")
    cfg["mailboxes"] += [{"address": "a.b@example.org"}, {"address": "a-b@example.org"}]
    cfg["passwordHashes"] = {"a.b@example.org": "{BLF-CRYPT}$2y$10$" + "a" * 53}
    assert name_collisions(load_settings(cfg, "dev")) == []


def test_a_mail_host_named_like_a_relay_is_refused() -> None:
    [problem] = problems_of(lambda c: c.update(mailHost="mx2.large.example"), "large")
    assert problem.startswith("orgmail:mailHost: mx2.large.example is claimed by orgmail:mailHost")
    assert "relay 1 of tier large" in problem


@pytest.mark.parametrize("host", ["mta-sts.example.org", "autoconfig.example.org", "orgmail-acme-dev.example.org"])
def test_a_mail_host_named_like_a_worker_is_refused(host: str) -> None:
    [problem] = problems_of(lambda c: c.update(mailHost=host))
    assert problem.startswith(f"orgmail:mailHost: {host} is claimed by orgmail:mailHost ({host}) and by the ")


def test_domains_whose_names_differ_only_in_dot_and_dash_are_refused_once() -> None:
    [problem] = problems_of(lambda c: c["domains"].extend([{"name": "a-b.org", "zoneId": "1" * 32},
                                                          {"name": "a.b.org", "zoneId": "2" * 32}]))
    assert problem.startswith("orgmail:domains[1].name (a-b.org) and orgmail:domains[2].name (a.b.org) give ")
    assert "more" in problem


def test_a_domain_named_like_another_domains_record_is_refused() -> None:
    [problem] = problems_of(lambda c: c["domains"].append({"name": "dmarc.example.org",
                                                           "zoneId": c["domains"][0]["zoneId"]}))
    assert "orgmail:domains[0].name (example.org) and orgmail:domains[1].name (dmarc.example.org)" in problem
    assert "'txt-dmarc-example-org'" in problem


def test_the_same_ssh_network_twice_is_refused() -> None:
    [problem] = problems_of(lambda c: c["admin"].update(sshCidrs=["2001:db8::/32", "2001:0db8::/32"]))
    assert problem.startswith("orgmail:admin.sshCidrs[0] (2001:db8::/32) and orgmail:admin.sshCidrs[1]")


BACKSTOP = """
import copy, components.names as names
from tests.unit.conftest import stack_config
from tools.mockengine import DuplicateUrnError, run_program
names.name_collisions = lambda settings: []  # as if the settings check missed a name
cfg = copy.deepcopy(stack_config("dev"))
cfg["orgmail:mailboxes"] += [{"address": "a.b@example.org"}, {"address": "a-b@example.org"}]
try:
    run_program(cfg, "dev")
except DuplicateUrnError as e:
    print("refused:", e)
"""


def test_the_mock_engine_refuses_a_duplicate_urn_as_the_engine_does() -> None:
    """The backstop for any name the settings check misses: a mock run stops at a duplicate URN, as the
    engine stops a deploy. (In a process of its own: the failed run leaves registrations pending.)"""
    done = subprocess.run([sys.executable, "-c", BACKSTOP], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "refused: Duplicate resource URN " in done.stdout, done.stderr[-2000:]
    assert done.stdout.strip().endswith("::secrets-password-a-b-at-example-org")


@pytest.mark.parametrize("stack", STACKS)
def test_the_example_stacks_have_no_collisions(stack: str) -> None:
    assert name_collisions(load_settings(raw_config(stack), stack)) == []


# --- Item 10: one stack name in two projects of one account -------------------------------------

# Inputs whose values must be unique per AWS account and region, or per Cloudflare account.
ACCOUNT_UNIQUE = {
    "aws:ssm/parameter:Parameter": "name",
    "aws:ec2/amiCopy:AmiCopy": "name",
    "cloudflare:index/workersScript:WorkersScript": "scriptName",
    "cloudflare:index/workersCustomDomain:WorkersCustomDomain": "hostname",
    "aws:dlm/lifecyclePolicy:LifecyclePolicy": "policyDetails.targetTags",
    "aws:cloudwatch/metricAlarm:MetricAlarm": "dimensions",
}


def account_names(run: MockRun) -> set[str]:
    found = set()
    for r in run.resources:
        key = ACCOUNT_UNIQUE.get(r.type)
        if key is None:
            continue
        value: Any = r.inputs
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None and (r.type != "aws:cloudwatch/metricAlarm:MetricAlarm" or "Stack" in value):
            found.add(f"{r.type} {json.dumps(value, sort_keys=True)}")
    return found


@functools.cache
def project_run(project: str) -> MockRun:
    return run_program(stack_config("dev"), "dev", project=project)


def test_the_same_stack_in_another_project_shares_no_account_wide_name() -> None:
    """(Same config in both: the per-domain names mta-sts.<domain> and autoconfig.<domain> are the domain's,
    like its MX: two stacks serving one domain is what the pre-deploy check reports; README.)"""
    ours, theirs = account_names(project_run("orgmail")), account_names(project_run("orgmail-eu"))
    assert len(ours) > 20
    shared = {n for n in ours & theirs if '"mta-sts.' not in n and '"autoconfig.' not in n}
    assert shared == set()
    assert len(ours & theirs) == 2  # mta-sts.example.org, autoconfig.example.org


def test_stacks_of_the_orgmail_project_keep_their_names() -> None:
    run = project_run("orgmail")
    assert run.outputs["ssmPath"] == "/orgmail/dev"
    scripts = {r.inputs["scriptName"] for r in run.of_type("cloudflare:index/workersScript:WorkersScript")}
    assert scripts == {"orgmail-dev", "orgmail-dev-acme"}


def test_another_project_is_namespaced_by_a_digest_of_project_and_stack() -> None:
    run = project_run("orgmail-eu")
    settings = load_settings(raw_config("dev"), "dev", "orgmail-eu")
    assert settings.namespace == "dev-" + hashlib.sha256(b"orgmail-eu/dev").hexdigest()[:6]
    assert run.outputs["ssmPath"] == f"/orgmail/{settings.namespace}"
    text = user_data(run.one("aws:ec2/instance:Instance", "mail-instance"))
    assert f"STACK={settings.namespace}" in text  # the backup metric's dimension, as the alarms watch it


def test_the_longest_stack_name_in_another_project_meets_every_provider_constraint() -> None:
    run = run_program(edge_config("small"), LONGEST_STACK, project="p" * 100)
    problems = dc.check_run(run)
    assert problems == [], "\n".join(map(str, problems))
