"""Read a small JSON file from a stranger (config.json, an index, adapter_config.json) with one-line errors.

The standard library parses; this adds what a hostile file needs around it: a size bound (so a
huge file is refused before it is read), strict UTF-8, deep nesting (RecursionError) as an error,
a folder where a file belongs, and the expected top-level type.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ShadowMergeError

MAX_BYTES = 64 * 1024 * 1024


def load(path: str | Path, what: str, kind: type = dict, hint: str = "re-download or re-save it"):
    """The parsed contents of path, which must be a `kind` (dict or list); `what` names the file in errors."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ShadowMergeError(f"{what} {path} is a folder, not a JSON file; {hint}")
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ShadowMergeError(f"{what} {path} is {size} bytes, more than a JSON file of this kind can be "
                                   f"({MAX_BYTES}); {hint}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ShadowMergeError(f"{what} {path} is missing; {hint}") from None
    except OSError as exc:
        raise ShadowMergeError(f"{what} {path} cannot be read ({exc.strerror or exc}); {hint}") from None
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ShadowMergeError(f"{what} {path} is not UTF-8 text; {hint}") from None
    except json.JSONDecodeError as exc:
        raise ShadowMergeError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}); {hint}") from None
    except RecursionError:
        raise ShadowMergeError(f"{what} {path} is nested too deeply to be a real one; {hint}") from None
    if not isinstance(value, kind):
        expected = "a JSON object" if kind is dict else "a JSON list"
        raise ShadowMergeError(f"{what} {path} is {_json_type(value)}, not {expected}; {hint}")
    return value


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def expect(value, kind, what: str, hint: str):
    """value if it is of `kind` (a type or tuple of types; bool is never a number), else a one-line error."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join({dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "an integer",
                             float: "a number", type(None): "null"}.get(k, k.__name__) for k in kinds)
        raise ShadowMergeError(f"{what} is {_json_type(value)} ({str(value)[:40]!r}), it must be {names}; {hint}")
    return value
