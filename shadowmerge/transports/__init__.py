"""Where a model's bytes come from: the Transport interface, its registry, and the transports built in.

A TensorStore (checkpoint.py) asks its transport for everything it reads: which files the model has, their
safetensors headers, and bytes at an offset (`pread`); a writer copying a tensor unchanged asks for a file
descriptor (`zero_copy_fd`) to copy in the kernel, and reads with pread where there is none. Built in, a file
each: local.LocalFiles (a folder here), hub.HubFiles (a Hub revision: headers by HTTP range, weights downloaded
into the huggingface_hub cache), hub.HubStream (a Hub revision read by range, `--stream`, `hf://`), and
objectstore.ObjectFiles (`s3://`, `gs://`, `az://` through fsspec); the last two share stream.RangeStream (reads
in order, several requests in flight, every byte checked against the store's own digest). A new transport is a
class with these methods in a file of this folder, named in MODULES (see docs/architecture.md); `resolve(ref)`
asks each registered transport whether the reference is its kind, the most recently registered first.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Protocol

from ..errors import ShadowMergeError

MODULES = ("shadowmerge.transports.hub", "shadowmerge.transports.objectstore")   # imported to register their transports
TRANSPORTS: list[type] = []


class Transport(Protocol):
    folder: Path             # where the model's files are, or will be once fetched, on this machine
    name: str                # the model, for messages
    commit: str | None       # the Hub commit it resolved to; None for a folder of this machine
    pickles: list[str]       # pickle weights it lists but does not read (to say why no weights were found)
    label: str               # the role it is read in (base, instruct, adapter), for messages; set by its reader
    streams: bool            # True when weights are read by range from elsewhere, never copied down (fetch: side files)

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

    def source(self) -> dict | None:
        """For run records of a streamed input: its URL and each file read with its pinned version and digest (what
        `verify --recompute` re-reads and checks); None for files on this machine."""

    def finish(self) -> str | None:
        """After the run read what it needed: check every streamed file whole (the rest of it read, its digest and
        version compared; a one-line error naming the file); a line on retries and re-reads, or None."""

    def close(self) -> None:
        """Release open descriptors."""


def register(cls: type) -> type:
    """Class decorator: make a transport available to `resolve`."""
    TRANSPORTS.append(cls)
    return cls


def resolve(ref: str | Path, allow_pickle: bool = False, stream: bool = False) -> Transport:
    """The transport of a model reference: a folder of this machine, a Hub id (read by range with stream=True), a
    URL (s3://, gs://, az://, hf://), or another registered kind."""
    text = str(ref)
    try:
        if "\0" in text:
            raise ValueError
        if "://" not in text:
            Path(ref).expanduser().exists()
    except (OSError, ValueError, RuntimeError):      # a NUL byte, a name too long, ~unknown-user
        raise ShadowMergeError(f"{text[:200]!r} is not a usable path or Hub id; pass a model folder or an "
                               f"id like org/name") from None
    _load()
    for cls in reversed(TRANSPORTS):
        if cls.claims(text):
            return cls.open(ref, allow_pickle, stream) if getattr(cls, "streamable", False) else \
                cls.open(ref, allow_pickle)
    raise ShadowMergeError(f"model folder not found: {ref}; check the path, or pass a Hub id like org/name")


def _load() -> None:
    import importlib

    for module in MODULES:
        importlib.import_module(module)




PINS: "contextvars.ContextVar[dict]" = contextvars.ContextVar("shadowmerge_pins", default={})


@contextlib.contextmanager
def pinned(sources: dict):
    """Within: streamed inputs opened again by URL must hold what a record says they held (`source()` of each, by
    URL): the same versions, read as those versions where the store keeps them (verify --recompute)."""
    token = PINS.set({**PINS.get(), **sources})
    try:
        yield
    finally:
        PINS.reset(token)


def pins_of(url: str) -> dict | None:
    """The record's word on the files of a URL being opened again (pinned()), or None."""
    return PINS.get().get(url)

from .local import LocalFiles  # noqa: E402  (registered first: asked last)

__all__ = ["MODULES", "TRANSPORTS", "Transport", "register", "resolve", "pinned", "pins_of", "LocalFiles"]
