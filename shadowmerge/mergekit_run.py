"""Run a mergekit YAML with shadow_graft registered, and give the output the Instruct's side files.

`shadowmerge mergekit CONFIG OUT [mergekit-yaml options]` calls this. A shadow_graft config is
checked first (roles, models, base) with errors that say how to fix the YAML; then mergekit's own
`mergekit-yaml` runs in this process into a temporary folder beside OUT. Afterwards the config,
tokenizer, chat template and generation config are the Instruct's (mergekit copies the base
model's, which for Shadow-FT is the wrong donor), and the folder is renamed into place. Other
merge methods run through unchanged, with the same atomic output.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from . import yamlfile
from .checkpoint import Checkpoint
from .errors import ShadowMergeError
from .output import OutputFolder, make_readable, os_error_of
from .record import new as new_record
from .record import write as write_record
from .sidefiles import copy_side_files, side_files
from .spec import GraftSpec
from .tensors import dtype_name

ROLES = ("instruct", "tuned")
_KEEP = ("mergekit_config.yml",)     # mergekit's own account of the merge (its README is replaced by our card)


def load_config(path: str | Path) -> dict:
    cfg = yamlfile.load(path, "merge config")
    if not isinstance(cfg, dict):
        raise ShadowMergeError(f"{path} is not a mergekit config: write a mapping with merge_method, models, ... (see "
                               f"merge_configs/ for examples)")
    return cfg


def _model_ref(entry) -> str | None:
    model = entry.get("model") if isinstance(entry, dict) else None
    if isinstance(model, dict):          # mergekit's long form: {model: {path: ...}}
        model = model.get("path") or model.get("model")
    return str(model) if model is not None else None


def check_shadow_graft(cfg: dict, path: str | Path) -> dict[str, str]:
    """The roles of a shadow_graft config ({"base", "instruct", "tuned"} -> model), or a clear error."""
    where = f"{path}:"
    if "slices" in cfg:
        raise ShadowMergeError(f"{where} shadow_graft takes `models:`, not `slices:`; put the Instruct and the tuned "
                               f"Base under `models:`")
    for key in ("tokenizer_source", "tokenizer"):
        if cfg.get(key) is not None:
            raise ShadowMergeError(f"{where} remove `{key}`: shadow_graft keeps the Instruct's tokenizer, and Base, "
                                   f"Instruct and tuned Base must share one vocabulary")
    base = cfg.get("base_model")
    if not base:
        raise ShadowMergeError(f"{where} no base_model; add `base_model: <the Base model the tuned model was "
                               f"trained from>`")
    base = str(base)
    models = cfg.get("models")
    if not isinstance(models, list):
        raise ShadowMergeError(f"{where} no `models:` list; add the Instruct (parameters: {{role: instruct}}) and "
                               f"the tuned Base (parameters: {{role: tuned}}) under `models:`")
    others = [m for m in models if _model_ref(m) != base]
    if len(others) < 2:
        names = ", ".join(str(_model_ref(m)) for m in others) or "none"
        raise ShadowMergeError(f"{where} shadow_graft takes two or more models besides base_model, one with "
                               f"`parameters: {{role: instruct}}` and one or more with `{{role: tuned}}`; found "
                               f"{len(others)} ({names}); give each its role")
    params = cfg.get("parameters") if isinstance(cfg.get("parameters"), dict) else {}
    _check_combine(params, where)
    roles: dict[str, str] = {"base": base}
    for m in others:
        ref = _model_ref(m)
        if ref is None:
            raise ShadowMergeError(f"{where} a models entry has no `model:`; write `- model: PATH_OR_HUB_ID`")
        params = m.get("parameters") or {}
        role = params.get("role") if isinstance(params, dict) else None
        if role is None:
            raise ShadowMergeError(f"{where} model {ref} has no role; add `parameters: {{role: instruct}}` or "
                                   f"`parameters: {{role: tuned}}` to it")
        if role not in ROLES:
            raise ShadowMergeError(f"{where} model {ref} has role {role!r}; use role instruct (the Instruct model) "
                                   f"or role tuned (the fine-tuned Base)")
        if "weight" in params:
            _check_numbers(params["weight"], f"{where} model {ref}: weight", "a finite number, e.g. `weight: 1`")
        if role == "tuned" and "tuned" in roles:          # several updates: tuned 2, tuned 3, ...
            roles[f"tuned {sum(r.startswith('tuned') for r in roles) + 1}"] = ref
            continue
        if role in roles:
            other = "tuned" if role == "instruct" else "instruct"
            raise ShadowMergeError(f"{where} two models have role {role} ({roles[role]}, {ref}); give the "
                                   f"{'fine-tuned Base' if other == 'tuned' else 'Instruct'} role {other}")
        roles[role] = ref
    return roles


def _check_combine(params: dict, where: str) -> None:
    """shadow_graft's `combine`, `density`, `seed` and `alpha` under parameters, as graft's own options are checked."""
    from .multi import COMBINE

    combine = params.get("combine", "sum")
    if combine not in COMBINE:
        raise ShadowMergeError(f"{where} combine: {combine!r}; use one of {', '.join(COMBINE)}")
    density = params.get("density")
    if combine == "sum":
        if density is not None:
            raise ShadowMergeError(f"{where} density goes with combine: ties, dare_ties or dare_linear; remove "
                                   f"`density:` (or set `combine:`)")
    elif not _number(density) or not 0 < density <= 1:
        raise ShadowMergeError(f"{where} combine: {combine} needs `density:` under parameters, the share of each "
                               f"update kept, in (0, 1], not {density!r}; write e.g. `density: 0.5`")
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ShadowMergeError(f"{where} seed: {seed!r}; give a whole number, e.g. `seed: 0`")
    if "alpha" in params:
        _check_numbers(params["alpha"], f"{where} alpha", "a finite number, e.g. `alpha: 1`")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_numbers(value, what: str, want: str) -> None:
    """A parameter as mergekit takes it (a number, a list of them interpolated over the layers, or conditional
    values {filter, value}): every number in it finite (a NaN or infinite weight would write NaN everywhere)."""
    if isinstance(value, list):
        if not value:
            raise ShadowMergeError(f"{what}: an empty list; give {want}")
        for v in value:
            _check_numbers(v, what, want)
    elif isinstance(value, dict) and "value" in value:
        _check_numbers(value["value"], what, want)
    elif not _number(value):
        raise ShadowMergeError(f"{what}: {value!r}; give {want}")


def validate(cfg: dict, path: str | Path):
    """mergekit's own config model, with its first complaint as one line."""
    from pydantic import ValidationError

    from mergekit.config import MergeConfiguration

    try:
        return MergeConfiguration.model_validate(cfg)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or "config"
        raise ShadowMergeError(f"{path}: {loc}: {err.get('msg')} (mergekit's config check)") from None


