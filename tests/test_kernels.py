"""The exactness tests again under other float32 kernels and thread counts, in fresh processes.

A fresh clone on an AVX-512 machine was red while CI elsewhere was green: MKL and ATen pick their float32
kernels (AVX2, AVX-512, AMX) and thread splits at start-up, and those round sums differently. Each case
below starts pytest anew with the kernels pinned by MKL_ENABLE_INSTRUCTIONS and ATEN_CPU_CAPABILITY and
torch's thread count set (conftest reads SHADOWMERGE_TEST_THREADS), and runs the graft, LoRA, DoRA,
pieces, similarity and several-update (sum, TIES, DARE's int32 hash) exactness tests there. The three cases
cover every value of each setting; `make test-kernels` runs all twelve combinations. MKL falls back to the
widest instructions the CPU has; ATen does not (ATEN_CPU_CAPABILITY=avx512 on a CPU without AVX-512, e.g. an AMD
EPYC with AVX2 only, dies of an illegal instruction), so an ATen capability above the CPU's is skipped, saying so.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXACTNESS = ["tests/test_graft.py::test_bit_exact_against_reference_expression",
             "tests/test_graft.py::test_small_chunks_give_the_same_bytes",
             "tests/test_graft.py::test_mixed_input_dtypes_are_exact",
             "tests/test_lora.py::test_lora_graft_equals_peft_merge",
             "tests/test_lora.py::test_base_dependent_adapters_need_base_and_graft_the_base_update",
             "tests/test_pieces.py::test_dora_and_full_copies_in_pieces_equal_peft",
             "tests/test_pieces.py::test_full_graft_of_huge_rows_is_bit_exact",
             "tests/test_similarity.py::test_sigma_is_exact_on_hand_made_tensors",
             "tests/test_similarity.py::test_chunks_do_not_change_the_sums",
             "tests/test_similarity.py::test_both_aggregations_match_independent_code",
             "tests/test_multi.py::test_sum_is_the_float32_formula_bit_for_bit",
             "tests/test_multi.py::test_combination_in_place_is_the_formula_bit_for_bit",
             "tests/test_multi.py::test_dare_draw_is_the_integer_hash_across_the_2_31_boundary",
             "tests/test_multi.py::test_select_is_exact_when_its_first_guess_misses_and_at_every_kind_of_tie",
             "tests/test_multi.py::test_small_pieces_give_the_same_bits"]
MKL, ATEN, THREADS = ("AVX2", "AVX512"), ("default", "avx2", "avx512"), (1, 2)
CASES = [("AVX2", "default", 1), ("AVX512", "avx2", 2), ("AVX512", "avx512", 1)]
if os.environ.get("SHADOWMERGE_KERNELS") == "all":
    CASES = list(itertools.product(MKL, ATEN, THREADS))


ATEN_ORDER = ("default", "avx2", "avx512")


def cpu_capability() -> str:
    """The widest ATen capability this CPU has (as torch finds it with no ATEN_CPU_CAPABILITY set)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    found = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip().lower()
    return found if found in ATEN_ORDER else "default"


@pytest.mark.parametrize("mkl, aten, threads", CASES, ids=[f"mkl-{m}-aten-{a}-threads{t}" for m, a, t in CASES])
def test_exactness_holds_on_other_kernels_and_thread_counts(mkl, aten, threads, tmp_path):
    has = cpu_capability()
    if ATEN_ORDER.index(aten) > ATEN_ORDER.index(has):
        pytest.skip(f"this CPU's widest ATen kernels are {has}: ATEN_CPU_CAPABILITY={aten} would run instructions "
                    f"it does not have")
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS=mkl, ATEN_CPU_CAPABILITY=aten, SHADOWMERGE_TEST_THREADS=str(threads))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu",
                          "--basetemp", str(tmp_path / "t"), *EXACTNESS], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout
