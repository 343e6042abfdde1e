# Two entry points: `make run` and `make test`. Everything else is set-up they call.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= config/relay.toml
# Debian packages the tests and benchmarks talk to for real (never started as system services here).
SYSTEM_PACKAGES := redis-server prometheus postfix faketime

.PHONY: run test setup system-deps lint typecheck unit unit-future fuzz bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(STAMP)

# Installs the Debian packages when missing. Postfix comes with the "No configuration"
# preseed so the system instance is never set up or started: benches use smtp-sink and
# smtp-source, and the Postfix tests run private instances (tests/support/postfix.py).
# Dovecot (imapd + sieve) is only run by tests/test_dovecot.py from a private config; the
# system service is stopped and disabled after installing. Chromium only runs headless,
# from tests/test_lab_browser.py (the lab report in a real browser).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	[ -x /usr/sbin/smtp-sink ] || command -v smtp-sink >/dev/null || missing="$$missing postfix"; \
	command -v faketime >/dev/null || missing="$$missing faketime"; \
	[ -x /usr/sbin/dovecot ] || command -v dovecot >/dev/null || missing="$$missing dovecot-imapd"; \
	command -v sievec >/dev/null || missing="$$missing dovecot-sieve"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install:$$missing" >&2; exit 1; fi; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  for svc in redis-server prometheus postfix dovecot; do (service $$svc stop || true) >/dev/null 2>&1; done; \
	  (systemctl disable --now dovecot || true) >/dev/null 2>&1; \
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

# The suite again with the clock five years ahead (libfaketime, inherited by every child
# process): no test may depend on the day it runs. The first line checks that the clock
# really moved, or the run would prove nothing. Monotonic time stays real; why Python's
# time.sleep then needs tests/future_clock/sitecustomize.py is explained there.
unit-future: export FAKETIME_DONT_FAKE_MONOTONIC := 1
unit-future: setup system-deps
	faketime -f '+5y' $(BIN)/python -c 'import sys, time; sys.exit(time.time() < float(sys.argv[1]) + 4 * 365 * 86400)' "$$(date +%s)"
	PYTHONPATH="$(CURDIR)/tests/future_clock$${PYTHONPATH:+:$$PYTHONPATH}" faketime -f '+5y' $(BIN)/pytest

test: lint typecheck unit unit-future

# The property tests of tests/test_properties.py with a large budget (CI runs them small).
# A failure prints the input: add it to tests/fuzz/corpus.json so every run replays it.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest tests/test_properties.py -q

# The bench also runs Rspamd (Debian's 3.4) beside the relay from a private config, and
# py-spy for the CPU split by stage; both are installed here, not in system-deps, so CI
# (which runs system-deps) does not pay for them. A system rspamd service the package
# would start is stopped and disabled at once. If either cannot be installed the bench
# still runs and its results say what was skipped and why.
bench: setup system-deps
	@if ! command -v rspamd >/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then echo "rspamd missing and not root: the bench skips it" >&2; \
	  else \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -qq --no-install-recommends rspamd >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq --no-install-recommends rspamd >/dev/null; }; } \
	      || echo "could not install rspamd: the bench skips it" >&2; \
	    (service rspamd stop || true) >/dev/null 2>&1; \
	    (systemctl disable --now rspamd || true) >/dev/null 2>&1; \
	  fi; \
	fi
	@[ -x $(BIN)/py-spy ] || $(BIN)/python -m pip install --quiet py-spy \
	  || echo "could not install py-spy: CPU per stage is reported without the in-worker split" >&2
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache
