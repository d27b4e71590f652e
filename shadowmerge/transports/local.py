"""LocalFiles: a model folder of this machine, read with pread on descriptors opened once."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from ..errors import ShadowMergeError
from ..formats.safetensors import read_header
from . import register


@register
class LocalFiles:
    """A model folder of this machine: pread on descriptors opened once, and the same descriptors for copies."""

    commit = None
    streams = False

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

    def source(self) -> dict | None:
        return None

    def finish(self) -> str | None:
        return None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
