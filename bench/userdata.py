"""(3) Rendered user-data size per example stack and host, raw and gzip, against EC2's 16 KB."""

from __future__ import annotations

import base64
from typing import Any

from bench.common import ROOT, log
from tools.mockengine import run_program
from tools.plan import user_data_text
from tools.stackfile import load_stack_config

EC2_LIMIT = 16384


def measure() -> dict[str, Any]:
    hosts: dict[str, Any] = {}
    for stack_file in sorted(ROOT.glob("Pulumi.*.yaml")):
        stack = stack_file.name[len("Pulumi."):-len(".yaml")]
        log(f"userdata: {stack}")
        run = run_program(load_stack_config(stack_file), stack)
        for inst in run.of_type("aws:ec2/instance:Instance"):
            raw = len(user_data_text(inst.inputs).encode())
            gz = len(base64.b64decode(inst.inputs["userDataBase64"]))
            hosts[f"{stack}/{inst.name}"] = {
                "raw_bytes": raw, "gzip_bytes": gz, "base64_bytes": len(inst.inputs["userDataBase64"]),
                "gzip_share_of_limit": round(gz / EC2_LIMIT, 3), "raw_fits": raw <= EC2_LIMIT,
                "met": gz <= EC2_LIMIT,
            }
    return {"limit_bytes": EC2_LIMIT, "hosts": hosts}
