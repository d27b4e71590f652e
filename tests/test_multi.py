"""Several updates onto one Instruct (graft with --tuned/--lora repeated, --combine): against the float32 formula,
mergekit's own TIES functions, peft's merge of each adapter, and the documented tie rule; DARE reproducible and
unbiased; the radix select exact on pieces smaller than a row; bad input one line, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tinymodels
from adapters import make_adapter
from shadowmerge import graft
from shadowmerge.errors import ShadowMergeError
from shadowmerge.multi import dare_keep
from shadowmerge.select import top_k

F32 = torch.float32


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Instruct, Base and three fine-tunes of the Base, float32 (no magnitudes tie) and bf16 (thousands do)."""
    out = {}
    for dtype in (F32, torch.bfloat16):
        root = tmp_path_factory.mktemp(f"multi-{str(dtype)[6:]}")
        i, b, t = tinymodels.triple(root, "llama", dtype, "100KB")
        extra = []
        for seed in (5, 6):
            m = tinymodels.perturb(tinymodels.build("llama", 0), 0.02, 1)
            extra.append(tinymodels.save(tinymodels.perturb(m, 0.01, seed), root / f"tuned{seed}", dtype,
                                         shard="100KB"))
        out[dtype] = {"instruct": i, "base": b, "tuned": [t, *extra]}
    return out


def _float(folder):
    return {k: v.float() for k, v in tinymodels.state(folder).items()}


def _delta(fam, k):
    b, t = _float(fam["base"]), _float(fam["tuned"][k])
    return {n: t[n] - b[n] for n in b}


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_sum_is_the_float32_formula_bit_for_bit(family, tmp_path, dtype):
    fam = family[dtype]
    out = tmp_path / "out"
    graft(fam["instruct"], fam["base"], tuple(fam["tuned"][:3]), out, weights="0.5,-1.25,2", alpha=0.75,
          progress=False)
    inst, got = _float(fam["instruct"]), tinymodels.state(out)
    d = [_delta(fam, k) for k in range(3)]
    for name, x in inst.items():
        if name not in got:
            continue
        acc = d[0][name] * 0.5
        acc = acc.add_(d[1][name] * -1.25).add_(d[2][name] * 2.0)
        want = (acc.mul_(0.75) + x).to(dtype)
        assert torch.equal(got[name], want), name
    rec = json.loads((out / "shadowmerge.json").read_text())
    assert rec["combine"]["method"] == "sum" and rec["combine"]["weights"] == [0.5, -1.25, 2.0]
    assert len(rec["updates"]) == 3 and rec["delta"] == "multi"


