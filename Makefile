# natflow: `make demo` and `make test` work on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
# Test processes (pytest-xdist): the suite is mostly waiting on servers and subprocesses.
JOBS   ?= 2
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv system-deps demo test lint typecheck unit screenshots bench bench-console clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the suite drives for real: Prometheus (metrics and alert tests) and Chromium
# (console tests in a real browser). Installed here, visibly, when missing; nothing else in the
# suite installs anything.
SYSTEM_DEPS := prometheus chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@missing=""; for p in $(SYSTEM_DEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "make system-deps: installing$$missing with apt-get"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check engine sdk tests examples
	$(BIN)/ruff format --check engine sdk tests examples

typecheck: $(STAMP)
	$(BIN)/mypy -p natflow -p natflow_engine

unit: $(STAMP)
	$(BIN)/pytest -q -n $(JOBS)

test: lint typecheck system-deps unit

# Refresh the console screenshots the README shows (docs/console-*.png) from a real Chromium.
# `make test` takes them too, into a temporary directory, so it leaves the checkout clean.
screenshots: $(STAMP) system-deps
	NATFLOW_SCREENSHOTS=1 $(BIN)/pytest -q tests/test_console.py -k test_screenshots_and_phone_layout

bench: $(STAMP)
	$(BIN)/natflow bench

# The console's runs page with 100,000 runs stored (add --browser to time Chromium too).
bench-console: $(STAMP)
	$(BIN)/python -m natflow_engine.console._bench

clean:
	rm -rf $(VENV) .natflow .mypy_cache .ruff_cache .pytest_cache
