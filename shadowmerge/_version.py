"""shadowmerge's version, and the versions a run record lists (every command's record imports them from here)."""

from __future__ import annotations

import platform

__version__ = "0.1.0"


def versions(*packages: str) -> dict[str, str | None]:
    """shadowmerge's and Python's versions and those of the packages (None where not installed), for run records."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"shadowmerge": __version__, "python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
