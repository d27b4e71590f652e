"""Training data: read a local JSON/JSONL/Parquet file (or a Hub dataset), check every row, and turn
it into conversations for the trainer; expected_tokens says which tokens of a conversation TRL trains on.

Rows may be chat `messages`, alpaca (instruction/input/output), sharegpt (`conversations` with
from/value) or, for DPO, preference pairs (prompt/chosen/rejected). SFT rows become
prompt/completion conversations (the loss is on the last assistant turn); DPO rows become
conversational prompt/chosen/rejected. The trainer formats them with the Instruct's chat template.

For vision-language models, a message's content may be a list of parts, as TRL's VLM trainer takes
them: `{"type": "text", "text": ...}` and `{"type": "image", "image": "path/to.png"}` (a local file,
relative to the data file). Such rows keep `{"type": "image"}` placeholders in place and carry the
image paths in `images`, in order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import ShadowMergeError, first_line

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
                            raise ShadowMergeError(f"{path} line {n}: not JSON ({exc.msg}); fix that line (one JSON object per line)") from None
            elif path.suffix == ".json":
                rows = json.loads(path.read_text())
            elif path.suffix == ".parquet":
                import pyarrow.parquet as pq

                rows = pq.read_table(path).to_pylist()
            else:
                raise ShadowMergeError(f"{path}: use a .json, .jsonl or .parquet file")
        except json.JSONDecodeError as exc:
            raise ShadowMergeError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}); fix the file") from None
        except UnicodeDecodeError as exc:
            raise ShadowMergeError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON") from None
        if not isinstance(rows, list):
            raise ShadowMergeError(f"{path}: not a list of rows; write a JSON array, or one JSON object per line (.jsonl)")
        return rows, digest
    if path.exists() or "/" not in str(ref) or str(ref).startswith((".", "/", "~")):
        raise ShadowMergeError(f"data file not found: {ref}; check the path (or pass a Hub dataset id, org/name)")
    try:
        import datasets

        ds = datasets.load_dataset(str(ref), split="train")
    except Exception as exc:
        reason = first_line(exc, None)
        raise ShadowMergeError(f"{ref!r} is not a local file and could not be loaded from the Hugging Face Hub "
                               f"({reason}); check the id and your connection, or pass a local file") from None
    return [dict(r) for r in ds], f"hub:{ref}@{getattr(ds, '_fingerprint', '?')}"


def detect(row: dict, where: str) -> str:
    if not isinstance(row, dict):
        raise ShadowMergeError(f"{where}: a row must be a JSON object, not {type(row).__name__}; fix the row")
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
        raise ShadowMergeError(f"{where}: missing field {key!r} ({fmt} rows need it as non-empty text); add it")
    return value


_IMAGE_KEYS = ("image", "path", "url")


def _content(content, where: str, k: int, images: list[str], folder: Path):
    """A message's content: text, or a list of text/image parts (image paths collected into `images`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise ShadowMergeError(f"{where}: message {k} content must be text or a list of parts; write it as text "
                               f"or as [{{type: text|image, ...}}]")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            ref = next((part[key] for key in _IMAGE_KEYS if isinstance(part.get(key), str)), None)
            if ref is None:
                raise ShadowMergeError(f"{where}: message {k} has an image part without a path (give "
                                       f"{{\"type\": \"image\", \"image\": \"path/to.png\"}})")
            images.append(_image_path(ref, folder, where))
            parts.append({"type": "image"})
        else:
            raise ShadowMergeError(f"{where}: message {k} has a content part that is neither {{type: text, text}} nor "
                                   f"{{type: image, image}}; write each part as one of those")
    return parts


def _image_path(ref: str, folder: Path, where: str) -> str:
    if "://" in ref:
        raise ShadowMergeError(f"{where}: image {ref[:80]!r} is a URL; download the images and give local paths")
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise ShadowMergeError(f"{where}: image file not found: {path}; check the path (relative paths are "
                               f"taken from the data file's folder)")
    try:
        from PIL import Image

        with Image.open(path) as img:
            img.verify()
    except Exception as exc:           # noqa: BLE001 - any unreadable file is the same user error
        raise ShadowMergeError(f"{where}: {path} is not a readable image ({type(exc).__name__}); re-save it as "
                               f"PNG or JPEG") from None
    return str(path.resolve())


