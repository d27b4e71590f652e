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


# --- the pieces the engine runs: the select's passes, the in-place masks and combination, the DARE hash ----------

def _pieces_of(x: torch.Tensor, size: int):
    def pieces():
        for a in range(0, x.numel(), size):
            yield a, x[a:a + size]
    return pieces


@pytest.mark.parametrize("case", ["unrepresentative first piece", "float32 ties", "bf16 ties", "zeros"])
def test_select_is_exact_when_its_first_guess_misses_and_at_every_kind_of_tie(case):
    """The first piece guesses the threshold's bin; a first piece unlike the rest makes it miss (a second pass), a
    float32 key with low bits makes the tie walk the pieces, bf16 deltas put it at a bin's first pattern (one piece
    read again), many exact zeros put it at 0. Each is the documented rule exactly, on pieces of several sizes."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20_000, generator=g)
    if case == "unrepresentative first piece":
        x[:3000] *= 1e-3
    elif case == "float32 ties":
        x[::3] = 0.123456789                      # thousands equal to one float32 magnitude with low bits
    elif case == "bf16 ties":
        x = x.to(torch.bfloat16).float()
    else:
        x[::2] = 0.0
        x[1::4] = -0.0
    for size in (999, 3000, 20_000):
        for density in (0.05, 0.4, 0.7, 0.95):
            k = max(1, int(density * x.numel()))
            cut = top_k(_pieces_of(x, size), x.numel(), k)
            mask = torch.cat([cut.mask(x[a:a + size], a) for a in range(0, x.numel(), size)])
            assert int(mask.sum()) == k, (size, density)
            assert torch.equal(torch.where(mask, x, torch.zeros(())), _stable_top(x, density)), (size, density)


def test_select_of_several_updates_at_once_equals_each_alone():
    from shadowmerge.select import top_k_many

    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(10_000, generator=g).to(torch.bfloat16).float() * s for s in (1.0, 3.0, 1e-4)]
    ks = [100, 5000, 9999]

    def pieces(which, start=0):
        for a in range(0, 10_000, 1500):
            if a >= start:
                yield a, (xs[j][a:a + 1500].clone() for j in which)

    together = top_k_many(pieces, 10_000, ks)
    for x, k, cut in zip(xs, ks, together):
        assert cut == top_k(_pieces_of(x, 1500), 10_000, k)


def test_cut_applied_in_place_is_where_of_its_mask():
    """Cut.apply_ (an int32 mask and-ed into the bit patterns) keeps exactly what torch.where(mask, x, 0) keeps, bit
    for bit: -0.0, NaN, ±inf, ties before and after the cut's index, and a piece starting past it."""
    from shadowmerge.select import Cut

    x = torch.tensor([0.5, -0.5, 0.25, -0.0, float("nan"), float("inf"), -float("inf"), 0.5, -0.5, 1e-40, 0.0, 2.0])
    key = int(torch.tensor(0.5).view(torch.int32))
    for cut in (Cut(key, 100 + 1, 5), Cut(key, 100 + 8, 5), Cut(key, 100 + 12, 5), Cut(0, 100 + 3, 9), Cut(-1, 0, 0)):
        for e0 in (100, 100 + 4):
            piece = x[e0 - 100:]
            want = torch.where(cut.mask(piece, e0), piece, torch.zeros(()))
            got = cut.apply_(piece.clone(), e0, torch.empty(piece.numel(), dtype=torch.int32))
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (cut, e0)


def _dare_reference(seed: int, k: int, name: str, index: int, density: float) -> bool:
    """DARE's draw for one flat index, in Python's unbounded integers (what the int32 arithmetic must equal)."""
    from shadowmerge.multi import _key

    m31 = (1 << 31) - 1

    def mix(x):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & m31
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & m31
        return x ^ (x >> 16)

    key = _key(seed, k, name)
    x = mix((index & m31) ^ key)
    x = mix(x ^ ((index >> 31) & m31) ^ (key >> 7))
    return x < int(density * (1 << 31))


def test_dare_draw_is_the_integer_hash_across_the_2_31_boundary():
    """torch's int32 products wrap modulo 2^32; the draw equals the hash in unbounded integers, for indices below,
    across and far above 2^31 (tensors of more than 2^31 elements), in pieces of any size."""
    for e0, n in ((0, 3000), ((1 << 31) - 1500, 3000), (5 * (1 << 31) + 7, 2000)):
        got = dare_keep(4, 2, "model.layers.3.mlp.experts.down_proj", e0, n, 0.37, "cpu")
        want = torch.tensor([_dare_reference(4, 2, "model.layers.3.mlp.experts.down_proj", e0 + i, 0.37)
                             for i in range(n)])
        assert torch.equal(got, want), e0
        halves = torch.cat([dare_keep(4, 2, "model.layers.3.mlp.experts.down_proj", e0 + a, min(777, n - a), 0.37,
                                      "cpu") for a in range(0, n, 777)])
        assert torch.equal(halves, want)
    assert bool(dare_keep(1, 0, "x", 0, 100, 1.0, "cpu").all())


