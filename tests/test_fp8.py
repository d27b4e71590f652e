"""FP8 block-quantized inputs (DeepSeek-V3.x / Kimi-K2 / Qwen3-FP8 layout) through every command, on tiny real
DeepSeek-V3 models written as the releases store them (tests/fp8models.py): the dequantization is the reference
formula bit for bit, in any piece; the graft follows the trainer rule (Δ = T − dq(B) rounded to T's dtype) and
writes bf16 exactly; the MTP layer is kept from the Instruct; mixed formats, LoRA, σ, extract, verify and
mergekit's refusal; every malformed FP8 input is one line."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import fp8models as F
from conftest import run_bad, tree_digest
from shadowmerge.formats import fp8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    inst, base = F.pair(root)
    tuned = F.tuned_from(base, root / "tuned")
    return SimpleNamespace(root=root, i=inst, b=base, t=tuned)


def _state(folder):
    return F.dequantized(folder)


# ---- the format -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_and_dequantize_are_transformers_arithmetic(ue8m0):
    """Where transformers' ops apply (the block divides the shape), ours give the same bits; ours also take partial
    edge blocks (the ceil-div grid), where the reference formula holds per block."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g) * 0.03
    x[16:32, 16:32] = 0                       # an all-zero block: scale 1
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[16, 16],
                                                                    scale_fmt="ue8m0" if ue8m0 else None))
    theirs = Fp8Quantize(quantizer)._quantize_one("w.weight", x)
    q, inv = fp8.quantize(x, (16, 16), ue8m0)
    assert torch.equal(q.view(torch.uint8), theirs["w.weight"].view(torch.uint8))
    assert torch.equal(inv, theirs["w.weight_scale_inv"].float())
    if ue8m0:
        assert torch.equal(inv, torch.exp2(torch.log2(inv).round()))
    deq = Fp8Dequantize(quantizer)._dequantize_one(q, inv, torch.float32)
    assert torch.equal(fp8.dequantize(q, inv, (16, 16)), deq)
    # partial edge blocks: 50 x 41 in blocks of 16 -> a 4 x 3 grid, each block its own scale
    y = torch.randn(50, 41, generator=g)
    q, inv = fp8.quantize(y, (16, 16), ue8m0)
    assert inv.shape == (4, 3)
    ref = q.float() * inv.repeat_interleave(16, 0)[:50].repeat_interleave(16, 1)[:, :41]
    assert torch.equal(fp8.dequantize(q, inv, (16, 16)), ref)
    assert torch.equal(inv[3, 2], (1.0 / (fp8.FP8_MAX / y[48:, 32:].abs().max())).float()) or ue8m0


def test_a_checkpoint_reads_fp8_weights_dequantized_in_any_piece(models):
    """A checkpoint shows each FP8 weight as one float32 tensor, its scales as none; any element range (whole
    rows, a row segment, ranges across block rows) reads the reference values bit for bit."""
    from shadowmerge.checkpoint import Checkpoint

    ckpt = Checkpoint.open(models.b, "base")
    ref = _state(models.b)
    assert not any(n.endswith(fp8.SCALE_SUFFIX) for n in ckpt.tensors)
    assert set(ckpt.tensors) == set(ref)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"      # 28 x 64: a partial last block row
    info = ckpt.tensors[name]
    assert info.dtype == torch.float32 and info.codec is not None and info.codec.grid == (2, 4)
    flat = ref[name].reshape(-1)
    for e0, e1 in [(0, flat.numel()), (0, 64), (70, 75), (5, 1000), (1000, 1792), (16 * 64 - 3, 16 * 64 + 3)]:
        got = ckpt.read_into(info, e0, e1, torch.empty((e1 - e0) * 4, dtype=torch.uint8)).view(torch.float32)
        assert torch.equal(got, flat[e0:e1]), (e0, e1)
    ckpt.close()


# ---- graft ------------------------------------------------------------------------------------------------------

