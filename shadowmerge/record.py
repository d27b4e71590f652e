"""Run records: the JSON file every output carries (shadowmerge.json; train: run.json; eval: eval.json;
extract: extract.json; similarity: report.json), with the manifest of every other file (size, sha256,
safetensors tensors) that `shadowmerge verify` checks.

Made (`new`: the command, shadowmerge's version and the record format's version), written, read back
(`read`, as a Record), sealed, recognised and relocated only here; what each command puts in its record is
built by the command (the graft's from its GraftSpec, stored as it is).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from .errors import ShadowMergeError

RECORD = "shadowmerge.json"
#: the record format's version (records written before it was versioned read as 0); raised when a key's meaning
#: changes, not when a key is added
RECORD_VERSION = 1
#: the record file of each command (its "tool" is "shadowmerge COMMAND")
FILES = {"graft": RECORD, "mergekit": RECORD, "lora retarget": RECORD, "train": "run.json", "eval": "eval.json",
         "extract": "extract.json", "similarity": "report.json"}
#: the run records shadowmerge's commands write at the top of an output folder
RECORDS = tuple(dict.fromkeys(FILES.values()))
#: the records whose output `shadowmerge verify` checks, in the order it looks for them: every command's
VERIFIABLE = RECORDS


@dataclass(frozen=True)
class Record:
    """A run record as read back: its file, the command that wrote it, that shadowmerge's version, the record
    format's version, and the whole record as written (`data`)."""
    file: str
    command: str
    version: str
    record_version: int
    data: dict


def local_ref(ref):
    """A model, file or folder reference as a record keeps it: the absolute path where it names a local one (so the
    record means the same from any working directory), else as given (a Hub id, None)."""
    if ref is None:
        return None
    path = Path(str(ref)).expanduser()
    return str(path.absolute()) if os.path.lexists(path) else str(ref)


def new(command: str, fields: dict) -> dict:
    """A command's record: who wrote it, then the command's own fields in their order (which cannot replace
    those three)."""
    if command not in FILES:
        raise ValueError(f"no record file for command {command!r}")
    head = {"tool": f"shadowmerge {command}", "version": __version__, "record_version": RECORD_VERSION}
    return {**head, **{k: v for k, v in fields.items() if k not in head}}


def write(folder: Path, record: dict, **dump) -> Path:
    """Write a record made by `new` into its command's file in folder (`dump`: json.dumps options)."""
    path = folder / FILES[record["tool"].removeprefix("shadowmerge ")]
    path.write_text(json.dumps(record, **{"indent": 2, **dump}) + "\n")
    return path


def read(folder: Path, names: tuple[str, ...] = VERIFIABLE, what: str = "run record",
         hint: str = "pass a folder shadowmerge wrote (its record must be intact)") -> Record:
    """The first of `names` that folder holds, checked to be a shadowmerge record; else a one-line error."""
    from . import jsonfile

    name = next((n for n in names if (folder / n).is_file()), names[0] if len(names) == 1 else None)
    if name is None:                # (one name: jsonfile says it is missing, with the hint)
        raise ShadowMergeError(f"{folder} has no {' or '.join(names)}: it is not a shadowmerge output folder "
                               f"(or the record was removed); pass the folder shadowmerge wrote")
    data = jsonfile.load(folder / name, what, hint=hint)
    tool = data.get("tool")
    if not isinstance(tool, str) or not tool.startswith("shadowmerge "):
        raise ShadowMergeError(f"{folder / name} was not written by shadowmerge (its \"tool\" is "
                               f"{str(tool)[:60]!r}); {hint}")
    version, record_version = data.get("version"), data.get("record_version", 0)
    if not isinstance(record_version, int) or isinstance(record_version, bool) or record_version > RECORD_VERSION:
        raise ShadowMergeError(f"{folder / name} has record_version {str(record_version)[:20]}, which this shadowmerge "
                               f"({__version__}) does not know; upgrade shadowmerge to read it")
    return Record(name, tool.removeprefix("shadowmerge "), str(version), record_version, data)


