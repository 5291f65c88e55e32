"""Offline plan: what `pulumi up` would create for a stack file, with no CLI, credentials or network.

    python -m tools.plan Pulumi.dev.yaml [--json] [--out build/plan-dev]

Prints the resources (type, name, key properties), the DNS records and the path of each host's
rendered user-data (written under --out). Secrets are masked; values the cloud assigns at deploy
time are placeholders, marked with '*' and listed at the end.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from components.dns_records import content_from_cloudflare, dkim_rotation
from components.settings import (
    NAMESPACE,
    ConfigError,
    Settings,
    load_settings,
    raw_from_pulumi_config,
    refuse_provider_credentials,
    settings_warnings,
)
from components.userdata import bundle_files
from tools.mockengine import PLACEHOLDER_IP_PREFIX, PLACEHOLDERS, MockRun, run_program
from tools.stackfile import StackFileError, config_keys, encrypted_settings, load_stack_config, project_name, stack_name

KEY_PROPERTIES: dict[str, tuple[str, ...]] = {
    "aws:ec2/vpc:Vpc": ("cidrBlock",),
    "aws:ec2/subnet:Subnet": ("cidrBlock", "availabilityZone"),
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": ("ipProtocol", "fromPort", "cidrIpv4", "cidrIpv6"),
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": ("ipProtocol", "fromPort", "cidrIpv4", "cidrIpv6"),
    "aws:ec2/instance:Instance": ("instanceType", "ami"),
    "aws:ebs/volume:Volume": ("type", "size", "encrypted"),
    "aws:ec2/eipDomainName:EipDomainName": ("domainName",),
    "aws:ssm/parameter:Parameter": ("name", "type"),
    "cloudflare:index/dnsRecord:DnsRecord": ("type", "name"),
    "tls:index/privateKey:PrivateKey": ("algorithm", "rsaBits"),
}


def user_data_text(resource_inputs: dict[str, Any]) -> str:
    return gzip.decompress(base64.b64decode(resource_inputs["userDataBase64"])).decode()


def host_env(user_data: str) -> dict[str, str]:
    """/etc/orgmail/host.env as a host's user-data writes it."""
    [text] = [f["content"] for f in yaml.safe_load(user_data)["write_files"] if f["path"] == "/etc/orgmail/host.env"]
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def stored_value(run: MockRun, name: str) -> str | None:
    """A parameter's value as orgmail-sync reads it: joined from its parts (join_parts)."""
    params = {p.inputs["name"]: p.inputs["value"] for p in run.of_type("aws:ssm/parameter:Parameter")}
    if name in params:
        return str(params[name])
    parts = sorted(k for k in params if k.startswith(f"{name}/part-"))
    return "".join(params[k] for k in parts if params[k] != "-") if parts else None


def host_files(run: MockRun, instance: Any) -> dict[str, str]:
    """Every file a planned host gets, from where it gets it: its user-data, its bundle (refused
    unless its SHA-256 is the one the user-data names, as the host refuses it) and its role's files."""
    text = user_data_text(instance.inputs)
    env = host_env(text)
    bundle = stored_value(run, env["BUNDLE_PATH"])
    if bundle is None or hashlib.sha256(bundle.encode()).hexdigest() != env["BUNDLE_SHA256"]:
        raise ValueError(f"{instance.name}: its bundle is missing or not the one its user-data names")
    role_files = json.loads(stored_value(run, f"{env['SSM_PATH']}/files/{env['ROLE']}") or "{}")
    return {**{f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]},
            **{path: f["content"] for path, f in bundle_files(bundle).items()},
            **{path: f["content"] for path, f in role_files.items()}}


def is_placeholder(value: Any) -> bool:
    text = json.dumps(value) if not isinstance(value, str) else value
    return PLACEHOLDER_IP_PREFIX in text or any(p in text for p in PLACEHOLDERS if "*" not in p and " " not in p)


def whole_numbers(value: Any) -> Any:
    """The engine turns every number into a float; show 25, not 25.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


def before_first_deploy(settings: Settings, run: MockRun) -> list[str]:
    """Preflight facts (quotas, offerings, port 25, tokens) and which image a replacement boots."""
    from tools.preflight import image_note, preflight

    [image] = run.of_type("aws:ec2/amiCopy:AmiCopy")
    return [*preflight(settings), image_note(image.inputs["sourceAmiId"], settings.ami_id is not None)]


def host_replacement(settings: Settings) -> list[str]:
    """What replaces this stack's hosts, in plain words: derived from what feeds user-data and the image."""
    from components.server import replacing_values

    names = ", ".join(replacing_values(settings))
    lines = [f"this replaces host {host} (minutes without service) when any of these changes: {names}"
             for host in settings.mx_hosts]
    if len(settings.mx_hosts) > 1:
        lines.append("hosts are replaced one after another, mailbox host first, never together")
    lines.append("every other setting (admin.*, upgrades.*, mailboxes, aliases, limits) is a day-2 change: "
                 "orgmail-sync applies it from SSM, no host is replaced")
    return lines


# Amazon SES's sandbox (SES Developer Guide, "Request production access"): per account and region.
SES_SANDBOX_MESSAGES_PER_DAY = 200
SES_SANDBOX_MESSAGES_PER_SECOND = 1


def outbound_notes(settings: Settings) -> list[str]:
    """How outside mail leaves this stack, and with SES what the account must do first (sandbox, quotas, cost)."""
    from components.dns_records import ses_mail_from_domain, ses_smtp_host
    from components.ses import configuration_set_name

    o = settings.outbound
    # Who sends: the mailbox host, or in a cluster its outbound relays (the edges hand them outside mail).
    sender = "the mailbox host" if settings.cluster is None else "the outbound relays"
    if not o.ses or o.ses_region is None:
        return [f"direct (orgmail:outbound.relay): {sender} deliver{'s' if settings.cluster is None else ''} outside "
                "mail on port 25, which AWS blocks on new accounts until a removal request is granted; until then mail "
                "waits in the queue and bounces after 5 days. To send from day one set orgmail:outbound.relay: ses (a "
                "day-2 change, no host is replaced)"]
    region = o.ses_region
    domains = ", ".join(ses_mail_from_domain(d.name) for d in settings.domains)
    if settings.cluster is None:
        who = (f"the mailbox host relays outside mail to {ses_smtp_host(region)}:587 (STARTTLS, SMTP credentials from "
               f"{settings.ssm_path}/ses/smtp); the backup-MX relays never send outside")
    else:
        who = (f"the outbound relays relay our domains' mail and bounces to {ses_smtp_host(region)}:587 (STARTTLS, SMTP "
               f"credentials from {settings.ssm_path}/relay/ses/smtp, which only their role reads); forwarded mail (SRS "
               "senders) still leaves from their own addresses")
    return [
        f"ses (orgmail:outbound.relay): {who}",
        f"SES sandbox: every new account starts in it, per region: SES then sends only to verified addresses, at most "
        f"{SES_SANDBOX_MESSAGES_PER_DAY} messages in 24 hours and {SES_SANDBOX_MESSAGES_PER_SECOND} a second. Before "
        f"users depend on it request production access for {region} (SES console, Account dashboard, 'Request "
        f"production access'; or `aws sesv2 put-account-details --region {region} --production-access-enabled "
        "--mail-type TRANSACTIONAL --website-url ... --use-case-description ...`), which AWS reviews before it applies. "
        "`python -m tools.verify` says whether the account is still in the sandbox",
        f"sending quotas: after production access SES sets a daily quota and a maximum send rate per account in "
        f"{region} and raises them as the account sends well (`aws sesv2 get-account --region {region}`: SendQuota); "
        "mail beyond them is deferred by SES and stays in the host's queue",
        f"identities: one SES domain identity per mail domain, signing with the stack's DKIM key (BYODKIM, selector "
        f"{settings.dkim_selector}, the record already published), MAIL FROM {domains}; configuration set "
        f"{configuration_set_name(settings)} sends bounce and complaint events to SNS; alarms on the account's bounce "
        "(4%) and complaint (0.08%) rates, below SES's review thresholds (5%, 0.1%)",
        f"SMTP key generation {o.ses_key_generation}" + (f", generation {o.ses_key_retiring} still active until removed "
                                                          "from outbound.sesKeyRetiring" if o.ses_key_retiring else "")
        + "; rotate with outbound.sesKeyGeneration (README, 'Rotate the SES SMTP key')",
        "cost: see 'Amazon SES relay' in the cost estimate below (per 1,000 messages)",
    ]


