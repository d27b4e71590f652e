"""shadow_graft in real mergekit runs: bit-exact against `shadowmerge graft`, side files, YAML errors."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_bad
from tinymodels import state

ROOT = Path(__file__).resolve().parent.parent


def shadow_yaml(path: Path, inst, base, tuned, **extra) -> Path:
    cfg = {"merge_method": "shadow_graft", "base_model": str(base),
           "models": [{"model": str(inst), "parameters": {"role": "instruct"}},
                      {"model": str(tuned), "parameters": {"role": "tuned"}}],
           "parameters": {"alpha": 1.0}, "dtype": "bfloat16", **extra}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def triple(make_triple):
    return make_triple("llama")


def graft(cli, out, inst, base, tuned, *extra):
    res = cli("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", out, "-q", *extra)
    assert res.exit_code == 0, res.output
    return state(out)


def test_shadowmerge_mergekit_equals_graft_and_keeps_the_instruct_side_files(triple, cli, tmp_path):
    inst, base, tuned = triple
    res = cli("mergekit", shadow_yaml(tmp_path / "c.yml", inst, base, tuned), tmp_path / "out")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    got, want = state(out), graft(cli, tmp_path / "graft", inst, base, tuned)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # mergekit's donor is base_model; the output must carry the Instruct's files instead
    for f in ("chat_template.jinja", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / f).read_bytes() == (inst / f).read_bytes(), f
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2      # the Base says 7
    assert (out / "mergekit_config.yml").is_file() and (out / "README.md").is_file()
    assert json.loads((out / "shadowmerge.json").read_text())["roles"]["instruct"] == str(inst)
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_python_api_registers_shadow_graft(triple, cli, tmp_path):
    import importlib

    import shadowmerge.mergekit
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    importlib.reload(shadowmerge.mergekit)         # importing (registering) twice is harmless
    assert [m.spec.name for m in merge_methods.registered_methods()].count("shadow_graft") == 1
    inst, base, tuned = triple
    cfg = yaml.safe_load(shadow_yaml(tmp_path / "c.yml", inst, base, tuned).read_text())
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "api"), options=MergeOptions(copy_tokenizer=False))
    got, want = state(tmp_path / "api"), graft(cli, tmp_path / "graft", inst, base, tuned)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_equals_task_arithmetic_in_float32(triple, cli, tmp_path):
    """The equivalent recipe: task_arithmetic, base B, I and T at weight 1, dtype float32 + out_dtype bf16.

    (On billions of elements, task_arithmetic's other order of summation rounds differently in a
    few per billion; on this model no element is affected.)"""
    inst, base, tuned = triple
    ta = {"merge_method": "task_arithmetic", "base_model": str(base),
          "models": [{"model": str(inst), "parameters": {"weight": 1.0}},
                     {"model": str(tuned), "parameters": {"weight": 1.0}}],
          "parameters": {"normalize": False}, "dtype": "float32", "out_dtype": "bfloat16"}
    (tmp_path / "ta.yml").write_text(yaml.safe_dump(ta))
    assert cli("mergekit", tmp_path / "ta.yml", tmp_path / "ta", "--no-copy-tokenizer").exit_code == 0
    res = cli("mergekit", shadow_yaml(tmp_path / "c.yml", inst, base, tuned, dtype="float32", out_dtype="bfloat16"),
              tmp_path / "sg")
    assert res.exit_code == 0, res.output
    got, ref = state(tmp_path / "sg"), state(tmp_path / "ta")
    want = graft(cli, tmp_path / "graft", inst, base, tuned)
    for name in want:
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], want[name]) and torch.equal(got[name], ref[name]), name


def test_out_dtype_is_one_rounding(triple, cli, tmp_path):
    """dtype bfloat16 + out_dtype float16 would round twice; the wrapper computes from float32 inputs."""
    inst, base, tuned = triple
    res = cli("mergekit", shadow_yaml(tmp_path / "c.yml", inst, base, tuned, out_dtype="float16"), tmp_path / "sg")
    assert res.exit_code == 0, res.output
    got, want = state(tmp_path / "sg"), graft(cli, tmp_path / "graft", inst, base, tuned, "--dtype", "float16")
    for name in want:
        assert got[name].dtype == torch.float16 and torch.equal(got[name], want[name]), name
    assert json.loads((tmp_path / "sg" / "config.json").read_text())["dtype"] == "float16"


def test_mergekit_filters_apply_to_alpha(triple, cli, tmp_path):
    inst, base, tuned = triple
    cfg = shadow_yaml(tmp_path / "c.yml", inst, base, tuned,
                      parameters={"alpha": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]})
    assert cli("mergekit", cfg, tmp_path / "sg").exit_code == 0
    got = state(tmp_path / "sg")
    half = graft(cli, tmp_path / "half", inst, base, tuned, "--alpha", "0.5")
    full = graft(cli, tmp_path / "full", inst, base, tuned)
    assert any("self_attn" in n for n in got) and any("mlp" in n for n in got)
    for name in got:
        assert torch.equal(got[name], (half if "self_attn" in name else full)[name]), name


def _bad_configs(inst, base, tuned):
    good = [{"model": str(inst), "parameters": {"role": "instruct"}}, {"model": str(tuned), "parameters": {"role": "tuned"}}]
    return {
        "no role": ({"models": [{"model": str(inst)}, good[1]]},
                    f"model {inst} has no role; add `parameters: {{role: instruct}}`"),
        "two instruct": ({"models": [good[0], {"model": str(tuned), "parameters": {"role": "instruct"}}]},
                         "two models have role instruct"),
        "unknown role": ({"models": [good[0], {"model": str(tuned), "parameters": {"role": "student"}}]},
                         "has role 'student'; use role instruct (the Instruct model) or role tuned"),
        "three models": ({"parameters": {"combine": "ties"},
                          "models": good + [{"model": str(tuned), "parameters": {"role": "tuned"}}]},
                         "combine: ties needs `density:`"),
        "one model": ({"models": good[:1]}, "found 1"),
        "no base": ({"base_model": None}, "no base_model; add `base_model:"),
        "slices": ({"slices": []}, "takes `models:`, not `slices:`"),
        "tokenizer": ({"tokenizer_source": "base"}, "remove `tokenizer_source`"),
        "mergekit's own check": ({"dtype": ["x"]}, "dtype: Input should be a valid string (mergekit's config check)"),
        # hostile values: each refused before mergekit runs, with the form that works
        "nan weight": (_tuned_weight(good, float("nan")), "weight: nan; give a finite number, e.g. `weight: 1`"),
        "text weight": (_tuned_weight(good, "heavy"), "weight: 'heavy'; give a finite number"),
        "boolean weight": (_tuned_weight(good, True), "weight: True; give a finite number"),
        "empty weight list": (_tuned_weight(good, []), "weight: an empty list; give a finite number"),
        "infinite weight in a gradient": (_tuned_weight(good, [1.0, float("inf")]), "weight: inf; give a finite"),
        "weight that overflows": (_tuned_weight(good, 1e300), "has NaN/Inf values; check the weights and alpha"),
        "unknown combine": ({"parameters": {"combine": "average"}},
                            "combine: 'average'; use one of sum, ties, dare_ties, dare_linear"),
        "density out of range": ({"parameters": {"combine": "ties", "density": 1.5}},
                                 "in (0, 1], not 1.5; write e.g. `density: 0.5`"),
        "density without combine": ({"parameters": {"density": 0.5}}, "density goes with combine: ties"),
        "fractional seed": ({"parameters": {"combine": "dare_ties", "density": 0.5, "seed": 1.5}},
                            "seed: 1.5; give a whole number, e.g. `seed: 0`"),
        "nan alpha": ({"parameters": {"alpha": float("nan")}}, "alpha: nan; give a finite number, e.g. `alpha: 1`"),
    }


def _tuned_weight(good, weight):
    return {"models": [good[0], {"model": good[1]["model"], "parameters": {"role": "tuned", "weight": weight}}]}


@pytest.mark.parametrize("case", ["no role", "two instruct", "unknown role", "three models", "one model", "no base",
                                  "slices", "tokenizer", "mergekit's own check", "nan weight", "text weight",
                                  "boolean weight", "empty weight list", "infinite weight in a gradient",
                                  "weight that overflows", "unknown combine", "density out of range",
                                  "density without combine", "fractional seed", "nan alpha"])
def test_yaml_errors_say_how_to_fix_the_yaml(triple, cli, tmp_path, case):
    inst, base, tuned = triple
    change, expect = _bad_configs(inst, base, tuned)[case]
    path = shadow_yaml(tmp_path / "c.yml", inst, base, tuned)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(change)
    path.write_text(yaml.safe_dump(cfg))
    run_bad(cli, tmp_path, [inst, base, tuned], path, command=("mergekit",), expect=expect)


@pytest.mark.parametrize("bad, fixed", [
    ({"models": "weight", "value": float("nan")}, 1),
    ({"parameters": {"combine": "ties", "density": 1.5}}, {"combine": "ties", "density": 0.5}),
    ({"parameters": {"density": 0.5}}, {}),
    ({"parameters": {"combine": "dare_ties", "density": 0.5, "seed": 1.5}},
     {"combine": "dare_ties", "density": 0.5, "seed": 0}),
])
def test_the_fix_a_yaml_error_suggests_works(triple, cli, tmp_path, bad, fixed):
    """Written as the one line says (`weight: 1`, `density: 0.5`, no density, `seed: 0`), the config runs."""
    inst, base, tuned = triple
    path = shadow_yaml(tmp_path / "c.yml", inst, base, tuned)
    cfg = yaml.safe_load(path.read_text())
    if "models" in bad:
        cfg["models"][1]["parameters"]["weight"] = fixed
    else:
        cfg["parameters"] = fixed
    path.write_text(yaml.safe_dump(cfg))
    res = cli("mergekit", path, tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    assert cli("verify", tmp_path / "out", "--recompute", "-q").exit_code == 0


def test_unreadable_config_and_bad_passthrough_option(triple, cli, tmp_path):
    inst, base, tuned = triple
    (tmp_path / "bad.yml").write_text("merge_method: [shadow_graft\n")
    run_bad(cli, tmp_path, [inst], tmp_path / "bad.yml", command=("mergekit",), expect="is not valid YAML")
    run_bad(cli, tmp_path, [inst], tmp_path / "missing.yml", command=("mergekit",), expect="merge config not found")
    path = shadow_yaml(tmp_path / "c.yml", inst, base, tuned)
    run_bad(cli, tmp_path, [inst, base, tuned], path, "--no-such-option", command=("mergekit",),
            expect="mergekit-yaml option error: No such option '--no-such-option'")


def test_graft_help_does_not_import_mergekit():
    code = ("import sys; from shadowmerge.cli import main\n"
            "try:\n    main(['graft', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'mergekit' not in sys.modules, 'mergekit was imported'\nprint('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr


def test_every_merge_config_parses_with_mergekit():
    from mergekit.config import MergeConfiguration

    from shadowmerge.mergekit_run import check_shadow_graft, load_config

    paths = sorted((ROOT / "merge_configs").glob("*.yml"))
    assert len(paths) >= 12
    methods = set()
    for path in paths:
        cfg = load_config(path)
        MergeConfiguration.model_validate(cfg)
        methods.add(cfg["merge_method"])
        if cfg["merge_method"] == "shadow_graft":
            roles = check_shadow_graft(cfg, path)
            assert roles["tuned"].startswith("./") and "/" in roles["instruct"], path
    assert methods == {"shadow_graft", "task_arithmetic"}


def test_existing_output_needs_force(triple, cli, tmp_path):
    inst, base, tuned = triple
    path = shadow_yaml(tmp_path / "c.yml", inst, base, tuned)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    # a user's own folder: the advice is another OUT, never --force (which would refuse it)
    err = run_bad(cli, tmp_path, [inst, base, tuned, tmp_path / "out"], path, command=("mergekit",),
                  expect="already exists and was not written by shadowmerge")
    assert "choose another OUT" in err and "pass --force" not in err
    # --force replaces only an output shadowmerge wrote: the user's folder stays, an empty one or ours is replaced
    run_bad(cli, tmp_path, [inst, base, tuned, tmp_path / "out"], path, "--force", command=("mergekit",),
            expect="was not written by shadowmerge (it has no shadowmerge record); --force replaces only")
    (tmp_path / "out" / "keep.txt").unlink()
    assert cli("mergekit", path, tmp_path / "out", "--force").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert cli("mergekit", path, tmp_path / "out", "--force").exit_code == 0


def test_a_failure_inside_mergekit_is_one_line_and_leaves_nothing(triple, cli, tmp_path, make_triple):
    from conftest import tree_digest

    inst, base, _ = triple
    _, _, other = make_triple("llama", intermediate_size=96)       # a "tuned" model of another size
    cfg = shadow_yaml(tmp_path / "c.yml", inst, base, other)
    before, listing = tree_digest(inst, base, other), sorted(p.name for p in tmp_path.iterdir())
    res = cli("mergekit", cfg, tmp_path / "out")
    assert res.exit_code == 1 and "Traceback" not in res.output
    # mergekit's own progress bars come first; the error is the last line, and one line
    assert res.stderr.strip().splitlines()[-1].startswith("error: mergekit failed: ValueError: Tensor size mismatch")
    assert sorted(p.name for p in tmp_path.iterdir()) == listing and tree_digest(inst, base, other) == before


# --- never an incomplete model with exit 0 (issue 11, part 6) ------------------------------------

@pytest.mark.parametrize("damage, expect", [
    ("drop", "1 of the instruct's tensors missing (e.g. model.layers.1.mlp.up_proj.weight)"),
    ("add", "1 tensors the instruct does not have (e.g. model.vision_tower.extra.weight)"),
    ("reshape", "1 with another shape or dtype (e.g. model.layers.1.mlp.up_proj.weight)"),
])
def test_an_incomplete_mergekit_output_is_an_error(triple, cli, tmp_path, monkeypatch, damage, expect):
    """mergekit guesses unknown architectures and may drop tensors; the wrapper checks against the Instruct."""
    from safetensors.torch import load_file, save_file

    from shadowmerge import mergekit_run

    real = mergekit_run._mergekit_yaml

    def lossy(cfg, out, args):
        real(cfg, out, args)
        shard = next(Path(out).glob("*.safetensors"))
        sd = load_file(shard)
        name = "model.layers.1.mlp.up_proj.weight"
        if damage == "drop":
            del sd[name]
        elif damage == "add":
            sd["model.vision_tower.extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)
        else:
            sd[name] = sd[name].reshape(-1)
        save_file(sd, shard, metadata={"format": "pt"})
        index = Path(out) / "model.safetensors.index.json"
        if index.exists():
            doc = json.loads(index.read_text())
            doc["weight_map"] = {n: f for n, f in doc["weight_map"].items() if n in sd}
            doc["weight_map"].update({n: shard.name for n in sd if n not in doc["weight_map"]})
            index.write_text(json.dumps(doc))
    monkeypatch.setattr(mergekit_run, "_mergekit_yaml", lossy)
    inst, base, tuned = triple
    err = run_bad(cli, tmp_path, [inst, base, tuned], shadow_yaml(tmp_path / "c.yml", inst, base, tuned),
                  command=("mergekit",), expect="mergekit's output is not a complete model")
    assert expect in err and f"use shadowmerge graft --instruct {inst}" in err


def test_model_paths_with_a_plus(triple, cli, tmp_path):
    import shutil

    inst, base, tuned = triple
    plus = tmp_path / "tuned+v2"
    shutil.copytree(tuned, plus)
    err = run_bad(cli, tmp_path, [inst, base, tuned, plus], shadow_yaml(tmp_path / "c.yml", inst, base, plus),
                  command=("mergekit",), expect="contains '+', which mergekit reads as MODEL+LORA")
    assert "rename the folder" in err
    err = run_bad(cli, tmp_path, [inst, base, tuned], shadow_yaml(tmp_path / "d.yml", inst, base, f"{base}+{tmp_path}/ad"),
                  command=("mergekit",), expect="is mergekit's MODEL+LORA syntax; shadow_graft takes full models")
    assert "shadowmerge graft --instruct INSTRUCT --lora ADAPTER" in err


def test_a_float32_tuned_model_is_exact_with_a_bf16_config(triple, cli, tmp_path, make_triple):
    """The ready configs say dtype: bfloat16; the wrapper still reads every input in float32, as graft does."""
    from safetensors.torch import load_file, save_file

    inst, base, tuned = triple
    fp32 = load_file(tuned / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    fp32 = {k: v.float() + 1e-4 * torch.randn(v.shape, generator=g) for k, v in fp32.items()}   # not bf16-exact
    save_file(fp32, tuned / "model.safetensors", metadata={"format": "pt"})
    res = cli("mergekit", shadow_yaml(tmp_path / "c.yml", inst, base, tuned), tmp_path / "sg")
    assert res.exit_code == 0, res.output
    got, want = state(tmp_path / "sg"), graft(cli, tmp_path / "graft", inst, base, tuned)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name]), name


def test_error_line_is_the_meaningful_one():
    from shadowmerge.mergekit_run import error_line

    long = "\n".join([f"  context line {i}" for i in range(67)] + ["", "Tensor lm_head.weight required but not present"])
    assert error_line(RuntimeError(long)) == "Tensor lm_head.weight required but not present"
    pydantic = "1 validation error for MergeConfiguration\nmodels.0\n  Field required\nFor further information visit https://x"
    assert error_line(ValueError(pydantic)) == "Field required"
    assert error_line(RuntimeError("")) == "RuntimeError"


def test_tied_instruct_with_untied_base_and_tuned_gives_the_graft_model(cli, tmp_path):
    """mergekit writes an lm_head the tied Instruct does not have; the wrapper leaves it out, as graft does."""
    from tinymodels import build, perturb, save

    inst = save(build("qwen2", 0), tmp_path / "instruct")
    base = save(perturb(build("qwen2", 0, tie_word_embeddings=False), 0.02, 1), tmp_path / "base", eos=7)
    tuned = save(perturb(perturb(build("qwen2", 0, tie_word_embeddings=False), 0.02, 1), 0.01, 2),
                 tmp_path / "tuned", eos=7)
    res = cli("mergekit", shadow_yaml(tmp_path / "c.yml", inst, base, tuned), tmp_path / "sg")
    assert res.exit_code == 0, res.output
    got, want = state(tmp_path / "sg"), graft(cli, tmp_path / "graft", inst, base, tuned)
    assert "lm_head.weight" not in got and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    record = json.loads((tmp_path / "sg" / "shadowmerge.json").read_text())
    assert [d["name"] for d in record["dropped"]] == ["lm_head.weight"]
    assert cli("verify", tmp_path / "sg", "--recompute", "-q").exit_code == 0


# family: True where mergekit 0.1.5 merges it (then bit-identical to graft), False where it cannot (then one
# error line that points to shadowmerge graft, and nothing written): never an incomplete model with exit 0
FAMILIES = {"llama": True, "gpt_oss": True, "qwen2_5_vl": True, "qwen3_moe": False, "mixtral": False,
            "gemma3": False, "mllama": False, "qwen2_vl": False, "qwen3_vl": False}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_is_exact_or_refused(family, cli, tmp_path):
    import tinymodels as tm

    root = tmp_path / "models"
    if family in tm.VLMS:
        inst, base = tm.vlm_triple(root, family)
        tuned = tm.save(tm.perturb(tm.perturb(tm.build_vlm(family), 0.02, 1), 0.01, 2), root / "tuned")
    else:
        inst, base, tuned = tm.triple(root, family)
    config = shadow_yaml(tmp_path / "c.yml", inst, base, tuned)
    if FAMILIES[family]:
        res = cli("mergekit", config, tmp_path / "out")
        assert res.exit_code == 0, res.output
        got, want = state(tmp_path / "out"), graft(cli, tmp_path / "graft", inst, base, tuned)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    else:
        err = run_bad(cli, tmp_path, [inst, base, tuned], config, command=("mergekit",), expect="shadowmerge graft")
        assert "--instruct" in err
