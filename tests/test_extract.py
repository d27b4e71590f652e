"""`shadowmerge extract`: a full fine-tune's update as a LoRA adapter that real peft loads and merges."""

from __future__ import annotations

import json

import pytest
import torch

import shadowmerge
from conftest import DEVICES, run_bad
import tinymodels
from tinymodels import state


@pytest.fixture
def f32_triple(make_triple):
    return make_triple("llama", dtype=torch.float32)


def peft_merged(instruct, adapter) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(instruct, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def test_rank_r_adapter_is_the_svd_truncation_and_peft_merges_it(f32_triple, cli, tmp_path):
    inst, base, tuned = f32_triple
    out = tmp_path / "lora"
    res = cli("extract", "--base", base, "--tuned", tuned, "--out", out, "--rank", "8", "--for-instruct", inst)
    assert res.exit_code == 0, res.output
    I, B, T = state(inst), state(base), state(tuned)
    merged = peft_merged(inst, out)
    record = json.loads((out / "extract.json").read_text())
    assert len(record["modules"]) == 14 and all(m["rank"] == 8 for m in record["modules"])
    for m in record["modules"]:
        name = m["module"] + ".weight"
        delta = T[name] - B[name]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = u[:, :8] @ torch.diag(s[:8]) @ vh[:8]              # Eckart-Young: the best rank-8 approximation
        torch.testing.assert_close(merged[name], I[name] + best, rtol=0, atol=1e-5)
        got = float((merged[name] - I[name] - delta).norm() / delta.norm())
        assert got == pytest.approx(m["rel_error"], rel=1e-3) and 0 < m["rel_error"] < 1
        assert m["energy"] == pytest.approx(1 - m["rel_error"] ** 2, rel=1e-6)
    # dropped by default: norms and embeddings stay the Instruct's, and the record says what was left out
    assert torch.equal(merged["model.norm.weight"], I["model.norm.weight"])
    assert {o["tensor"] for o in record["others"]} >= {"model.norm.weight", "model.embed_tokens.weight"}
    assert not any(o["kept"] for o in record["others"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(inst) and cfg["r"] == cfg["lora_alpha"] == 8
    assert (out / "extract.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "extract.json", "extract.png"]    # the spool is gone


def test_full_rank_with_copies_reproduces_the_three_way_graft(f32_triple, cli, tmp_path):
    """At full rank with --others copy, grafting the extracted adapter onto the Instruct is the graft of the
    full update itself (up to float32 SVD rounding): nothing of T - B is lost."""
    inst, base, tuned = f32_triple
    out = tmp_path / "lora"
    res = cli("extract", "--base", base, "--tuned", tuned, "--out", out, "--rank", "128", "--others", "copy",
              "--for-instruct", inst)
    assert res.exit_code == 0, res.output
    shadowmerge.graft(inst, base, tuned, tmp_path / "full", progress=False)
    F, M = state(tmp_path / "full"), peft_merged(inst, out)
    for name, want in F.items():
        torch.testing.assert_close(M[name], want, rtol=0, atol=2e-5 * float(want.abs().max()), msg=name)
    # the full copies were made for the Instruct (Instruct + update): the graft takes their update against it
    shadowmerge.graft(inst, inst, out=tmp_path / "via-lora", lora=out, progress=False)
    G = state(tmp_path / "via-lora")
    for name, want in F.items():
        torch.testing.assert_close(G[name], want, rtol=0, atol=2e-5 * float(want.abs().max()), msg=name)
    record = json.loads((out / "extract.json").read_text())
    assert max(m["rel_error"] for m in record["modules"]) < 1e-3 and all(o["kept"] for o in record["others"])


def test_energy_picks_the_rank_per_module(f32_triple, cli, tmp_path):
    inst, base, tuned = f32_triple
    out = tmp_path / "lora"
    res = cli("extract", "--base", base, "--tuned", tuned, "--out", out, "--energy", "0.9", "--max-rank", "40")
    assert res.exit_code == 0, res.output
    record = json.loads((out / "extract.json").read_text())
    B, T = state(base), state(tuned)
    for m in record["modules"]:
        s = torch.linalg.svdvals((T[m["module"] + ".weight"] - B[m["module"] + ".weight"]).double())
        share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        want = min(int((share < 0.9).sum()) + 1, 40)
        assert m["rank"] == want and (m["energy"] >= 0.9 or m["rank"] == 40)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    peft_merged(base, out)          # peft accepts the per-module ranks (rank_pattern / alpha_pattern)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_factors_are_measured_as_stored(f32_triple, cli, tmp_path, dtype):
    """--dtype bfloat16/float16 stores every adapter tensor in it; peft's merge adds exactly the stored B @ A, and
    the recorded error is that product's (at least the float32 SVD's bound), not the bound itself."""
    from safetensors import safe_open

    inst, base, tuned = f32_triple
    name = str(dtype).removeprefix("torch.")
    for out, extra in ((tmp_path / "f32", []), (tmp_path / name, ["--dtype", name])):
        res = cli("extract", "--base", base, "--tuned", tuned, "--out", out, "--rank", "8", "--others", "copy",
                  "--for-instruct", inst, *extra)
        assert res.exit_code == 0, res.output
    with safe_open(tmp_path / name / "adapter_model.safetensors", "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert {v.dtype for v in stored.values()} == {dtype}
    I, B, T = state(inst), state(base), state(tuned)
    merged = peft_merged(inst, tmp_path / name)
    record = json.loads((tmp_path / name / "extract.json").read_text())
    bound = {m["module"]: m["rel_error"] for m in json.loads((tmp_path / "f32" / "extract.json").read_text())["modules"]}
    assert record["settings"]["dtype"] == name
    for m in record["modules"]:
        key, w = f"base_model.model.{m['module']}.lora_", m["module"] + ".weight"
        product = stored[key + "B.weight"].float() @ stored[key + "A.weight"].float()
        torch.testing.assert_close(merged[w], I[w] + product, rtol=0, atol=1e-5)
        delta = T[w] - B[w]
        assert m["rel_error"] == pytest.approx(float((product - delta).norm() / delta.norm()), rel=1e-4)
        assert m["rel_error"] >= bound[m["module"]] * (1 - 1e-5)
    full = I["model.norm.weight"] + T["model.norm.weight"] - B["model.norm.weight"]
    assert torch.equal(merged["model.norm.weight"], full.to(dtype).float())      # full copies in --dtype too
    size = {d: (tmp_path / d / "adapter_model.safetensors").stat().st_size for d in ("f32", name)}
    assert size[name] < 0.55 * size["f32"]


@pytest.mark.parametrize("device", DEVICES)
def test_extract_on_a_device_is_the_svd_truncation(f32_triple, cli, tmp_path, device):
    """--device moves the SVDs (cuda: no TF32); the adapter is the same truncation, whatever the signs."""
    inst, base, tuned = f32_triple
    res = cli("extract", "--base", base, "--tuned", tuned, "--out", tmp_path / "lora", "--rank", "8",
              "--device", device)
    assert res.exit_code == 0, res.output
    B, T, merged = state(base), state(tuned), peft_merged(base, tmp_path / "lora")
    record = json.loads((tmp_path / "lora" / "extract.json").read_text())
    assert record["settings"]["device"] == device
    for m in record["modules"]:
        w = m["module"] + ".weight"
        u, s, vh = torch.linalg.svd(T[w] - B[w], full_matrices=False)
        torch.testing.assert_close(merged[w], B[w] + u[:, :8] @ torch.diag(s[:8]) @ vh[:8], rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, expect", [
    (["--rank", "4", "--device", "tpu"], "unknown device 'tpu'; use cpu or cuda[:N]"),
    (["--rank", "4", "--device", "cuda:99"], "--device cuda:99"),
    ([], "give one of --rank R or --energy E"),
    (["--rank", "4", "--energy", "0.9"], "give one of --rank R or --energy E"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--energy", "1.5"], "--energy is a share of the update's squared singular values in (0, 1]"),
    (["--energy", "0.9", "--max-rank", "0"], "--max-rank must be at least 1"),
])
def test_bad_settings(f32_triple, cli, tmp_path, args, expect):
    inst, base, tuned = f32_triple
    run_bad(cli, tmp_path, [inst, base, tuned], "--base", base, "--tuned", tuned, *args, command=("extract",),
            expect=expect)


def test_inputs_that_do_not_belong_together(f32_triple, make_triple, cli, tmp_path):
    inst, base, tuned = f32_triple
    q_inst, _, _ = make_triple("qwen2", dtype=torch.float32)
    run_bad(cli, tmp_path, [inst, base], "--base", base, "--tuned", base, "--rank", "4", command=("extract",),
            expect="--base and --tuned are the same model")
    import shutil

    copy = shutil.copytree(base, tmp_path.parent / f"{tmp_path.name}-copy-of-base")    # the same weights, elsewhere
    run_bad(cli, tmp_path, [inst, base, copy], "--base", base, "--tuned", copy, "--rank", "4", command=("extract",),
            expect="no linear weight differs from --base")
    run_bad(cli, tmp_path, [base, q_inst], "--base", base, "--tuned", q_inst, "--rank", "4", command=("extract",),
            expect="--base and --tuned hold different tensors")
    run_bad(cli, tmp_path, [base, tuned, q_inst], "--base", base, "--tuned", tuned, "--rank", "4", "--for-instruct",
            q_inst, command=("extract",), expect="--for-instruct: ")


def test_every_command_has_help_with_an_example(cli):
    import click

    from shadowmerge.cli import main

    def commands(group, path):
        for name, cmd in group.commands.items():
            yield [*path, name]
            if isinstance(cmd, click.Group):
                yield from commands(cmd, [*path, name])

    for path in commands(main, []):
        res = cli(*path, "--help")
        assert res.exit_code == 0 and "Example" in res.output and "shadowmerge " in res.output, path


def test_copies_without_an_instruct_are_the_tuned_values(f32_triple, cli, tmp_path):
    inst, base, tuned = f32_triple
    out = tmp_path / "lora"
    assert cli("extract", "--base", base, "--tuned", tuned, "--out", out, "--rank", "4", "--others", "copy").exit_code == 0
    T, merged = state(tuned), peft_merged(base, out)
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged[name], T[name]), name


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_vision_language_update_uses_the_loaded_names(family, cli, tmp_path):
    """Vision-language checkpoints are renamed when they load; the adapter uses the loaded names, so peft applies
    it to the Instruct (the language model's and the vision tower's linear layers) as the SVD says."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    inst, base = tinymodels.vlm_triple(tmp_path, family, torch.float32)
    tuned = tinymodels.save(tinymodels.perturb(tinymodels.perturb(tinymodels.build_vlm(family), 0.02, 1), 0.01, 2),
                            tmp_path / "tuned", torch.float32)
    res = cli("extract", "--base", base, "--tuned", tuned, "--rank", "4", "--for-instruct", inst,
              "--out", tmp_path / "lora", "-q")
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "lora" / "extract.json").read_text())
    assert any(m["module"] + ".weight" != m["tensor"] for m in record["modules"]), "nothing was renamed"
    model = AutoModelForImageTextToText.from_pretrained(inst, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload().state_dict()
    B, T = tinymodels.state(base), tinymodels.state(tuned)
    for m in record["modules"]:
        key, delta = m["module"] + ".weight", T[m["tensor"]] - B[m["tensor"]]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        torch.testing.assert_close(merged[key], before[key] + u[:, :4] @ torch.diag(s[:4]) @ vh[:4], rtol=0, atol=1e-5)
    assert len(record["modules"]) > 10


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral", "qwen3_moe-fused", "gpt_oss"])
def test_moe_experts_become_a_lora_on_the_fused_parameters(case, make_triple, cli, tmp_path):
    """Experts stored one by one (Qwen3-MoE, Mixtral) or fused on disk ((experts, out, in), or GPT-OSS's
    (experts, in, out)) load as one 3-D parameter; the adapter puts a LoRA on it with peft's target_parameters,
    and peft's merge adds each expert's own rank-r truncation. At full rank with --others copy (routers as full
    copies) the merge is the three-way graft."""
    from transformers import AutoModelForCausalLM

    from test_moe import fused_copy

    family = case.split("-")[0]
    inst, base, tuned = make_triple(family, dtype=torch.float32)
    if case.endswith("fused"):
        inst, base, tuned = (fused_copy(m, tmp_path / f"fused-{m.name}", torch.float32) for m in (inst, base, tuned))
    loaded = {n: AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).state_dict()
              for n, m in (("I", inst), ("B", base), ("T", tuned))}
    I, B, T = loaded["I"], loaded["B"], loaded["T"]
    out = tmp_path / "lora"
    res = cli("extract", "--base", base, "--tuned", tuned, "--out", out, "--rank", "2", "--for-instruct", inst,
              "--others", "copy", "-q")
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    fused = sorted(n for n, v in I.items() if v.dim() == 3)
    assert cfg["target_parameters"] == fused and len(fused) == 4
    merged = peft_merged(inst, out)
    record = {m["module"]: m for m in json.loads((out / "extract.json").read_text())["modules"]}
    transposed = family == "gpt_oss"
    for name in fused:
        delta = T[name] - B[name]
        for e in range(delta.shape[0]):
            m = delta[e].T if transposed else delta[e]
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
            torch.testing.assert_close(merged[name][e], I[name][e] + (best.T if transposed else best), rtol=0,
                                       atol=1e-5, msg=f"{name} expert {e}")
        got = float((merged[name] - I[name] - delta).norm() / delta.norm())
        assert record[name]["experts"] == delta.shape[0] and record[name]["rank"] == 2
        assert got == pytest.approx(record[name]["rel_error"], rel=1e-3)
    routers = [n for n in I if n.endswith("mlp.gate.weight") or n.endswith("router.weight")]
    assert routers and all(torch.equal(merged[n], I[n] + (T[n] - B[n])) for n in routers)   # full copies
    res = cli("extract", "--base", base, "--tuned", tuned, "--out", tmp_path / "full", "--rank", "64",
              "--for-instruct", inst, "--others", "copy", "-q")
    assert res.exit_code == 0, res.output
    shadowmerge.graft(inst, base, tuned, tmp_path / "graft", progress=False)
    G = AutoModelForCausalLM.from_pretrained(tmp_path / "graft", dtype=torch.float32).state_dict()
    M = peft_merged(inst, tmp_path / "full")
    for name, want in G.items():
        if name.endswith("weight") or name in fused:        # biases and GPT-OSS's attention sinks are dropped
            torch.testing.assert_close(M[name], want, rtol=0, atol=2e-5 * float(want.abs().max()), msg=name)


def test_moe_energy_takes_the_largest_rank_any_expert_needs(make_triple, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    inst, base, tuned = make_triple("qwen3_moe", dtype=torch.float32)
    out = tmp_path / "lora"
    res = cli("extract", "--base", base, "--tuned", tuned, "--out", out, "--energy", "0.5", "--max-rank", "64", "-q")
    assert res.exit_code == 0, res.output
    B = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    T = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).state_dict()
    merged = peft_merged(base, out)          # peft takes the parameters' ranks from rank_pattern
    ranks = set()
    for m in json.loads((out / "extract.json").read_text())["modules"]:
        if "experts" not in m:
            continue
        need, r = [], m["rank"]
        for e, d in enumerate(T[m["module"]] - B[m["module"]]):
            s = torch.linalg.svdvals(d.double())
            need.append(int((torch.cumsum(s ** 2, 0) / (s ** 2).sum() < 0.5).sum()) + 1)
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            torch.testing.assert_close(merged[m["module"]][e], B[m["module"]][e] + u[:, :r] @ torch.diag(s[:r]) @ vh[:r],
                                       rtol=0, atol=1e-5)
        assert r == max(need) and m["energy"] >= 0.5
        ranks.add(r)
    assert len(ranks) > 1 or ranks != {json.loads((out / "adapter_config.json").read_text())["r"]}


def test_expert_tensors_that_are_no_fused_parameter_are_refused(make_triple, cli, tmp_path):
    """A changed 3-D expert tensor the model does not load as a parameter, or an expert set with one missing,
    cannot be one LoRA: a one-line error, nothing written."""
    from test_errors import resave

    inst, base, tuned = make_triple("llama", dtype=torch.float32)
    for folder, value in ((base, 0.0), (tuned, 1.0)):
        resave(folder, lambda sd: sd.update({"model.layers.0.mlp.experts.w": torch.full((2, 3, 4), value)}))
    run_bad(cli, tmp_path, [base, tuned], "--base", base, "--tuned", tuned, "--rank", "2", command=("extract",),
            expect="model.layers.0.mlp.experts.w has shape [2, 3, 4]: these expert tensors are not a parameter")
    inst, base, tuned = make_triple("qwen3_moe", dtype=torch.float32)
    for folder in (base, tuned):
        resave(folder, lambda sd: sd.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    run_bad(cli, tmp_path, [base, tuned], "--base", base, "--tuned", tuned, "--rank", "2", command=("extract",),
            expect="model.layers.1.mlp.experts.gate_up_proj: the checkpoint's 7 expert tensors do not make up its "
                   "[4, 64, 64]")
