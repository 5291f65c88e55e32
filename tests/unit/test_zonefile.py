"""The BIND export holds exactly the records the stack publishes, and parses as a zone."""

from __future__ import annotations

from pathlib import Path

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.zone

from components.settings import load_settings
from tests.unit.conftest import STACKS, raw_config, run_stack
from tools.plan import plan_document
from tools.zonefile import zone_files


def test_every_stack_exports_parsable_zones_with_every_record(tmp_path: Path) -> None:
    for stack in STACKS:
        settings = load_settings(raw_config(stack), stack)
        doc = plan_document(run_stack(stack), tmp_path / stack)
        files = zone_files(settings, doc["dns"], doc["outputs"]["hostIps"], from_plan=False)
        assert set(files) == {d.name for d in settings.domains}
        exported = set()
        for zone, text in files.items():
            z = dns.zone.from_text(text, origin=zone, relativize=False, check_origin=False)
            for name, node in z.nodes.items():
                for rdataset in node.rdatasets:
                    for rdata in rdataset:
                        exported.add((str(name).rstrip("."), dns.rdatatype.to_text(rdataset.rdtype),
                                      rdata.to_text()))
        planned = set()
        for r in doc["dns"]:
            if r["proxied"]:  # webmail's tunnel CNAME: a note, not a record, in a zone for another DNS host
                assert f"; {r['name']}: webmail, a proxied CNAME to its Cloudflare Tunnel" in "".join(files.values())
                continue
            text = f"{r['priority']} {r['content']}." if r["type"] == "MX" else r["content"]
            rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(r["type"]), text,
                                        origin=dns.name.root, relativize=False)
            planned.add((r["name"], r["type"], rdata.to_text()))
        assert exported == planned, stack


def test_served_names_and_ptr_are_noted(tmp_path: Path) -> None:
    settings = load_settings(raw_config("dev"), "dev")
    doc = plan_document(run_stack("dev"), tmp_path)
    text = zone_files(settings, doc["dns"], doc["outputs"]["hostIps"], from_plan=True)["example.org"]
    assert "; mta-sts.example.org: HTTPS, served by the Cloudflare Worker orgmail-dev" in text
    assert "; PTR of 192.0.2.10 -> mail.example.org. is set at AWS" in text