def test_a_full_graft_of_fp8_models_is_exact_and_keeps_the_mtp_layer(models, tmp_path, cli):
    """bf16 output = bf16(dq(I) + (T − bf16(dq(B)))) bit for bit; an untouched tensor's update is exactly zero (the
    trainer rule), so it is bf16(dq(I)); the MTP layer (no tensor in T) is kept from the Instruct; config.json has
    no quantization_config; transformers loads the output and generates; verify --recompute passes."""
    before = tree_digest(models.i, models.b, models.t)
    res = cli("graft", "--instruct", models.i, "--base", models.b, "--tuned", models.t, "--out", tmp_path / "out",
              "-q")
    assert res.exit_code == 0, res.output
    assert "multi-token-prediction" in res.output and "written as bfloat16" in res.output
    from safetensors.torch import load_file

    out = load_file(tmp_path / "out" / "model.safetensors")
    i, b, t = _state(models.i), _state(models.b), load_file(models.t / "model.safetensors")
    assert not any(n.endswith(fp8.SCALE_SUFFIX) for n in out)
    changed = 0
    for name, value in out.items():
        assert value.dtype == torch.bfloat16 or i[name].dtype == torch.float32, name
        if name not in t:                                       # the MTP layer
            assert name.startswith("model.layers.2."), name
            assert torch.equal(value.float(), i[name].to(value.dtype).float()), name
            continue
        delta = t[name].float() - b[name].to(t[name].dtype).float()
        assert torch.equal(value, (i[name] + delta).to(value.dtype)), name
        changed += bool(delta.any())
    assert 0 < changed < len(t)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    assert cli("verify", tmp_path / "out", "--recompute", "-q").exit_code == 0
    assert tree_digest(models.i, models.b, models.t) == before


@pytest.mark.parametrize("which", ["bf16 base", "bf16 instruct"])
def test_fp8_and_bf16_inputs_mix(models, tmp_path, cli, which):
    """An FP8 Instruct with a bf16 Base (the decoded Base as bf16: Δ is then plain T − B), or a bf16 Instruct with
    the FP8 Base (the trainer rule): both exact."""
    from safetensors.torch import load_file

    plain = F.decoded_twin(models.b if which == "bf16 base" else models.i, tmp_path / "plain")
    inst, base = (models.i, plain) if which == "bf16 base" else (plain, models.b)
    res = cli("graft", "--instruct", inst, "--base", base, "--tuned", models.t, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    i = _state(inst) if which == "bf16 base" else load_file(plain / "model.safetensors")
    b = load_file(plain / "model.safetensors") if which == "bf16 base" else _state(models.b)
    t = load_file(models.t / "model.safetensors")
    for name in t:
        delta = t[name].float() - b[name].to(t[name].dtype).float()
        assert torch.equal(out[name], (i[name].float() + delta).to(out[name].dtype)), name


def test_a_lora_graft_onto_an_fp8_instruct_is_exact(models, tmp_path, cli):
    from safetensors.torch import load_file

    from adapters import make_adapter

    plain = tmp_path / "decoded-base"             # the Base as the trainer loads it
    shutil.copytree(models.t, plain)
    adapter = make_adapter(plain, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_a_proj", "o_proj"])
    res = cli("graft", "--instruct", models.i, "--lora", adapter, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    i = _state(models.i)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    a = lora[f"base_model.model.{name[:-len('.weight')]}.lora_A.weight"].float()
    b = lora[f"base_model.model.{name[:-len('.weight')]}.lora_B.weight"].float()
    assert torch.equal(out[name], (i[name] + 2.0 * (b @ a)).to(torch.bfloat16))


def test_sigma_is_on_dequantized_values_and_names_no_scale(models, tmp_path, cli):
    res = cli("similarity", "--base", models.b, "--instruct", models.i, "--out", tmp_path / "sim", "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "sim" / "report.json").read_text())
    rows = {r["name"]: r for r in report["pairs"][0]["tensors"]}
    assert not any(n.endswith(fp8.SCALE_SUFFIX) for n in rows)
    b, i = _state(models.b), _state(models.i)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    sigma = float((i[name] - b[name]).abs().double().sum() / (b[name].abs().double().sum() + i[name].abs().double()
                                                               .sum()))
    assert rows[name]["sigma"] == pytest.approx(sigma, rel=1e-9)
    assert cli("verify", tmp_path / "sim").exit_code == 0


def test_extract_from_an_fp8_base_follows_the_trainer_rule(models, tmp_path, cli):
    res = cli("extract", "--base", models.b, "--tuned", models.t, "--rank", "4", "--out", tmp_path / "lora", "-q")
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "lora" / "extract.json").read_text())
    extracted = {m["tensor"] for m in record["modules"]}
    assert extracted and all(".layers.1." in n for n in extracted)          # untouched tensors: exactly zero update
    ok = cli("verify", tmp_path / "lora", "--recompute", "-q")
    assert ok.exit_code == 0, ok.output


def test_a_config_with_remote_code_is_read_from_names_and_shapes(models, tmp_path, cli):
    """Kimi-K2 names a model type whose code is remote (auto_map): the graft never runs it."""
    kimi = tmp_path / "kimi"
    shutil.copytree(models.i, kimi)
    cfg = json.loads((kimi / "config.json").read_text())
    cfg.update(model_type="kimi_k2", auto_map={"AutoModelForCausalLM": "modeling_kimi.KimiForCausalLM"})
    (kimi / "config.json").write_text(json.dumps(cfg))
    (kimi / "modeling_kimi.py").write_text("raise SystemExit('remote code ran')\n")
    base = tmp_path / "kimi-base"
    shutil.copytree(models.b, base)
    (base / "config.json").write_text(json.dumps({**json.loads((models.b / "config.json").read_text()),
                                                  "model_type": "kimi_k2"}))
    res = cli("graft", "--instruct", kimi, "--base", base, "--tuned", models.t, "--out", tmp_path / "out", "-q",
              "--no-role-check")
    assert res.exit_code == 1 and "architectures differ" in res.stderr      # the tuned model is deepseek_v3
    tuned = tmp_path / "kimi-tuned"
    shutil.copytree(models.t, tuned)
    (tuned / "config.json").write_text(json.dumps({**json.loads((models.t / "config.json").read_text()),
                                                   "model_type": "kimi_k2"}))
    res = cli("graft", "--instruct", kimi, "--base", base, "--tuned", tuned, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 0 and "remote code ran" not in res.output, res.output


def test_mergekit_refuses_fp8_inputs_and_points_to_graft(models, tmp_path, cli):
    import yaml

    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "shadow_graft", "base_model": str(models.b), "dtype": "bfloat16",
                                   "models": [{"model": str(models.i), "parameters": {"role": "instruct"}},
                                              {"model": str(models.t), "parameters": {"role": "tuned"}}]}))
    err = run_bad(cli, tmp_path, [models.i, models.b], cfg, command=("mergekit",), expect="stores FP8 blocks")
    assert "shadowmerge graft" in err


