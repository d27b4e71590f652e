"""Bad input: a one-line error naming what is wrong and what to do, exit 1, no output, inputs untouched."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import one_line_error, run_bad, tree_digest


@pytest.fixture
def triple(make_triple):
    return make_triple("llama")


def args(i, b, t):
    return ["--instruct", i, "--base", b, "--tuned", t]


def test_missing_folder(cli, tmp_path, triple):
    i, b, t = triple
    err = run_bad(cli, tmp_path, triple, *args(i, b, tmp_path / "nope"), expect="model folder not found")
    assert "nope" in err


def test_folder_without_weights(cli, tmp_path, triple):
    i, b, t = triple
    (t / "model.safetensors").unlink()
    run_bad(cli, tmp_path, triple, *args(i, b, t), expect="no weights found")


def test_pickle_only_without_flag(cli, tmp_path, triple):
    i, b, t = triple
    torch.save(load_file(t / "model.safetensors"), t / "pytorch_model.bin")
    (t / "model.safetensors").unlink()
    run_bad(cli, tmp_path, triple, *args(i, b, t), expect="pass --allow-pickle")


def test_index_names_a_missing_shard(cli, tmp_path, make_triple):
    i, b, t = make_triple("llama", shard="60KB")
    sorted(t.glob("model-*.safetensors"))[-1].unlink()
    run_bad(cli, tmp_path, (i, b, t), *args(i, b, t), expect="which is missing")


def test_truncated_file(cli, tmp_path, triple):
    i, b, t = triple
    data = (t / "model.safetensors").read_bytes()
    (t / "model.safetensors").write_bytes(data[:-100])
    run_bad(cli, tmp_path, triple, *args(i, b, t), expect="truncated")


def test_corrupt_header(cli, tmp_path, triple):
    i, b, t = triple
    data = bytearray((b / "model.safetensors").read_bytes())
    data[8:20] = b"\xff" * 12
    (b / "model.safetensors").write_bytes(bytes(data))
    err = run_bad(cli, tmp_path, triple, *args(i, b, t), expect="corrupt safetensors header")
    assert "base" in err


def resave(folder, edit):
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_names_differ(cli, tmp_path, triple):
    i, b, t = triple
    resave(t, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    resave(b, lambda sd: sd.update({"model.extra.weight": torch.zeros(3)}))
    err = run_bad(cli, tmp_path, triple, *args(i, b, t), expect="tensor names differ")
    assert "model.layers.1.mlp.up_proj.weight" in err and "model.extra.weight" in err and "--exclude" in err


def test_shape_differs(cli, tmp_path, triple):
    i, b, t = triple
    resave(t, lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 32, dtype=torch.bfloat16)}))
    run_bad(cli, tmp_path, triple, *args(i, b, t), expect="shape differs for model.layers.0.mlp.up_proj.weight")


def test_architectures_differ(cli, tmp_path, triple):
    i, b, t = triple
    cfg = json.loads((b / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (b / "config.json").write_text(json.dumps(cfg))
    err = run_bad(cli, tmp_path, triple, *args(i, b, t), expect="architectures differ")
    assert "LlamaForCausalLM" in err and "MistralForCausalLM" in err


def test_vocab_rows_differ(cli, tmp_path, make_triple):
    i, _, _ = make_triple("llama", vocab_size=300)
    _, b, t = make_triple("llama")
    run_bad(cli, tmp_path, (i, b, t), *args(i, b, t), expect="--vocab common")


def test_nonfinite_result(cli, tmp_path, triple):
    i, b, t = triple
    def poison(sd):
        sd["model.layers.0.self_attn.q_proj.weight"][3, 4] = float("nan")
    resave(t, poison)
    run_bad(cli, tmp_path, triple, *args(i, b, t), expect="NaN/Inf")
    res = cli("graft", *args(i, b, t), "--out", tmp_path / "ok", "-q", "--allow-nonfinite")
    assert res.exit_code == 0 and "NaN/Inf" in res.output
    assert torch.isnan(load_file(tmp_path / "ok" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]).any()


def test_fp16_overflow_is_caught(cli, tmp_path, make_triple):
    i, b, t = make_triple("llama", torch.float32)
    resave(t, lambda sd: sd["model.norm.weight"].fill_(1e6))
    run_bad(cli, tmp_path, (i, b, t), *args(i, b, t), "--dtype", "float16", expect="model.norm.weight")


def test_target_exists_then_force(cli, tmp_path, triple):
    """--force replaces only an output shadowmerge wrote (it has a record): a user's own folder is refused."""
    i, b, t = triple
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    run_bad(cli, tmp_path, triple, *args(i, b, t), expect="already exists")
    assert (tmp_path / "out" / "old.txt").exists()
    res = cli("graft", *args(i, b, t), "--out", tmp_path / "out", "-q", "--force")
    assert res.exit_code == 1 and "Traceback" not in res.output
    one_line_error(res.stderr, "was not written by shadowmerge (it has no shadowmerge record); --force replaces only")
    assert (tmp_path / "out" / "old.txt").read_text() == "x" and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old.txt"]
    (tmp_path / "out" / "old.txt").unlink()
    assert cli("graft", *args(i, b, t), "--out", tmp_path / "out", "-q", "--force").exit_code == 0   # empty: nothing lost
    res = cli("graft", *args(i, b, t), "--out", tmp_path / "out", "-q", "--force", "--alpha", "0.5")   # ours
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "shadowmerge.json").read_text())["alpha"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([i.parent.name, "out"])


@pytest.mark.parametrize("what", ["a user's folder", "a foreign record", "a damaged record", "a file", "a link"])
def test_force_never_replaces_what_shadowmerge_did_not_write(cli, tmp_path, triple, what):
    i, b, t = triple
    out = tmp_path / "mywork"
    if what == "a file":
        out.write_text("notes")
    elif what == "a link":
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("precious")
        if what == "a foreign record":
            (out / "shadowmerge.json").write_text(json.dumps({"tool": "mergekit"}))
        elif what == "a damaged record":
            (out / "run.json").write_bytes(b"\xff{")
    before = tree_digest(tmp_path)
    res = cli("graft", *args(i, b, t), "--out", out, "-q", "--force")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    err = one_line_error(res.stderr, "--force replaces only")
    assert str(out) in err
    assert tree_digest(tmp_path) == before, "the user's folder or an input changed"


def test_target_inside_an_input(cli, tmp_path, triple):
    i, b, t = triple
    before = tree_digest(*triple)
    res = cli("graft", *args(i, b, t), "--out", i / "merged", "-q")
    assert res.exit_code == 1 and "inside the input" in res.output
    assert tree_digest(*triple) == before
    res = cli("graft", *args(i, b, t), "--out", i.parent, "-q", "--force")
    assert res.exit_code == 1 and "contains the input" in res.output
    assert tree_digest(*triple) == before


def test_not_enough_disk_space_is_checked_first(cli, tmp_path, triple, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    run_bad(cli, tmp_path, triple, *args(*triple), expect="not enough disk space")


def test_disk_full_while_writing(cli, tmp_path, triple, monkeypatch):
    from shadowmerge import writer

    real = os.write
    written = [0]

    def write(fd, data):
        written[0] += 1
        if written[0] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(writer.os, "write", write)
    monkeypatch.setattr(writer.os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    run_bad(cli, tmp_path, triple, *args(*triple), expect="disk full while writing")


@pytest.mark.parametrize("lanes", [1, 3])
@pytest.mark.parametrize("where", ["written", "copied"])
def test_a_failure_while_hashing_ends_the_run_cleanly(cli, tmp_path, triple, monkeypatch, where, lanes):
    """The manifest's sha256 runs on threads of its own behind the writer (one lane, or several hashing shards at
    once, a lagging one from the page cache); an I/O error there (hashing a piece the writer wrote, or reading back
    one the kernel copied or a lagging lane let go) still ends the graft with one line, exit 1 and nothing left,
    instead of a hang or a manifest that does not match the files."""
    from shadowmerge import writer

    monkeypatch.setattr(writer, "hash_lanes", lambda: lanes)
    monkeypatch.setattr(writer, "LAG_BYTES", 0 if lanes > 1 else writer.LAG_BYTES)

    if where == "written":
        real, calls = writer.hashlib.sha256, [0]

        class Failing:
            def __init__(self):
                self.h = real()

            def update(self, data):
                hasher = threading.current_thread().name == "shadowmerge-hasher"
                calls[0] += hasher
                if hasher and calls[0] > 5:
                    raise OSError(errno.EIO, "Input/output error")
                self.h.update(data)

            def hexdigest(self):
                return self.h.hexdigest()
        monkeypatch.setattr(writer.hashlib, "sha256", Failing)
        extra = []
    else:       # read back short: every tensor outside --include is a kernel copy
        preadv = os.preadv
        monkeypatch.setattr(writer.os, "preadv", lambda *a: 0 if threading.current_thread().name ==
                            "shadowmerge-hasher" else preadv(*a))
        extra = ["--include", "q_proj"]
    shards = ["--shard-size", "20KB"] if lanes > 1 else []      # several shards, so that several lanes hash
    run_bad(cli, tmp_path, triple, *args(*triple), *extra, *shards,
            expect="Input/output error" if where == "written" else "short read of a shard just written")


def test_ctrl_c_in_process_cleans_up(cli, tmp_path, triple, monkeypatch):
    from shadowmerge import writer

    real = writer.ShardWriter.write
    calls = [0]

    def write(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(writer.ShardWriter, "write", write)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli("graft", *args(*triple), "--out", tmp_path / "out", "-q")
    assert res.exit_code == 130 and "interrupted" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


SLOW_CLI = """
import sys, time
from shadowmerge import writer
real = writer.ShardWriter.write
def slow(self, *a, **k):
    time.sleep(0.2)
    return real(self, *a, **k)
writer.ShardWriter.write = slow
from shadowmerge.cli import main
sys.argv = ["shadowmerge"] + sys.argv[1:]
main()
"""


def test_sigint_real_process_exits_130_and_leaves_nothing(tmp_path, triple):
    i, b, t = triple
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "graft", *map(str, args(i, b, t)), "--out", str(out),
                             "-q"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.shadowmerge-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "the graft never started writing"
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [i.parent.name]


def test_hub_id_offline_names_the_id(cli, tmp_path, triple, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    i, b, t = triple
    res = cli("graft", *args(i, "no-such-org/NoSuchModel-Base", t), "--out", tmp_path / "out", "-q")
    assert res.exit_code == 1 and "'no-such-org/NoSuchModel-Base'" in res.output and "Hub" in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, expect", [
    (["--include", "("], "--include '(' is not a valid regular expression"),
    (["--shard-size", "lots"], "shard size 'lots' is not a size"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
])
def test_bad_options(cli, tmp_path, triple, extra, expect):
    run_bad(cli, tmp_path, triple, *args(*triple), *extra, expect=expect)


def test_missing_base_or_out(cli, tmp_path, triple):
    i, b, t = triple
    res = cli("graft", "--instruct", i, "--tuned", t, "--out", tmp_path / "o", "-q")
    assert res.exit_code == 1 and "--base" in res.output
    res = cli("graft", *args(i, b, t), "-q")
    assert res.exit_code == 1 and "--out is required" in res.output


def test_real_console_script_prints_one_line(tmp_path, triple):
    exe = Path(sys.executable).parent / "shadowmerge"
    i, b, t = triple
    proc = subprocess.run([str(exe), "graft", *map(str, args(i, b, tmp_path / "missing")), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: model folder not found")


# --- quantized checkpoints (issue 11, part 4; FP8 blocks are read since issue 33: tests/test_fp8.py) ------------

@pytest.mark.parametrize("who", ["instruct", "base", "tuned"])
@pytest.mark.parametrize("how, expect", [
    ({"quantization_config": {"quant_method": "mxfp4"}}, "quant_method 'mxfp4'"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method 'gptq'"),
    ({"text_config": {"quantization_config": {"quant_method": "awq"}}}, "quant_method 'awq'"),
    ({"quantization_config": True}, "a quantization_config"),
])
def test_quantized_checkpoints_are_refused_before_any_data_is_read(cli, tmp_path, triple, monkeypatch, who, how,
                                                                   expect):
    from shadowmerge.checkpoint import TensorStore

    i, b, t = triple
    folder = {"instruct": i, "base": b, "tuned": t}[who]
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(how)
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(TensorStore, "read_into", lambda *a, **k: pytest.fail("tensor data was read"))
    err = run_bad(cli, tmp_path, triple, *args(i, b, t), expect=f"{who} {folder} is a quantized checkpoint")
    assert expect in err and "pass the bf16/fp16 release of this model instead" in err


@pytest.mark.parametrize("marker", ["model.layers.0.self_attn.q_proj.weight_scale_inv",     # FP8 (DeepSeek, Qwen)
                                    "model.layers.0.mlp.experts.gate_up_proj_blocks",      # MXFP4 (GPT-OSS)
                                    "model.layers.0.self_attn.q_proj.qweight",             # GPTQ / AWQ
                                    "model.layers.0.mlp.down_proj.weight.absmax"])          # bitsandbytes
def test_quantized_tensors_without_a_config_are_refused(cli, tmp_path, triple, marker):
    i, b, t = triple
    resave(t, lambda sd: sd.update({marker: torch.zeros(4, dtype=torch.uint8)}))
    err = run_bad(cli, tmp_path, triple, *args(i, b, t), expect="is a quantized checkpoint")
    assert repr(marker) in err


def test_quantized_refusal_names_the_full_precision_release(cli, tmp_path, triple):
    import shutil

    i, b, t = triple
    fp8 = tmp_path / "Qwen3-8B-FP8"
    shutil.copytree(i, fp8)
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    err = run_bad(cli, tmp_path, (*triple, fp8), *args(fp8, b, t), expect=f"e.g. {tmp_path / 'Qwen3-8B'}")
    assert "fp8" in err and str(fp8) in err       # names the method and the folder
    # every command that opens a model refuses it the same way
    for command, extra in ((("graft",), ["--instruct", fp8, "--base", b, "--tuned", t, "--dry-run"]),
                           (("similarity",), ["--base", b, "--instruct", fp8]),
                           (("lora", "retarget"), [])):
        if command == ("lora", "retarget"):
            from adapters import make_adapter

            adapter = make_adapter(b, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
            extra = [adapter, "--instruct", fp8]
        res = cli(*command, *extra, *([] if "--dry-run" in extra else ["--out", tmp_path / "o"]))
        assert res.exit_code == 1 and "is a quantized checkpoint" in res.stderr, (command, res.output)
        assert not (tmp_path / "o").exists()


def test_mergekit_refuses_a_quantized_model_before_mergekit_runs(cli, tmp_path, triple):
    import yaml

    i, b, t = triple
    cfg = json.loads((t / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (t / "config.json").write_text(json.dumps(cfg))
    merge = tmp_path / "merge.yml"
    merge.write_text(yaml.safe_dump({"merge_method": "shadow_graft", "base_model": str(b), "dtype": "bfloat16",
                                     "models": [{"model": str(i), "parameters": {"role": "instruct"}},
                                                {"model": str(t), "parameters": {"role": "tuned"}}]}))
    run_bad(cli, tmp_path, [*triple, merge], merge, command=("mergekit",), expect="tuned")
    res = cli("mergekit", merge, tmp_path / "out")
    assert "is a quantized checkpoint" in res.stderr
