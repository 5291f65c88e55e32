#!/bin/bash
# `make test`'s pytest step, in two lines of work side by side, each pytest process with its own temporary
# directory:
# - the single host's booted tests (tests/e2e without the cluster's);
# - every other layer (unit, tools, validate, verify), then the ISP cluster's booted tests
#   (tests/e2e/test_cluster*.py), which thereby boot their guests once the other layers no longer need
#   the CPU.
# On 2 cores the whole run takes about as long as the single host's booted tests alone, which spend most
# of their time waiting on their guests. The second line's output follows the first's; any pytest process
# failing (or collecting no test: pytest exit 5) fails the run.
set -u
PY=${PY:-.venv/bin/python}
CLUSTER=(tests/e2e/test_cluster_net.py tests/e2e/test_cluster.py)
mkdir -p build
(
  "$PY" -m pytest --basetemp=build/pytest-layers tests/unit tests/tools tests/validate tests/verify "$@"
  layers=$?
  "$PY" -m pytest --basetemp=build/pytest-cluster --durations=20 "${CLUSTER[@]}" "$@"
  cluster=$?
  echo "=== other layers: exit $layers; cluster's booted tests: exit $cluster ==="
  [ "$layers" -eq 0 ] && [ "$cluster" -eq 0 ]
) > build/test-layers.log 2>&1 &
second=$!
"$PY" -m pytest --basetemp=build/pytest-e2e --durations=40 tests/e2e "${CLUSTER[@]/#/--ignore=}" "$@"
e2e=$?
wait "$second"
rest=$?
echo "=== unit, tools, validate, verify and the cluster's booted tests (build/test-layers.log) ==="
cat build/test-layers.log
echo "=== single host's booted tests: exit $e2e; the rest: exit $rest ==="
[ "$e2e" -eq 0 ] && [ "$rest" -eq 0 ]