def _mergekit_ties(deltas, weights, density):
    """mergekit's own functions on the same deltas: sparsify.magnitude, then merge_group's arithmetic, get_mask."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import magnitude

    stacked = torch.stack([magnitude(d, density) for d in deltas])
    w = torch.tensor(weights, dtype=stacked.dtype)
    while stacked.dim() > w.dim():
        w.unsqueeze_(-1)
    stacked.mul_(w)
    mask = get_mask(stacked, method="sum", mask_dtype=stacked.dtype)
    mixed = (stacked * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed / divisor


def _ties_at_threshold(d: torch.Tensor, density: float) -> bool:
    k = max(1, int(density * d.numel()))
    mags = d.abs().flatten().sort(descending=True).values
    return k < d.numel() and bool(mags[k - 1] == mags[k])


def test_ties_equals_mergekit_away_from_threshold_ties(family, tmp_path):
    fam = family[F32]
    out = tmp_path / "out"
    graft(fam["instruct"], fam["base"], tuple(fam["tuned"][:2]), out, combine="ties", density=0.3, weights="1,0.7",
          progress=False)
    inst, got = _float(fam["instruct"]), tinymodels.state(out)
    d = [_delta(fam, k) for k in range(2)]
    compared = 0
    for name, x in inst.items():
        if name not in got or any(_ties_at_threshold(dk[name], 0.3) for dk in d):
            continue
        want = (x + _mergekit_ties([d[0][name], d[1][name]], [1.0, 0.7], 0.3)).to(F32)
        assert torch.equal(got[name], want), name
        compared += 1
    assert compared >= 15


def _stable_top(d: torch.Tensor, density: float) -> torch.Tensor:
    """The documented rule: exactly k largest magnitudes, ties at the threshold to the lower flat index."""
    flat = d.flatten()
    k = max(1, int(density * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return torch.where(mask, flat, torch.zeros(())).reshape(d.shape)


def test_ties_on_bf16_follows_the_documented_tie_rule(family, tmp_path):
    fam = family[torch.bfloat16]
    d = [_delta(fam, k) for k in range(2)]
    tied = [n for n in d[0] if _ties_at_threshold(d[0][n], 0.5)]
    assert tied, "a bf16 model's deltas should tie at the threshold"
    out = tmp_path / "out"
    graft(fam["instruct"], fam["base"], tuple(fam["tuned"][:2]), out, combine="ties", density=0.5, progress=False)
    inst, got = _float(fam["instruct"]), tinymodels.state(out)
    for name in tied[:4]:
        t = [_stable_top(dk[name], 0.5) for dk in d]
        total = t[0] + t[1]
        sign = torch.where(total >= 0, 1.0, -1.0)
        m = [(torch.sign(x) == sign).float() for x in t]
        mixed = t[0] * m[0] + t[1] * m[1]
        div = m[0] + m[1]
        div[div == 0] = 1
        assert torch.equal(got[name], (inst[name] + mixed / div).to(torch.bfloat16)), name


@pytest.mark.parametrize("piece", [7, 64, 1000])
def test_radix_select_is_exact_on_any_pieces(piece):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g).to(torch.bfloat16).float()     # many equal magnitudes
    for density in (0.01, 0.3, 0.77, 1.0):
        k = max(1, int(density * x.numel()))

        def pieces():
            for a in range(0, x.numel(), piece):
                yield a, x[a:a + piece]

        cut = top_k(pieces, x.numel(), k)
        mask = torch.cat([cut.mask(x[a:a + piece], a) for a in range(0, x.numel(), piece)])
        assert int(mask.sum()) == k
        assert torch.equal(torch.where(mask, x, torch.zeros(())), _stable_top(x, density))


def test_dare_is_reproducible_drops_its_share_and_keeps_the_expectation(family, tmp_path):
    a = dare_keep(7, 1, "model.layers.0.mlp.up_proj.weight", 0, 200_000, 0.3, "cpu")
    pieces = torch.cat([dare_keep(7, 1, "model.layers.0.mlp.up_proj.weight", e, min(1234, 200_000 - e), 0.3, "cpu")
                        for e in range(0, 200_000, 1234)])
    assert torch.equal(a, pieces), "the draw depends on the piece size"
    share = float(a.float().mean())
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / 200_000) ** 0.5           # 4 standard deviations
    assert not torch.equal(a, dare_keep(8, 1, "model.layers.0.mlp.up_proj.weight", 0, 200_000, 0.3, "cpu"))
    assert not torch.equal(a, dare_keep(7, 2, "model.layers.0.mlp.up_proj.weight", 0, 200_000, 0.3, "cpu"))
    fam = family[F32]
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = tmp_path / f"out{threads}"
        graft(fam["instruct"], fam["base"], tuple(fam["tuned"][:2]), out, combine="dare_linear", density=0.4,
              seed=11, progress=False)
        outs.append(tinymodels.state(out))
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]), name
    # the expectation: over many seeds, the mean of the dropped-and-rescaled update approaches the update
    d = _delta(fam, 0)["model.layers.0.mlp.up_proj.weight"].flatten()
    mean = sum(torch.where(dare_keep(s, 0, "x", 0, d.numel(), 0.4, "cpu"), d / 0.4, torch.zeros(()))
               for s in range(400)) / 400
    assert float((mean - d).norm() / d.norm()) < 0.15


def test_adapters_and_full_fine_tunes_together_match_peft(family, tmp_path):
    """A full fine-tune and three adapters (plain, rsLoRA with a negative weight, DoRA, which needs the Base) summed:
    each adapter's part is peft's own merge of it alone (merge_and_unload on the Base, minus the Base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fam = family[F32]
    a1 = make_adapter(fam["base"], tmp_path / "a1", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1)
    a2 = make_adapter(fam["base"], tmp_path / "a2", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                      use_rslora=True, seed=2)
    a3 = make_adapter(fam["base"], tmp_path / "a3", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                      use_dora=True, seed=3)
    out = tmp_path / "out"
    graft(fam["instruct"], fam["base"], fam["tuned"][0], out, lora=(str(a1), str(a2), str(a3)),
          weights="1,0.5,-2,1.5", progress=False)
    base = _float(fam["base"])
    parts = []
    for a in (a1, a2, a3):
        m = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=F32)
        merged = PeftModel.from_pretrained(m, a).merge_and_unload().state_dict()
        parts.append({n: merged[n].float() - base[n] for n in base if n in merged})
    full = _delta(fam, 0)
    inst, got = _float(fam["instruct"]), tinymodels.state(out)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight"):
        zero = torch.zeros_like(full[name])
        want = inst[name] + (full[name] * 1.0 + parts[0].get(name, zero) * 0.5 + parts[1].get(name, zero) * -2.0
                             + parts[2].get(name, zero) * 1.5)
        assert torch.allclose(got[name], want, rtol=0, atol=2e-6), name


