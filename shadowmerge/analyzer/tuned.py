"""A LoRA adapter seen as the tuned model: T = Base + update, computed piece by piece, never merged.

`similarity --tuned ADAPTER` needs T's values where the adapter changes the Base. This store answers
`tensors` and `read_into` like a checkpoint: untouched tensors are the Base's bytes, adapted ones are
float32 pieces of Base + scale * B @ A (DoRA and full copies as the graft computes them), made by the
graft's own LoRA delta source, so memory stays bounded by the piece, as everywhere else.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import ShadowMergeError
from ..formats.safetensors import itemsize
from ..tensors import Buffers, widen
from ..transports import Transport


def is_adapter(where: Transport) -> bool:
    """Whether a resolved --tuned (a folder, or a Hub model) is a PEFT adapter rather than a model."""
    if where.commit is not None:        # on the Hub: an adapter's repo has no config.json
        return where.has("adapter_config.json") and not where.has("config.json")
    return where.has("adapter_config.json")


class LoraTuned:
    """Base + a LoRA adapter's update, readable like a Checkpoint (float32 where the adapter changes it)."""

    def __init__(self, base: Checkpoint, ref: str | Path, allow_pickle: bool = False, where=None):
        from ..lora import Adapter, LoraDelta

        self.base, self.label = base, "tuned"
        self.adapter = Adapter(where, str(ref), allow_pickle) if where is not None else Adapter.open(ref, allow_pickle)
        self.ref, self.folder, self.transport = f"{base.ref} + LoRA {ref}", self.adapter.folder, self.adapter.transport
        try:
            self.source = LoraDelta(self.adapter, base, base, flag="--tuned")
        except ShadowMergeError:
            self.adapter.close()
            raise
        self.tensors: dict[str, TensorInfo] = {}
        self._entries = {}
        for name, info in base.tensors.items():
            entry = self.source.entry(name) if info.dtype.is_floating_point else None
            if entry is None:
                self.tensors[name] = info
                continue
            if tuple(entry.shape) != tuple(info.shape):
                raise ShadowMergeError(f"--tuned {ref}: the adapter's update of {name} has shape {list(entry.shape)}, "
                                       f"the base {list(info.shape)}; pass the adapter trained on this Base")
            self._entries[name] = entry
            self.tensors[name] = replace(info, dtype=torch.float32, nbytes=info.numel * 4)
        if not self._entries:
            raise ShadowMergeError(f"--tuned {ref}: the adapter changes no tensor of the base; pass the adapter "
                                   f"trained on this Base")
        self._buffers = Buffers(torch.device("cpu"))
        self._work = Buffers(torch.device("cpu"), torch.float32)

    def read_into(self, info: TensorInfo, e0: int, e1: int, out: torch.Tensor) -> torch.Tensor:
        entry = self._entries.get(info.name)
        if entry is None:
            return self.base.read_into(info, e0, e1, out)
        b = self.base.tensors[info.name]
        raw = self.base.read_into(b, e0, e1, self._buffers("base-piece", (e1 - e0) * itemsize(b.dtype)))
        payload = self.source.read(entry, e0, e1, self._buffers)

        def to_float(data: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
            n = data.numel() // itemsize(dtype)
            return widen(data, dtype, self._work(key, n))

        delta = self.source.delta_into(entry, payload, self._work("delta", e1 - e0), to_float)
        t = out[: (e1 - e0) * 4].view(torch.float32)
        torch.add(raw.view(b.dtype).float(), delta, out=t)
        return out[: (e1 - e0) * 4]

    def fetch(self, progress: bool = False) -> None:
        self.adapter.fetch(progress)

    def close(self) -> None:
        self.adapter.close()
