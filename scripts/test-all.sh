#!/bin/bash
# `make test`'s pytest step: the booted tests (tests/e2e) and every other layer run side by side, each in
# its own pytest process and temporary directory. On 2 cores the whole run takes about as long as the
# booted tests alone, which spend most of their time waiting on their guests. The other layers' output
# follows the booted tests' output; either failing (or collecting no test: pytest exit 5) fails the run.
set -u
PY=${PY:-.venv/bin/python}
mkdir -p build
"$PY" -m pytest --basetemp=build/pytest-layers tests/unit tests/tools tests/validate tests/verify "$@" \
  > build/test-layers.log 2>&1 &
layers=$!
"$PY" -m pytest --basetemp=build/pytest-e2e --durations=40 tests/e2e "$@"
e2e=$?
wait "$layers"
rest=$?
echo "=== unit, tools, validate and verify (build/test-layers.log) ==="
cat build/test-layers.log
echo "=== booted tests: exit $e2e; other layers: exit $rest ==="
[ "$e2e" -eq 0 ] && [ "$rest" -eq 0 ]
