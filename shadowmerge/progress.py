"""A tqdm progress bar in bytes/s on stderr, or a silent stand-in when progress is off (--quiet)."""

from __future__ import annotations

import sys


class _NoBar:
    def update(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                dynamic_ncols=True)
