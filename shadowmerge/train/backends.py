"""What `shadowmerge train` asks of a trainer, and the registry of trainers (`--backend NAME`).

A backend trains one model at a time ("base": the Base, grafted afterwards; "instruct": the --baseline, the
same recipe on the Instruct) on the run's rows, formatted with the Instruct's chat template, into a folder:
a PEFT adapter for method lora, a model for method full. The run (prepare.Run) holds the resolved recipe, the
inputs, the rows and the record; the stages in run.py call check once, then train, tidy and losses per model.
A new trainer is a class with these four methods and `@register` (see docs/architecture.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import ShadowMergeError

if TYPE_CHECKING:       # for the annotations only: prepare.py imports this module
    from .prepare import Run

MODULES = ("shadowmerge.train.trl_backend", "shadowmerge.train.llamafactory")     # imported to register
BACKENDS: dict[str, type] = {}


class Backend(Protocol):
    name: str              # the --backend value
    resumes: bool          # whether --resume continues from its checkpoints in OUT.checkpoints/

    def check(self, run: Run) -> None:
        """Before any training: the trainer is installed and takes the recipe (else a one-line error)."""

    def train(self, run: Run, role: str, out: Path) -> str | None:
        """Train role's model into out; None when trained, else what was written instead (--emit-only)."""

    def tidy(self, run: Run, role: str, out: Path) -> None:
        """The trained folder as it is kept (paths it names, the adapter's base); may reject the run."""

    def losses(self, run: Run, role: str, out: Path) -> list[dict]:
        """The training loss per logged step: [{"step": N, "loss": x}, ...]."""


def register(cls: type) -> type:
    """Class decorator: make a backend selectable as --backend cls.name."""
    BACKENDS[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    _load()
    return tuple(BACKENDS)


def create(name: str) -> Backend:
    """A fresh backend for one run (backends may keep what they learn while training, e.g. the losses)."""
    _load()
    if name not in BACKENDS:
        raise ShadowMergeError(f"backend {name!r} is not one of {', '.join(BACKENDS)}; pick one of them")
    return BACKENDS[name]()


def _load() -> None:
    import importlib

    for module in MODULES:
        importlib.import_module(module)


def name_base(adapter: Path, base: Path) -> None:
    """The adapter's base_model_name_or_path: the absolute folder of the model it was trained on (re-runs from
    anywhere; not LLaMA-Factory's model view or a relative path as typed)."""
    from ..output import rewrite_text

    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    local = Path(str(base)).expanduser()
    cfg["base_model_name_or_path"] = str(local.absolute()) if local.exists() else str(base)
    rewrite_text(path, json.dumps(cfg, indent=2) + "\n")
