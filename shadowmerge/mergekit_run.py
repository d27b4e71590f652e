"""Run a mergekit YAML with shadow_graft registered, and give the output the Instruct's side files.

`shadowmerge mergekit CONFIG OUT [mergekit-yaml options]` calls this. A shadow_graft config is
checked first (roles, models, base) with errors that say how to fix the YAML; then mergekit's own
`mergekit-yaml` runs in this process into a temporary folder beside OUT. Afterwards the config,
tokenizer, chat template and generation config are the Instruct's (mergekit copies the base
model's, which for Shadow-FT is the wrong donor), and the folder is renamed into place. Other
merge methods run through unchanged, with the same atomic output.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import __version__, hub, yamlfile
from .checkpoint import Checkpoint
from .errors import ShadowMergeError
from .output import OutputFolder, copy_side_files, make_readable, side_files, write_record
from .pipeline import dtype_name

ROLES = ("instruct", "tuned")
_KEEP = ("README.md", "mergekit_config.yml")     # mergekit's own account of the merge


def load_config(path: str | Path) -> dict:
    cfg = yamlfile.load(path, "merge config")
    if not isinstance(cfg, dict):
        raise ShadowMergeError(f"{path} is not a mergekit config (expected a mapping with merge_method, models, ...)")
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
        raise ShadowMergeError(f"{where} shadow_graft takes `models:`, not `slices:`; list the Instruct and the tuned "
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
        raise ShadowMergeError(f"{where} no `models:` list; list the Instruct (parameters: {{role: instruct}}) and "
                               f"the tuned Base (parameters: {{role: tuned}})")
    others = [m for m in models if _model_ref(m) != base]
    if len(others) != 2:
        names = ", ".join(str(_model_ref(m)) for m in others) or "none"
        raise ShadowMergeError(f"{where} shadow_graft takes exactly two models besides base_model, one with "
                               f"`parameters: {{role: instruct}}` and one with `{{role: tuned}}`; found "
                               f"{len(others)} ({names})")
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
        if role in roles:
            other = "tuned" if role == "instruct" else "instruct"
            raise ShadowMergeError(f"{where} two models have role {role} ({roles[role]}, {ref}); give the "
                                   f"{'fine-tuned Base' if other == 'tuned' else 'Instruct'} role {other}")
        roles[role] = ref
    return roles


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


def run(config: str | Path, out: str | Path, mergekit_args: tuple[str, ...] = (), *, force: bool = False) -> Path:
    """Check CONFIG, run mergekit-yaml on it into OUT (atomically), fix the side files for shadow_graft."""
    cfg = load_config(config)
    method = cfg.get("merge_method")
    roles = check_shadow_graft(cfg, config) if method == "shadow_graft" else None
    if roles is not None and cfg.get("out_dtype") and dtype_name(str(cfg.get("dtype"))) != "float32":
        cfg["dtype"] = "float32"     # inputs upcast exactly, so the one rounding is mergekit's cast to out_dtype
    from .mergekit import register

    register()

    validate(cfg, config)
    for role, ref in (roles or {}).items():    # headers and configs checked as graft checks them (e.g. quantized)
        Checkpoint.open(ref, role).close()
    instruct = hub.resolve(roles["instruct"]) if roles else None
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
        record = {"tool": "shadowmerge mergekit", "version": __version__, "config": str(Path(config).absolute()),
                  "merge_method": method, "mergekit_args": list(mergekit_args)}
        if instruct is not None:
            for p in side_files(tmp):
                if p.name not in _KEEP:
                    p.unlink()
            dtype = cfg.get("out_dtype") or cfg.get("dtype")
            names = copy_side_files(instruct, tmp, dtype_name(dtype), skip=_KEEP)
            record.update(roles=roles, side_files_from=str(instruct), side_files=names,
                          recompute=_recompute_inputs(cfg, roles, instruct, dtype))
        write_record(tmp, record)
        target.commit()
    return target.target


def _recompute_inputs(cfg: dict, roles: dict, instruct: Path, dtype) -> dict | None:
    """The graft that a shadow_graft config computes, for `shadowmerge verify --recompute` (None if not plain)."""
    alpha = (cfg.get("parameters") or {}).get("alpha", 1.0) if isinstance(cfg.get("parameters"), dict) else None
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None       # per-tensor or filtered alpha: not one graft
    paths = {"instruct": str(instruct.absolute())}
    for role in ("base", "tuned"):
        paths[role] = str(hub.resolve(roles[role]).absolute())
    return {"tool": "shadowmerge graft", "input_paths": paths, "alpha": float(alpha),
            "dtype": dtype_name(dtype) or "as the instruct", "vocab": "error", "include": None, "exclude": None}


def _mergekit_yaml(cfg: dict, out: Path, args: tuple[str, ...]) -> None:
    import click
    import yaml
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    fd, cfg_path = tempfile.mkstemp(suffix=".yml", prefix="shadowmerge-")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        mergekit_yaml.main(args=[cfg_path, str(out), *args], standalone_mode=False)
    except click.ClickException as exc:
        raise ShadowMergeError(f"mergekit-yaml option error: {exc.format_message()}") from None
    except (ShadowMergeError, KeyboardInterrupt):
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ShadowMergeError(f"mergekit failed: {type(exc).__name__}: {reason}") from None
    finally:
        os.unlink(cfg_path)
