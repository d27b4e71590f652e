"""Training data: read a local JSON/JSONL/Parquet file (or a Hub dataset), check every row, and turn
it into conversations for the trainer.

Rows may be chat `messages`, alpaca (instruction/input/output), sharegpt (`conversations` with
from/value) or, for DPO, preference pairs (prompt/chosen/rejected). SFT rows become
prompt/completion conversations (the loss is on the last assistant turn); DPO rows become
conversational prompt/chosen/rejected. The trainer formats them with the Instruct's chat template.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import ShadowMergeError

FORMATS = ("messages", "alpaca", "sharegpt", "preference")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "system": "system"}


def read_rows(ref: str) -> tuple[list[dict], str]:
    """The rows of a data file (or Hub dataset id), and a fingerprint of it for the run record."""
    path = Path(ref).expanduser()
    if path.is_file():
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            if path.suffix == ".jsonl":
                rows = []
                for n, line in enumerate(path.read_text().splitlines(), 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise ShadowMergeError(f"{path} line {n}: not JSON ({exc.msg})") from None
            elif path.suffix == ".json":
                rows = json.loads(path.read_text())
            elif path.suffix == ".parquet":
                import pyarrow.parquet as pq

                rows = pq.read_table(path).to_pylist()
            else:
                raise ShadowMergeError(f"{path}: use a .json, .jsonl or .parquet file")
        except json.JSONDecodeError as exc:
            raise ShadowMergeError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(rows, list):
            raise ShadowMergeError(f"{path}: expected a list of rows (a JSON array, or one JSON object per line)")
        return rows, digest
    if path.exists() or "/" not in str(ref) or str(ref).startswith((".", "/", "~")):
        raise ShadowMergeError(f"data file not found: {ref}")
    try:
        import datasets

        ds = datasets.load_dataset(str(ref), split="train")
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ShadowMergeError(f"{ref!r} is not a local file and could not be loaded from the Hugging Face Hub "
                               f"({reason}); check the id and your connection, or pass a local file") from None
    return [dict(r) for r in ds], f"hub:{ref}@{getattr(ds, '_fingerprint', '?')}"


def detect(row: dict, where: str) -> str:
    if not isinstance(row, dict):
        raise ShadowMergeError(f"{where}: a row must be a JSON object, not {type(row).__name__}")
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    raise ShadowMergeError(f"{where}: unknown row format (fields {', '.join(sorted(row)) or 'none'}); use "
                           f"messages, alpaca (instruction/input/output), sharegpt (conversations) or "
                           f"prompt/chosen/rejected")


def _text(row: dict, key: str, where: str, fmt: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ShadowMergeError(f"{where}: missing field {key!r} ({fmt} rows need it as non-empty text)")
    return value


def _messages(row: dict, fmt: str, where: str) -> list[dict]:
    if fmt == "alpaca":
        prompt = _text(row, "instruction", where, fmt)
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", where, fmt)}]
        if row.get("system"):
            msgs.insert(0, {"role": "system", "content": str(row["system"])})
        return msgs
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise ShadowMergeError(f"{where}: missing field 'conversations' (a list of {{from, value}} turns)")
        msgs = []
        for k, t in enumerate(turns):
            role = _ROLES.get(str(t.get("from")).lower()) if isinstance(t, dict) else None
            if role is None or not isinstance(t.get("value"), str):
                raise ShadowMergeError(f"{where}: turn {k + 1} needs 'from' (human/gpt/system) and 'value'")
            msgs.append({"role": role, "content": t["value"]})
        return msgs
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ShadowMergeError(f"{where}: missing field 'messages' (a list of {{role, content}})")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise ShadowMergeError(f"{where}: message {k + 1} needs role (system/user/assistant) and content")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _turns(value, role: str, where: str, key: str) -> list[dict]:
    if isinstance(value, str) and value.strip():
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": m.get("role", role), "content": m["content"]} for m in value]
    raise ShadowMergeError(f"{where}: missing field {key!r} (preference rows need prompt, chosen and rejected)")


def prepare(rows: list[dict], stage: str, source: str, max_samples: int | None = None) -> tuple[list[dict], str]:
    """Rows in the trainer's form, and their format. Every row is checked; the error names the first bad one."""
    if not rows:
        raise ShadowMergeError(f"{source}: no rows")
    rows = rows[:max_samples] if max_samples else rows
    fmt = detect(rows[0], f"{source} row 1")
    if stage == "dpo" and fmt != "preference":
        raise ShadowMergeError(f"{source}: --stage dpo needs preference rows (prompt/chosen/rejected); these are {fmt}")
    if stage == "sft" and fmt == "preference":
        raise ShadowMergeError(f"{source}: preference rows (prompt/chosen/rejected) are for --stage dpo")
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{source} row {n}"
        if detect(row, where) != fmt:
            raise ShadowMergeError(f"{where}: {detect(row, where)} row in a {fmt} file; use one format per file")
        if fmt == "preference":
            out.append({"prompt": _turns(row.get("prompt"), "user", where, "prompt"),
                        "chosen": _turns(row.get("chosen"), "assistant", where, "chosen"),
                        "rejected": _turns(row.get("rejected"), "assistant", where, "rejected")})
            continue
        msgs = _messages(row, fmt, where)
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise ShadowMergeError(f"{where}: the conversation must end with an assistant turn to learn from")
        out.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return out, fmt
