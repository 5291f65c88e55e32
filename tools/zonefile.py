"""Export every record a stack publishes as BIND zone files, for review or for DNS hosted elsewhere.

    python -m tools.zonefile Pulumi.dev.yaml [--out DIR]                          # review copy
    pulumi stack output --json > outputs.json
    python -m tools.zonefile Pulumi.dev.yaml --outputs outputs.json [--out DIR]   # to publish

One zone per configured domain. Without --outputs the records come from the offline plan, whose
Elastic IPs are placeholders (192.0.2.x) and whose DKIM keys are mock keys made for the plan: those
records are commented out and marked PLACEHOLDER, and the zone says it is not for publishing as is.
With --outputs (the deployed stack's outputs) every record holds its real value. The PTR records
live at AWS (Elastic IP reverse DNS), and the MTA-STS and autoconfig host names are served by the
stack's Cloudflare Worker: both appear as comments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from components.dns_records import web_hosts, worker_name
from components.settings import ConfigError, Settings
from tools.plan import is_placeholder, plan_document, plan_stack_file
from tools.stackfile import StackFileError

PLACEHOLDER_IP = "Elastic IP, known after pulumi up"
MOCK_DKIM = "mock DKIM key of the offline plan"


def _owner(name: str) -> str:
    return name.rstrip(".") + "."


def _rdata(record: dict[str, Any]) -> str:
    if record["type"] == "MX":
        return f"{record['priority']} {_owner(record['content'])}"
    return str(record["content"])


def stand_in(record: dict[str, Any], from_plan: bool) -> str | None:
    """Why a planned record's value is not the real one (None: it is real)."""
    if not from_plan:
        return None
    if is_placeholder(record["content"]):
        return PLACEHOLDER_IP
    if record["type"] == "TXT" and "._domainkey." in record["name"]:
        return MOCK_DKIM
    return None


def published_addresses(outputs: dict[str, Any]) -> list[tuple[str, str]]:
    """(host name, address) of every Elastic IP with a PTR: each host's, and a cluster's load balancer's (one
    per zone, all at the mail host's name) and relays'."""
    pairs = list((outputs.get("hostIps") or {}).items())
    pairs += [(str(outputs.get("mailHost")), ip) for ip in outputs.get("loadBalancerIps") or []]
    return pairs


def zone_files(settings: Settings, dns: list[dict[str, Any]], host_ips: dict[str, str] | list[tuple[str, str]], *,
               from_plan: bool) -> dict[str, str]:
    """Zone name -> BIND text. from_plan: the records come from the offline plan, so its stand-in
    values (placeholder addresses, mock DKIM keys) are commented out and marked."""
    zones = {d.name: d for d in settings.domains}
    by_zone: dict[str, list[dict[str, Any]]] = {z: [] for z in zones}
    for record in dns:
        name = record["name"]
        zone = max((z for z in zones if name == z or name.endswith("." + z)), key=len)
        by_zone[zone].append(record)
    web = web_hosts(settings)
    out: dict[str, str] = {}
    for zone, records in by_zone.items():
        lines = []
        marked = [r for r in records if stand_in(r, from_plan)]
        if marked:
            lines += [f"; NOT FOR PUBLISHING AS IS: {len(marked)} record(s) below are commented out because the "
                      "offline plan has only stand-ins for them",
                      "; (placeholder Elastic IPs, mock DKIM keys). For DNS hosted elsewhere run: "
                      "pulumi stack output --json > outputs.json;",
                      f"; python -m tools.zonefile Pulumi.{settings.stack}.yaml --outputs outputs.json"]
        lines += [f"; {zone}: records published by orgmail stack {settings.stack} ({settings.organization})",
                  f"$ORIGIN {_owner(zone)}", f"$TTL {settings.dns_ttl}"]
        for r in records:
            if r.get("proxied"):  # webmail's CNAME to its tunnel answers only through Cloudflare's proxy
                lines.append(f"; {r['name']}: webmail, a proxied CNAME to its Cloudflare Tunnel "
                             f"({r['content']}); it works only in Cloudflare's DNS")
                continue
            line = f"{_owner(r['name']):<48} {int(r['ttl']):>6} IN {r['type']:<5} {_rdata(r)}"
            why = stand_in(r, from_plan)
            lines.append(f"; PLACEHOLDER ({why}): {line}" if why else line)
        for web_zone, host in web:
            if web_zone == zone:
                lines.append(f"; {host}: HTTPS, served by the Cloudflare Worker {worker_name(settings)}")
        for host, ip in (host_ips.items() if isinstance(host_ips, dict) else host_ips):
            if host == zone or host.endswith("." + zone):
                mark = f" (PLACEHOLDER: {PLACEHOLDER_IP})" if from_plan and is_placeholder(ip) else ""
                lines.append(f"; PTR of {ip} -> {host}. is set at AWS (Elastic IP reverse DNS){mark}")
        out[zone] = "\n".join(lines) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack_file", type=Path)
    parser.add_argument("--out", type=Path, help="write <zone>.zone files here instead of printing")
    parser.add_argument("--outputs", type=Path,
                        help="the deployed stack's outputs (pulumi stack output --json): real addresses and DKIM keys "
                             "instead of the offline plan's placeholders")
    args = parser.parse_args(argv)
    try:
        settings, run = plan_stack_file(args.stack_file)
        outputs = json.loads(args.outputs.read_text()) if args.outputs else None
    except StackFileError as e:
        print(e, file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"{args.stack_file}: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"{args.outputs}: cannot read the stack outputs: {e}", file=sys.stderr)
        return 2
    if outputs is not None:
        if not isinstance(outputs, dict) or not isinstance(outputs.get("dnsRecords"), list):
            print(f"{args.outputs}: no dnsRecords; give the output of `pulumi stack output --json`", file=sys.stderr)
            return 2
        files = zone_files(settings, outputs["dnsRecords"], published_addresses(outputs), from_plan=False)
    else:
        doc = plan_document(run, Path("build") / f"plan-{settings.stack}")
        files = zone_files(settings, doc["dns"], published_addresses(doc["outputs"]), from_plan=True)
        print("zonefile: a review copy from the offline plan; its placeholder addresses and mock DKIM keys are "
              "commented out (PLACEHOLDER); for DNS hosted elsewhere pass --outputs (pulumi stack output --json)",
              file=sys.stderr)
    for zone, text in files.items():
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{zone}.zone").write_text(text)
            print(args.out / f"{zone}.zone")
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
