"""Export every example stack's registered resources as JSON, for the policy tests.

Runs with the PROGRAM's venv (it runs the program on the mock engine); the policy tests read the
JSON in the policy venv. Secrets are masked. Usage: python policy/export_plans.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.mockengine import run_program  # noqa: E402
from tools.plan import whole_numbers  # noqa: E402
from tools.stackfile import load_stack_config, stack_name  # noqa: E402


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stack_file in sorted(ROOT.glob("Pulumi.*.yaml")):
        stack = stack_name(stack_file)
        run = run_program(load_stack_config(stack_file), stack)
        resources = [{"type": r.type, "name": r.name, "urn": r.urn, "parent": r.parent, "protect": r.protect,
                      "dependencies": r.dependencies, "propertyDependencies": r.property_dependencies,
                      "props": whole_numbers(r.masked_inputs)}
                     for r in sorted(run.resources, key=lambda r: r.urn)]
        (out_dir / f"{stack}.json").write_text(json.dumps({"stack": stack, "resources": resources}, indent=1))
        print(f"{stack}: {len(resources)} resources -> {out_dir / (stack + '.json')}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
