# Every routine action. `make run` and `make test` work from a fresh clone with only
# Python 3.11 and make on the machine: they create .venv and install into it first.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed-stamp
# Stage commands in dvc.yaml call `lmops`: keep the venv's scripts first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install run serve test lint format repro status clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 not found (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: install
	$(BIN)/lmops run --profile cpu-demo

serve: install
	$(BIN)/lmops serve

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

repro: install
	$(BIN)/dvc repro

status: install
	$(BIN)/dvc status

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
