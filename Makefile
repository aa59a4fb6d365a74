# bulk-tagger: the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

# The locks (exact versions, every file's hash): requirements-build.lock (pip, setuptools),
# requirements.lock (what the worker needs: the Docker image installs it), requirements-dev.lock
# (that plus the tests' and linters'). They fit every Python from 3.11 and every platform (the
# image's Python is 3.12). `make lock` brings them in line with pyproject.toml's ranges, keeping
# the pins that still fit; `make lock UPGRADE=1` takes the newest versions the ranges allow.
UV_VERSION := 0.13.8
LOCK := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	$(if $(UPGRADE),--upgrade) --custom-compile-command "make lock"

.PHONY: demo test lint bench chaos clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip and setuptools first (the editable install builds with them), then the dependencies, then
# the project itself (its dependencies are all there: --no-deps).
$(STAMP): pyproject.toml requirements-build.lock requirements.lock | $(BIN)/python
	$(BIN)/pip install -q --require-hashes -r requirements-build.lock
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(DEVSTAMP): pyproject.toml requirements-build.lock requirements-dev.lock | $(BIN)/python
	$(BIN)/pip install -q --require-hashes -r requirements-build.lock
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@ $(STAMP)

lock: | $(BIN)/python
	$(BIN)/pip install -q "uv==$(UV_VERSION)"
	$(BIN)/python -c 'import tomllib; print("pip", *tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		| $(LOCK) - -o requirements-build.lock
	$(LOCK) pyproject.toml -c requirements-build.lock -o requirements.lock
	$(LOCK) pyproject.toml --extra dev -c requirements-build.lock -c requirements.lock \
		-o requirements-dev.lock

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
