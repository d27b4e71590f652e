"""Cheap checks before any training: the pair fits (headers only), and the chat template's special
tokens have trained embedding rows in the Base (the known Llama-3 pitfall: its Base never trained
them, so a Base fine-tuned on chat-formatted data starts those rows from untrained values).
"""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from ..chunks import CHUNK_ELEMENTS, ranges
from ..tensors import Buffers
from ..deltas import INPUT_EMBEDDINGS
from ..errors import ShadowMergeError
from ..plan import check_architecture
from ..formats.safetensors import itemsize

SAMPLE = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def check_pair(base: Checkpoint, instruct: Checkpoint) -> None:
    """Same architecture, tensor names and shapes: a graft of the Base's update will fit the Instruct."""
    check_architecture(instruct, (base,))
    differ = sorted(set(base.tensors) ^ set(instruct.tensors))
    shapes = [n for n in base.tensors if n in instruct.tensors and base.tensors[n].shape != instruct.tensors[n].shape]
    if differ or shapes:
        names = (differ + shapes)[:4]
        raise ShadowMergeError(f"base and instruct differ in {len(differ)} tensor name(s) and {len(shapes)} shape(s) "
                               f"(e.g. {', '.join(names)}); pass the Base and Instruct of one model")


def same_weights(base: Checkpoint, instruct: Checkpoint, chunk_elements: int = CHUNK_ELEMENTS) -> bool:
    """Whether Base and Instruct hold the same weights (σ = 0): byte for byte, stopping at the first difference
    (a real pair differs in its first tensor, so this costs one piece; equal weights cost one read of both)."""
    if base.folder.resolve() == instruct.folder.resolve():
        return True
    buffers = Buffers(torch.device("cpu"))
    for name, a in base.tensors.items():
        b = instruct.tensors.get(name)
        if b is None or a.shape != b.shape or a.dtype != b.dtype:
            return False
        for e0, e1 in ranges(0, a.numel, a.row_numel, chunk_elements):
            size = (e1 - e0) * itemsize(a.dtype)
            if not torch.equal(base.read_into(a, e0, e1, buffers("base", size)),
                               instruct.read_into(b, e0, e1, buffers("instruct", size))):
                return False
    return bool(base.tensors)


def untrained_template_tokens(base: Checkpoint, tokenizer, chunk_elements: int = CHUNK_ELEMENTS) -> list[str]:
    """Special tokens of the chat template whose Base embedding row looks untrained (tiny, or the mean row)."""
    try:
        ids = tokenizer.apply_chat_template(SAMPLE, tokenize=True, add_generation_prompt=False)
    except Exception:
        ids = tokenizer.apply_chat_template(SAMPLE[1:], tokenize=True, add_generation_prompt=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    wanted = sorted({int(i) for i in ids if int(i) in special})
    info = next((base.tensors[n] for n in base.tensors if n.endswith(INPUT_EMBEDDINGS)), None)
    if info is None or not wanted or len(info.shape) != 2:
        return []
    rows, dim = info.shape
    chunk_rows = max(1, chunk_elements // max(dim, 1))
    norms = torch.empty(rows)
    total = torch.zeros(dim, dtype=torch.float64)
    buf = torch.empty(min(chunk_rows, rows) * info.row_bytes, dtype=torch.uint8)
    picked: dict[int, torch.Tensor] = {}
    for r0 in range(0, rows, chunk_rows):
        r1 = min(r0 + chunk_rows, rows)
        x = base.read_into(info, r0 * dim, r1 * dim, buf).view(info.dtype).reshape(r1 - r0, dim).float()
        norms[r0:r1] = x.norm(dim=1)
        total += x.sum(0, dtype=torch.float64)
        for i in wanted:
            if r0 <= i < r1:
                picked[i] = x[i - r0].clone()
    mean = (total / rows).float()
    typical = float(norms.median())
    flagged = []
    for i, row in picked.items():
        if float(row.norm()) < 0.1 * typical or float((row - mean).norm()) < 0.1 * typical:
            flagged.append(tokenizer.convert_ids_to_tokens(i))
    return flagged
