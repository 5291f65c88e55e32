"""Export every record a stack publishes as BIND zone files, for review or for DNS hosted elsewhere.

    python -m tools.zonefile Pulumi.dev.yaml [--out DIR]

One zone per configured domain, from the offline plan (placeholder addresses stay placeholders:
fill in the Elastic IPs from `pulumi stack output hostIps` for real use). The PTR records live at
AWS (Elastic IP reverse DNS), and the MTA-STS and autoconfig host names are served by the
stack's Cloudflare Worker: both appear as comments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from components.dns_records import web_hosts, worker_name
from components.settings import ConfigError, Settings
from tools.plan import plan_document, plan_stack_file
from tools.stackfile import StackFileError


def _owner(name: str) -> str:
    return name.rstrip(".") + "."


def _rdata(record: dict[str, Any]) -> str:
    if record["type"] == "MX":
        return f"{record['priority']} {_owner(record['content'])}"
    return str(record["content"])


def zone_files(settings: Settings, dns: list[dict[str, Any]], host_ips: dict[str, str]) -> dict[str, str]:
    """Zone name -> BIND text."""
    zones = {d.name: d for d in settings.domains}
    by_zone: dict[str, list[dict[str, Any]]] = {z: [] for z in zones}
    for record in dns:
        name = record["name"]
        zone = max((z for z in zones if name == z or name.endswith("." + z)), key=len)
        by_zone[zone].append(record)
    web = web_hosts(settings)
    out: dict[str, str] = {}
    for zone, records in by_zone.items():
        lines = [f"; {zone}: records published by orgmail stack {settings.stack} ({settings.organization})",
                 f"$ORIGIN {_owner(zone)}", f"$TTL {settings.dns_ttl}"]
        for r in records:
            lines.append(f"{_owner(r['name']):<48} {int(r['ttl']):>6} IN {r['type']:<5} {_rdata(r)}")
        for web_zone, host in web:
            if web_zone == zone:
                lines.append(f"; {host}: HTTPS, served by the Cloudflare Worker {worker_name(settings)}")
        for host, ip in host_ips.items():
            if host == zone or host.endswith("." + zone):
                lines.append(f"; PTR of {ip} -> {host}. is set at AWS (Elastic IP reverse DNS)")
        out[zone] = "\n".join(lines) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack_file", type=Path)
    parser.add_argument("--out", type=Path, help="write <zone>.zone files here instead of printing")
    args = parser.parse_args(argv)
    try:
        settings, run = plan_stack_file(args.stack_file)
    except StackFileError as e:
        print(e, file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"{args.stack_file}: {e}", file=sys.stderr)
        return 2
    doc = plan_document(run, Path("build") / f"plan-{settings.stack}")
    files = zone_files(settings, doc["dns"], doc["outputs"]["hostIps"])
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
