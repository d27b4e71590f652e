"""shadowmerge: graft a Base model's fine-tuning update onto its Instruct sibling (Shadow-FT).

    W_out = W_I + alpha * (W_B' - W_B)

`shadowmerge.graft(...)` runs the merge; the `shadowmerge` command line wraps it.
"""

__version__ = "0.1.0"

__all__ = ["graft", "GraftSummary", "ShadowMergeError", "__version__"]


def __getattr__(name):  # keep `import shadowmerge` light: torch loads on first use
    if name in ("graft", "GraftSummary"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "ShadowMergeError":
        from .errors import ShadowMergeError

        return ShadowMergeError
    raise AttributeError(f"module 'shadowmerge' has no attribute {name!r}")
