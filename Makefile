# The two set-up commands (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# uv does not read pip's config: pass the find-links that holds the pinned CPU torch wheel.
UV_FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-slow clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(BIN)/uv pip install --python $(BIN)/python $(UV_FIND_LINKS) -e '.[test]' \
	  || $(BIN)/pip install -e '.[test]'
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m vlptune.demo --out $(DEMO_DIR)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) runs data results
