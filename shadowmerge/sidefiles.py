"""Side files: the files of a model folder that are not weights (config, tokenizer, chat template, README, ...).

The output of a graft keeps the Instruct's side files (copy_side_files); a Hub model's side files are
downloaded only when they are kept. Both ask the one predicate here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .record import RECORD

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_INDEXES = (INDEX, PICKLE_INDEX)
#: side files that describe the input model itself (its card, its provenance, its training run): an output
#: is another model, so it never carries them (it gets its own card and record)
DESCRIBE_THE_INPUT = ("README.md", "PROVENANCE.txt", "trainer_state.json", "train_results.json",
                      "all_results.json", "eval_results.json")


def is_side_file(name: str) -> bool:
    """Whether a top-level file name is a side file: not weights, an index, our record or hidden."""
    return ("/" not in name and not name.endswith(WEIGHT_SUFFIXES) and name not in WEIGHT_INDEXES
            and name != RECORD and not name.startswith("."))


def side_files(folder: Path) -> list[Path]:
    """Every top-level side file of a model folder."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_side_file(p.name))


def copy_side_files(src: Path, dst: Path, dtype_name: str | None, skip: tuple[str, ...] = (),
                    drop: tuple[str, ...] = ()) -> list[str]:
    """Copy the Instruct's side files (but those named in skip, and those that describe the Instruct itself: its
    card, provenance, training run); record a changed output dtype in config.json, and remove its keys in drop
    (an FP8 Instruct written as bf16: its quantization_config)."""
    from . import jsonfile

    names = []
    for path in side_files(src):
        if path.name in skip or path.name in DESCRIBE_THE_INPUT:
            continue
        shutil.copyfile(path, dst / path.name)
        names.append(path.name)
    if (dtype_name or drop) and (dst / "config.json").is_file():
        cfg = jsonfile.load(dst / "config.json", "the instruct's config.json")
        for key in drop:
            cfg.pop(key, None)
        for key in ("dtype", "torch_dtype"):
            if key in cfg and dtype_name:
                cfg[key] = dtype_name
        if "dtype" not in cfg and "torch_dtype" not in cfg and dtype_name:
            cfg["dtype"] = dtype_name
        (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return names
