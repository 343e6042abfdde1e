# Two entry points: `make run` and `make test`. Everything else is set-up they call.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= config/relay.toml
# Debian packages the tests and benchmarks talk to for real (never started as system services here).
SYSTEM_PACKAGES := redis-server prometheus postfix

.PHONY: run test setup system-deps lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(STAMP)

# Installs the Debian packages when missing. Postfix comes with the "No configuration"
# preseed so its master is never set up or started; we only use smtp-sink/smtp-source.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	[ -x /usr/sbin/smtp-sink ] || command -v smtp-sink >/dev/null || missing="$$missing postfix"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install:$$missing" >&2; exit 1; fi; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  for svc in redis-server prometheus postfix; do (service $$svc stop || true) >/dev/null 2>&1; done; \
	fi

run: setup
	$(BIN)/relay serve --config $(CONFIG)

lint: setup
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)

typecheck: setup
	$(BIN)/mypy

unit: setup system-deps
	$(BIN)/pytest

test: lint typecheck unit

bench: setup system-deps
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache
