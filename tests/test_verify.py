"""shadowmerge verify: every output carries a manifest; anything missing, added or changed is named, in one line."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from safetensors.torch import load_file, save_file

from adapters import make_adapter
from conftest import DEVICES


@pytest.fixture
def triple(make_triple):
    return make_triple("llama", shard="60KB")


def graft(cli, triple, out, *extra):
    i, b, t = triple
    res = cli("graft", "--instruct", i, "--base", b, "--tuned", t, "--out", out, "-q", "--shard-size", "100KB", *extra)
    assert res.exit_code == 0, res.output
    return out


def ok(cli, *args):
    res = cli("verify", *args, "-q")
    assert res.exit_code == 0, res.output
    return res.output


def bad(cli, expect, *args):
    res = cli("verify", *args, "-q")
    assert res.exit_code == 1 and isinstance(res.exception, (SystemExit, type(None))), repr(res.exception)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in res.output, err
    assert expect in err, err
    return err


def test_graft_output_verifies_and_recomputes(cli, tmp_path, triple):
    out = graft(cli, triple, tmp_path / "out", "--alpha", "0.5", "--dtype", "float16")
    record = json.loads((out / "shadowmerge.json").read_text())
    shards = [n for n in record["manifest"] if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in record["manifest"]
    assert all(len(e["sha256"]) == 64 for e in record["manifest"].values())
    assert "verified" in ok(cli, out)
    text = ok(cli, out, "--recompute")
    assert f"{len(load_all(out))} tensor(s) recomputed from the inputs, bit-identical" in text
    assert "3 tensor(s) recomputed" in ok(cli, out, "--recompute", "--sample", "3")


def test_the_record_keeps_the_graft_spec_and_older_records_still_recompute(cli, tmp_path, triple):
    """The record stores the GraftSpec the graft ran with, and verify --recompute rebuilds the graft from it; a record
    written before specs were recorded (no "spec") still recomputes from its flat fields; a stranger's spec with a
    wrong type is one line."""
    out = graft(cli, triple, tmp_path / "out", "--alpha", "0.5", "--dtype", "float16", "--exclude", "embed")
    path = out / "shadowmerge.json"
    record = json.loads(path.read_text())
    assert record["spec"]["alpha"] == 0.5 and record["spec"]["dtype"] == "float16"
    assert record["spec"]["exclude"] == "embed" and record["spec"]["instruct"] == str(triple[0])
    assert "recomputed from the inputs, bit-identical" in ok(cli, out, "--recompute")
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "spec"}))
    assert "recomputed from the inputs, bit-identical" in ok(cli, out, "--recompute")
    path.write_text(json.dumps(dict(record, spec=dict(record["spec"], alpha="half"))))
    bad(cli, "the record's graft spec: alpha", out, "--recompute")
    path.write_text(json.dumps(dict(record, spec=dict(record["spec"], shiny=1))))
    bad(cli, "does not know", out, "--recompute")


@pytest.mark.parametrize("device", DEVICES)
def test_recompute_on_the_device_gives_the_same_bytes(cli, tmp_path, triple, device):
    """A full-FT graft made on the CPU is recomputed bit for bit on the device, and the other way round."""
    other = "cpu" if device != "cpu" else device
    out = graft(cli, triple, tmp_path / "out", "--alpha", "0.3", "--device", device)
    assert json.loads((out / "shadowmerge.json").read_text())["device"] == device
    assert "bit-identical" in ok(cli, out, "--recompute", "--device", other)
    out2 = graft(cli, triple, tmp_path / "out2", "--alpha", "0.3", "--device", other)
    assert "bit-identical" in ok(cli, out2, "--recompute", "--device", device)
    adapter = make_adapter(triple[1], tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    res = cli("graft", "--instruct", triple[0], "--lora", adapter, "--out", tmp_path / "lora", "-q", "--device", device)
    assert res.exit_code == 0, res.output
    assert "bit-identical" in ok(cli, tmp_path / "lora", "--recompute", "--device", device)


def load_all(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_every_kind_of_change_is_named(cli, tmp_path, triple):
    out = graft(cli, triple, tmp_path / "out")
    shard = sorted(out.glob("model-*.safetensors"))[0]
    original = shard.read_bytes()

    data = bytearray(original)
    data[-3] ^= 0xFF                                     # one bit of tensor data
    shard.write_bytes(bytes(data))
    bad(cli, f"{shard.name}: sha256 differs from the record", out)
    shard.write_bytes(original)

    tensors = load_file(shard)                          # a header that says something else
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].reshape(-1)
    save_file(tensors, shard, metadata={"format": "pt"})
    bad(cli, f"the header differs from the record at tensor {name!r}", out)
    shard.write_bytes(original)

    (out / "extra.py").write_text("import os")           # something added
    bad(cli, "extra.py is not in the record's manifest", out)
    (out / "extra.py").unlink()

    (out / "generation_config.json").unlink()            # something removed
    bad(cli, "generation_config.json is missing", out)


def test_recompute_names_the_first_tensor_that_differs(cli, tmp_path, triple):
    out = graft(cli, triple, tmp_path / "out")
    i, b, t = triple
    tuned_shard = sorted(t.glob("model-*.safetensors"))[0]
    tensors = load_file(tuned_shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1                    # an input changed since the run
    save_file(tensors, tuned_shard, metadata={"format": "pt"})
    ok(cli, out)                                         # the output itself is as written
    bad(cli, f"tensor {name} differs from its recomputation from the inputs", out, "--recompute")


def test_recompute_needs_the_inputs(cli, tmp_path, triple):
    out = graft(cli, triple, tmp_path / "out")
    os.rename(triple[2], triple[2].parent / "moved")
    bad(cli, "--recompute needs the tuned input", out, "--recompute")


def test_lora_graft_retarget_and_mergekit_outputs_verify(cli, tmp_path, triple):
    i, b, t = triple
    adapter = make_adapter(b, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    res = cli("graft", "--instruct", i, "--lora", adapter, "--out", tmp_path / "lora-out", "-q")
    assert res.exit_code == 0, res.output
    assert "recomputed" in ok(cli, tmp_path / "lora-out", "--recompute")
    res = cli("lora", "retarget", adapter, "--instruct", i, "--out", tmp_path / "retargeted")
    assert res.exit_code == 0, res.output
    ok(cli, tmp_path / "retargeted")
    bad(cli, "nothing to recompute", tmp_path / "retargeted", "--recompute")
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "shadow_graft", "base_model": str(b), "dtype": "bfloat16",
                                   "parameters": {"alpha": 0.5},
                                   "models": [{"model": str(i), "parameters": {"role": "instruct"}},
                                              {"model": str(t), "parameters": {"role": "tuned"}}]}))
    res = cli("mergekit", cfg, tmp_path / "merged")
    assert res.exit_code == 0, res.output
    assert "recomputed from the inputs, bit-identical" in ok(cli, tmp_path / "merged", "--recompute")
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "bfloat16",
                                   "models": [{"model": str(i), "parameters": {"weight": 0.5}},
                                              {"model": str(t), "parameters": {"weight": 0.5}}]}))
    res = cli("mergekit", cfg, tmp_path / "linear")
    assert res.exit_code == 0, res.output
    ok(cli, tmp_path / "linear")


@pytest.mark.parametrize("case, expect", [
    ("no record", "has no shadowmerge.json or run.json"),
    ("no manifest", "has no manifest (written by an older shadowmerge)"),
    ("record not JSON", "is not valid JSON"),
    ("manifest a list", "manifest is a list"),
    ("not a folder", "is not a folder"),
    ("sample without recompute", "--sample goes with --recompute"),
    ("sample zero", "--sample must be at least 1"),
    ("an entry's size a string", "the size of 'config.json' is a string"),
    ("an entry leaving the folder", "manifest entry '../escape.txt' leaves the folder"),
    ("no input paths", "names no input folders (written by an older shadowmerge)"),
    ("a newer record version", "has record_version 99, which this shadowmerge"),
    ("a record version that is text", "has record_version 1, which this shadowmerge"),
    ("not shadowmerge's record", "was not written by shadowmerge (its \"tool\" is 'mergekit')"),
])
def test_bad_verify_input(cli, tmp_path, triple, case, expect):
    out = graft(cli, triple, tmp_path / "out")
    record = out / "shadowmerge.json"
    extra = []
    if case == "no record":
        record.unlink()
    elif case == "no manifest":
        rec = json.loads(record.read_text())
        del rec["manifest"]
        record.write_text(json.dumps(rec))
    elif case == "record not JSON":
        record.write_text("{")
    elif case == "manifest a list":
        rec = json.loads(record.read_text())
        rec["manifest"] = [1]
        record.write_text(json.dumps(rec))
    elif case == "not a folder":
        out = out / "config.json"
    elif case in ("an entry's size a string", "an entry leaving the folder", "no input paths", "a newer record version",
                  "a record version that is text", "not shadowmerge's record"):
        rec = json.loads(record.read_text())
        if case == "a newer record version":
            rec["record_version"] = 99
        elif case == "a record version that is text":
            rec["record_version"] = "1"
        elif case == "not shadowmerge's record":
            rec["tool"] = "mergekit"
        elif case == "an entry's size a string":
            rec["manifest"]["config.json"]["size"] = "12"
        elif case == "an entry leaving the folder":
            rec["manifest"]["../escape.txt"] = {"size": 1, "sha256": "0" * 64}
        else:
            del rec["input_paths"]
            extra = ["--recompute"]
        record.write_text(json.dumps(rec))
    elif case == "sample without recompute":
        extra = ["--sample", "2"]
    else:
        extra = ["--recompute", "--sample", "0"]
    bad(cli, expect, out, *extra)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_extracted_adapter_is_recomputed_from_its_inputs(cli, tmp_path, dtype):
    """verify --recompute on extract's output: the update's norm, the factors' error against the inputs' update and
    the full copies; a factor changed by one element or a tuned input changed afterwards is caught."""
    from safetensors.torch import load_file, save_file

    import tinymodels

    i, b, t = tinymodels.triple(tmp_path / "m", "llama")
    out = tmp_path / "adapter"
    res = cli("extract", "--base", b, "--tuned", t, "--rank", "4", "--others", "copy", "--for-instruct", i,
              "--dtype", dtype, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    ok = cli("verify", out, "--recompute", "-q")
    assert ok.exit_code == 0 and "recomputed" in ok.output, ok.output
    weights = out / "adapter_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key][0, 0] += 0.5
    save_file(state, weights, metadata={"format": "pt"})
    record = json.loads((out / "extract.json").read_text())      # the manifest would catch it first: re-seal it
    from shadowmerge.record import manifest

    record["manifest"] = manifest(out, "extract.json")
    (out / "extract.json").write_text(json.dumps(record))
    bad = cli("verify", out, "--recompute")
    assert bad.exit_code == 1 and "not its rank-4 truncation" in bad.stderr, bad.output
