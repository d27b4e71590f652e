"""The models an evaluation compares: `LABEL=PATH_OR_HUB_ID` (or a bare path, labelled by its folder name),
checked before anything is evaluated (the folder or Hub id resolves, holds unquantized weights, a tokenizer,
and a chat template when one is asked for), and described for the record (path, Hub commit)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ShadowMergeError, first_line

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,63}$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "tokenizer.tiktoken")


@dataclass
class Model:
    label: str
    ref: str
    folder: Path | None = None
    described: dict = field(default_factory=dict)
    alpha: float | None = None            # an α-sweep model: made (grafted) when its turn comes
    setting: int = 0                      # ... with the sweep's setting (several updates: weights, combine)
    checkpoint: object = None             # the opened Checkpoint (Hub ids: weights fetched when evaluated)

    def fetch(self, progress: bool) -> None:
        if self.checkpoint is not None:
            self.checkpoint.fetch(progress)


def label_of(path: str) -> str:
    name = Path(str(path).rstrip("/")).name or str(path)
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", name)[:64].lstrip("._-=+") or "model"


def parse(specs: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """[(label, reference)] from LABEL=PATH or bare paths; labels unique and usable as folder names."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        spec = str(spec)
        label, eq, ref = spec.partition("=")
        if not eq or Path(spec).expanduser().exists():
            label, ref = label_of(spec), spec
        elif not _LABEL.match(label):
            raise ShadowMergeError(f"model {spec!r}: the label {label[:40]!r} may hold letters, digits and ._+=- "
                                   f"(up to 64, starting with a letter or digit); write LABEL=PATH, e.g. shadow=./out")
        if not ref:
            raise ShadowMergeError(f"model {spec!r} names no model; write LABEL=PATH_OR_HUB_ID, e.g. shadow=./out")
        if any(label == seen for seen, _ in out):
            first = next(r for seen, r in out if seen == label)
            if not eq or Path(spec).expanduser().exists():
                raise ShadowMergeError(f"models {first} and {ref} both get the label {label!r} from their folder "
                                       f"names; name them: write LABEL=PATH for each, e.g. {label}-1={first} "
                                       f"{label}-2={ref}")
            raise ShadowMergeError(f"the label {label!r} is given twice; name each model once: LABEL=PATH")
        out.append((label, ref))
    return out


def open_model(label: str, ref: str, chat_template: bool, allow_pickle: bool, progress: bool,
               why: str | None = None) -> Model:
    """Checked, its side files at hand (a Hub id's downloaded), its weights not yet downloaded."""
    from ..transports import hub
    from ..checkpoint import Checkpoint

    ckpt = Checkpoint.open(ref, f"model {label}", allow_pickle)
    try:
        ckpt.needs_local("eval")
        if ckpt.quantized:             # FP8 blocks transformers cannot decode on a CPU: refused now, not after loading
            from ..formats.fp8 import check_decodable

            check_decodable(ckpt, f"model {label}")
        ckpt.fetch(progress, side=True, weights=False)
        check_tokenizer(label, ref, ckpt.folder, chat_template, why)
        described = {"ref": ref, "path": str(Path(ckpt.folder).resolve()), "commit": None}
        prov = hub.provenance([ckpt]).get(ckpt.label)
        if prov:
            described.update(repo=prov["repo"], revision=prov["revision"], commit=prov["sha"])
    except BaseException:
        ckpt.close()
        raise
    return Model(label, ref, Path(ckpt.folder), described, checkpoint=ckpt)


def check_tokenizer(label: str, ref: str, folder: Path, chat_template: bool, why: str | None = None):
    """The model's tokenizer, loaded (a one-line error when it has none, or no chat template when one is needed)."""
    if not any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
        raise ShadowMergeError(f"model {label} ({ref}) has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:3])}, "
                               f"...); add the tokenizer files of the model it was made from to {folder}")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:            # noqa: BLE001 - a damaged tokenizer of a stranger: one line
        raise ShadowMergeError(f"model {label} ({ref}): its tokenizer does not load ({type(exc).__name__}: "
                               f"{first_line(exc, 120, empty='')}); re-save "
                               f"it with the model's tokenizer") from None
    if chat_template and not tok.chat_template:
        if why:
            raise ShadowMergeError(f"model {label} ({ref}) has no chat template, and {why}; add the template "
                                   f"(chat_template.jinja) to {folder}, or leave out --heldout and pass "
                                   f"--no-apply-chat-template")
        raise ShadowMergeError(f"model {label} ({ref}) has no chat template, and --apply-chat-template is on; "
                               f"pass --no-apply-chat-template (plain prompts for every model), or add the "
                               f"template (chat_template.jinja) to {folder}")
    return tok
