"""Where a model's bytes come from: the Transport interface, its registry, and LocalFiles (a folder here).

A TensorStore (checkpoint.py) asks its transport for everything it reads: which files the model has, their
safetensors headers, and bytes at an offset (`pread`); a writer copying a tensor unchanged asks for a file
descriptor (`zero_copy_fd`) to copy in the kernel, and reads with pread where there is none. Built in:
LocalFiles, and hub.HubFiles (a Hub revision: headers by HTTP range, weights downloaded into the
huggingface_hub cache on first read). A new transport is a class with these methods, registered with
`@register` (see docs/architecture.md); `resolve(ref)` asks each registered transport whether the reference
is its kind, the most recently registered first.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Protocol

from .errors import ShadowMergeError
from .formats.safetensors import read_header

MODULES = ("shadowmerge.hub",)            # imported to register their transports
TRANSPORTS: list[type] = []


class Transport(Protocol):
    folder: Path             # where the model's files are, or will be once fetched, on this machine
    name: str                # the model, for messages
    commit: str | None       # the Hub commit it resolved to; None for a folder of this machine
    pickles: list[str]       # pickle weights it lists but does not read (to say why no weights were found)
    label: str               # the role it is read in (base, instruct, adapter), for messages; set by its reader

    @classmethod
    def claims(cls, ref: str) -> bool:
        """Whether ref (a path, a Hub id, a URL) is this transport's kind of reference."""

    @classmethod
    def open(cls, ref: str, allow_pickle: bool) -> Transport:
        """The model ref names (a one-line error when it cannot be reached)."""

    def has(self, name: str) -> bool:
        """Whether the model has this file (a path relative to its folder)."""

    def names(self) -> list[str]:
        """The model's top-level entries."""

    def size(self, name: str) -> int:
        """A file's size in bytes (0 when it is not there)."""

    def header(self, path: Path) -> tuple[int, dict]:
        """A safetensors file's validated header: (data start, {name: (dtype, shape, begin, end)})."""

    def fetch(self, names: list[str], progress: bool, desc: str | None) -> None:
        """Make these files readable from `folder` (a download, where they are not here yet)."""

    def pread(self, path: Path, view: memoryview, pos: int) -> int:
        """Read up to len(view) bytes of path at pos into view; the count read (0 at the end of the file)."""

    def zero_copy_fd(self, path: Path) -> int | None:
        """A read-only OS descriptor of path for copies in the kernel (copy_file_range), or None."""

    def evicting_metadata(self) -> contextlib.AbstractContextManager:
        """Within: a failed check of the model's JSON files discards cached copies (so a bad download goes)."""

    def describe(self) -> dict | None:
        """For run records: the Hub id, revision and commit; None for a folder of this machine."""

    def close(self) -> None:
        """Release open descriptors."""


def register(cls: type) -> type:
    """Class decorator: make a transport available to `resolve`."""
    TRANSPORTS.append(cls)
    return cls


def resolve(ref: str | Path, allow_pickle: bool = False) -> Transport:
    """The transport of a model reference: a folder of this machine, a Hub id, or another registered kind."""
    text = str(ref)
    try:
        if "\0" in text:
            raise ValueError
        Path(ref).expanduser().exists()
    except (OSError, ValueError, RuntimeError):      # a NUL byte, a name too long, ~unknown-user
        raise ShadowMergeError(f"{text[:200]!r} is not a usable path or Hub id; pass a model folder or an "
                               f"id like org/name") from None
    _load()
    for cls in reversed(TRANSPORTS):
        if cls.claims(text):
            return cls.open(ref, allow_pickle)
    raise ShadowMergeError(f"model folder not found: {ref}; check the path, or pass a Hub id like org/name")


def _load() -> None:
    import importlib

    for module in MODULES:
        importlib.import_module(module)


@register
class LocalFiles:
    """A model folder of this machine: pread on descriptors opened once, and the same descriptors for copies."""

    commit = None

    def __init__(self, folder: Path):
        self.folder, self.name, self.pickles, self.label = Path(folder), str(folder), [], ""
        self._fds: dict[Path, int] = {}
        self._opening = threading.Lock()       # the reader and compute threads (a LoRA's Wide factors) read at once

    @classmethod
    def claims(cls, ref: str) -> bool:
        return Path(ref).expanduser().exists()

    @classmethod
    def open(cls, ref: str | Path, allow_pickle: bool = False) -> LocalFiles:
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ShadowMergeError(f"{ref} is a file; pass the model folder that contains it")
        return cls(path)

    def has(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir())

    def size(self, name: str) -> int:
        path = self.folder / name
        return path.stat().st_size if path.is_file() else 0

    def header(self, path: Path) -> tuple[int, dict]:
        start, header, _ = read_header(path, path.stat().st_size)
        return start, header

    def fetch(self, names: list[str], progress: bool = False, desc: str | None = None) -> None:
        return None

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._opening:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def pread(self, path: Path, view: memoryview, pos: int) -> int:
        return os.preadv(self._fd(path), [view], pos)

    def zero_copy_fd(self, path: Path) -> int | None:
        return self._fd(path)

    def evicting_metadata(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def describe(self) -> dict | None:
        return None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