def plan_document(run: MockRun, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    user_data: dict[str, dict[str, Any]] = {}
    for r in run.of_type("aws:ec2/instance:Instance"):
        text = user_data_text(r.inputs)
        path = out_dir / f"{r.name}.user-data.yaml"
        path.write_text(text)
        raw = len(base64.b64decode(r.inputs["userDataBase64"]))
        user_data[r.name] = {"path": str(path), "bytes": len(text.encode()), "gzipBytes": raw}
    dns = [
        {"type": r.inputs["type"], "name": r.inputs["name"],
         "content": content_from_cloudflare(r.inputs["type"], r.inputs.get("content"), r.inputs.get("data")),
         "priority": r.inputs.get("priority"), "ttl": r.inputs["ttl"], "proxied": r.inputs["proxied"]}
        for r in run.of_type("cloudflare:index/dnsRecord:DnsRecord")
    ]
    outputs = {k: ("[secret]" if k in run.secret_outputs else v) for k, v in run.outputs.items()}
    return whole_numbers({
        "resources": [{"type": r.type, "name": r.name, "parent": r.parent.rsplit("::", 1)[-1],
                       "protect": r.protect, "inputs": r.masked_inputs} for r in run.resources],
        "dns": dns,
        "userData": user_data,
        "outputs": outputs,
        "placeholders": PLACEHOLDERS,
    })


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text + ("*" if is_placeholder(value) else "")


def print_table(doc: dict[str, Any]) -> None:
    for title, key in (("Warnings", "warnings"), ("Not in this plan", "notes")):
        if doc.get(key):
            print(f"{title}:")
            for line in doc[key]:
                print(f"  - {line}")
            print()
    print(f"Resources ({len(doc['resources'])}):")
    for r in doc["resources"]:
        props = KEY_PROPERTIES.get(r["type"], ())
        shown = ", ".join(f"{p}={_cell(r['inputs'][p])}" for p in props if r["inputs"].get(p) is not None)
        flag = " [protected]" if r["protect"] else ""
        print(f"  {r['type']:<62} {r['name']:<44}{flag} {shown}")
    print(f"\nDNS records ({len(doc['dns'])}), all unproxied:")
    for d in doc["dns"]:
        prio = f" {d['priority']}" if d["priority"] is not None else ""
        content = d["content"] if len(d["content"]) < 90 else d["content"][:87] + "..."
        print(f"  {d['name']:<40} {d['ttl']:>6} {d['type']:<4}{prio} {_cell(content)}")
    if doc.get("outbound"):
        print("\nOutbound mail:")
        for line in doc["outbound"]:
            print(f"  - {line}")
    if doc.get("dkimRotation"):
        print("\nDKIM keys:")
        for line in doc["dkimRotation"]:
            print(f"  - {line}")
    print("\nUser-data:")
    for name, u in doc["userData"].items():
        print(f"  {name}: {u['path']} ({u['bytes']} bytes, {u['gzipBytes']} gzip; EC2 limit 16384)")
    print("\nHost replacement (a change to any of these settings makes user-data or the image anew):")
    for line in doc["hostReplacement"]:
        print(f"  - {line}")
    print("\nOutputs:")
    for k, v in doc["outputs"].items():
        if k not in ("dnsRecords", "dkimPublicKey"):
            print(f"  {k}: {_cell(v)}")
    print("\nBefore the first `pulumi up` (checkable only on the account):")
    for line in doc["beforeFirstDeploy"]:
        print(f"  - {line}")
    print("\n* placeholder, known only at deploy time:")
    for value, meaning in doc["placeholders"].items():
        print(f"  {value}: {meaning}")


def encrypted_notes(stack_file: Path) -> list[str]:
    """What the offline plan leaves out: every encrypted (secure:) orgmail setting, and what is planned instead."""
    notes = []
    for where in encrypted_settings(stack_file):
        if not where.startswith(f"{NAMESPACE}:"):
            continue  # other namespaces (provider settings): not part of the plan; credentials are refused earlier
        if where.startswith(f"{NAMESPACE}:passwordHashes."):
            address = where.split(".", 1)[1]
            instead = (f"{address} gets a generated initial password in this plan; the deployment uses the hash")
        elif where == f"{NAMESPACE}:spamhausDqsKey":
            instead = "the public Spamhaus zones in this plan; the deployment uses the key"
        else:
            instead = "the setting is treated as unset in this plan"
        notes.append(f"{where}: encrypted (secure:), which the offline plan cannot decrypt; planned without it: "
                     f"{instead}")
    return notes


def plan_stack_file(stack_file: Path) -> tuple[Settings, MockRun]:
    """Validated settings and the mock run of a stack file (raises ConfigError on bad config)."""
    stack = stack_name(stack_file)
    refuse_provider_credentials(config_keys(stack_file))  # secure ones too: load_stack_config drops them
    config = load_stack_config(stack_file)
    project = project_name(stack_file)
    return (load_settings(raw_from_pulumi_config(config), stack, project),
            run_program(config, stack, project=project))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack_file", type=Path, help="Pulumi.<stack>.yaml")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--out", type=Path, help="where to write rendered user-data (default build/plan-<stack>)")
    args = parser.parse_args(argv)
    from tools.cost import PriceError, cost_section, format_cost

    try:
        settings, run = plan_stack_file(args.stack_file)
        cost = cost_section(run, settings)
    except StackFileError as e:
        print(e, file=sys.stderr)
        return 2
    except (ConfigError, PriceError) as e:
        print(f"{args.stack_file}: {e}", file=sys.stderr)
        return 2
    doc = plan_document(run, args.out or Path("build") / f"plan-{settings.stack}")
    doc["warnings"] = settings_warnings(settings)
    doc["notes"] = encrypted_notes(args.stack_file)
    doc["cost"] = cost
    doc["beforeFirstDeploy"] = before_first_deploy(settings, run)
    doc["dkimRotation"] = dkim_rotation(settings)
    doc["outbound"] = outbound_notes(settings)
    doc["hostReplacement"] = host_replacement(settings)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_table(doc)
        print()
        print(format_cost(cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
