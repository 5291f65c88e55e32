#!/bin/bash
# Offline tests of the CrossGuard policy pack, no Pulumi CLI needed:
#   1. policy/.venv (pulumi-policy and its older protobuf) is created from policy/requirements.txt if missing;
#   2. the example stacks' resources are exported as JSON with the PROGRAM's venv (.venv) on the mock engine;
#   3. pytest runs policy/tests in the policy venv on that JSON.
set -euo pipefail
cd "$(dirname "$0")"
PROGRAM_PY="${PROGRAM_PY:-../.venv/bin/python}"
if [ ! -x "$PROGRAM_PY" ]; then
  echo "policy/run-tests.sh: the program's venv ($PROGRAM_PY) is missing: run 'make lint' (or set PROGRAM_PY)" >&2
  exit 2
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  touch "$stamp"
fi
plans="$(mktemp -d)"
trap 'rm -rf "$plans"' EXIT
"$PROGRAM_PY" export_plans.py "$plans" >/dev/null
ORGMAIL_PLANS="$plans" .venv/bin/python -m pytest -p no:cacheprovider "$@"
