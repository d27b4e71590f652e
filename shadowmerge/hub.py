"""Turn a model reference (a local folder or a Hugging Face Hub id) into a local folder."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ShadowMergeError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Weight formats we never read; pickles are fetched only when the user allows them.
_NEVER = ["*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.ot", "*.tflite", "original/*"]


def resolve(ref: str | Path, allow_pickle: bool = False) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (or found in the cache) by huggingface_hub."""
    text = str(ref)
    try:
        if "\0" in text:
            raise ValueError
        path = Path(ref).expanduser()
        exists = path.exists()
    except (OSError, ValueError, RuntimeError):      # a NUL byte, a name too long, ~unknown-user
        raise ShadowMergeError(f"{text[:200]!r} is not a usable path or Hub id") from None
    if exists:
        if not path.is_dir():
            raise ShadowMergeError(f"{ref} is a file; pass the model folder that contains it")
        return path
    if not _REPO_ID.match(text) or ".." in text:
        raise ShadowMergeError(f"model folder not found: {ref}")
    try:
        from huggingface_hub import snapshot_download

        ignore = _NEVER + ([] if allow_pickle else ["*.bin"])
        return Path(snapshot_download(text, ignore_patterns=ignore))
    except Exception as exc:  # offline, unknown, gated: all mean the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShadowMergeError(
            f"{text!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {reason}); check the id and your connection, or download it first "
            f"(`hf download {text} --local-dir DIR`) and pass DIR") from None
