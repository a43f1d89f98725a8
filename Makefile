# dicom-gateway: setup, run, test and benchmark on a Debian machine.
#
#   make run    set everything up and run the node on the embedded default
#               (SQLite index + ./var/objects, AE GATEWAY on port 11112)
#   make test   set everything up and run lint, type checks and the test suite
#   make bench  set everything up and run the benchmark against Orthanc and DCMTK
#
# System packages are installed with apt-get when missing (needs root).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dcmtk gives admins echoscu/storescu; the rest are the tests' real peers.
APT_PACKAGES := dcmtk
TEST_APT_PACKAGES := orthanc chromium chromium-driver
CONFIG ?= config/gateway.toml

.PHONY: setup test-setup system-deps test-system-deps python-deps run test lint typecheck \
	pytest postgres nats bench clean

setup: system-deps python-deps

test-setup: setup test-system-deps

test-system-deps:
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES="$(TEST_APT_PACKAGES)"

system-deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "As root, install:$$missing"; exit 1; fi; \
	  echo "Installing system packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends $$missing \
	    || { apt-get update && apt-get install -y --no-install-recommends $$missing; }; \
	fi

python-deps: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/dicom-gateway run --config $(CONFIG)

# PostgreSQL is used by the tests when it is installed: start it if it is stopped.
postgres:
	@if [ -d /etc/postgresql ] && command -v pg_ctlcluster >/dev/null; then \
	  if ! pg_isready -q -h 127.0.0.1 -p 5432; then \
	    pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | sort -V | tail -1) main start \
	      || echo "could not start PostgreSQL"; \
	  fi; \
	fi

# The NATS sink's tests publish to the machine's JetStream server on 127.0.0.1:4222
# when nats-server is installed: start it if it is stopped.
nats:
	@if command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ]; then \
	  if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then \
	    mkdir -p /var/lib/nats-server; \
	    start-stop-daemon --start --oknodo --background \
	      --exec $$(command -v nats-server || echo /usr/sbin/nats-server) -- \
	      -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server \
	      || echo "could not start nats-server"; \
	  fi; \
	fi

lint: python-deps
	$(BIN)/ruff check gateway tests bench

typecheck: python-deps
	$(BIN)/mypy

pytest: test-setup postgres nats
	$(BIN)/pytest -n 2 --durations=25 --cov --cov-report=term

test: test-setup postgres nats lint typecheck pytest

# The index-scaling runs use the machine's PostgreSQL as the tests do: start it if stopped.
bench: test-setup postgres
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .coverage
