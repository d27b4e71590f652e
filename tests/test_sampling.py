"""σ from a sample (similarity --sample) and the shadow finder (similarity --candidates), on real tiny models.

The sampled figure must hold the full scan's official σ inside the interval it states (for every seed and size
tried here: the 99% interval misses about one time in a hundred, and these seeds are fixed), read only the sampled
tensors (counted at the Hub server: a Hub id is never downloaded), and equal the full scan exactly when the sample
is the whole population. The shadow finder must rank a true Base first, place an unrelated model of the same
architecture beyond the range, refuse a model with another shape, and note another vocabulary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinymodels
from hubserver import FakeHub
from shadowmerge.analyzer import similarity
from shadowmerge.analyzer.sample import choose, least, role
from shadowmerge.errors import ShadowMergeError


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 12-layer tiny Llama triple: 108 model.layers.N.* tensors in 9 strata."""
    root = tmp_path_factory.mktemp("deep")
    return tinymodels.triple(root, "llama", torch.bfloat16, "200KB", num_hidden_layers=12)


def test_sampled_sigma_holds_the_full_scan_in_its_interval(deep):
    inst, base, _ = deep
    full = similarity(base, inst, progress=False).pairs[0]
    assert full.official_count == 108
    widths = []
    for n in (18, 30, 60):
        for seed in range(6):
            s = similarity(base, inst, sample=n, seed=seed, progress=False).pairs[0].sampled
            assert s["tensors"] == n and s["of"] == 108 and s["seed"] == seed
            assert s["low"] <= full.official <= s["high"], (n, seed, s, full.official)
            assert s["low"] < s["high"]
            widths.append((n, s["high"] - s["low"]))
    mean = {n: sum(w for m, w in widths if m == n) / 6 for n in (18, 30, 60)}
    assert mean[60] < mean[18], "a larger sample must narrow the interval"


def test_a_sample_of_everything_is_the_full_scan(deep):
    inst, base, _ = deep
    full = similarity(base, inst, progress=False).pairs[0]
    s = similarity(base, inst, sample=500, progress=False).pairs[0].sampled
    assert s["value"] == full.official and s["low"] == s["high"] == full.official


def test_samples_are_stratified_spread_and_seeded(deep):
    inst, base, _ = deep
    from shadowmerge.checkpoint import Checkpoint

    ck = Checkpoint.open(inst, "instruct")
    items = [(n, i) for n, i in ck.tensors.items()]
    ck.close()
    official = [n for n, _ in items if n.startswith("model.layers.")]
    assert least(official) == 18                         # two of each of the 9 places in a layer
    a = [n for n, _ in choose(items, 2, seed=0)]
    assert len(a) == 18 and {role(n) for n in a} == {role(n) for n in official}
    for place in {role(n) for n in a}:                   # two of each place: one from each half of the depth
        layers = sorted(int(n.split(".")[2]) for n in a if role(n) == place)
        assert layers[0] < 6 <= layers[1], (place, layers)
    assert [n for n, _ in choose(items, 30, seed=3)] == [n for n, _ in choose(items, 30, seed=3)]
    assert [n for n, _ in choose(items, 30, seed=3)] != [n for n, _ in choose(items, 30, seed=4)]


def _cli(env: dict, *args) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    return subprocess.run([sys.executable, "-m", "shadowmerge", *map(str, args)], env={**full, **env},
                          capture_output=True, text=True, timeout=300)


def test_a_sample_of_hub_ids_reads_only_the_sampled_tensors(deep, tmp_path):
    inst, base, _ = deep
    with FakeHub() as hub:
        hub.add("org/inst", inst)
        hub.add("org/base", base)
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "NO_PROXY": "127.0.0.1,127.0.0.2",
               "no_proxy": "127.0.0.1,127.0.0.2"}
        res = _cli(env, "similarity", "--base", "org/base", "--instruct", "org/inst", "--sample", "20", "-q")
        assert res.returncode == 0, res.stderr
        assert "99% interval" in res.stdout and "20 of 108 tensors sampled" in res.stdout
        assert not list((tmp_path / "hf").rglob("*.safetensors")), "a sample downloaded weights"
        from shadowmerge.checkpoint import Checkpoint

        ck = Checkpoint.open(inst, "instruct")
        picked = choose(list(ck.tensors.items()), 20, 0)
        need = 2 * sum(info.nbytes for _, info in picked)
        ck.close()
        total = sum(p.stat().st_size for f in (inst, base) for p in f.glob("*.safetensors"))
        # the sampled tensors' bytes, and at most one request's read-ahead each (small files are read whole)
        assert need <= hub.weight_bytes() <= need + 2 * 20 * (8 << 20) and hub.weight_bytes() < total
        # with --out: the report states the sample, and verify checks it
        res = _cli(env, "similarity", "--base", "org/base", "--instruct", "org/inst", "--sample", "20", "--out",
                   tmp_path / "report", "-q")
        assert res.returncode == 0, res.stderr
        report = json.loads((tmp_path / "report" / "report.json").read_text())
        assert report["pairs"][0]["sample"]["tensors"] == 20
        assert "interval" in (tmp_path / "report" / "summary.md").read_text()
        assert _cli({}, "verify", tmp_path / "report").returncode == 0


