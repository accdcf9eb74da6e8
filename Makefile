# ops-pipeline. Two commands on a fresh machine (Python 3.11+, Node 20+, make):
#   make demo   - install everything, start the embedded stack, release examples/node-api (run twice: v2 over v1)
#   make test   - the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE := $(or $(OPS_STATE_DIR),$(CURDIR)/.ops)
export DAGSTER_HOME ?= $(STATE)/dagster_home
export OPS_PROJECT_ROOT := $(CURDIR)
export DAGSTER_DISABLE_TELEMETRY := 1
ENVIRONMENT ?= local
PORT ?= 3000

.PHONY: setup demo release rollback backup drill ui test test-fast validate status down clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

tools/node_modules/.installed: tools/package-lock.json
	cd tools && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(DAGSTER_HOME)/dagster.yaml: config/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp config/dagster.yaml $@

setup: $(VENV)/.installed tools/node_modules/.installed $(DAGSTER_HOME)/dagster.yaml

## demo: release examples/node-api to the `local` environment on the embedded stack, through the dagster CLI.
demo: setup
	$(BIN)/python -m ops_pipeline.local_stack up
	$(BIN)/dagster job execute -m ops_pipeline.definitions -j release -c presets/local.yaml
	@echo
	@$(BIN)/python -m ops_pipeline.status local
	@echo
	@echo "Open the Dagster UI: make ui  (then http://127.0.0.1:$(PORT))"

release: setup
	$(BIN)/dagster job execute -m ops_pipeline.definitions -j release -c presets/$(ENVIRONMENT).yaml

rollback: setup
	$(BIN)/dagster job execute -m ops_pipeline.definitions -j rollback -c presets/rollback-$(ENVIRONMENT).yaml

backup: setup
	$(BIN)/dagster job execute -m ops_pipeline.definitions -j backup -c presets/backup-local.yaml

drill: setup
	$(BIN)/dagster job execute -m ops_pipeline.definitions -j restore_drill -c presets/backup-local.yaml

## ui: the Dagster UI + daemon (schedules, sensors, run queue) on the persistent local instance.
ui: setup
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

status: setup
	@$(BIN)/python -m ops_pipeline.status $(ENVIRONMENT)

validate: setup
	$(BIN)/dagster definitions validate -w workspace.yaml

## test: the whole suite (real PostgreSQL, Redis, PM2, S3 server, dagster daemon/webserver, browser, Podman).
test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not e2e and not browser and not containers and not faults"

down:
	-PM2_HOME=$(STATE)/envs/$(ENVIRONMENT)/pm2 tools/node_modules/.bin/pm2 kill >/dev/null 2>&1
	-$(BIN)/python -m ops_pipeline.local_stack down

clean: down
	rm -rf $(STATE)
