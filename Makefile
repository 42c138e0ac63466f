# Parley — `make run` starts everything; `make test` runs the whole suite. Both install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
export XDG_RUNTIME_DIR ?= /tmp/parley-runtime-$(shell id -u)

.PHONY: install run test lint bench migrate clean-var

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v redis-server >/dev/null || { echo "Installing redis-server (Debian package)…"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@# Browser tests drive Debian's Chromium through Playwright (no browser download).
	@command -v chromium >/dev/null || { echo "Installing chromium (Debian package) for the browser tests…"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# CPU torch first, pinned: a later resolver would otherwise pull the CUDA build (GBs).
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@mkdir -p -m 700 $(XDG_RUNTIME_DIR) var
	@rm -f $(VENV)/.installed-*; touch $@

run: install
	$(PY) -m config.devstack

test: install
	PARLEY_ENV=test $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PARLEY_ENV=test $(VENV)/bin/mypy

migrate: install
	$(PY) manage.py migrate_all

bench: install
	@command -v wrk >/dev/null || { echo "Installing wrk (Debian package) for the load benchmarks…"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk >/dev/null; } || true
	DATABASE_TEST_NAME=parley_bench REDIS_TEST_DB=10 PARLEY_ENV=test $(PY) -m pytest tests/perf -p no:randomly -s -o addopts="" --reuse-db

clean-var:
	rm -rf var
