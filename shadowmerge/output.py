"""The output folder: checked, written in a temporary folder beside the target, renamed at the end.

Also copies the Instruct's side files (config, generation config, tokenizer, chat template, ...),
never the Base's, and writes the run record. On any failure or Ctrl-C nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ShadowMergeError
from .plan import human_bytes

RECORD = "shadowmerge.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def side_files(folder: Path) -> list[Path]:
    """Every top-level non-weight file of a model folder (config, tokenizer, templates, README, ...)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
                  and p.name not in WEIGHT_INDEXES and p.name != RECORD and not p.name.startswith("."))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(folder: Path) -> None:
    """Give the files of a folder the usual mode (0666 minus the umask): some writers leave 0600."""
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~_umask())


class OutputFolder:
    """with OutputFolder(target, force, inputs) as tmp: write into tmp; then .commit() renames it."""

    def __init__(self, target: str | Path, *, force: bool, inputs: list[Path], need_bytes: int, flag: str = "--out"):
        self.target = Path(target).expanduser().absolute()
        self.force = force
        real = self.target.resolve()
        for folder in inputs:
            inp = folder.resolve()
            if real == inp or inp in real.parents:
                raise ShadowMergeError(f"{flag} {target} is inside the input {folder}; choose a folder elsewhere")
            if real in inp.parents:
                raise ShadowMergeError(f"{flag} {target} contains the input {folder}; choose another folder")
        if self.target.exists() and not force:
            raise ShadowMergeError(f"{target} already exists; choose another {flag} or pass --force to replace it")
        if self.target.exists() and not self.target.is_dir():
            raise ShadowMergeError(f"{target} exists and is not a folder; choose another {flag}")
        self._made: list[Path] = []
        parent = self.target.parent
        probe = parent
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if need_bytes > free:
            raise ShadowMergeError(f"not enough disk space in {probe}: the output needs {human_bytes(need_bytes)}, "
                                   f"{human_bytes(free)} is free; free some space or choose another {flag}")
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        missing = []
        p = self.target.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            p.mkdir()
            self._made.append(p)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.shadowmerge-", dir=self.target.parent))
        return self.tmp

    def commit(self) -> None:
        assert self.tmp is not None
        os.chmod(self.tmp, 0o777 & ~_umask())
        old = None
        if self.target.exists():
            old = self.target.parent / f"{self.tmp.name}-old"
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        self.tmp = None
        self._made = []
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for p in reversed(self._made):
            try:
                p.rmdir()
            except OSError:
                pass


def copy_side_files(src: Path, dst: Path, dtype_name: str | None, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the Instruct's side files (but those named in skip); record a changed output dtype in config.json."""
    names = []
    for path in side_files(src):
        if path.name in skip:
            continue
        shutil.copyfile(path, dst / path.name)
        names.append(path.name)
    if dtype_name and (dst / "config.json").is_file():
        cfg = json.loads((dst / "config.json").read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = dtype_name
        if "dtype" not in cfg and "torch_dtype" not in cfg:
            cfg["dtype"] = dtype_name
        (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return names


def write_record(folder: Path, record: dict) -> None:
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
