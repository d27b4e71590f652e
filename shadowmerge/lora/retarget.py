"""retarget(): the same LoRA adapter, pointed at the Instruct model instead of the Base, unmerged.

For serving many adapters on one Instruct model (vLLM, TGI, peft): the weights are copied byte for
byte, adapter_config.json's base_model_name_or_path names the Instruct, and shadowmerge.json plus
the README record where the adapter was trained. DoRA and modules_to_save adapters are refused:
their update depends on the Base weights, so it does not carry over without merging.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..transports import hub
from ..checkpoint import Checkpoint
from ..errors import ShadowMergeError
from ..output import OutputFolder
from ..plan import build_plan
from .. import record
from .adapter import CONFIG, Adapter
from .source import LoraDelta


@dataclass
class RetargetSummary:
    out: Path
    modules: int
    trained_on: str | None
    instruct: str
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"wrote {self.out}: {self.modules} LoRA module(s), weights unchanged; base_model_name_or_path "
                 f"{self.trained_on or '(unset)'} -> {self.instruct}"]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def retarget(adapter: str | Path, instruct: str | Path, out: str | Path, *, force: bool = False,
             allow_pickle: bool = False, progress: bool = True, command: str | None = None) -> RetargetSummary:
    """Write a copy of `adapter` whose base model is `instruct`, after checking it fits (headers only)."""
    opened: list = []
    try:
        ad = Adapter.open(adapter, allow_pickle)
        opened.append(ad)
        ad.needs_local("lora retarget")
        why = ad.needs_base()
        if why:
            raise ShadowMergeError(
                f"cannot retarget: the adapter {'; and '.join(why)}, so its update depends on the Base weights "
                f"and does not carry over to the Instruct unmerged; merge it instead: shadowmerge graft "
                f"--instruct {instruct} --lora {adapter} --base BASE --out DIR")
        inst = Checkpoint.open(instruct, "instruct", allow_pickle)
        opened.append(inst)
        ad.refuse_own_base(inst, hint="it already applies there: pass the Instruct sibling of that Base")
        # Without filters, the plan takes every adapter target or raises: each exists in the Instruct,
        # with the right shape, and none is a head the Instruct ties to its embedding.
        plan = build_plan(inst, LoraDelta(ad, None, inst))
        ad.fetch(progress, side=True)                    # a Hub adapter: all of it
        inst.fetch(weights=False, side=["README.md"])    # a Hub Instruct: its headers, and its card for the license
        files = [p for p in sorted(ad.folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
        target_ref, pinned = hub.reference(inst)
        folder = OutputFolder(out, force=force, inputs=[ad.folder, inst.folder],
                              need_bytes=sum(p.stat().st_size for p in files))
        with folder as tmp:
            for p in files:
                shutil.copyfile(p, tmp / p.name)
            cfg = dict(ad.config, base_model_name_or_path=target_ref, revision=pinned)   # not the Base's revision
            (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            record.write(tmp, record.new("lora retarget", {
                "adapter": str(adapter), "trained_on": ad.base_model, "retargeted_to": target_ref, "revision": pinned,
                "hub": hub.provenance(opened), "weights": "byte-identical copy of the adapter's",
                "method": "Shadow-FT: the adapter was trained on the Base and is applied to the Instruct"}))
            _write_card(tmp, target_ref, ad.base_model, adapter, inst.folder, command)
            folder.commit()
        return RetargetSummary(folder.target, len(ad.modules), ad.base_model, target_ref, plan.warnings)
    finally:
        for item in opened:
            item.close()


def _write_card(folder: Path, instruct: str, trained_on: str | None, adapter, inst_folder: Path,
                command: str | None) -> None:
    """The adapter's own card (peft's, with its stale base_model, is replaced): base_model is the Instruct."""
    from .. import card

    card.write(folder, title=f"A Shadow-FT LoRA adapter for {Path(str(instruct)).name}", library="peft",
               made_from={"Instruct (applied to)": instruct, "Base (trained on)": trained_on,
                          "adapter": adapter}, relation="adapter", license_from=inst_folder,
               what=f"This LoRA adapter was trained on `{trained_on or 'the Base model'}` and retargeted, unchanged, "
                    f"to its Instruct sibling `{instruct}` with `shadowmerge lora retarget`: load it on the Instruct "
                    f"with peft, or serve it there (vLLM, TGI).",
               command=command or card.command_line(None))
