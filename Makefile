# bulk-tagger: the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: demo test lint bench chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(DEVSTAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(STAMP)

demo: $(STAMP)
	$(BIN)/bulk-tagger run jobs/demo.yaml --simulate --state-dir runs/demo

test: $(DEVSTAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(DEVSTAMP)
	$(BIN)/ruff check worker tests
	$(BIN)/mypy

bench: $(DEVSTAMP)
	$(BIN)/python -m tests.bench

chaos: $(DEVSTAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_chaos.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