# ---- bad input --------------------------------------------------------------------------------------------------

def _damaged(models, tmp_path, change):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(models.b, bad)
    change(bad, load_file, save_file)
    return bad


def _edit_tensors(fn):
    def change(folder, load_file, save_file):
        for f in sorted(folder.glob("*.safetensors")):
            state = load_file(f)
            fn(state)
            save_file(state, f, metadata={"format": "pt"})
            index = folder / "model.safetensors.index.json"
            doc = json.loads(index.read_text())
            doc["weight_map"] = {n: m for n, m in doc["weight_map"].items() if n in state or m != f.name}
            doc["weight_map"].update({n: f.name for n in state})
            index.write_text(json.dumps(doc))
    return change


def _edit_config(fn):
    def change(folder, load_file, save_file):
        cfg = json.loads((folder / "config.json").read_text())
        fn(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return change


SCALE = "model.layers.0.mlp.down_proj.weight_scale_inv"
BAD = [
    (_edit_tensors(lambda s: s.pop(SCALE, None)), "has no scale tensor"),
    (_edit_tensors(lambda s: s.update({SCALE: s[SCALE][:, :1].contiguous()}) if SCALE in s else None),
     "the scales do not belong"),
    (_edit_tensors(lambda s: s[SCALE].__setitem__((0, 0), float("inf")) if SCALE in s else None),
     "not a positive finite number"),
    (_edit_tensors(lambda s: s[SCALE].__setitem__((0, 0), 0.0) if SCALE in s else None),
     "not a positive finite number"),
    (_edit_config(lambda c: c.pop("quantization_config")), "has no fp8 quantization_config"),
    (_edit_config(lambda c: c["quantization_config"].update(weight_block_size=[16])), "not two positive integers"),
    (_edit_config(lambda c: c["quantization_config"].update(weight_block_size=[8, 8])), "needs"),
    (_edit_config(lambda c: c["quantization_config"].update(quant_method="gptq")), "is a quantized checkpoint"),
]


@pytest.mark.parametrize("change, expect", BAD)
def test_a_malformed_fp8_base_is_one_line(models, tmp_path, cli, change, expect):
    bad = _damaged(models, tmp_path.parent / f"{tmp_path.name}-in", change)
    run_bad(cli, tmp_path, [models.i, bad, models.t], "--instruct", models.i, "--base", bad, "--tuned", models.t,
            expect=expect)


def test_fp8_models_that_disagree_on_the_block_are_refused(models, tmp_path, cli):
    other = tmp_path.parent / f"{tmp_path.name}-other"
    F.to_fp8(F.save_bf16(F.perturb(F.build(0), 0.05, 1), other, eos=7, template="base"), block=(8, 8))
    run_bad(cli, tmp_path, [models.i, other], "--instruct", models.i, "--base", other, "--tuned", models.t,
            expect="blocks of [16, 16]")


# ---- eval and train: where transformers can decode the blocks --------------------------------------------------

@pytest.fixture(scope="module")
def divisible(tmp_path_factory):
    """An FP8 pair whose block divides every weight (what transformers decodes on a CPU), with chat tokenizers, its
    Instruct's decoded bf16 twin, and held-out rows."""
    import tinymodels

    root = tmp_path_factory.mktemp("fp8-divisible")
    inst = F.to_fp8(F.save_bf16(F.build(0), root / "instruct"), block=(4, 4), mtp=False)
    base = F.to_fp8(F.save_bf16(F.perturb(F.build(0), 0.05, 1), root / "base", eos=7, template="base"), block=(4, 4),
                    mtp=False)
    for folder in (inst, base):
        tinymodels.chat_tokenizer(folder, "instruct" if folder is inst else "base")
    twin = F.decoded_twin(inst, root / "twin")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is w{100 + k}"},
                                                     {"role": "assistant", "content": f"w{200 + k}"}]}) + "\n"
                            for k in range(6)))
    return SimpleNamespace(i=inst, b=base, twin=twin, rows=rows, root=root)