def _messages(row: dict, fmt: str, where: str, images: list[str] | None = None,
              folder: Path = Path(".")) -> list[dict]:
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
            raise ShadowMergeError(f"{where}: missing field 'conversations'; add it as a list of {{from, value}} turns")
        msgs = []
        for k, t in enumerate(turns):
            role = _ROLES.get(str(t.get("from")).lower()) if isinstance(t, dict) else None
            if role is None or not isinstance(t.get("value"), str):
                raise ShadowMergeError(f"{where}: turn {k + 1} lacks 'from' or 'value'; give it 'from' (human/gpt/system) "
                                       f"and 'value'")
            msgs.append({"role": role, "content": t["value"]})
        return msgs
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ShadowMergeError(f"{where}: missing field 'messages'; add it as a list of {{role, content}}")
    images = [] if images is None else images
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), (str, list)):
            raise ShadowMergeError(f"{where}: message {k + 1} lacks role or content; give it role (system/user/"
                                   f"assistant) and content")
    return [{"role": m["role"], "content": _content(m["content"], where, k + 1, images, folder)} for m in msgs]


def _turns(value, role: str, where: str, key: str) -> list[dict]:
    if isinstance(value, str) and value.strip():
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": m.get("role", role), "content": m["content"]} for m in value]
    raise ShadowMergeError(f"{where}: missing field {key!r}; add it (preference rows need prompt, chosen and "
                           f"rejected)")


def prepare(rows: list[dict], stage: str, source: str, max_samples: int | None = None) -> tuple[list[dict], str]:
    """Rows in the trainer's form, and their format. Every row is checked; the error names the first bad one.
    Rows with images carry their paths in `images` (then every row must be a messages row)."""
    src = Path(str(source)).expanduser()
    folder = src.parent if src.is_file() else Path(".")
    if not rows:
        raise ShadowMergeError(f"{source}: no rows; pass a file with at least one training example")
    rows = rows[:max_samples] if max_samples else rows
    fmt = detect(rows[0], f"{source} row 1")
    if stage == "dpo" and fmt != "preference":
        raise ShadowMergeError(f"{source}: --stage dpo needs preference rows (prompt/chosen/rejected); these are "
                               f"{fmt}; pass preference data, or use --stage sft")
    if stage == "sft" and fmt == "preference":
        raise ShadowMergeError(f"{source}: preference rows (prompt/chosen/rejected) are for DPO; pass --stage dpo")
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
        images: list[str] = []
        msgs = _messages(row, fmt, where, images, folder)
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise ShadowMergeError(f"{where}: the conversation must end with an assistant turn to learn from; add "
                               f"the assistant's answer as the last turn")
        last = msgs[-1]["content"]
        if not isinstance(last, str) and any(p["type"] == "image" for p in last):
            raise ShadowMergeError(f"{where}: the assistant's last turn has an image; move images into the prompt")
        if not images:          # parts without an image: plain text, as every chat template takes it
            msgs = [dict(m, content=m["content"] if isinstance(m["content"], str) else
                         "".join(p["text"] for p in m["content"])) for m in msgs]
        out.append({"prompt": msgs[:-1], "completion": msgs[-1:], **({"images": images} if images else {})})
    with_images = [n for n, r in enumerate(out, 1) if "images" in r]
    if with_images and stage != "sft":
        raise ShadowMergeError(f"{source}: rows with images are supported for --stage sft only; use --stage sft")
    if with_images and len(with_images) != len(out):
        first = next(n for n, r in enumerate(out, 1) if "images" not in r)
        raise ShadowMergeError(f"{source} row {first}: no image, while row {with_images[0]} has one; give every row "
                               f"an image, or train the text rows in a separate run")
    return out, fmt


def expected_tokens(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], int]:
    """(ids, start): prompt + completion in the chat template, and where the trained tokens start, the way
    TRL's trainers tokenize a conversational prompt/completion row (the common prefix of the prompt with a
    generation prompt and of the whole conversation)."""
    def ids(messages, **kw):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
        return list(out["input_ids"])

    prompt_ids, full = ids(prompt, add_generation_prompt=True), ids(prompt + completion)
    start = 0
    while start < min(len(prompt_ids), len(full)) and prompt_ids[start] == full[start]:
        start += 1
    return full, start
