"""Read a YAML file (a recipe, a merge config) with one-line errors for a missing or malformed file."""

from __future__ import annotations

from pathlib import Path

from .errors import ShadowMergeError, first_line


def load(path: str | Path, what: str):
    """The parsed contents of path; `what` names the file in the error when it is missing."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ShadowMergeError(f"{what} not found: {path}; check the path") from None
    except (OSError, yaml.YAMLError) as exc:
        reason = first_line(exc, None)
        raise ShadowMergeError(f"{path} is not valid YAML ({reason}); fix the file") from None
