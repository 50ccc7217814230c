# posflow: the two commands of the README, and their parts.
#   make demo   set everything up, start the local stack and the whole pipeline with a fleet
#   make test   set everything up, start the stack, lint, type-check and run the whole suite

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install test-tools bench-tools stack-up stack-down lint typecheck unit integration clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "posflow: error: Python 3.11+ is needed as '$(PYTHON)' -- fix: install python3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || apt-get install -y -q python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

# What only the tests use, from Debian: docker-compose parses docker-compose.yml (no engine
# needed), Chromium loads the dashboards as a browser does.
test-tools:
	@command -v docker-compose >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 || { \
	  apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    docker-compose chromium >/dev/null; }

# What only the benchmarks compare against: Quix Streams (bench_stream_floor.py), in its own
# environment because it pins pydantic below what posflow runs on.
BENCH_VENV ?= .venv-bench
bench-tools:
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q -r benchmarks/requirements-quix.txt

stack-up: install
	$(BIN)/posflow stack up

stack-down: install
	$(BIN)/posflow stack down

demo: stack-up
	$(BIN)/posflow stack check
	$(BIN)/posflow demo $(DEMO_ARGS)
	@echo "Stop the stack with: $(BIN)/posflow stack down"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy
	$(BIN)/mypy tests benchmarks

unit: install
	$(BIN)/pytest tests/unit

integration: stack-up
	$(BIN)/pytest tests/integration

test: stack-up test-tools lint typecheck
	$(BIN)/pytest

clean: stack-down
	rm -rf .stack $(VENV) $(BENCH_VENV)