def run(config: str | Path, out: str | Path, mergekit_args: tuple[str, ...] = (), *, force: bool = False,
        command: str | None = None) -> Path:
    """Check CONFIG, run mergekit-yaml on it into OUT (atomically), fix the side files for shadow_graft."""
    cfg = load_config(config)
    method = cfg.get("merge_method")
    _check_plus(cfg, config, method == "shadow_graft")
    roles = check_shadow_graft(cfg, config) if method == "shadow_graft" else None
    from .mergekit import register

    register()

    validate(cfg, config)
    # The three models, opened once as graft opens them (headers and config: e.g. quantized ones are refused).
    # Only headers are read, so they hold no open file.
    ckpts = {role: Checkpoint.open(ref, role) for role, ref in roles.items()} if roles else {}
    _refuse_fp8(cfg, config, ckpts)
    if ckpts:
        _float32_inputs(cfg, ckpts["instruct"])
    instruct = ckpts["instruct"].folder if ckpts else None
    local = [Path(_model_ref(m)) for m in cfg.get("models") or [] if _model_ref(m) and Path(_model_ref(m)).is_dir()]
    if cfg.get("base_model") and Path(str(cfg["base_model"])).is_dir():
        local.append(Path(str(cfg["base_model"])))
    need = 0
    if instruct is not None:     # about the Instruct's size, twice that if written as float32
        need = sum(p.stat().st_size for p in instruct.glob("*.safetensors"))
        need *= 2 if dtype_name(cfg.get("out_dtype") or cfg.get("dtype")) == "float32" else 1
    target = OutputFolder(out, force=force, inputs=local, need_bytes=need, flag="OUT")
    if roles is not None and not any(a in ("--copy-tokenizer", "--no-copy-tokenizer") for a in mergekit_args):
        mergekit_args = (*mergekit_args, "--no-copy-tokenizer")    # the Instruct's tokenizer replaces it anyway
    with target as tmp:
        _mergekit_yaml(cfg, tmp, mergekit_args)
        make_readable(tmp)
        record = new_record("mergekit", {"config": str(Path(config).absolute()), "merge_method": method,
                                         "mergekit_args": list(mergekit_args)})
        if instruct is not None:
            for p in side_files(tmp):
                if p.name not in _KEEP:
                    p.unlink()
            dtype = cfg.get("out_dtype") or cfg.get("dtype")
            names = copy_side_files(instruct, tmp, dtype_name(dtype), skip=_KEEP)
            dropped = check_complete(tmp, ckpts["instruct"], roles, dtype)
            _card(tmp, roles, instruct, cfg, command)
            record.update(roles=roles, side_files_from=str(instruct), side_files=names,
                          dropped=[{"name": n, "why": "the instruct config ties it to the input embedding"}
                                   for n in dropped],
                          recompute=_recompute_inputs(cfg, ckpts, dtype))
        write_record(tmp, record)
        target.commit()
    return target.target


