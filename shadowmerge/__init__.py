"""shadowmerge: graft a Base model's fine-tuning update onto its Instruct sibling (Shadow-FT).

    W_out = W_I + alpha * (W_B' - W_B)

`shadowmerge.graft(...)` runs the merge, `shadowmerge.similarity(...)` measures how close a Base and
its Instruct are; the `shadowmerge` command line wraps both.
"""

import time as _time

_IMPORTED = _time.perf_counter()      # a command-line run's start-up (timeline.py) is measured from here

from ._version import __version__  # noqa: E402

__all__ = ["graft", "GraftSummary", "similarity", "ShadowMergeError", "__version__"]


def __getattr__(name):  # keep `import shadowmerge` light: torch loads on first use
    if name in ("graft", "GraftSummary"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "similarity":
        from .analyzer import similarity

        return similarity
    if name == "ShadowMergeError":
        from .errors import ShadowMergeError

        return ShadowMergeError
    raise AttributeError(f"module 'shadowmerge' has no attribute {name!r}")
