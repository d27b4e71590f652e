"""Model cards: every output folder gets its own README.md, built with huggingface_hub's ModelCard.

Never the Instruct's card copied (it would claim to be the official model): `base_model` lists the Hub ids
of the models the output was made from (local folders are named in the text, since the Hub accepts only
repo ids there), `base_model_relation` says how, the license is carried over from the Instruct's own card,
and the text gives the exact command, the method and, where known, σ and the recipe.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ._version import __version__

TAGS = ["shadow-ft", "shadowmerge"]


PAPER = "[Shadow-FT](https://arxiv.org/abs/2505.12716)"
_TEMPLATE = "---\n{{ card_data }}\n---\n\n# {{ title }}\n\n{{ body }}\n"


def hub_id(ref: str | Path | None) -> str | None:
    """ref as a Hub repo id (revision dropped), or None for a local folder or anything the Hub would refuse."""
    if ref is None:
        return None
    text = str(ref).split("@", 1)[0]
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or len(text) > 200 or "\0" in text:
        return None
    try:
        if Path(text).exists():             # a local folder named like org/name
            return None
    except (OSError, ValueError):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def license_of(folder: Path | None) -> dict:
    """license (and license_name/license_link for 'other') from a model folder's own card, if it has one."""
    readme = Path(folder) / "README.md" if folder is not None else None
    if readme is None or not readme.is_file() or readme.stat().st_size > 1 << 20:
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
    except Exception:           # noqa: BLE001 - a damaged card of a stranger only means: license unknown
        return {}
    keys = ("license", "license_name", "license_link")
    return {k: getattr(data, k) for k in keys if isinstance(getattr(data, k, None), str)}


def command_line(argv: list[str] | None) -> str:
    return "shadowmerge " + shlex.join(argv) if argv is not None else "the Python API of shadowmerge"


def write(folder: Path, **fields) -> Path:
    """folder/README.md for an output (fields: see render)."""
    return save(folder, render(**fields))


def save(folder: Path, text: str) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(text)
    return path


class Early:
    """A card rendered on a thread of its own while the data moves (its fields are known before: the plan and
    the options), so that the end of a run only writes the text. Rendering imports huggingface_hub's card
    modules and runs a Jinja template: ~0.1 s that would otherwise come after the last byte."""

    def __init__(self, **fields):
        import threading

        self._text: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._render, args=(fields,), daemon=True, name="shadowmerge-card")
        self._thread.start()

    def _render(self, fields: dict) -> None:
        try:
            self._text = render(**fields)
        except BaseException as exc:        # raised where the card is written
            self._error = exc

    def write(self, folder: Path, note: str | None = None) -> Path:
        """The card, with a note learned while the data moved (a section of its own) appended."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return save(folder, self._text.rstrip("\n") + "\n\n" + note.strip() + "\n" if note else self._text)


def render(*, title: str, made_from: dict[str, str | Path | None], relation: str, license_from: Path | None,
           what: str, command: str, details: dict | None = None, library: str = "transformers",
           datasets: list[str] | None = None, evaluation: str | None = None) -> str:
    """The text of an output's README.md: made_from maps a role ("Instruct", "Base", ...) to the model's
    reference."""
    from huggingface_hub import ModelCard, ModelCardData

    ids = []
    for ref in made_from.values():
        hid = hub_id(ref)
        if hid and hid not in ids:
            ids.append(hid)
    data = ModelCardData(base_model=ids or None, library_name=library, tags=list(TAGS),
                         datasets=[d for d in datasets or [] if hub_id(d)] or None, **license_of(license_from))
    if ids:
        data.base_model_relation = relation
    lines = [what, "", "| input | model |", "|---|---|"]
    lines += [f"| {role} | `{ref}` |" for role, ref in made_from.items() if ref is not None]
    lines += ["", "Made with:", "", "```", command, "```", ""]
    if details:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in details.items()]
        lines.append("")
    if evaluation:
        lines += [evaluation, ""]
    lines.append(f"Method: {PAPER}, W = W_Instruct + α · (W_Base,tuned − W_Base), in float32 and cast once; "
                 f"shadowmerge {__version__}.")
    text = str(ModelCard.from_template(data, template_str=_TEMPLATE, title=title, body="\n".join(lines)))
    return text if text.endswith("\n") else text + "\n"
