"""The graft itself: bit-exact results, loadable output, Instruct side files, filters, dtypes, tying."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import shadowmerge
from conftest import DEVICES
from tinymodels import state

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def reference(i, b, t, alpha=1.0, out_dtype=None):
    return (i.float() + alpha * (t.float() - b.float())).to(out_dtype or i.dtype)


def assert_bit_exact(inst, base, tuned, out, alpha=1.0, out_dtype=None):
    I, B, T, O = (state(p) for p in (inst, base, tuned, out))
    assert set(O) == set(I)
    for name in I:
        want = reference(I[name], B[name], T[name], alpha, out_dtype)
        assert O[name].dtype == want.dtype, name
        assert torch.equal(O[name].view(torch.uint8) if O[name].dtype == torch.float8_e4m3fn else O[name], want), name


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("alpha", [1.0, 0.8])
@pytest.mark.parametrize("device", DEVICES)
def test_bit_exact_against_reference_expression(make_triple, tmp_path, dtype, alpha, device):
    inst, base, tuned = make_triple("llama", dtype)
    summary = shadowmerge.graft(inst, base, tuned, tmp_path / "out", alpha=alpha, device=device, progress=False)
    assert summary.counts["graft"] == len(state(inst))
    assert_bit_exact(inst, base, tuned, tmp_path / "out", alpha)
    # the result really moved away from the instruct where the update is non-zero
    O, I = state(tmp_path / "out"), state(inst)
    assert all(not torch.equal(O[n], I[n]) for n in I)


def test_sharded_inputs_and_outputs(make_triple, tmp_path, cli):
    inst, base, tuned = make_triple("llama", shard="60KB")
    assert (inst / "model.safetensors.index.json").exists()
    res = cli("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", tmp_path / "out",
              "--shard-size", "100KB", "--quiet")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state(out).values())
    for p in shards:
        with safe_open(p, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert_bit_exact(inst, base, tuned, out)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_output_loads_and_generates(make_triple, tmp_path, family):
    from transformers import AutoModelForCausalLM

    inst, base, tuned = make_triple(family)
    shadowmerge.graft(inst, base, tuned, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    # the loaded weights are the grafted ones, not a re-initialisation
    O = state(tmp_path / "out")
    for name, p in model.state_dict().items():
        if name in O:
            assert torch.equal(p, O[name].float()), name
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in O
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert torch.equal(model.lm_head.weight, O["lm_head.weight"].float())
    ids = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert ids.shape == (1, 8)


def test_side_files_come_from_the_instruct(make_triple, tmp_path):
    inst, base, tuned = make_triple("qwen2")
    shadowmerge.graft(inst, base, tuned, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        assert (out / name).read_bytes() == (inst / name).read_bytes(), name
        if name != "config.json":
            assert (out / name).read_bytes() != (base / name).read_bytes(), name
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (out / "chat_template.jinja").read_text() == "<instruct>"


def test_files_are_readable_by_others(make_triple, tmp_path):
    inst, base, tuned = make_triple("llama")
    old = os.umask(0o022)
    try:
        shadowmerge.graft(inst, base, tuned, tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name


def raw_bytes(folder, name):
    for p in folder.glob("*.safetensors"):
        with safe_open(p, "pt") as f:
            if name in f.keys():
                t = f.get_tensor(name)
                return t.reshape(-1).view(torch.uint8).numpy().tobytes()
    raise KeyError(name)


def test_include_exclude_copy_untouched_tensors_byte_for_byte(make_triple, tmp_path):
    inst, base, tuned = make_triple("llama")
    s = shadowmerge.graft(inst, base, tuned, tmp_path / "out", include=r"self_attn|mlp",
                          exclude=r"layers\.1\.mlp", progress=False)
    out = tmp_path / "out"
    I, B, T, O = (state(p) for p in (inst, base, tuned, out))
    grafted = [n for n in I if ("self_attn" in n or "mlp" in n) and "layers.1.mlp" not in n]
    assert s.counts["graft"] == len(grafted) and s.counts["copy"] == len(I) - len(grafted)
    for n in I:
        if n in grafted:
            assert torch.equal(O[n], reference(I[n], B[n], T[n])), n
        else:
            assert raw_bytes(out, n) == raw_bytes(inst, n), n
    record = json.loads((out / "shadowmerge.json").read_text())
    assert record["counts"]["graft"] == len(grafted) and record["include"] == r"self_attn|mlp"
    assert record["inputs"] == {"instruct": str(inst), "base": str(base), "tuned": str(tuned)}


def test_dtype_option_casts_once_and_updates_config(make_triple, tmp_path):
    inst, base, tuned = make_triple("llama", torch.bfloat16)
    shadowmerge.graft(inst, base, tuned, tmp_path / "out", dtype="float32", exclude="norm", progress=False)
    out = tmp_path / "out"
    I, B, T, O = (state(p) for p in (inst, base, tuned, out))
    for n in I:
        want = I[n].float() if "norm" in n else reference(I[n], B[n], T[n], out_dtype=torch.float32)
        assert O[n].dtype == torch.float32 and torch.equal(O[n], want), n
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_fp16_output_from_bf16_inputs_is_exact(make_triple, tmp_path):
    inst, base, tuned = make_triple("qwen3", torch.bfloat16)
    shadowmerge.graft(inst, base, tuned, tmp_path / "out", dtype="float16", alpha=1.5, progress=False)
    assert_bit_exact(inst, base, tuned, tmp_path / "out", 1.5, torch.float16)


def test_untied_instruct_with_tied_base_grafts_the_embedding_update_into_lm_head(make_triple, tmp_path):
    inst, _, _ = make_triple("qwen2", tie_word_embeddings=False)
    _, base, tuned = make_triple("qwen2", tie_word_embeddings=True)
    # same model_type/architectures; only the tying differs
    shadowmerge.graft(inst, base, tuned, tmp_path / "out", progress=False)
    I, B, T, O = (state(p) for p in (inst, base, tuned, tmp_path / "out"))
    assert "lm_head.weight" in I and "lm_head.weight" not in B
    emb = "model.embed_tokens.weight"
    assert torch.equal(O["lm_head.weight"], reference(I["lm_head.weight"], B[emb], T[emb]))


def test_tied_instruct_never_gets_an_lm_head(make_triple, tmp_path):
    inst, _, _ = make_triple("qwen2", tie_word_embeddings=True)
    _, base, tuned = make_triple("qwen2", tie_word_embeddings=False)
    s = shadowmerge.graft(inst, base, tuned, tmp_path / "out", progress=False)
    assert "lm_head.weight" not in state(tmp_path / "out")
    assert any("ties it to the input embedding" in w for w in s.warnings)


def test_vocab_policy_common_grafts_common_rows_and_keeps_the_rest(make_triple, tmp_path, cli):
    inst, _, _ = make_triple("llama", vocab_size=260)
    _, base, tuned = make_triple("llama", vocab_size=256)
    res = cli("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", tmp_path / "o1", "-q")
    assert res.exit_code == 1 and "vocabulary sizes differ" in res.output and "--vocab common" in res.output
    assert not (tmp_path / "o1").exists()
    s = shadowmerge.graft(inst, base, tuned, tmp_path / "out", vocab="common", progress=False)
    assert s.counts["partial"] == 2
    I, B, T, O = (state(p) for p in (inst, base, tuned, tmp_path / "out"))
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert O[n].shape == I[n].shape == (260, 64)
        assert torch.equal(O[n][:256], reference(I[n][:256], B[n], T[n]))
        assert torch.equal(O[n][256:], I[n][256:])


def test_pickle_weights_only_with_allow_pickle(make_triple, tmp_path, cli):
    inst, base, tuned = make_triple("llama")
    for folder in (base,):
        sd = state(folder)
        torch.save(sd, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    args = ["graft", "--instruct", inst, "--base", base, "--tuned", tuned, "-q"]
    res = cli(*args, "--out", tmp_path / "o1")
    assert res.exit_code == 1 and "--allow-pickle" in res.output and not (tmp_path / "o1").exists()
    res = cli(*args, "--out", tmp_path / "o2", "--allow-pickle")
    assert res.exit_code == 0, res.output
    assert_bit_exact(inst, state_folder(tmp_path, base), tuned, tmp_path / "o2")


def state_folder(tmp_path, pickled):
    """A safetensors copy of a pickled folder, for comparison helpers that read safetensors."""
    from safetensors.torch import save_file

    folder = tmp_path / "unpickled"
    folder.mkdir(exist_ok=True)
    save_file(torch.load(pickled / "pytorch_model.bin", weights_only=True), folder / "model.safetensors")
    return folder


def test_dry_run_reads_no_tensor_data_and_writes_nothing(make_triple, tmp_path, cli, monkeypatch):
    inst, base, tuned = make_triple("llama")

    def boom(*a, **k):
        raise AssertionError("tensor data was read during --dry-run")
    monkeypatch.setattr(os, "preadv", boom)
    monkeypatch.setattr(os, "copy_file_range", boom)
    res = cli("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", tmp_path / "out", "--dry-run",
              "--exclude", "norm")
    assert res.exit_code == 0, res.output
    assert "graft 16, partial 0, copy 5" in res.output
    assert "model.layers.0.self_attn.q_proj.weight" in res.output
    assert "(matched by --exclude)" in res.output
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [inst.parent.name]


@pytest.mark.parametrize("device", DEVICES)
def test_small_chunks_give_the_same_bytes(make_triple, tmp_path, monkeypatch, device):
    """Tensors stream in chunks of rows; chunk boundaries must not change a single bit."""
    from shadowmerge import engine

    inst, base, tuned = make_triple("llama", torch.float16)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)
    run = engine.run
    monkeypatch.setattr(engine, "run", lambda *a, **k: run(*a, **k, chunk_elements=100))
    shadowmerge.graft(inst, base, tuned, tmp_path / "out", alpha=0.3, vocab="common", device=device, progress=False)
    assert_bit_exact(inst, base, tuned, tmp_path / "out", 0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_input_dtypes_are_exact(tmp_path, device):
    """A bf16 Instruct/Base with an fp32 trainer checkpoint as Tuned (a common real combination)."""
    import tinymodels as tm

    inst = tm.save(tm.build("llama"), tmp_path / "i", torch.bfloat16)
    base = tm.save(tm.perturb(tm.build("llama"), 0.02, 1), tmp_path / "b", torch.float16)
    tuned = tm.save(tm.perturb(tm.perturb(tm.build("llama"), 0.02, 1), 0.01, 2), tmp_path / "t", torch.float32)
    s = shadowmerge.graft(inst, base, tuned, tmp_path / "out", alpha=0.5, progress=False, vocab="common", device=device)
    assert any("dtypes differ" in w for w in s.warnings)
    assert_bit_exact(inst, base, tuned, tmp_path / "out", 0.5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_timeline_accounts_for_every_byte_and_profile_prints_it(make_triple, tmp_path, cli, lora):
    """shadowmerge.json's timeline: every byte of the shards went through write or a kernel copy, and all of them
    through the hash, once; the grafted pieces were read, widened and computed; the output was fsynced. --profile
    prints the same stages."""
    from adapters import make_adapter

    inst, base, tuned = make_triple("llama", shard="60KB")
    delta = ["--lora", make_adapter(base, tmp_path / "adapter")] if lora else ["--base", base, "--tuned", tuned]
    res = cli("graft", "--instruct", inst, *delta, "--out", tmp_path / "out", "--shard-size", "50KB", "--profile",
              "--quiet")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    stages = rec["timeline"]["stages"]
    shards = sum((tmp_path / "out" / s).stat().st_size for s in rec["shards"])
    assert len(rec["shards"]) > 1
    written = stages["write"]["bytes"] + stages.get("copy", {}).get("bytes", 0)
    assert written == shards and stages["hash"]["bytes"] == shards
    assert stages["read"]["bytes"] > 0 and stages["arithmetic"]["bytes"] > 0 and "fsync" in stages
    assert all(v["seconds"] >= 0 for v in stages.values()) and rec["timeline"]["wall_seconds"] > 0
    assert "start-up" in stages                     # a command-line run: the imports before it
    printed = res.stdout[res.stdout.index("timeline (wall"):]
    for stage in ("read", "convert", "arithmetic", "cast", "write", "hash", "flush", "fsync"):
        assert f"\n  {stage} " in printed


# --- the engine's cheap checks are exact ---------------------------------------------------------------------
_EDGES = [0.0, -0.0, 1.0, -2.5, 1e-45, float("nan"), float("inf"), -float("inf"), 3.3895e38, 3.3961e38, 3.39e38,
          -3.3961e38, 3.4028e38, 65504.0, 65519.0, 65520.0, -65520.0, 1e38]


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.sampled_from(_EDGES) | st.floats(width=32), min_size=1, max_size=40),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_the_nonfinite_check_and_the_zero_test_equal_their_element_wise_definitions(values, dtype):
    """finite_after_cast answers exactly "has the cast output NaN/Inf?" (also where a finite float32 value rounds
    to Inf in the output dtype), and all_zero exactly "not delta.any()" (NaN is non-zero, -0.0 is zero)."""
    from shadowmerge.engine import all_zero, finite_after_cast

    x = torch.tensor(values, dtype=torch.float32)
    out = x.to(dtype)
    assert finite_after_cast(x, out) == bool(torch.isfinite(out).all())
    assert all_zero(x, torch.zeros(64)) == (not bool(x.any()))
    assert all_zero(x * 0, torch.zeros(64)) == (not bool((x * 0).any()))


@pytest.mark.parametrize("device", DEVICES)
def test_several_compute_threads_write_the_bytes_of_one(make_triple, tmp_path, monkeypatch, device):
    """Pieces computed by 3 threads that finish out of order (random delays) are written in plan order: the output
    is byte-identical to a one-thread run, for a full and a LoRA graft, in pieces of 100 elements (on a GPU each
    thread on a CUDA stream of its own)."""
    import random
    import threading

    from adapters import make_adapter
    from shadowmerge import engine

    inst, base, tuned = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter")
    run = engine.run
    monkeypatch.setattr(engine, "run", lambda *a, **k: run(*a, **k, chunk_elements=100))
    compute, seen, rng = engine._Worker.compute, set(), random.Random(0)

    def late(self, job, slot):
        seen.add(threading.current_thread().name)
        time.sleep(rng.random() / 1000)
        compute(self, job, slot)

    monkeypatch.setattr(engine._Worker, "compute", late)
    for label, workers in (("one", 1), ("three", 3)):
        monkeypatch.setattr(engine, "workers", lambda device, w=workers: (w, 1))
        shadowmerge.graft(inst, base, tuned, tmp_path / f"full-{label}", progress=False, device=device)
        shadowmerge.graft(inst, None, None, tmp_path / f"lora-{label}", lora=adapter, progress=False, device=device)
        assert len(seen) == workers, seen     # every thread computed pieces
        seen.clear()
    for kind in ("full", "lora"):
        one, three = tmp_path / f"{kind}-one", tmp_path / f"{kind}-three"
        names = sorted(p.name for p in one.glob("*.safetensors"))
        assert names and names == sorted(p.name for p in three.glob("*.safetensors"))
        for n in names:
            assert (one / n).read_bytes() == (three / n).read_bytes(), (kind, n)
    stages = json.loads((tmp_path / "full-one" / "shadowmerge.json").read_text())["timeline"]["stages"]
    assert ("cuda start" in stages) == (device == "cuda")      # CUDA started on its own thread, beside the plan


@settings(max_examples=60, deadline=None)
@given(shards=st.lists(st.lists(st.tuples(st.integers(0, 300), st.booleans(), st.booleans()), max_size=8),
                       min_size=1, max_size=6),
       lanes=st.integers(1, 4), lag=st.sampled_from([0, 50, 1 << 30]))
def test_the_hasher_gives_each_shard_the_sha256_of_its_file(tmp_path_factory, shards, lanes, lag):
    """However the bytes of each shard arrive (buffers handed back at once or waited for, ranges the kernel wrote),
    over any number of lanes and whatever a lane lags behind (so that some buffers are read back from the file),
    each digest is the sha256 of its file, and every buffer is handed back exactly once."""
    import hashlib

    from shadowmerge import writer
    from shadowmerge.timeline import Timeline

    folder, digests, released = tmp_path_factory.mktemp("h"), {}, []
    h = writer.Hasher(digests, Timeline(), scratch_bytes=7, lanes=lanes)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer, "LAG_BYTES", lag)
        _feed(h, folder, shards, released)
    assert digests == {f"s{i}": hashlib.sha256((folder / f"s{i}").read_bytes()).hexdigest() for i in range(len(shards))}
    handed = [(i, j) for i, c in enumerate(shards) for j, (_, kernel, keep) in enumerate(c) if not kernel and not keep]
    assert sorted(released) == handed


def _feed(h, folder, shards, released):
    for i, chunks in enumerate(shards):
        fd = os.open(folder / f"s{i}", os.O_RDWR | os.O_CREAT | os.O_EXCL)
        h.begin(os.dup(fd))
        for j, (n, kernel, keep) in enumerate(chunks):
            data = bytes((i * 31 + j * 7 + k) % 251 for k in range(n))
            os.write(fd, data)
            if kernel:
                h.back(n)
            else:
                h.data(memoryview(data), None if keep else lambda j=j, i=i: released.append((i, j)))
        os.close(fd)
        h.end(f"s{i}")
    h.close()


def test_shards_hashed_on_several_lanes_give_the_manifest_of_one(make_triple, tmp_path, monkeypatch):
    """With three hashing lanes that lag (a slow sha256, no lag allowed, a shard per tensor), the writer goes on to
    the next shards, and the lagging ones are hashed from the page cache: the files and the manifest are those of a
    one-lane run, and verify recomputes every digest."""
    import hashlib
    import threading

    from shadowmerge import writer
    from shadowmerge.verify import verify

    inst, base, tuned = make_triple("llama")
    real, lanes_seen = hashlib.sha256, set()

    class Slow:
        def __init__(self):
            self.h = real()

        def update(self, data):
            if threading.current_thread().name == "shadowmerge-hasher":
                lanes_seen.add(threading.get_ident())
                time.sleep(0.002)
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(writer.hashlib, "sha256", Slow)
    monkeypatch.setattr(writer, "LAG_BYTES", 0)
    records = {}
    for lanes in (1, 3):
        monkeypatch.setattr(writer, "hash_lanes", lambda n=lanes: n)
        out = tmp_path / f"lanes-{lanes}"
        shadowmerge.graft(inst, base, tuned, out, shard_size="20KB", progress=False)
        assert len(lanes_seen) == lanes, lanes_seen
        lanes_seen.clear()
        records[lanes] = json.loads((out / "shadowmerge.json").read_text())["manifest"]
        verify(out, progress=False)        # raises on a digest that is not the file's
    assert len(records[1]) > 4 and records[1] == records[3]
    for name, entry in records[3].items():
        assert entry["sha256"] == real((tmp_path / "lanes-3" / name).read_bytes()).hexdigest(), name


def test_a_command_line_graft_prints_everything_and_exits_with_its_status(make_triple, tmp_path):
    """The console script ends a successful graft/verify with os._exit (no interpreter teardown): all it printed
    still arrives, the output verifies, and an error still exits 1 with its one line."""
    import subprocess
    import sys
    from pathlib import Path

    assert '\nshadowmerge = "shadowmerge.cli:entry"\n' in (Path(__file__).parents[1] / "pyproject.toml").read_text()
    inst, base, tuned = make_triple("llama")
    cmd = [sys.executable, "-m", "shadowmerge"]
    out = tmp_path / "out"
    res = subprocess.run([*cmd, "graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", out,
                          "--profile", "-q"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"wrote {out}") and res.stdout.rstrip().endswith(" %") and "\n  fsync " in res.stdout
    res = subprocess.run([*cmd, "verify", out], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    res = subprocess.run([*cmd, "verify", tmp_path / "missing"], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1


def test_a_role_check_refusal_stops_the_graft_beside_it(make_triple, tmp_path, monkeypatch):
    """The role check runs beside the engine; its refusal stops the engine within a piece (instead of after the
    whole graft), is the error raised, and leaves nothing but the inputs."""
    from shadowmerge import engine, roles

    inst, base, tuned = make_triple("llama")
    run = engine.run
    monkeypatch.setattr(engine, "run", lambda *a, **k: run(*a, **k, chunk_elements=100))
    compute, pieces = engine._Worker.compute, []

    def slow(self, job, slot):
        pieces.append(job)
        time.sleep(0.01)                     # thousands of pieces: a whole graft would take a minute
        compute(self, job, slot)

    def refuse(*a, **k):
        time.sleep(0.2)
        raise shadowmerge.ShadowMergeError("--base and --tuned look exchanged: test")

    monkeypatch.setattr(engine._Worker, "compute", slow)
    monkeypatch.setattr(roles, "check", refuse)
    with pytest.raises(shadowmerge.ShadowMergeError, match="look exchanged"):
        shadowmerge.graft(inst, base, tuned, tmp_path / "out", progress=False)
    from shadowmerge.chunks import ranges

    total = sum(len(list(ranges(0, t.numel(), t.numel() // t.shape[0], 100)))          # pieces of a whole graft
                for t in state(inst).values() if t.dim())
    assert 0 < len(pieces) < total / 10, (len(pieces), total)
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_a_closed_hasher_refuses_more_work_instead_of_starting_again(tmp_path):
    """After the writer's abort() or finish() the hasher thread is gone: anything handed to it later (a thread of an
    aborted run that has not stopped yet) raises at once, neither waiting for a hash nor starting a new thread."""
    import threading

    from shadowmerge.timeline import Timeline
    from shadowmerge.writer import Hasher

    digests: dict = {}
    h = Hasher(digests, Timeline())
    h.begin(os.open(tmp_path, os.O_RDONLY))
    h.data(memoryview(b"abc"))
    h.end("x")
    h.close()
    assert digests == {"x": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}   # sha256("abc")
    before = threading.active_count()
    fd = os.open(tmp_path, os.O_RDONLY)
    for late in (lambda: h.data(memoryview(b"d")), lambda: h.data(memoryview(b"d"), release=lambda: None),
                 lambda: h.back(1), lambda: h.begin(fd)):
        with pytest.raises(RuntimeError, match="closed"):
            late()
    assert threading.active_count() == before
    with pytest.raises(OSError):        # begin() closed the descriptor it was given
        os.fstat(fd)