def is_shadowmerge_output(folder: Path) -> bool:
    """Does folder hold a run record that shadowmerge wrote (a JSON object whose "tool" is "shadowmerge ...")?"""
    for name in RECORDS:
        try:
            read(folder, (name,))
            return True
        except ShadowMergeError:
            continue
    return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of every file under folder (links not followed)."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            out.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(out)


def header_tensors(path: Path, size: int) -> dict[str, list]:
    """{tensor name: [dtype name, shape]} of one safetensors file, from its (validated) header."""
    from .formats.safetensors import NAMES, read_header

    _, tensors, _ = read_header(path, size)
    return {t: [NAMES[d], list(shape)] for t, (d, shape, _, _) in tensors.items()}


def manifest(folder: Path, skip: str, known: dict[str, str] | None = None) -> dict:
    """{relative path: {size, sha256[, tensors: {name: [dtype, shape]}]}} for every file but `skip`.

    `known` holds the sha256 of files hashed while they were written, and the manifests of records in
    subfolders (train's shadow/, written and sealed in this same run) give theirs; the rest is read here."""
    from concurrent.futures import ThreadPoolExecutor

    known = dict(known or {})
    for sub in folder.glob(f"*/{RECORD}"):
        for name, entry in (json.loads(sub.read_text()).get("manifest") or {}).items():
            known.setdefault(f"{sub.parent.name}/{name}", entry["sha256"])
    names = [n for n in files_under(folder) if n != skip]
    with ThreadPoolExecutor(2, thread_name_prefix="shadowmerge-sha256") as pool:
        digests = list(pool.map(lambda n: known.get(n) or sha256_file(folder / n), names))
    out = {}
    for name, digest in zip(names, digests):
        path = folder / name
        entry: dict = {"size": path.stat().st_size, "sha256": digest}
        if name.endswith(".safetensors"):
            entry["tensors"] = header_tensors(path, entry["size"])
        out[name] = entry
    return out


def seal(folder: Path, record: str = RECORD, known: dict[str, str] | None = None) -> None:
    """Add the manifest of folder to its run record, if it has one."""
    path = folder / record
    if path.is_file():
        data = json.loads(path.read_text())
        data["manifest"] = manifest(folder, record, known)
        path.write_text(json.dumps(data, indent=2) + "\n")


def add_timeline(path: Path, timeline) -> None:
    """The run's timeline (timeline.py) into a sealed record, durably (the record is not in its own manifest)."""
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    data["timeline"] = timeline.as_record()
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def final_paths(value, tmp: str, final: str):
    """Every string of a record that names a temporary folder, naming the final one instead."""
    if isinstance(value, dict):
        return {k: final_paths(v, tmp, final) for k, v in value.items()}
    if isinstance(value, list):
        return [final_paths(v, tmp, final) for v in value]
    if isinstance(value, str) and (value == tmp or value.startswith(tmp + "/")):
        return final + value[len(tmp):]
    return value


def relocate(folder: Path, tmp: Path, final: Path) -> None:
    """A record (and model card) written inside a temporary folder that will be renamed to `final` (train's
    run folder, with shadow/ and instruct-ft/ in it): name the final folders, seal the record again."""
    from .output import rewrite_text

    path = folder / RECORD
    if not path.is_file():
        return
    card = folder / "README.md"          # the baseline's card names the adapter it merged
    if card.is_file() and str(tmp) in card.read_text():
        rewrite_text(card, card.read_text().replace(str(tmp), str(final)))
    rec = final_paths(json.loads(path.read_text()), str(tmp), str(final))
    known = {n: e["sha256"] for n, e in rec.pop("manifest", {}).items() if n != "README.md"}   # train wrote only the card
    path.write_text(json.dumps(rec, indent=2) + "\n")
    seal(folder, known=known)