def _combined_reference(terms, method):
    """The combination as mergekit's functions write it (torch.where / sign / == / .float()), on whole pieces."""
    weighted = [d * w for w, d in terms]
    if method in ("sum", "dare_linear"):
        acc = weighted[0].clone()
        for wd in weighted[1:]:
            acc.add_(wd)
        return acc
    total = weighted[0].clone()
    for wd in weighted[1:]:
        total.add_(wd)
    sign = torch.where(total >= 0, 1.0, -1.0)
    mixed = divisor = None
    for (w, _), wd in zip(terms, weighted):
        m = (torch.sign(wd) == sign).float()
        mixed = wd * m if mixed is None else mixed.add_(wd * m)
        divisor = m * w if divisor is None else divisor.add_(m * w)
    if method == "ties":
        divisor[divisor == 0] = 1
        mixed.div_(divisor)
    return mixed


@pytest.mark.parametrize("method", ["sum", "ties", "dare_ties", "dare_linear"])
def test_combination_in_place_is_the_formula_bit_for_bit(method):
    """combine_into (in place, in reused buffers) against the formula written plainly, bit for bit: exact zeros of
    both signs, terms that cancel, negative and unit weights, one to four updates."""
    from types import SimpleNamespace

    from shadowmerge.multi import Scratch, combine_into, shaped_
    from shadowmerge.select import top_k

    g = torch.Generator().manual_seed(7)
    for count in (1, 2, 3, 4):
        deltas = [torch.randn(4096, generator=g).to(torch.bfloat16).float() for _ in range(count)]
        for d in deltas:
            d[::5] = 0.0
            d[1::7] = -0.0
        if count > 1:
            deltas[1][::3] = -deltas[0][::3]                  # cancels exactly
        weights = [1.0, -0.5, 2.0, 1.0][:count]
        how = SimpleNamespace(combine=method, density=0.6, seed=3, weights=weights)
        cuts = [top_k(_pieces_of(d, 4096), 4096, max(1, int(0.6 * 4096))) for d in deltas]
        shaped = []
        for k, d in enumerate(deltas):
            if method == "ties":
                s = torch.where(cuts[k].mask(d, 0), d, torch.zeros(()))
            elif method.startswith("dare"):
                s = torch.where(dare_keep(3, k, "t", 0, 4096, 0.6, "cpu"), d / 0.6, torch.zeros(()))
            else:
                s = d
            shaped.append((weights[k], s))
        want = _combined_reference(shaped, method)
        work = Scratch(torch.device("cpu"), torch.float32)

        def term(k, into):
            return shaped_(into.copy_(deltas[k]), how, k, "t", 0, cuts[k], work)

        got = combine_into(torch.empty(4096), list(range(count)), term, method, weights, work)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (method, count)


def test_pieces_shrink_with_the_updates_to_keep_the_one_update_budget():
    """The engine's buffers for K updates (its 6 slots of raw bytes, 3 workers' float32 buffers) stay within the
    one-update graft's at 4 Mi elements, for every method, with and without adapters, up to MAX_UPDATES."""
    from shadowmerge.chunks import CHUNK_ELEMENTS
    from shadowmerge.multi import COMBINE, MAX_UPDATES, _piece_elements

    budget = (6 * 4 * 2 + 3 * 4 * 4) * CHUNK_ELEMENTS
    for method in COMBINE:
        for lora in (False, True):
            last = CHUNK_ELEMENTS
            for k in range(2, MAX_UPDATES + 1):
                n = _piece_elements(k, method, lora)
                floats = 4 + (k + 3 if method == "ties" else k + 2 if method == "dare_ties" else 1) + (method != "sum") \
                    + 2 * lora
                assert (6 * (3 + k) * 2 + 3 * floats * 4) * n <= budget and 0 < n <= last, (method, lora, k)
                last = n


def test_small_pieces_give_the_same_bits(family, tmp_path, monkeypatch):
    """The engine's pieces and the threshold passes' pieces cut smaller than a row (first-piece guesses that miss,
    ties found in a later piece): the same output as the default pieces, for ties and dare_ties on bf16."""
    import shadowmerge.multi as multi

    fam = family[torch.bfloat16]
    outs = {}
    for label in ("default", "small"):
        if label == "small":
            monkeypatch.setattr(multi, "PASS_ELEMENTS", 777)
            monkeypatch.setattr(multi.MultiDelta, "chunk_elements", property(lambda self: 1000))
        for combine in ("ties", "dare_ties"):
            out = tmp_path / f"{label}-{combine}"
            graft(fam["instruct"], fam["base"], tuple(fam["tuned"]), out, combine=combine, density=0.3, seed=2,
                  weights="1,-0.5,2", progress=False)
            outs[(label, combine)] = tinymodels.state(out)
    for combine in ("ties", "dare_ties"):
        a, b = outs[("default", combine)], outs[("small", combine)]
        for name in a:
            assert torch.equal(a[name], b[name]), (combine, name)