@pytest.mark.parametrize("extra, expect", [
    (dict(weights="1,2,3"), "--weights gives 3 weight(s) for 2 update(s)"),
    (dict(weights="1,x"), "one finite number per update"),
    (dict(combine="ties", density=0.0), "--density in (0, 1]"),
    (dict(combine="ties", density=1.5), "--density in (0, 1]"),
    (dict(combine="ties"), "--density in (0, 1]"),
    (dict(density=0.5), "--density goes with --combine ties"),
])
def test_bad_settings_are_one_line_and_write_nothing(family, tmp_path, extra, expect):
    fam = family[F32]
    with pytest.raises(ShadowMergeError, match=expect.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        graft(fam["instruct"], fam["base"], tuple(fam["tuned"][:2]), tmp_path / "out", progress=False, **extra)
    assert not (tmp_path / "out").exists()


def test_an_update_of_another_architecture_is_refused(family, tmp_path):
    fam = family[F32]
    other = tinymodels.save(tinymodels.build("qwen2", 0), tmp_path / "qwen")
    with pytest.raises(ShadowMergeError):
        graft(fam["instruct"], fam["base"], (str(fam["tuned"][0]), str(other)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_and_verify(family, tmp_path, cli):
    fam = family[torch.bfloat16]
    args = ["graft", "--instruct", fam["instruct"], "--base", fam["base"], "--tuned", fam["tuned"][0], "--tuned",
            fam["tuned"][1], "--combine", "dare_ties", "--density", "0.5", "--seed", "3", "--out", tmp_path / "out",
            "-q"]
    res = cli(*args, "--dry-run")
    assert res.exit_code == 0, res.stderr
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    res = cli("verify", tmp_path / "out", "--recompute", "-q")
    assert res.exit_code == 0 and "bit-identical" in res.stdout, res.stdout + res.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "update 2" in card and "dare_ties" in card


def test_interference_tells_aligned_opposed_and_independent_updates_apart(family, tmp_path, cli):
    """similarity --base B --tuned T1 --tuned T2 ...: an update against itself scaled (cos +1, no conflicts), against
    its negation (cos -1, every sign in conflict), against an independent one (cos near 0, about half); an adapter
    is an update too."""
    import jsonschema
    from safetensors.torch import save_file

    fam = family[F32]
    b, t = tinymodels.state(fam["base"]), tinymodels.state(fam["tuned"][0])
    for name, scale in (("twice", 2.0), ("negated", -1.0)):
        folder = tmp_path / name
        folder.mkdir()
        save_file({n: b[n] + scale * (t[n] - b[n]) for n in b}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        (folder / "config.json").write_text((fam["base"] / "config.json").read_text())
    adapter = make_adapter(fam["base"], tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"], seed=4)
    res = cli("similarity", "--base", fam["base"], "--tuned", fam["tuned"][0], "--tuned", tmp_path / "twice",
              "--tuned", tmp_path / "negated", "--tuned", fam["tuned"][1], "--tuned", adapter, "--out",
              tmp_path / "rep", "-q")
    assert res.exit_code == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    by = {(p["a"], p["b"]): p for p in report["interference"]["pairs"]}
    first = fam["tuned"][0].name
    assert by[(first, "twice")]["cosine"] > 0.999 and by[(first, "twice")]["sign_conflicts"] < 0.001
    assert "same way" in by[(first, "twice")]["verdict"]
    assert by[(first, "negated")]["cosine"] < -0.999 and by[(first, "negated")]["sign_conflicts"] > 0.999
    assert "oppose" in by[(first, "negated")]["verdict"]
    other = by[(first, fam["tuned"][1].name)]
    assert abs(other["cosine"]) < 0.3 and 0.3 < other["sign_conflicts"] < 0.7
    assert len(report["interference"]["pairs"]) == 10 and "interference.png" in report["figures"]
    schema = json.loads((Path(__file__).parents[1] / "shadowmerge/analyzer/report.schema.json").read_text())
    jsonschema.validate(report, schema)
    assert "Interference between the updates" in (tmp_path / "rep" / "summary.md").read_text()
    assert cli("verify", tmp_path / "rep").exit_code == 0
    res = cli("similarity", "--tuned", fam["tuned"][0], "--tuned", fam["tuned"][1], "-q")
    assert res.exit_code == 1 and "several --tuned need --base" in res.stderr


@pytest.mark.parametrize("combine, extra", [("sum", {}), ("ties", {"density": 0.4}),
                                            ("dare_ties", {"density": 0.5, "seed": 9})])
def test_mergekit_yaml_equals_the_cli_bit_for_bit(family, tmp_path, combine, extra):
    """shadow_graft with several `role: tuned` models (weights) and `combine`, run by mergekit itself, writes the
    same tensors as graft --tuned ... --tuned ... --combine; verify --recompute rebuilds it from the record."""
    import yaml

    from shadowmerge.mergekit_run import run as run_mergekit
    from shadowmerge.verify import verify

    fam = family[F32]
    cfg = {"merge_method": "shadow_graft", "base_model": str(fam["base"]), "dtype": "float32",
           "parameters": {"combine": combine, **extra},
           "models": [{"model": str(fam["instruct"]), "parameters": {"role": "instruct"}},
                      {"model": str(fam["tuned"][0]), "parameters": {"role": "tuned", "weight": 0.8}},
                      {"model": str(fam["tuned"][1]), "parameters": {"role": "tuned", "weight": 1.3}}]}
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    run_mergekit(path, tmp_path / "yaml")
    graft(fam["instruct"], fam["base"], tuple(fam["tuned"][:2]), tmp_path / "cli", weights="0.8,1.3",
          combine=combine, density=extra.get("density"), seed=extra.get("seed", 0), progress=False)
    a, b = tinymodels.state(tmp_path / "yaml"), tinymodels.state(tmp_path / "cli")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert verify(tmp_path / "yaml", recompute=True, progress=False)


def test_eval_sweeps_a_graft_of_several_updates(family, tmp_path, cli):
    """eval --instruct I --base B --tuned T1 --tuned T2 --combine ties --density D --alpha ...: each swept model is the
    graft of both updates (held-out loss, paired), recorded with how they were combined."""
    import shutil

    fam = family[F32]
    inst = tmp_path / "instruct"
    shutil.copytree(fam["instruct"], inst)
    tinymodels.chat_tokenizer(inst, "instruct")
    rows = tmp_path / "heldout.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "what is the capital of france"},
                                                     {"role": "assistant", "content": "paris"}]}) + "\n"
                            for _ in range(6)))
    res = cli("eval", "--instruct", inst, "--base", fam["base"], "--tuned", fam["tuned"][0], "--tuned",
              fam["tuned"][1], "--combine", "ties", "--density", "0.5", "--alpha", "0.5,1", "--heldout", rows,
              "--device", "cpu", "--out", tmp_path / "e", "-q")
    assert res.exit_code == 0, res.stdout + res.stderr
    record = json.loads((tmp_path / "e" / "eval.json").read_text())
    swept = [m for m in record["models"] if m.get("alpha") is not None] if isinstance(record["models"], list) else \
        [m for m in record["models"].values() if m.get("alpha") is not None]
    assert len(swept) == 2 and all(m["combine"]["combine"] == "ties" and len(m["tuned"]) == 2 for m in swept)
    res = cli("eval", "a=x", "b=y", "--weights", "1,2", "--heldout", rows, "--out", tmp_path / "f", "-q")
    assert res.exit_code == 1 and "--weights" in res.stderr
