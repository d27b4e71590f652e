"""Progress on stderr: a tqdm bar in bytes/s on a terminal, one plain line per stage when stderr is a file or a
pipe (a bar there becomes hundreds of carriage-return updates), nothing with --quiet."""

from __future__ import annotations

import contextlib
import sys
import time


def human_bytes(n: float) -> str:
    """A byte count as people read it (decimal units: 1.50 GB)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


class _NoBar:
    def update(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _LineBar(_NoBar):
    """For a log file: counts the bytes, and says once, at the end of the stage, how many and how fast."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.start = total, desc, 0, time.perf_counter()

    def update(self, n):
        self.done += n

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            seconds = time.perf_counter() - self.start
            rate = f"{_size(self.done / seconds)}/s" if seconds > 0 else "-"
            print(f"{self.desc}: {_size(self.done)} in {seconds:.1f} s ({rate})", file=sys.stderr, flush=True)
        return False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    if not sys.stderr.isatty():
        return _LineBar(total, desc)
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                dynamic_ncols=True)


@contextlib.contextmanager
def library_bars(quiet: bool):
    """For the time of the block, every library's tqdm bar (transformers' loading and GGUF conversion, datasets',
    lm_eval's) is off when quiet or when stderr is not a terminal, where a bar is hundreds of carriage-return
    updates in a log; the caller's own disable=False is overridden too."""
    if not quiet and sys.stderr.isatty():
        yield
        return
    import functools

    from tqdm import std

    init = std.tqdm.__init__

    @functools.wraps(init)
    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)
    std.tqdm.__init__ = silent
    try:
        yield
    finally:
        std.tqdm.__init__ = init
