# Quickstart: `make plan` (offline plan of the dev stack) and `make test` (all tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STACK ?= dev

# The program's packages from the hash lock first (the versions a deploy installs, so the tests run on
# them and tests/tools/test_lockfiles.py can read their metadata), then the tools and tests on top.
$(VENV)/.installed: requirements.txt requirements.lock requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --require-hashes -r requirements.lock
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

.PHONY: plan test lint unit e2e policy bench
plan: $(VENV)/.installed
	$(PY) -m tools.plan Pulumi.$(STACK).yaml

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy

unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit

e2e: $(VENV)/.installed
	$(PY) -m pytest tests/e2e

# The policy pack pins older protobuf/grpc than the program: its own venv, its own tests.
policy: $(VENV)/.installed
	bash policy/run-tests.sh -q

# The booted tests and the other layers side by side (scripts/test-all.sh: the cluster's booted tests follow the other layers).
test: lint policy $(VENV)/.installed
	PY=$(PY) bash scripts/test-all.sh

# Benchmarks report figures (never pass/fail): see docs/benchmarks.md. Needs root, like e2e.
bench: $(VENV)/.installed
	$(PY) -m bench.run
