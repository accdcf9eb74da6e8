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
# `dg` (the Dagster CLI the 1.13 docs recommend) wants the project's venv activated.
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(BIN):$(PATH)
ENVIRONMENT_GIVEN := $(ENVIRONMENT)
ENVIRONMENT ?= local
PORT ?= 3000
# Jobs print a short account of their run; VERBOSE=1 puts the whole Dagster log on the terminal too
# (it is always kept in <state>/logs/, and the path is printed).
VERBOSE ?=
LAUNCH = $(BIN)/python -m ops_pipeline.platform.run_report launch $(if $(VERBOSE),--verbose)

SPEC ?= presets/$(ENVIRONMENT).yaml

.PHONY: setup nginx pgbackrest demo release plan rollback backup drill ui test test-fast validate init status down clean

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

# The PM2 target's front proxy (and the Docker target's) is Debian's nginx; as root it is installed when missing.
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx >/dev/null; \
	  else echo "nginx is needed (the front proxy of every environment): install it, e.g. sudo apt-get install nginx"; exit 1; fi; }

# pgBackRest (Debian's package) archives WAL and restores to a point in time (app.database.backups: archive).
pgbackrest:
	@command -v pgbackrest >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends pgbackrest >/dev/null; \
	  else echo "pgbackrest is needed for archive mode backups: install it, e.g. sudo apt-get install pgbackrest"; fi; }

setup: $(VENV)/.installed tools/node_modules/.installed $(DAGSTER_HOME)/dagster.yaml nginx pgbackrest

## demo: release examples/node-api to the `local` environment on the embedded stack, through `dg launch`.
demo: setup
	@$(BIN)/python -m ops_pipeline.platform.local_stack up
	@$(LAUNCH) release presets/local.yaml
	@echo
	@$(BIN)/python -m ops_pipeline.release.status local
	@echo
	@echo "Open the Dagster UI: make ui  (then http://127.0.0.1:$(PORT))"

## release: a release from a spec file (SPEC=path; default presets/$(ENVIRONMENT).yaml).
release: setup
	@$(LAUNCH) release $(SPEC)

## plan: what `make release` would do with the same SPEC, with no side effect (the `plan` job, a dry run).
plan: setup
	@$(LAUNCH) plan $(SPEC)

rollback: setup
	@$(LAUNCH) rollback presets/rollback-$(ENVIRONMENT).yaml

backup: setup
	@$(LAUNCH) backup presets/backup-local.yaml

drill: setup
	@$(LAUNCH) restore_drill presets/backup-local.yaml

## ui: the Dagster UI + daemon (schedules, sensors, run queue) on the persistent local instance.
ui: setup
	dg dev -h 127.0.0.1 -p $(PORT)

## status: what serves every environment of the state folder (or ENVIRONMENT=name only).
status: setup
	@$(BIN)/python -m ops_pipeline.release.status $(ENVIRONMENT_GIVEN)

## validate: the definitions load (dg check defs); with SPEC=path, that release spec is checked too (no side effect).
validate: setup
	dg check defs
	$(if $(filter command line environment,$(origin SPEC)),$(BIN)/python -m ops_pipeline.platform.spec $(SPEC))

## init: a commented starting spec for the Node app in APP=folder (written to OUT, default <app name>.yaml).
init: setup
	@$(BIN)/python -m ops_pipeline.release.init_spec $(APP) -o $(or $(OUT),$(notdir $(abspath $(APP))).yaml)

## test: the whole suite (real PostgreSQL, Redis, PM2, S3 server, dagster daemon/webserver, browser, Podman).
test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not e2e and not browser and not containers and not faults"

## down: stop every environment's PM2 daemon and nginx front proxy, then the embedded PostgreSQL/Redis.
down:
	-@$(BIN)/python -m ops_pipeline.release.status --down
	-@$(BIN)/python -m ops_pipeline.platform.local_stack down

clean: down
	rm -rf $(STATE)

## ui-user: a user of the compose stack's UI (NAME=alice ROLE=operator|viewer|delete); asks for the password.
.PHONY: ui-user
ui-user:
	@test -n "$(NAME)" -a -n "$(ROLE)" || { echo "usage: make ui-user NAME=alice ROLE=operator|viewer|delete"; exit 2; }
	@docker/proxy/ui-user.sh "$(NAME)" "$(ROLE)"
