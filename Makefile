# Muster's developer entry points. `make run` and `make test` work on a fresh Debian 12
# machine: `run` installs what it needs and runs the whole system in one process
# (`muster up --embedded`); `test` installs the real test services, starts them, runs the
# suite, stops them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SERVICES := $(BIN)/python -m tests.services

.PHONY: run run-deps deps system-deps services-deps venv test lint services services-stop clean

## Everything in one process, no server: nodes announce, get plans, back up, test restores;
## a lost file comes back. UP_ARGS="--keep-running" keeps the fleet up until Ctrl-C.
run: run-deps venv
	$(BIN)/muster up --embedded $(UP_ARGS)

# What `run` needs: no RabbitMQ, no Swift; the embedded MongoDB-protocol server, and the
# standard tools the demo restores with when Muster is not there.
run-deps:
	@tests/services/install-system.sh python3-venv zstd age tar
	@tests/services/install-venvs.sh secantus

deps: system-deps services-deps $(VENV)/.installed

# An editable install maps the packages that exist when it runs: a new one reinstalls.
$(VENV)/.installed: setup.cfg pyproject.toml $(wildcard */__init__.py)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

## Just Muster, for the command line: no test servers.
venv: $(VENV)/.installed

system-deps:
	@tests/services/install-system.sh

services-deps:
	@tests/services/install-venvs.sh

## Start RabbitMQ, the MongoDB-protocol server and Swift on 127.0.0.1; prints `export` lines.
services: deps
	@$(SERVICES) start

services-stop:
	@$(SERVICES) stop

## The whole suite against real services, which are stopped again even on failure.
test: deps
	$(SERVICES) run -- $(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean: services-stop
	rm -rf $(VENV) .services