def _refuse_fp8(cfg: dict, path, ckpts: dict) -> None:
    """mergekit reads weights as stored: FP8 blocks would be added as raw FP8 numbers without their scales."""
    from .formats.fp8 import is_fp8_config

    found = next((c.ref for c in ckpts.values() if c.quantized), None)
    if found is None:
        for m in [cfg.get("base_model")] + [_model_ref(m) for m in cfg.get("models") or []]:
            config = Path(str(m or "")) / "config.json"
            if m and config.is_file():
                try:
                    if is_fp8_config(json.loads(config.read_text())):
                        found = m
                        break
                except (OSError, ValueError):
                    continue
    if found is not None:
        raise ShadowMergeError(f"{path}: {found} stores FP8 blocks, which mergekit cannot read (it would add the "
                               f"FP8 numbers without their scales); use shadowmerge graft --instruct I --base B "
                               f"--tuned T --out OUT, which reads them exactly")


def _card(folder: Path, roles: dict, instruct: Path, cfg: dict, command: str | None) -> None:
    """The output's own card (mergekit's names the temporary folder and an empty base_model)."""
    from . import card

    alpha = (cfg.get("parameters") or {}).get("alpha", 1.0)
    card.write(folder, title=f"{Path(roles['instruct']).name} + the update of a fine-tune of its Base (Shadow-FT, "
                             f"mergekit)",
               made_from={"Instruct": roles["instruct"], "Base": roles["base"], "tuned Base": roles["tuned"],
                          **{f"{r} (another tuned Base)": v for r, v in roles.items() if r.startswith("tuned ")}},
               relation="merge", license_from=instruct, command=command or card.command_line(None),
               what="The Instruct model with the update of a fine-tune of its Base grafted onto it, by mergekit's "
                    "`shadow_graft` merge method (`shadowmerge mergekit`); mergekit's own config is in "
                    "mergekit_config.yml.",
               details={"alpha": alpha, "dtype": cfg.get("dtype", "mergekit's default"),
                        "out_dtype": cfg.get("out_dtype", "as dtype")})


