"""Delta sources: the interface every source of the learned update implements, and the registry that picks one.

A source maps Instruct tensor names to entries (`entry(name)`, None for none), reads the raw bytes
an entry needs for a piece, a flat element range (`read`: I/O, on the reader thread), and turns
them into a float32 delta (`delta_into`: arithmetic, on the compute device; on a CPU several compute
threads call it at once for different pieces, so it keeps no state between calls beyond what it read at
open, and writes only into `out` and the buffers `to_float` gives it). It also says what it
is for the plan, the record and the card. An entry has a `shape`, and may have a `tile` (at most
that many rows per piece: see chunks.ranges). Two optional hooks: `chunk_elements` (the engine's piece size for
this source, when it holds more per piece than one update does) and `upcoming(entries, stop)` (called by the
engine's reader before its first read, with the entries it will graft in order: work ahead, as MultiDelta's TIES
passes do, stopping when the Event `stop` is set).

The built-in sources: `deltas.FullDelta` (tuned − base), `lora.LoraDelta` (a PEFT adapter) and `multi.MultiDelta`
(several of those at once, combined by sum, TIES or DARE; asked first, as it is last in MODULES). A new
one is a class implementing DeltaSource, decorated with `@register`, in a module listed in MODULES:
see docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .errors import ShadowMergeError

if TYPE_CHECKING:
    import torch

    from .checkpoint import Checkpoint
    from .spec import GraftSpec

#: modules whose import registers a source (built-in ones first; a source registered later is asked first)
MODULES = ("shadowmerge.deltas", "shadowmerge.lora.source", "shadowmerge.multi")


class Entry(Protocol):
    """What a source gives the plan for one tensor."""

    @property
    def shape(self) -> tuple[int, ...]: ...


@runtime_checkable
class DeltaSource(Protocol):
    """Where the learned update W_B' − W_B of each tensor comes from."""

    kind: str                       # "full", "lora": in the record, the plan and messages
    formula: str                    # the arithmetic, in words, for the record
    mismatch_hint: str              # the next step when tensor names do not match the Instruct's
    strict: bool                    # is an Instruct tensor without an entry an error (True) or a copy (False)?
    checkpoints: tuple              # the models whose architecture must match the Instruct's
    warnings: list[str]

    @classmethod
    def wanted(cls, spec: "GraftSpec") -> bool:
        """Does this source make the delta the spec asks for?"""

    @classmethod
    def open(cls, spec: "GraftSpec", instruct: "Checkpoint", opened: list) -> "DeltaSource":
        """Open the inputs the source reads (appended to `opened`, for the caller to close), from headers."""

    def describe(self) -> dict:
        """Its inputs, for the plan and the record's "inputs"."""

    def record(self) -> dict:
        """More for the run record (e.g. the adapter's modules)."""

    def card_inputs(self) -> dict:
        """More "made from" rows for the model card ({role: reference})."""

    def names(self) -> set[str]:
        """Every tensor name the source changes (to report names the Instruct lacks)."""

    def entry(self, name: str) -> Entry | None:
        """The entry for an Instruct tensor, or None when the source does not change it."""

    def rows(self, entry: Entry) -> int:
        """The entry's rows (dim 0), to compare with the Instruct's (vocabularies may differ)."""

    def read(self, entry: Entry, e0: int, e1: int, buffers):
        """The raw bytes the piece [e0, e1) needs (reader thread)."""

    def delta_into(self, entry: Entry, payload, out: "torch.Tensor", to_float) -> "torch.Tensor":
        """The float32 delta of the piece, into `out` (compute device)."""


_REGISTERED: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a DeltaSource available to graft (by its `kind`)."""
    if cls.kind in _REGISTERED and _REGISTERED[cls.kind] is not cls:
        raise ValueError(f"a delta source of kind {cls.kind!r} is registered already")
    _REGISTERED[cls.kind] = cls
    return cls


def registered() -> dict[str, type]:
    """Every registered source by kind, MODULES imported first, in MODULES' order."""
    for module in MODULES:
        importlib.import_module(module)

    def order(cls):              # MODULES' order, whichever was imported first; other modules' after them
        return MODULES.index(cls.__module__) if cls.__module__ in MODULES else len(MODULES)
    return {kind: cls for kind, cls in sorted(_REGISTERED.items(), key=lambda kv: order(kv[1]))}


def open_source(spec: "GraftSpec", instruct: "Checkpoint", opened: list) -> DeltaSource:
    """The source the spec asks for, its inputs opened: the most recently registered one that wants it (so a
    more specific source, registered after the built-ins, is asked before the general full fine-tune)."""
    for cls in reversed(list(registered().values())):
        if cls.wanted(spec):
            return cls.open(spec, instruct, opened)
    raise ShadowMergeError("no delta source fits these inputs; pass --base and --tuned, or --lora")