@pytest.mark.parametrize("n", [0, 1, -3])
def test_sample_too_small_is_one_line(deep, n):
    with pytest.raises(ShadowMergeError, match="--sample must be at least 2"):
        similarity(deep[1], deep[0], sample=n, progress=False)


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    root = tmp_path_factory.mktemp("candidates")
    inst = tinymodels.save(tinymodels.build("llama", 0, num_hidden_layers=6), root / "instruct")
    return {
        "instruct": inst,
        "base": tinymodels.save(tinymodels.perturb(tinymodels.build("llama", 0, num_hidden_layers=6), 0.02, 1),
                                root / "base"),
        "unrelated": tinymodels.save(tinymodels.build("llama", 7, num_hidden_layers=6), root / "unrelated"),
        "shape": tinymodels.save(tinymodels.build("llama", 0, num_hidden_layers=6, intermediate_size=48),
                                 root / "shape"),
        "vocab": tinymodels.save(tinymodels.perturb(tinymodels.build("llama", 0, num_hidden_layers=6,
                                                                     vocab_size=160), 0.02, 1), root / "vocab"),
        "qwen": tinymodels.save(tinymodels.build("qwen2", 0), root / "qwen"),
    }


def test_shadow_finder_ranks_and_explains(candidates, tmp_path):
    c = candidates
    order = [str(c[k]) for k in ("unrelated", "shape", "qwen", "vocab", "base")]
    report = similarity(instruct=c["instruct"], candidates=order, progress=False, out=tmp_path / "found")
    found = {Path(e["candidate"]).name: e for e in report.candidates}
    ranked = [Path(e["candidate"]).name for e in report.candidates if e["rank"]]
    assert ranked[0] == "base" and "unrelated" in ranked, ranked
    assert "plausible shadow" in found["base"]["verdict"] and found["base"]["interval"] is not None
    assert found["unrelated"]["sigma"] > 0.06 and "farther than 0.06" in found["unrelated"]["verdict"]
    assert found["shape"]["rank"] is None and "another shape" in found["shape"]["unusable"][0]
    assert "mlp" in found["shape"]["unusable"][0]
    assert found["qwen"]["rank"] is None and "another architecture" in " ".join(found["qwen"]["unusable"])
    assert found["vocab"]["rank"] is not None and "--vocab common" in found["vocab"]["notes"][0]
    text = str(report)
    assert text.index("base") < text.index("unrelated") and "not a proven Base" in text
    saved = json.loads((tmp_path / "found" / "report.json").read_text())
    assert [e["candidate"] for e in saved["candidates"]] == [e["candidate"] for e in report.candidates]
    assert "Shadow candidates" in (tmp_path / "found" / "summary.md").read_text()
    import jsonschema

    schema = json.loads((Path(__file__).parents[1] / "shadowmerge/analyzer/report.schema.json").read_text())
    jsonschema.validate(saved, schema)


def test_shadow_finder_cli_and_mistakes(candidates):
    c = candidates
    res = _cli({}, "similarity", "--instruct", c["instruct"], "--candidates", f"{c['base']},{c['shape']}", "-q")
    assert res.returncode == 0 and "1. " in res.stdout and "unusable" in res.stdout, res.stderr
    res = _cli({}, "similarity", "--instruct", c["instruct"], "--base", c["base"], "--candidates", str(c["base"]))
    assert res.returncode == 1 and "--candidates goes with --instruct alone" in res.stderr
    res = _cli({}, "similarity", "--instruct", c["instruct"], "--candidates", f"{c['base']},,")
    assert res.returncode == 1 and "separated by commas" in res.stderr
    res = _cli({}, "similarity", "--instruct", c["instruct"], "--candidates", f"{c['base']},/no/such/model")
    assert res.returncode == 0 and "cannot be read" in res.stdout
    res = _cli({}, "similarity", "--base", c["base"], "--instruct", c["instruct"])
    assert res.returncode == 1 and "--sample N" in res.stderr


def test_a_model_without_model_layers_names_is_scanned_whole(tmp_path):
    """GPT-2 names its layers transformer.h.N: nothing for the official figure to sample; the advice (the full
    scan) works."""
    inst = tinymodels.save(tinymodels.build("gpt2", 0), tmp_path / "instruct")
    base = tinymodels.save(tinymodels.perturb(tinymodels.build("gpt2", 0), 0.02, 1), tmp_path / "base")
    with pytest.raises(ShadowMergeError, match=r"no model\.layers\.N\.\* tensor to sample.*leave out --sample"):
        similarity(base, inst, sample=8, progress=False)
    assert similarity(base, inst, progress=False).pairs[0].weighted > 0
