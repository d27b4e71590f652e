"""Where a run's time went: busy seconds (and bytes) per stage, summed over the threads that did the work.

Stages run on several threads at once (reading, arithmetic and writing overlap), so their seconds can add up to
more than the wall time; `wall` is the run's own, from its start to the end of the final fsync and rename, and
`start-up` (a command-line run) the time before it: the interpreter and imports. The run record keeps it
(`timeline`), `graft --profile` prints it, and the benchmarks read it. On a GPU the arithmetic is asynchronous:
its seconds there are those of launching it, and the wait shows up in `cast` (the copy back to the host).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

#: the stages, in the order a graft meets them (a stage no run used is left out of the record)
STAGES = ("start-up", "cuda start", "plan", "role check", "read", "convert", "arithmetic", "cast", "check", "write",
          "copy", "hash", "writeback", "flush", "side files", "card", "record", "manifest", "fsync", "rename")
#: when the package was imported (a command-line run's start-up is from there to where its command begins)
IMPORTED = getattr(sys.modules.get("shadowmerge"), "_IMPORTED", time.perf_counter())


class Timeline:
    def __init__(self, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.end: float | None = None
        self.seconds: dict[str, float] = {}
        self.bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float, nbytes: int = 0) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            if nbytes:
                self.bytes[stage] = self.bytes.get(stage, 0) + nbytes

    @contextlib.contextmanager
    def __call__(self, stage: str, nbytes: int = 0):
        """`with timeline("read", n):` adds the block's seconds (and n bytes) to the stage."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0, nbytes)

    def stop(self) -> None:
        self.end = time.perf_counter()

    @property
    def wall(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    def as_record(self) -> dict:
        order = sorted(self.seconds, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES))
        stages = {s: {"seconds": round(self.seconds[s], 4), **({"bytes": self.bytes[s]} if s in self.bytes else {})}
                  for s in order}
        return {"wall_seconds": round(self.wall, 4), "stages": stages}

    def render(self) -> str:
        """The table `--profile` prints: each stage's busy seconds, share of the wall time and rate."""
        rec = self.as_record()
        wall = max(rec["wall_seconds"], 1e-9)
        lines = [f"timeline (wall {wall:.2f} s; stages overlap on threads, so shares can add up to more than 100 %):"]
        for stage, entry in rec["stages"].items():
            rate = f"  {entry['bytes'] / max(entry['seconds'], 1e-9) / 1e9:6.2f} GB/s" if entry.get("bytes") else ""
            lines.append(f"  {stage:<11} {entry['seconds']:8.2f} s  {100 * entry['seconds'] / wall:5.0f} %{rate}")
        return "\n".join(lines)
