"""Checkpoints of a training run, kept beside OUT as OUT.checkpoints/, and what --resume continues from.

The Trainer writes a checkpoint every `save_steps` optimizer steps (the latest one kept) into
OUT.checkpoints/base/ (and instruct/ with --baseline), beside recipe.json: the recipe, inputs and data
hash they belong to. A run that finishes, or is rejected, removes the folder; an interrupted one leaves
it, and `--resume` goes on from the last checkpoint (transformers' get_last_checkpoint, which restores
optimizer, scheduler, RNG and data position) only for the same recipe and data. The folder is a working
area, not an output: it is written in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import ShadowMergeError

VOLATILE = ("out", "save_steps")        # settings that may change between a run and its --resume


def folder(out) -> Path:
    final = Path(str(out)).expanduser().absolute()
    return final.parent / f"{final.name}.checkpoints"


def key(r, base: Path, instruct: Path, data_hash: str) -> dict:
    """What a checkpoint belongs to: the recipe (inputs as resolved folders) and the data's hash."""
    out = {k: v for k, v in r.as_dict().items() if k not in VOLATILE}
    out.update(base=str(Path(base).resolve()), instruct=str(Path(instruct).resolve()), data=data_hash)
    return json.loads(json.dumps(out, default=str))


def last(work: Path, prune: bool = False) -> str | None:
    """The newest complete checkpoint-N folder in work (its trainer_state.json, which the Trainer writes last,
    reads as step N), or None. With prune, newer incomplete ones (a save cut short by Ctrl-C) are removed."""
    import re

    found = sorted(((int(m.group(1)), p) for p in (work.iterdir() if work.is_dir() else [])
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d{1,12})", p.name))), reverse=True)
    for step, path in found:
        if _read(path / "trainer_state.json").get("global_step") == step:
            return str(path)
        if prune:
            shutil.rmtree(path)
    return None


def check(work: Path, want: dict, resume: bool, force: bool, resumable: bool) -> str | None:
    """Before training (main process, no live run writing OUT): --resume needs checkpoints of this recipe; without
    it, checkpoints of an interrupted run are not thrown away silently (--force does), but a folder with no
    complete checkpoint is (there is nothing in it to resume). Returns what it removed, to say so."""
    record = work / "recipe.json"
    if resume and not resumable:
        raise ShadowMergeError("--resume works with the trl backend; with llamafactory, run the kept config with "
                               "its own resume_from_checkpoint (see --emit-only)")
    if resume and not record.is_file():
        raise ShadowMergeError(f"--resume: there are no checkpoints at {work}; start without --resume")
    found = _read(record)
    differs = sorted(k for k in set(want) | set(found) if want.get(k) != found.get(k)) if record.is_file() else []
    newest = last(work / "base")
    where = Path(newest).name if newest else "no checkpoint yet"
    if resume and differs:
        raise ShadowMergeError(f"--resume: the checkpoints at {work} were made by another recipe or data "
                               f"({', '.join(differs[:6])}{' ...' if len(differs) > 6 else ''} differ); run the "
                               f"same recipe and data to resume, or pass --force without --resume to start over")
    if resume or not work.exists():
        return None
    if force:
        shutil.rmtree(work)
        return None
    if newest is None and last(work / "instruct") is None:       # nothing to resume or lose: start over
        shutil.rmtree(work)
        return f"removed {work}, left by an interrupted run before its first checkpoint"
    if differs:
        raise ShadowMergeError(f"{work} holds the checkpoints of an interrupted run of another recipe or data; "
                               f"--force removes them (or use another --out)")
    raise ShadowMergeError(f"{work} holds the checkpoints of an interrupted run of this recipe ({where}); add "
                           f"--resume to go on from there, or --force to start over")


def start(work: Path, want: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(want, indent=2) + "\n")


def _read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