def test_a_failure_in_the_threshold_passes_is_one_line_and_writes_nothing(family, tmp_path, monkeypatch):
    """The TIES passes run ahead on threads of their own: an error there reaches the user as the graft's one line,
    nothing is written, and no thread is left behind."""
    import threading
    import time

    import shadowmerge.multi as multi

    fam = family[F32]
    real, calls = multi.MultiDelta.find_cuts, []

    def failing(self, entry, bufs=None, stop=None):
        calls.append(entry.name)
        if len(calls) == 5:
            raise ShadowMergeError(f"cannot read {entry.name}: the file changed under us; run again")
        return real(self, entry, bufs, stop)

    monkeypatch.setattr(multi.MultiDelta, "find_cuts", failing)
    before = threading.active_count()
    with pytest.raises(ShadowMergeError, match="the file changed under us"):
        graft(fam["instruct"], fam["base"], tuple(fam["tuned"][:2]), tmp_path / "out", combine="ties", density=0.5,
              progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*out*"))
    for _ in range(50):
        if threading.active_count() <= before:
            break
        time.sleep(0.1)
    assert threading.active_count() <= before


def test_more_updates_than_the_cap_are_one_line(family, tmp_path):
    from shadowmerge.multi import MAX_UPDATES

    fam = family[F32]
    with pytest.raises(ShadowMergeError, match=f"at most {MAX_UPDATES}"):
        graft(fam["instruct"], fam["base"], tuple([fam["tuned"][0]] * (MAX_UPDATES + 1)), tmp_path / "out",
              progress=False)
    assert not (tmp_path / "out").exists()


def test_eval_sweeps_a_grid_of_weights_and_combine_methods(family, tmp_path, cli):
    """eval --weights '1,1;1,0.5' --combine sum,ties: every (weights, method) at every α is grafted and evaluated,
    labelled by what varies; each is the graft of that setting (its held-out loss equals the same graft made by
    `graft` and evaluated beside it); the best is named with its setting; a bad grid is one line."""
    import shutil

    fam = family[F32]
    inst = tmp_path / "instruct"
    shutil.copytree(fam["instruct"], inst)
    tinymodels.chat_tokenizer(inst, "instruct")
    direct = tmp_path / "direct"
    graft(inst, fam["base"], tuple(fam["tuned"][:2]), direct, weights="1,0.5", combine="ties", density=0.5,
          progress=False)
    rows = tmp_path / "heldout.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {k} plus {k}"},
                                                     {"role": "assistant", "content": f"{2 * k}"}]}) + "\n"
                            for k in range(6)))
    common = ["--instruct", inst, "--base", fam["base"], "--tuned", fam["tuned"][0], "--tuned", fam["tuned"][1],
              "--heldout", rows, "--device", "cpu", "-q"]
    res = cli("eval", f"direct={direct}", *common, "--weights", "1,1;1,0.5", "--combine", "sum,ties",
              "--density", "0.5", "--alpha", "1", "--out", tmp_path / "e")
    assert res.exit_code == 0, res.stdout + res.stderr
    record = json.loads((tmp_path / "e" / "eval.json").read_text())
    held = {h["model"]: h["nll_per_token"] for h in record["heldout"]}
    swept = {"alpha=1+w=1_1+sum", "alpha=1+w=1_1+ties", "alpha=1+w=1_0.5+sum", "alpha=1+w=1_0.5+ties"}
    assert swept <= set(held) and len(held) == 6
    assert held["alpha=1+w=1_0.5+ties"] == held["direct"]
    assert len({held[label] for label in swept}) == 4            # four different models
    models = record["models"] if isinstance(record["models"], dict) else {m["label"]: m for m in record["models"]}
    assert models["alpha=1+w=1_0.5+ties"]["combine"] == {"weights": "1,0.5", "combine": "ties", "density": 0.5,
                                                         "seed": 0}
    best = record["best_alpha"]["heldout"]
    assert best["model"] in swept and best["setting"] and held[best["model"]] == min(held[label] for label in swept)
    assert f"with {best['setting']}" in (tmp_path / "e" / "eval.md").read_text()
    for extra, expect in ((["--combine", "sum,average"], "'average' is not a method"),
                          (["--weights", "1,1;1,1"], "names a setting twice"),
                          (["--density", "0.5"], "--density goes with --combine ties")):
        res = cli("eval", *common, *extra, "--out", tmp_path / "f")
        assert res.exit_code == 1 and expect in res.stderr and not (tmp_path / "f").exists(), res.stderr