def _check_plus(cfg: dict, path, shadow: bool) -> None:
    """mergekit reads MODEL+LORA in a model reference: refuse what that would silently misread."""
    refs = [_model_ref(m) for m in cfg.get("models") or []] + [cfg.get("base_model")]
    for ref in (str(r) for r in refs if r is not None):
        if "+" not in ref:
            continue
        if Path(ref).expanduser().exists():
            raise ShadowMergeError(f"{path}: the model path {ref} contains '+', which mergekit reads as MODEL+LORA "
                                   f"(a LoRA merged into a model); rename the folder, or link it under a name "
                                   f"without '+'")
        if shadow:
            raise ShadowMergeError(f"{path}: {ref} is mergekit's MODEL+LORA syntax; shadow_graft takes full models. "
                                   f"To graft a LoRA adapter trained on the Base, use shadowmerge graft --instruct "
                                   f"INSTRUCT --lora ADAPTER --out OUT (exact, with no merged copy of the Base)")


def _float32_inputs(cfg: dict, inst: Checkpoint) -> None:
    """shadow_graft reads its inputs in float32 and casts once to the output dtype, as graft does.

    mergekit loads every input in `dtype`: with `dtype: bfloat16` a float32 tuned model would be rounded
    before the subtraction. The output dtype is `out_dtype`, else `dtype`, else the Instruct's.
    """
    out = cfg.get("out_dtype") or cfg.get("dtype")
    if out is None:
        out = inst.config.get("dtype") or inst.config.get("torch_dtype")
    if isinstance(out, str) and dtype_name(out):
        cfg["out_dtype"], cfg["dtype"] = dtype_name(out), "float32"


def check_complete(folder: Path, inst: Checkpoint, roles: dict, dtype) -> list[str]:
    """mergekit's output must hold exactly the Instruct's tensors (a tied lm_head left out), shapes and dtype.

    mergekit guesses where it has no architecture definition, and may drop whole towers or experts. An
    output head that mergekit writes although the Instruct ties it (untied Base/Tuned) is removed, as
    graft leaves it out: the model loads with the Instruct's config, which ties it. Returns those names."""
    from .deltas import OUTPUT_EMBEDDINGS
    from .tensors import parse_dtype

    tied = inst.tie_word_embeddings
    want = {n: i for n, i in inst.tensors.items() if not (tied and n.endswith(OUTPUT_EMBEDDINGS))}
    out = Checkpoint(folder, "mergekit output", str(folder))
    tied_away = sorted(n for n in out.tensors if tied and n.endswith(OUTPUT_EMBEDDINGS))
    if tied_away:
        out.close()
        drop_tensors(folder, set(tied_away))
        out = Checkpoint(folder, "mergekit output", str(folder))
    try:
        missing = sorted(set(want) - set(out.tensors))
        extra = sorted(set(out.tensors) - set(want))
        out_dtype = parse_dtype(dtype_name(dtype)) if dtype else None
        wrong = sorted(n for n in set(want) & set(out.tensors)
                       if out.tensors[n].shape != want[n].shape
                       or (out_dtype is not None and want[n].dtype.is_floating_point
                           and out.tensors[n].dtype != out_dtype))
    finally:
        out.close()
    if missing or extra or wrong:
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for v, what in
                 ((missing, "of the instruct's tensors missing"), (extra, "tensors the instruct does not have"),
                  (wrong, "with another shape or dtype")) if v]
        raise ShadowMergeError(
            f"mergekit's output is not a complete model: {'; '.join(parts)}. mergekit has no exact architecture "
            f"definition for this model, so it guessed; use shadowmerge graft --instruct {roles['instruct']} "
            f"--base {roles['base']} --tuned {roles['tuned']} --out OUT, which handles every layout")
    return tied_away


