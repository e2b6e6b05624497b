# llmtrt — one venv (.venv), everything installed from PyPI plus the local CPU torch wheel.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out
PYTEST_ARGS ?=

.PHONY: install test demo bench lint fixture clean

install: $(STAMP)

# torch is pinned first so nothing pulls a CUDA build; the rest come from pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,rtx]"
	touch $(STAMP)

test: install
	$(BIN)/pytest -q $(PYTEST_ARGS)

demo: install
	$(BIN)/llmtrt pipeline run configs/pipelines/demo.yaml --out $(OUT)/demo

bench: install
	$(PY) -m benchmarks.run --quick

lint: install
	$(BIN)/ruff check llmtrt exporter plugins pipelines configs tests benchmarks tools

fixture: install
	$(PY) -m tools.train_fixture

clean:
	rm -rf $(OUT) .pytest_cache
