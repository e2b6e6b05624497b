# llmtrt — one venv (.venv), everything installed from PyPI plus the local CPU torch wheel.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out
PYTEST_ARGS ?=

.PHONY: install test demo bench bench-venv bench-smoke lint fixture clean

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

# The issue-15 goal table (156M decode side by side with the onnxruntime-genai builder, int4 preparation,
# 1.1B-shaped int4-awq quantize), ~20 min on 2 cores; `python -m benchmarks.goals --full` adds 8B-shaped rows.
bench: install bench-venv
	$(PY) -m benchmarks.goals --json $(OUT)/bench.json

bench-smoke: install
	$(PY) -m benchmarks.run --quick

# The peer: onnxruntime-genai's model builder and runtime in their own venv (torch CPU pinned first).
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet "torch==2.13.0"
	$(BENCH_VENV)/bin/python -m pip install --quiet "onnxruntime-genai==0.18.*" transformers onnx onnx-ir onnxruntime numpy sentencepiece
	touch $@

bench-venv: $(BENCH_VENV)/.installed

lint: install
	$(BIN)/ruff check llmtrt exporter plugins pipelines configs tests benchmarks tools

fixture: install
	$(PY) -m tools.train_fixture

clean:
	rm -rf $(OUT) .pytest_cache