def drop_tensors(folder: Path, names: set[str]) -> None:
    """Rewrite the shards of folder that hold `names` without them (bytes copied in the kernel), and the index."""
    from .formats.safetensors import build_header, read_header

    index = folder / "model.safetensors.index.json"
    for shard in sorted(folder.glob("*.safetensors")):
        start, tensors, meta = read_header(shard, shard.stat().st_size)
        if not names & set(tensors):
            continue
        keep = sorted(((n, t) for n, t in tensors.items() if n not in names), key=lambda kv: kv[1][2])
        if not keep:
            shard.unlink()
            continue
        header, _ = build_header([(n, d, shape, end - begin) for n, (d, shape, begin, end) in keep], meta or None)
        new = shard.with_name(f".{shard.name}.new")
        with open(shard, "rb") as src, open(new, "wb") as dst:
            dst.write(header)
            dst.flush()
            for _, (_, _, begin, end) in keep:
                pos, left = start + begin, end - begin
                while left:
                    got = os.copy_file_range(src.fileno(), dst.fileno(), left, pos)
                    if got <= 0:
                        raise ShadowMergeError(f"{shard}: ended while rewriting it; run again")
                    pos, left = pos + got, left - got
        os.replace(new, shard)
    if index.is_file():
        doc = json.loads(index.read_text())
        doc["weight_map"] = {n: f for n, f in doc["weight_map"].items()
                             if n not in names and (folder / f).is_file()}
        index.write_text(json.dumps(doc, indent=2) + "\n")


def _recompute_inputs(cfg: dict, ckpts: dict[str, Checkpoint], dtype) -> dict | None:
    """The graft that a shadow_graft config computes, for `shadowmerge verify --recompute` (None if not plain)."""
    alpha = (cfg.get("parameters") or {}).get("alpha", 1.0) if isinstance(cfg.get("parameters"), dict) else None
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None       # per-tensor or filtered alpha: not one graft
    paths = {role: str(c.folder.absolute()) for role, c in ckpts.items()}
    params = cfg["parameters"] if isinstance(cfg.get("parameters"), dict) else {}
    tuned = tuple(paths[r] for r in sorted((r for r in paths if r.startswith("tuned")),
                                           key=lambda r: int(r[6:] or 1)))
    weights = []
    for m in cfg.get("models") or []:
        p = m.get("parameters") if isinstance(m, dict) and isinstance(m.get("parameters"), dict) else {}
        if p.get("role") == "tuned":
            weights.append(p.get("weight", 1.0))
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        return None       # per-tensor weights: not one graft
    combine = params.get("combine", "sum")
    several = len(tuned) > 1 or combine != "sum" or any(w != 1 for w in weights)
    spec = GraftSpec(instruct=paths["instruct"], base=paths.get("base"), tuned=tuned, alpha=float(alpha),
                     dtype=dtype_name(dtype),
                     **({"weights": ",".join(repr(float(w)) for w in weights), "combine": combine,
                         "density": params.get("density") if combine != "sum" else None,
                         "seed": int(params.get("seed", 0))} if several else {}))
    return new_record("graft", {"input_paths": paths, "spec": spec.as_record()})


def _mergekit_yaml(cfg: dict, out: Path, args: tuple[str, ...]) -> None:
    import click
    import yaml
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    fd, cfg_path = tempfile.mkstemp(suffix=".yml", prefix="shadowmerge-")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()        # mergekit's own use of transformers' deprecated names
        try:
            mergekit_yaml.main(args=[cfg_path, str(out), *args], standalone_mode=False)
        finally:
            transformers_logging.set_verbosity(verbosity)
    except click.ClickException as exc:
        raise ShadowMergeError(f"mergekit-yaml option error: {exc.format_message()}; see `mergekit-yaml --help` "
                               f"for the options it takes") from None
    except click.exceptions.Abort as exc:       # click's name for Ctrl-C (and our SIGTERM) inside mergekit-yaml
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise exc.__context__ from None
        raise KeyboardInterrupt from None
    except (ShadowMergeError, KeyboardInterrupt):
        raise
    except Exception as exc:
        machine = os_error_of(exc, out.parent)    # a full disk in mergekit's writer: the output folder says so
        if machine is not None:
            raise machine from None
        raise ShadowMergeError(f"mergekit failed: {type(exc).__name__}: {error_line(exc)}; where mergekit does not "
                               f"know the architecture, shadowmerge graft --instruct I --base B --tuned T --out OUT "
                               f"does the same merge") from None
    finally:
        os.unlink(cfg_path)


def error_line(exc: BaseException) -> str:
    """The line of a (long, multi-line) exception message that says what went wrong: its last real line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("For further information", "http", "Traceback", "File "))]
    return (lines[-1] if lines else type(exc).__name__)[:300]
