"""The similarity analyzer: exact sigma, both aggregations against independent code, files, errors."""

from __future__ import annotations

import csv
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import shadowmerge
from conftest import CUDA, DEVICES, run_bad
from tinymodels import state


def folder_with(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    return path


def sums_of(tmp_path: Path, a: dict, b: dict, chunk: int | None = None):
    from shadowmerge.analyzer.stats import scan
    from shadowmerge.checkpoint import Checkpoint

    ca = Checkpoint.open(folder_with(tmp_path / f"a{len(list(tmp_path.iterdir()))}", a), "base")
    cb = Checkpoint.open(folder_with(tmp_path / f"b{len(list(tmp_path.iterdir()))}", b), "instruct")
    items = [(n, ca.tensors[n], cb.tensors[n], None) for n in a]
    return scan(items, ca, cb, **({"chunk_elements": chunk} if chunk else {}))


def test_sigma_is_exact_on_hand_made_tensors(tmp_path):
    x = torch.randn(300, 70)
    s = sums_of(tmp_path, {"same": x, "huge": torch.full((10,), 1e6), "step": torch.ones(1000),
                           "ortho": torch.tensor([1.0, 0.0])},
                {"same": x.clone(), "huge": torch.full((10,), 1e-3), "step": torch.full((1000,), 1.25),
                 "ortho": torch.tensor([0.0, 1.0])})
    assert s["same"].sigma == 0.0 and s["same"].rel_l2 == 0.0 and s["same"].cosine == pytest.approx(1.0, abs=1e-12)
    small = torch.tensor(1e-3).item()                              # as float32 stores it
    diff = (torch.tensor(1e6) - torch.tensor(1e-3)).item()         # the difference is taken in float32 too
    assert s["huge"].sigma == pytest.approx(diff / (1e6 + small), rel=1e-12) and s["huge"].sigma > 0.999999
    assert s["step"].sigma == pytest.approx(0.25 / 2.25, rel=1e-12)                       # e / (2 + e), e = 0.25
    assert s["step"].rel_l2 == pytest.approx(0.25, rel=1e-12)
    assert s["ortho"].sigma == 1.0 and s["ortho"].cosine == pytest.approx(0.0, abs=1e-12)
    assert s["step"].numel == 1000


def test_chunks_do_not_change_the_sums(tmp_path):
    a = {"w": torch.randn(513, 129).to(torch.bfloat16), "v": torch.randn(1000)}
    b = {k: (v.float() + 0.01 * torch.randn(v.shape)).to(v.dtype) for k, v in a.items()}
    whole, chunked = sums_of(tmp_path, a, b), sums_of(tmp_path, a, b, chunk=1000)
    for name in a:
        assert chunked[name].sigma == pytest.approx(whole[name].sigma, rel=1e-12)
        assert chunked[name].cosine == pytest.approx(whole[name].cosine, rel=1e-12)


@pytest.mark.gpu
@CUDA
def test_cuda_sums_equal_cpu_sums(make_triple):
    """float64 sums of the same float32 values: only the order of addition differs between devices."""
    from dataclasses import fields

    inst, base, tuned = make_triple("qwen3")
    on = {d: shadowmerge.similarity(base, inst, tuned=tuned, device=d, progress=False).pairs[0] for d in ("cpu", "cuda")}
    rows = {d: {r.name: r.sums for r in p.rows} for d, p in on.items()}
    assert rows["cpu"].keys() == rows["cuda"].keys()
    for name, want in rows["cpu"].items():
        for f in fields(want):
            assert getattr(rows["cuda"][name], f.name) == pytest.approx(getattr(want, f.name), rel=1e-12, abs=1e-300), \
                (name, f.name)


def official_script(base: Path, instruct: Path) -> tuple[float, float]:
    """An independent, straightforward rendering of the official script's rules (and the weighted sigma)."""
    a, b = state(base), state(instruct)
    sigmas, num, den = [], 0.0, 0.0
    for name in a:
        x, y = a[name].double(), b[name].double()
        if re.search(r"model\.layers\.(\d+)\.", name):
            sigmas.append(float((x - y).abs().sum() / (x.abs().sum() + y.abs().sum())))
        num += float((x - y).abs().sum())
        den += float(x.abs().sum() + y.abs().sum())
    return sum(sigmas) / len(sigmas), num / den


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("device", DEVICES)
def test_both_aggregations_match_independent_code(make_triple, family, device):
    inst, base, _ = make_triple(family)
    r = shadowmerge.similarity(base, inst, device=device, progress=False)
    (p,) = r.pairs
    official, weighted = official_script(base, inst)
    assert p.official == pytest.approx(official, rel=1e-9)
    assert p.weighted == pytest.approx(weighted, rel=1e-9)
    assert p.official_count == len([n for n in state(inst) if n.startswith("model.layers.")])
    # per module and per layer partition the tensors: their sums add up to the whole
    total = p.total()
    assert sum(s.abs_diff for s in p.per_module().values()) == pytest.approx(total.abs_diff, rel=1e-12)
    a, b = state(base), state(inst)
    layer1 = [n for n in a if n.startswith("model.layers.1.")]
    want = sum(float((a[n].double() - b[n].double()).abs().sum()) for n in layer1) / \
        sum(float(a[n].double().abs().sum() + b[n].double().abs().sum()) for n in layer1)
    assert p.per_layer()[1].sigma == pytest.approx(want, rel=1e-9)
    assert set(p.per_module()) >= {"q", "k", "v", "o", "gate", "up", "down", "norms", "embed"}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_report_files_plots_and_schema(make_triple, cli, tmp_path):
    import jsonschema

    inst, base, tuned = make_triple("llama")
    res = cli("similarity", "--base", base, "--instruct", inst, "--tuned", tuned, "--out", tmp_path / "rep",
              "--matrix", "model.layers.0.mlp.up_proj.weight", "-q")
    assert res.exit_code == 0, res.output
    assert "official σ (mean per tensor, model.layers.N.*)" in res.output and "weighted σ" in res.output
    rep = tmp_path / "rep"
    report = json.loads((rep / "report.json").read_text())
    schema = json.loads((Path(shadowmerge.__file__).parent / "analyzer" / "report.schema.json").read_text())
    jsonschema.validate(report, schema)
    (pair,) = report["pairs"]
    assert pair["verdict"]["level"] in ("ok", "caution") and pair["verdict"]["reasons"]
    assert len(pair["per_layer"]) == 2 and "update_cos" in pair["per_layer"][0]
    stems = ["sigma_per_pair", "01-instruct-sigma_per_layer", "01-instruct-layer_module_heatmap", "01-instruct-matrix",
             "01-instruct-diagnostics"]
    for stem in stems:
        w, h = _png_size(rep / f"{stem}.png")
        assert 300 <= w <= 4000 and 200 <= h <= 3000, (stem, w, h)
        assert ET.parse(rep / f"{stem}.svg").getroot().tag.endswith("svg")
    rows = list(csv.DictReader(open(rep / "tensors.csv")))
    assert len(rows) == len(state(inst)) and {"sigma", "update_cos", "module", "layer"} <= set(rows[0])
    page = (rep / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(stems)
    assert re.search(r"""(src|href)=["']?(https?:|//)""", page) is None      # self-contained: opens offline
    assert "Verdict" in (rep / "summary.md").read_text()


def test_many_pairs_one_figure(make_triple, cli, tmp_path):
    i1, b1, _ = make_triple("llama")
    i2, b2, _ = make_triple("qwen2")
    res = cli("similarity", "--pair", f"llama-tiny={b1},{i1}", "--pair", f"qwen-tiny={b2},{i2}", "--out",
              tmp_path / "rep", "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [p["name"] for p in report["pairs"]] == ["llama-tiny", "qwen-tiny"]
    assert report["figures"] == ["sigma_per_pair.png", "sigma_per_pair.svg"]
    assert ET.parse(tmp_path / "rep" / "sigma_per_pair.svg").getroot() is not None
    svg = (tmp_path / "rep" / "sigma_per_pair.svg").read_text()
    assert "llama-tiny" in svg and "qwen-tiny" in svg


def test_mismatched_pair_is_analysed_on_common_tensors_and_listed(make_triple, tmp_path):
    inst, _, _ = make_triple("llama", vocab_size=300)
    _, base, _ = make_triple("llama")
    r = shadowmerge.similarity(base, inst, out=tmp_path / "rep", progress=False)
    (p,) = r.pairs
    assert sorted(s.split(":")[0] for s in p.shape_differs) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert len(p.rows) == len(state(inst)) - 2
    assert p.verdict()["level"] != "ok" and "only the common tensors were compared" in p.verdict()["line"]
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(report["pairs"][0]["mismatched"]["shape_differs"]) == 2


def test_diagnostics_see_an_update_that_undoes_instruction_tuning(make_triple, tmp_path):
    inst, base, _ = make_triple("llama")
    a, b = state(base), state(inst)
    against = {n: (a[n].float() - 0.5 * (b[n].float() - a[n].float())).to(a[n].dtype) for n in a}
    along = {n: (a[n].float() + 0.5 * (b[n].float() - a[n].float())).to(a[n].dtype) for n in a}
    for name, tensors, sign in (("against", against, -1), ("along", along, 1)):
        t = tmp_path / name
        t.mkdir()
        (t / "config.json").write_bytes((base / "config.json").read_bytes())
        save_file(tensors, t / "model.safetensors")
        (p,) = shadowmerge.similarity(base, inst, tuned=t, progress=False).pairs
        assert sign * p.total().update_cos > 0.95       # -1 / +1 but for the bf16 rounding of T
        v = p.verdict()
        if sign < 0:
            assert v["level"] == "caution" and "points against instruction tuning" in v["line"]
        else:
            assert "does not undo instruction tuning" in v["line"]


@pytest.mark.parametrize("args, expect", [
    (["--pair", "nocomma=a"], "--pair 'nocomma=a': write NAME=BASE,INSTRUCT"),
    (["--base", "{base}"], "--base and --instruct go together"),
    ([], "nothing to compare"),
    (["--pair", "x={base},{inst}", "--pair", "x={base},{inst}"], "--pair name 'x' is used twice"),
    (["--pair", "x={base},{inst}", "--pair", "y={base},{inst}", "--tuned", "{base}"], "--tuned goes with one pair"),
    (["--base", "{base}", "--instruct", "{inst}", "--matrix", "nope.weight"], "--matrix nope.weight: no such tensor"),
    (["--base", "{base}", "--instruct", "{inst}", "--matrix", "model.norm.weight"], "pass a 2-D weight matrix"),
    (["--base", "{gpt2}", "--instruct", "{inst}"], "share no tensor of equal shape"),
    (["--base", "{base}", "--instruct", "{inst}", "--device", "meta"], "device 'meta' is not supported"),
    (["--base", "{base}", "--instruct", "{inst}", "--device", "cuda:x"], "unknown device 'cuda:x'"),
    (["--base", "{base}", "--instruct", "{inst}", "--matrix-size", "1"], "--matrix-size must be at least 2"),
])
def test_similarity_errors(make_triple, cli, tmp_path, args, expect):
    inst, base, _ = make_triple("llama")
    gpt2 = make_triple("gpt2")[1]
    args = [a.format(base=base, inst=inst, gpt2=gpt2) for a in args]
    run_bad(cli, tmp_path, [inst, base], *args, command=("similarity",), expect=expect)


def test_vision_tower_and_language_model_are_told_apart(tmp_path):
    """A multimodal layout: the official figure covers the language model's layers only."""
    names = ["model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.0.mlp.up_proj.weight",
             "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
             "model.multi_modal_projector.linear.weight", "model.language_model.embed_tokens.weight"]
    a = {n: torch.randn(8, 8) for n in names}
    b = {n: v + (0.5 if "vision" in n else 0.01) * torch.randn(8, 8) for n, v in a.items()}
    r = shadowmerge.similarity(folder_with(tmp_path / "a", a), folder_with(tmp_path / "b", b), progress=False)
    (p,) = r.pairs
    assert p.official_count == 2
    towers = p.towers()
    assert set(towers) == {"language", "vision"} and towers["vision"].sigma > 5 * towers["language"].sigma
    assert {row.name: row.tower for row in p.rows}["model.multi_modal_projector.linear.weight"] == "vision"
    assert list(p.per_layer()) == [0]
    # the towers never share a row of the per-module table
    modules = p.per_module()
    assert modules["q"].numel == 64 and modules["vision q"].numel == 64 and modules["vision other"].numel == 64
    assert sum(s.numel for s in modules.values()) == p.total().numel


MODULE_NAMES = {
    "model.layers.0.self_attn.qkv_proj.weight": "qkv",                      # Phi-3
    "transformer.h.0.self_attention.query_key_value.weight": "qkv",         # Falcon, BLOOM
    "transformer.h.0.attn.c_attn.weight": "qkv",                            # GPT-2
    "model.visual.blocks.0.attn.qkv.weight": "qkv",                         # Qwen2-VL vision tower
    "model.layers.0.mlp.gate_up_proj.weight": "gate_up",                    # Phi-3
    "model.layers.0.mlp.experts.gate_up_proj": "experts.gate_up",           # transformers 5 fused experts
    "model.layers.0.mlp.experts.down_proj": "experts.down",
    "model.layers.0.mlp.experts.gate_up_proj_bias": "experts.bias",         # GPT-OSS
    "model.layers.0.mlp.experts.down_proj_bias": "experts.bias",
    "model.layers.0.mlp.experts.3.gate_proj.weight": "experts.gate",        # Qwen3-MoE on the Hub
    "model.layers.0.mlp.experts.3.up_proj.weight": "experts.up",
    "model.layers.0.mlp.experts.3.down_proj.weight": "experts.down",
    "model.layers.0.block_sparse_moe.experts.7.w1.weight": "experts.gate",  # Mixtral on the Hub
    "model.layers.0.block_sparse_moe.experts.7.w3.weight": "experts.up",
    "model.layers.0.block_sparse_moe.experts.7.w2.weight": "experts.down",
    "model.layers.0.mlp.gate.weight": "router",                             # Qwen3-MoE
    "model.layers.0.block_sparse_moe.gate.weight": "router",                # Mixtral
    "model.layers.0.mlp.router.weight": "router",                           # GPT-OSS
    "model.layers.0.mlp.router.bias": "router",
    "model.layers.0.mlp.gate.e_score_correction_bias": "router",            # DeepSeek-V3
    "model.layers.0.mlp.shared_expert_gate.weight": "router",               # Qwen2-MoE
    "model.layers.0.mlp.shared_expert.gate_proj.weight": "gate",            # a shared expert is a dense MLP
    "model.layers.0.mlp.gate_proj.weight": "gate",
    "model.layers.0.self_attn.v_proj.weight": "v",
    "model.layers.0.mlp.up_proj.weight": "up",
}


@pytest.mark.parametrize("name", sorted(MODULE_NAMES))
def test_fused_expert_and_router_tensors_are_their_own_module_types(name):
    from shadowmerge.analyzer.aggregate import MODULES, module_of

    assert module_of(name) == MODULE_NAMES[name] and module_of(name) in MODULES


@pytest.mark.parametrize("model_type, extra", [
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                       head_dim=16)),
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, layer_types=["full_attention"] * 2)),
])
def test_real_moe_checkpoints_classify_every_expert_and_router_tensor(tmp_path, model_type, extra):
    """Tiny MoE models saved by transformers itself: no expert or router tensor is counted as a dense type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinymodels import perturb

    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                               max_position_embeddings=64, **extra)
    folders = []
    for k in range(2):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        if k:
            perturb(model, 0.02, 1)
        model.save_pretrained(tmp_path / f"m{k}")
        folders.append(tmp_path / f"m{k}")
    (p,) = shadowmerge.similarity(*folders, progress=False).pairs
    kinds = {r.name: r.module for r in p.rows}
    experts = [n for n in kinds if ".experts." in n]
    routers = [n for n in kinds if n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "router.weight",
                                               "router.bias"))]
    assert experts and routers, sorted(kinds)
    assert all(kinds[n].startswith("experts.") for n in experts), {n: kinds[n] for n in experts}
    assert all(kinds[n] == "router" for n in routers)
    dense = {"q", "k", "v", "o", "gate", "up", "down", "gate_up", "qkv"}
    assert not [n for n in experts + routers if kinds[n] in dense]
    modules = p.per_module()
    assert sum(s.numel for s in modules.values()) == p.total().numel


@pytest.mark.parametrize("family", ["gemma3", "mllama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_real_vision_language_checkpoints_keep_the_towers_apart(tmp_path, family):
    """Tiny VLMs saved by transformers itself: the official figure is the language model's layers, and every
    vision tensor (tower and projector) is in rows of its own."""
    import tinymodels as tm

    inst, base = tm.vlm_triple(tmp_path, family)
    (p,) = shadowmerge.similarity(base, inst, progress=False).pairs
    towers = {r.name: r.tower for r in p.rows}
    vision = [n for n, t in towers.items() if t == "vision"]
    language = [n for n, t in towers.items() if t == "language"]
    assert vision and language and len(vision) + len(language) == len(towers)
    assert all(any(k in n for k in ("vision", "visual", "multi_modal_projector")) for n in vision), vision
    from shadowmerge.analyzer.aggregate import OFFICIAL

    official = [n for n in towers if OFFICIAL.search(n)]
    assert all(towers[n] == "language" for n in official)
    # the official pattern (model.layers.N.) also matches model.language_model.layers.N (Qwen3-VL), by substring
    assert official and p.official_count == len(official)
    assert p.per_layer() and set(p.per_layer()) == {0, 1}
    modules = p.per_module()
    assert any(m.startswith("vision ") for m in modules) and {"q", "k", "v", "o"} <= set(modules)
    assert sum(s.numel for s in modules.values()) == p.total().numel


@pytest.mark.parametrize("lora", [dict(r=4, lora_alpha=8, target_modules="all-linear"),
                                  dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)],
                         ids=["lora", "dora"])
def test_tuned_can_be_a_lora_adapter(make_triple, cli, tmp_path, lora):
    """The update is computed on the fly from the adapter: the same diagnostics as with the merged model."""
    from adapters import make_adapter, peft_merged

    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_bytes((base / "config.json").read_bytes())
    save_file({k: v.contiguous() for k, v in peft_merged(base, adapter).items()}, merged / "model.safetensors")
    (on_the_fly,) = shadowmerge.similarity(base, inst, tuned=adapter, progress=False).pairs
    (by_merge,) = shadowmerge.similarity(base, inst, tuned=merged, progress=False).pairs
    want = {r.name: r.sums for r in by_merge.rows}
    moved = 0
    for r in on_the_fly.rows:
        w = want[r.name]
        assert r.sums.sq_update == pytest.approx(w.sq_update, rel=1e-5, abs=1e-12), r.name
        assert r.sums.dot_update == pytest.approx(w.dot_update, rel=1e-4, abs=1e-9), r.name
        moved += r.sums.sq_update > 0
    assert moved and on_the_fly.total().update_rel == pytest.approx(by_merge.total().update_rel, rel=1e-5)
    assert on_the_fly.verdict()["line"] == by_merge.verdict()["line"]
    res = cli("similarity", "--base", base, "--instruct", inst, "--tuned", adapter, "--out", tmp_path / "rep", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["pairs"][0]["tuned"].endswith(str(adapter))


def test_tuned_adapter_of_another_model_is_one_line(make_triple, cli, tmp_path):
    from adapters import make_adapter

    inst, base, _ = make_triple("llama")
    gpt2 = make_triple("gpt2")[1]
    adapter = make_adapter(gpt2, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn"],
                           fan_in_fan_out=True)
    err = run_bad(cli, tmp_path, [inst, base, adapter], "--base", base, "--instruct", inst, "--tuned", adapter,
                  command=("similarity",), expect="none of its 2 target(s) is in the base")
    assert err.startswith(f"error: --tuned {adapter}") and "pass the Base it was trained on" in err


def test_report_reads_like_a_figure_page(make_triple, cli, tmp_path):
    """Issue 12, part 5: the page names version, date and command; one letter convention (B, I, T); values with
    the digits that tell rows apart; short labels, never absolute paths, in headings."""
    from shadowmerge import __version__

    inst, base, tuned = make_triple("llama")
    res = cli("similarity", "--base", base, "--instruct", inst, "--tuned", tuned, "--out", tmp_path / "rep", "-q")
    assert res.exit_code == 0, res.output
    rep = tmp_path / "rep"
    report = json.loads((rep / "report.json").read_text())
    assert report["command"].startswith("shadowmerge similarity --base ") and report["version"] == __version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", report["created"])
    page, md = (rep / "report.html").read_text(), (rep / "summary.md").read_text()
    assert f"shadowmerge {__version__}, {report['created']}: <code>shadowmerge similarity" in page
    assert f"shadowmerge {__version__}, {report['created']}: `shadowmerge similarity" in md
    assert "<h2>instruct</h2>" in page and "## instruct\n" in md
    text = " ".join(report["definitions"].values())
    assert "B = Base, I = Instruct, T = the tuned Base" in text and "A-B" not in text and "T-A" not in text
    # every layer's σ printed as a distinct value (the first cut printed 0.0049 for all)
    layers = [r for r in md.split("### Per layer (weighted)")[1].split("###")[0].splitlines() if r.startswith("| ") and
              r[2].isdigit()]
    sigmas = [r.split("|")[2].strip() for r in layers]
    assert len(layers) == 2 and len(set(sigmas)) == len({x["sigma"] for x in report["pairs"][0]["per_layer"]})
    assert "overflow-x:auto" in page and "name='viewport'" in page


@pytest.mark.parametrize("values, expect", [
    ([0.0049123, 0.0049456, 0.0049127], ["0.004912", "0.004946", "0.004913"]),
    ([0.99991234, 0.99993, 1.0], ["0.99991", "0.99993", "1"]),
    ([0.012345678, 0.5], ["0.0123", "0.5"]),
])
def test_table_digits_tell_values_apart(values, expect):
    from shadowmerge.analyzer.report import _table

    assert [row[0] for row in _table(["v"], [[v] for v in values])[1:]] == expect


@pytest.mark.parametrize("ref, label", [
    ("Qwen/Qwen3-4B", "Qwen/Qwen3-4B"),
    ("/home/u/.cache/huggingface/hub/models--Qwen--Qwen3-4B-Base/snapshots/0123abc", "Qwen/Qwen3-4B-Base"),
    ("/data/models/llama-3.1-8b-instruct/", "llama-3.1-8b-instruct"),
    ("./runs/shadow", "shadow"),
])
def test_short_labels_never_show_absolute_paths(ref, label):
    from shadowmerge.analyzer.plots import short_label

    assert short_label(ref) == label


@pytest.mark.skipif(__import__("shutil").which("chromium") is None,
                    reason="needs a headless browser: apt install chromium (Debian's package)")
def test_report_renders_headless_without_widening_the_page(make_triple, cli, tmp_path):
    """report.html in headless Chromium at a phone's width and a desktop's: the page never scrolls sideways
    (wide tables scroll inside their box). The screenshots are left in tmp_path to look at."""
    import subprocess

    inst, base, tuned = make_triple("llama")
    assert cli("similarity", "--base", base, "--instruct", inst, "--tuned", tuned, "--out", tmp_path / "rep",
               "-q").exit_code == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    probe = tmp_path / "rep" / "probe.html"
    probe.write_text(page.replace("</body>", "<script>document.body.dataset.overflow = String("
                                              "document.documentElement.scrollWidth > window.innerWidth)</script></body>"))
    chrome = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    for width in (390, 1200):
        dom = subprocess.run([*chrome, f"--window-size={width},2400", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
        assert 'data-overflow="false"' in dom, width
        shot = tmp_path / f"report-{width}.png"
        subprocess.run([*chrome, f"--window-size={width},2400", f"--screenshot={shot}", probe.as_uri()],
                       capture_output=True, timeout=120)
        assert shot.stat().st_size > 10_000