def test_eval_loads_fp8_decoded_as_its_bf16_twin(divisible, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = cli("eval", f"fp8={divisible.i}", f"twin={divisible.twin}", "--heldout", divisible.rows, "--device", "cpu",
              "--out", tmp_path / "e", "-q")
    assert res.exit_code == 0, res.output
    loss = {h["model"]: h["nll_per_token"] for h in json.loads((tmp_path / "e" / "eval.json").read_text())["heldout"]}
    assert loss["fp8"] == loss["twin"]


def test_eval_and_train_refuse_blocks_transformers_cannot_decode(models, divisible, tmp_path, cli):
    """Partial edge blocks: transformers would load wrong values, so eval and train say so in one line at once."""
    import tinymodels

    inst = tmp_path.parent / f"{tmp_path.name}-inst"
    shutil.copytree(models.i, inst)
    tinymodels.chat_tokenizer(inst, "instruct")
    run_bad(cli, tmp_path, [inst], f"a={inst}", f"b={divisible.twin}", "--heldout", divisible.rows, "--device", "cpu",
            expect="ends in a partial block", command=("eval",))
    run_bad(cli, tmp_path, [inst], "--base", models.b, "--instruct", inst, "--data", divisible.rows, "--max-steps", "1",
            expect="ends in a partial block", command=("train",))


def test_train_tunes_an_fp8_base_and_grafts_onto_the_fp8_instruct(divisible, tmp_path, cli):
    res = cli("train", "--base", divisible.b, "--instruct", divisible.i, "--data", divisible.rows, "--max-steps", "2",
              "--batch-size", "2", "--grad-accum", "1", "--lora-rank", "2", "--lr", "5e-2", "--out", tmp_path / "run",
              "-q")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "run" / "shadow" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cli("verify", tmp_path / "run", "--recompute", "-q").exit_code == 0


# ---- --dtype fp8: the Instruct's own format --------------------------------------------------------------------

def _stored(folder):
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.mark.parametrize("chunk", [None, 64])
def test_dtype_fp8_writes_the_instructs_format_block_by_block(models, tmp_path, cli, monkeypatch, chunk):
    """--dtype fp8: the same grid and scale format, quantization_config kept; a block without update keeps the
    Instruct's bytes and scale (a tensor without update is a byte copy), an updated block is transformers'
    quantization of dq(I) + Δ; pieces of a few elements (whole block rows) give the same bytes; the summary and the
    record say what FP8 kept of the update; verify --recompute passes."""
    if chunk:
        from shadowmerge import engine

        run = engine.run

        def small(*a, **k):
            k["chunk_elements"] = chunk
            return run(*a, **k)
        monkeypatch.setattr(engine, "run", small)
    res = cli("graft", "--instruct", models.i, "--base", models.b, "--tuned", models.t, "--dtype", "fp8", "--out",
              tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    assert "FP8 keeps" in res.output
    out, inst = _stored(tmp_path / "out"), _stored(models.i)
    assert set(out) == set(inst)                                    # weights, scales, MTP layer: the same names
    i, b = _state(models.i), _state(models.b)
    from safetensors.torch import load_file

    t = load_file(models.t / "model.safetensors")
    block = tuple(json.loads((models.i / "config.json").read_text())["quantization_config"]["weight_block_size"])
    for name, value in out.items():
        assert value.dtype == inst[name].dtype, name
        if value.dtype != fp8.FP8:
            if name in t and not name.endswith(fp8.SCALE_SUFFIX):
                delta = t[name].float() - b[name].to(t[name].dtype).float()
                assert torch.equal(value, (i[name] + delta).to(value.dtype)), name
            continue
        scale = name[: -len("weight")] + fp8.SCALE_SUFFIX
        if name not in t or not (t[name].float() - b[name].to(t[name].dtype).float()).any():
            assert torch.equal(value.view(torch.uint8), inst[name].view(torch.uint8)), name
            assert torch.equal(out[scale], inst[scale]), name
            continue
        delta = t[name].float() - b[name].to(t[name].dtype).float()
        q, inv = fp8.quantize(i[name] + delta, block, False)
        rows, cols = value.shape
        gr, gc = inv.shape
        padded = torch.zeros(gr * block[0], gc * block[1], dtype=torch.bool)
        padded[:rows, :cols] = delta != 0
        moved = padded.view(gr, block[0], gc, block[1]).any(3).any(1)
        per = moved.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        want_q = torch.where(per, q.view(torch.uint8), inst[name].view(torch.uint8))
        assert torch.equal(value.view(torch.uint8), want_q), name
        assert torch.equal(out[scale], torch.where(moved, inv, inst[scale])), name
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == list(block)
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    k = record["fp8"]
    assert k["kept"] > 0 and 0 < k["along"] <= k["kept"] ** 0.5 * 1.0001 + 1 and 0 < k["blocks_changed"] <= k["blocks"]
    # `along` is <out - I, update> / |update|^2, recomputed here from the written bytes
    moved, dot, norm2 = 0.0, 0.0, 0.0
    for name in k["tensors"]:
        scale = name[: -len("weight")] + fp8.SCALE_SUFFIX
        got = fp8.dequantize(out[name], out[scale], block).double() - i[name].double()
        upd = (t[name].float() - b[name].to(t[name].dtype).float() + i[name]).double() - i[name].double()
        moved, dot, norm2 = moved + float(got.pow(2).sum()), dot + float((got * upd).sum()), norm2 + float(upd.pow(2).sum())
    assert k["along"] == pytest.approx(dot / norm2, rel=1e-9) and k["kept"] == pytest.approx((moved / norm2) ** 0.5,
                                                                                                rel=1e-9)
    assert "FP8 keeps" in (tmp_path / "out" / "README.md").read_text()
    assert cli("verify", tmp_path / "out", "--recompute", "-q").exit_code == 0
    assert cli("verify", tmp_path / "out", "--recompute", "--sample", "3", "-q").exit_code == 0


def test_dtype_fp8_keeps_power_of_two_scales_and_says_when_most_of_the_update_is_lost(tmp_path, cli):
    inst, base = F.pair(tmp_path / "m", ue8m0=True)
    tuned = F.tuned_from(base, tmp_path / "m" / "tuned", scale=1e-4)        # mostly far below one FP8 step
    res = cli("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--dtype", "fp8", "--out",
              tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    assert "most of the update is below one FP8 step and was lost: write bf16" in res.output
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    assert record["fp8"]["along"] < 0.5
    out = _stored(tmp_path / "out")
    scales = [v for n, v in out.items() if n.endswith(fp8.SCALE_SUFFIX)]
    assert scales and all(torch.equal(s, torch.exp2(torch.log2(s).round())) for s in scales)
    bf16 = cli("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", tmp_path / "bf16", "-q")
    assert bf16.exit_code == 0 and "FP8 keeps" not in bf16.output          # the default keeps the update in bf16


def test_dtype_fp8_needs_an_fp8_instruct(models, tmp_path, cli):
    plain = F.decoded_twin(models.i, tmp_path.parent / f"{tmp_path.name}-plain")
    run_bad(cli, tmp_path, [plain], "--instruct", plain, "--base", models.b, "--tuned", models.t, "--dtype", "fp8",
            expect="the instruct stores no FP8 weights")


def test_lora_retarget_onto_an_fp8_instruct(models, tmp_path, cli):
    """An adapter trained on the (decoded) Base retargets onto the FP8 Instruct from its shapes, as onto a bf16 one."""
    from adapters import make_adapter

    plain = F.decoded_twin(models.b, tmp_path / "decoded-base")
    adapter = make_adapter(plain, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_a_proj", "o_proj"])
    res = cli("lora", "retarget", adapter, "--instruct", models.i, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert cli("verify", tmp_path / "out").exit_code == 0
