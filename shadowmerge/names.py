"""Names: a checkpoint's on-disk tensor names and the in-memory names a loaded model (and peft) uses.

transformers 5 renames checkpoint keys when it loads a model (Gemma-3 `language_model.model.*` becomes
`model.language_model.*`, Qwen2-VL `visual.*` becomes `model.visual.*`) and fuses some of them (per-expert
MoE weights become one 3-D `mlp.experts.gate_up_proj`). peft adapters are made on the loaded model, so
their keys use the in-memory names. This module asks transformers itself how it would load the folder:
the model class of config.json's `architectures`, built on the meta device (no weights, no remote code),
its `get_model_conversion_mapping`, and `rename_source_key` applied to every on-disk name, exactly as
`from_pretrained` does. No table is kept here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ShadowMergeError

# Real model classes are named like this; anything else in `architectures` is not looked up in transformers.
_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9_]{0,99}$")


@dataclass(frozen=True)
class Loaded:
    """How one on-disk tensor is loaded: its in-memory name, and the transform when it is not a plain rename."""

    disk: str
    memory: str
    converter: object | None = None      # a transformers WeightConverter (fusing, splitting, transposing ...)
    pattern: str | None = None           # the converter's source pattern this name matched


def disk_to_memory(folder: Path, names: list[str]) -> dict[str, Loaded]:
    """Each on-disk name's in-memory name, as transformers would load `folder`; {} when it cannot tell.

    Raises nothing for an unknown or custom architecture: the caller then compares names as they are.
    """
    model = meta_model(folder, names)
    if model is None:
        return {}
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    try:
        mapping = get_model_conversion_mapping(model)
    except Exception:           # noqa: BLE001 - a mapping transformers cannot build means: no renaming known
        return {}
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    prefix = model.base_model_prefix
    out = {}
    for name in names:
        memory, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if memory not in meta and name in meta:        # as from_pretrained: a key that should not have been renamed
            memory, pattern = rename_source_key(name, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        converter = by_pattern.get(pattern) if pattern is not None else None
        out[name] = Loaded(name, memory, converter, pattern if converter is not None else None)
    return out


_MODELS: dict[tuple, object] = {}


def meta_model(folder: Path, names: list[str]):
    """The model class config.json names, built on the meta device (once per folder); None when unknown, or
    when the config asks for far more layers or experts than the checkpoint's tensor names have (a config
    from a stranger must not make the build loop for minutes)."""
    config = Path(folder).resolve() / "config.json"
    try:
        stat = config.stat()
    except OSError:
        return None
    key = (config, stat.st_mtime_ns, stat.st_size)      # a config changed in place is read again
    if key not in _MODELS:
        _MODELS[key] = _build_meta_model(Path(folder), _module_bound(names))
    return _MODELS[key]


# config keys that count modules to build (layers, experts, blocks); other sizes cost nothing on the meta device
_COUNT_KEY = re.compile(r"(?i)layer|expert|depth|block")


def _module_bound(names: list[str]) -> int:
    """The largest module count a config may ask for: generous beside the indices the tensor names show
    (fused experts leave no index in the names)."""
    largest = 0
    for name in names:
        for part in name.split("."):
            if part.isdigit() and len(part) < 9:
                largest = max(largest, int(part) + 1)
    return 16 * largest + 1024


def _too_many_modules(value, bound: int, key: str = "") -> bool:
    if isinstance(value, dict):
        return any(_too_many_modules(v, bound, str(k)) for k, v in value.items())
    if isinstance(value, list):
        return len(value) > bound or any(_too_many_modules(v, bound, key) for v in value[:bound])
    return isinstance(value, int) and not isinstance(value, bool) and value > bound and bool(_COUNT_KEY.search(key))


def parameters_of(folder: Path, names: list[str], module: str) -> tuple[list[tuple[str, tuple[int, ...]]], bool] | None:
    """The parameters a module of the loaded model registers itself (in order, with shapes), and whether its
    3-D expert parameters are stored (experts, in, out) (`is_transposed`); None when there is no such module."""
    model = meta_model(folder, names)
    if model is None:
        return None
    try:
        mod = model.get_submodule(module)
    except AttributeError:
        return None
    params = [(n, tuple(p.shape)) for n, p in mod.named_parameters(recurse=False)]
    return params, bool(getattr(mod, "is_transposed", False))


def _build_meta_model(folder: Path, bound: int):
    import torch

    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:         # pragma: no cover - transformers is a dependency
        return None
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    archs = []
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
        if _too_many_modules(config.to_dict(), bound):
            return None
    except Exception:           # noqa: BLE001 - a config transformers cannot read: names are compared as they are
        return None
    for arch in archs[:1]:
        cls = getattr(transformers, arch, None) if _CLASS_NAME.match(arch) else None
        if cls is None or not hasattr(cls, "_from_config"):
            return None
        level = logging.getLogger("transformers").level
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            with torch.device("meta"):
                return cls._from_config(config)
        except Exception:       # noqa: BLE001 - a class that cannot be built from this config: no renaming known
            return None
        finally:
            logging.getLogger("transformers").setLevel(level)
    return None


def stacked_experts(loaded: Loaded) -> tuple[int, int] | None:
    """(source index, expert) when transformers loads this tensor by stacking experts (MergeModulelist on dim 0)
    and, for several sources, concatenating them along dim 1 (gate + up -> gate_up); None for any other transform."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in loaded.converter.operations]
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        return None
    patterns = list(loaded.converter.source_patterns)
    if loaded.pattern not in patterns or loaded.pattern.count("*") != 1:
        return None
    found = re.search(re.escape(loaded.pattern).replace(r"\*", r"(\d+)") + "$", loaded.disk)
    return (patterns.index(loaded.pattern), int(found.group(1))) if found else None


def converted_error(ref: str, memory: str, loaded: list[Loaded]) -> ShadowMergeError:
    """The one-line refusal for an adapter target that is not stored as one tensor on disk."""
    disk = ", ".join(sorted(x.disk for x in loaded)[:3]) + (", ..." if len(loaded) > 3 else "")
    return ShadowMergeError(
        f"--lora {ref}: the adapter changes {memory}, which transformers builds on loading from {disk} "
        f"({type(loaded[0].converter).__name__}); shadowmerge cannot write that update back exactly: leave it out "
        f"of the adapter, or merge the adapter into the Base with peft and graft that with --base/--tuned")
