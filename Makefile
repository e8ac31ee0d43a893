# The two set-up commands (see README): `make demo` and `make test`.
# Installs come from the committed lock file (requirements.lock, hashes included);
# `make lock` refreshes it on purpose.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LOCK   := requirements.lock
# uv does not read pip's config: pass the find-links that holds the pinned CPU torch wheel.
UV_FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
# Ray workers import torch, ray and transformers afresh in every process; with
# PYTHONDONTWRITEBYTECODE set nothing would ever be cached, so compile at install.
UV_SYNC := $(BIN)/uv pip sync --python $(BIN)/python --require-hashes --compile-bytecode $(UV_FIND_LINKS) $(LOCK)
UV_SELF := $(BIN)/uv pip install --python $(BIN)/python --no-deps --compile-bytecode -e .
PIP_SYNC := $(BIN)/pip install -q --require-hashes -r $(LOCK) && $(BIN)/pip install -q --no-deps -e . \
  && $(BIN)/python -m compileall -q -j 0 $(VENV)/lib
DEMO_DIR ?= runs/demo

.PHONY: install lock lint format demo test test-slow clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q 'uv==0.13.9'
	( $(UV_SYNC) && $(UV_SELF) ) || ( $(PIP_SYNC) )
	touch $@

# Re-resolve every dependency to the newest release that pyproject.toml allows
# and write it, with hashes, to the lock file. Commit the result on purpose.
lock:
	test -x $(BIN)/uv || ( $(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q 'uv==0.13.9' )
	$(BIN)/uv pip compile pyproject.toml --extra test --generate-hashes --python-version 3.11 \
	  --no-emit-find-links --custom-compile-command 'make lock' $(UV_FIND_LINKS) -o $(LOCK)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m vlptune.demo --out $(DEMO_DIR)

# Lint, format and type checks first (seconds), then the suite: `make test` is what CI runs.
CHECKED := platform tests bench
lint: install
	$(BIN)/ruff check $(CHECKED)
	$(BIN)/ruff format --check $(CHECKED)
	$(BIN)/mypy

# Rewrite the files the way `make lint` wants them (import order, formatting, safe fixes).
format: install
	$(BIN)/ruff check --fix $(CHECKED)
	$(BIN)/ruff format $(CHECKED)

test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) runs data results
