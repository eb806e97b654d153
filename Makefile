# `make serve` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.test-installed

.PHONY: serve test lint fetch browser bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(TEST_INSTALLED): pyproject.toml $(INSTALLED)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

fetch: $(INSTALLED)
	$(BIN)/max fetch

serve: fetch
	$(BIN)/max serve --host 127.0.0.1 --port 8000

lint: $(TEST_INSTALLED)
	$(BIN)/ruff check maxjax tests scripts
	$(BIN)/mypy maxjax

# Debian's chromium, for the chat page's browser test (tests/test_web_ui.py): Playwright drives this one and never
# downloads a browser of its own.
browser:
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

test: $(TEST_INSTALLED) fetch lint browser
	$(BIN)/python -m pytest -q --durations=25

bench: fetch
	$(BIN)/python scripts/bench_decode.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
