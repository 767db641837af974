# `make test` and `make demo` work on a fresh machine: they create .venv when it is missing (and reuse it),
# install torch first (CPU build by default; override TORCH_SPEC for another build), then the package.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.duo-installed

.PHONY: test demo lint install clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The main job: the paper's study on the built-in corpus, offline (about 15 minutes on 2 CPU cores).
# A re-run reuses the finished stages in $(STUDY_OUT).
STUDY_OUT ?= study
demo: $(STAMP)
	$(BIN)/duo-llm study --out $(STUDY_OUT) --preset default

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
