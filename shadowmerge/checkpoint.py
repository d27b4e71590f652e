"""Checkpoint: a lazy reader of one model folder (TensorStore: the same for any folder of tensors).

Names, shapes and dtypes come from the safetensors headers (or the index) without reading tensor
data; bytes are read on demand with pread, so no input file is memory-mapped and nothing is
held beyond the caller's buffer. Pickle (`.bin`) weights are read only when the caller allows
it, with `torch.load(weights_only=True)`. A Hub id is read the same way from its remote headers
(transport.py, hub.HubFiles); its weight files are downloaded by `fetch()`, or at the first read of data.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import jsonfile
from .errors import ShadowMergeError
from .formats import fp8
from .sidefiles import INDEX, is_side_file
from .formats.safetensors import NAMES, itemsize
from .transports import LocalFiles, Transport, resolve



@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file and absolute byte offset (None for a pickle-loaded tensor)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int | None
    nbytes: int
    codec: object = None        # how it is stored when not as plain `dtype` (formats/): read through it, never copied

    @property
    def numel(self) -> int:
        return self.nbytes // itemsize(self.dtype)

    @property
    def row_numel(self) -> int:
        """Elements in one slice along dim 0 (the unit every chunk is made of)."""
        return self.numel // self.shape[0] if self.shape and self.shape[0] else max(self.numel, 1)

    @property
    def row_bytes(self) -> int:
        return self.row_numel * itemsize(self.dtype)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


class TensorStore:
    """Lazily read tensors of one folder: `tensors` from headers, bytes on demand (`read_into`), all through
    its transport (transport.py: a folder here, a Hub revision, ...)."""

    def __init__(self, where: "Path | Transport", label: str, ref: str):
        self.transport = LocalFiles(where) if isinstance(where, (str, Path)) else where
        self.transport.label = label
        self.folder = self.transport.folder
        self.label = label
        self.ref = ref
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._weight_map: dict | None = None

    def evicting_metadata(self):
        """Reading a model's JSON files and headers: a check that fails discards cached copies of the JSON files
        (a Hub model: the next run fetches them again; a local folder: nothing to do)."""
        return self.transport.evicting_metadata()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _has(self, name: str) -> bool:
        """Whether the model has this file (on the Hub: in the commit's file list)."""
        return self.transport.has(name)

    def _names(self) -> list[str]:
        """The model's top-level entries (a folder where a file belongs is named too: reading it is the error)."""
        return self.transport.names()

    def _scan_safetensors(self, files: list[Path]) -> dict[str, TensorInfo]:
        found: list[TensorInfo] = []
        for path in files:
            start, header = self.transport.header(path)
            for name, (dtype, shape, begin, end) in header.items():
                found.append(TensorInfo(name, dtype, shape, path, start + begin, end - begin))
        order = {f: k for k, f in enumerate(files)}
        found.sort(key=lambda t: (order[t.file], t.offset))
        tensors: dict[str, TensorInfo] = {}
        for info in found:
            if info.name in tensors:
                raise ShadowMergeError(f"{self.label} {self.folder}: tensor {info.name!r} is stored twice "
                                       f"({tensors[info.name].file.name}, {info.file.name}); re-save the model with "
                                       f"save_pretrained, or re-download it")
            tensors[info.name] = info
        weight_map = self._weight_map
        if weight_map is not None:
            paths = {f: self.folder / f for f in set(weight_map.values())}     # shards may be in subfolders
            wrong = [n for n, f in weight_map.items() if n not in tensors or tensors[n].file != paths[f]]
            if wrong:
                raise ShadowMergeError(f"{self.label} {self.folder / INDEX} disagrees with the shard headers "
                                       f"about {len(wrong)} tensor(s), e.g. {wrong[0]!r}; re-save the model")
        return tensors

    def _scan_pickles(self, files: list[Path]) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        self.transport.fetch([p.name for p in files], progress=False)     # no header: read whole (--allow-pickle)
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise ShadowMergeError(f"{self.label} {path}: cannot be loaded with weights_only=True "
                                       f"({type(exc).__name__}); convert it to safetensors") from None
            if not isinstance(state, dict):
                raise ShadowMergeError(f"{self.label} {path}: holds a {type(state).__name__}, not a dict of tensors "
                                       f"(a state dict); re-save the model with save_pretrained")
            for name, t in state.items():
                if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                    continue
                if t.dtype not in NAMES or t.is_sparse or t.is_quantized:
                    raise ShadowMergeError(f"{self.label} {path}: tensor {name[:80]!r} is {t.dtype}"
                                           f"{' (sparse/quantized)' if t.dtype in NAMES else ''}, which shadowmerge "
                                           f"does not merge; convert the model to safetensors in bf16/fp16/fp32")
                t = t.contiguous()
                self._pickled[name] = t
                tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), path, None, t.numel() * t.element_size())
        return tensors

    def side_bytes(self) -> int:
        """The size of the side files (config, tokenizer, ...), on the Hub or on disk."""
        return sum(self.transport.size(n) for n in self._names() if is_side_file(n))

    # --- data -----------------------------------------------------------------------------
    def fetch(self, progress: bool = False, side: bool | list[str] = False, weights: bool = True) -> None:
        """Make what reading needs readable from `folder` (a Hub model: download it): the weight files (unless
        weights=False), and the side files (all of them with side=True, or those named)."""
        weights = sorted({f.relative_to(self.folder).as_posix() for t in self.tensors.values() if t.offset is not None
                          for f in (t.codec.files() if t.codec is not None else (t.file,))}) if weights else []
        extra = ([n for n in self._names() if is_side_file(n)] if side is True else
                 [n for n in side or () if self._has(n)])
        self.transport.fetch(weights + extra, progress, f"download {self.label} {self.transport.name}")

    def read_into(self, info: TensorInfo, e0: int, e1: int, out: torch.Tensor) -> torch.Tensor:
        """Read the raw bytes of elements [e0, e1) of a tensor (flat, row-major) into the uint8 tensor `out` (a
        tensor with a codec: its values in `dtype`, decoded from how it is stored)."""
        if info.codec is not None:
            return info.codec.read_into(self, f"{self.label} {self.ref}", e0, e1, out)
        size = itemsize(info.dtype)
        n = (e1 - e0) * size
        dst = out[:n]
        if dst.numel() != n:
            raise ValueError(f"buffer of {out.numel()} bytes for {n}")
        if info.offset is None:
            src = self._pickled[info.name].reshape(-1).view(torch.uint8)
            dst.copy_(src[e0 * size: e1 * size])
            return dst
        view = memoryview(dst.numpy())
        pos, done = info.offset + e0 * size, 0
        while done < n:
            got = self.transport.pread(info.file, view[done:], pos + done)
            if got <= 0:
                raise ShadowMergeError(f"{self.label} {info.file}: file ended while reading {info.name!r}; "
                                       f"it was truncated or changed during the run")
            done += got
        return dst

    def read_piece(self, info: TensorInfo, e0: int, e1: int, out: torch.Tensor):
        """Elements [e0, e1) for the graft's reader thread: their raw bytes (read_into), or for a tensor with a
        codec, what the codec reads to decode them later, in a compute thread (`decode(float32 buffer)`)."""
        if info.codec is not None and hasattr(info.codec, "read_encoded"):
            return info.codec.read_encoded(self, f"{self.label} {self.ref}", e0, e1, out)
        return self.read_into(info, e0, e1, out)

    def read_columns(self, info: TensorInfo, c0: int, c1: int, out: torch.Tensor) -> torch.Tensor:
        """Columns [c0, c1) of a 2-D tensor, as raw bytes of a contiguous (rows, c1 - c0) block."""
        rows, cols = info.shape
        if c0 == 0 and c1 == cols:
            return self.read_into(info, 0, rows * cols, out)
        width = (c1 - c0) * itemsize(info.dtype)
        for k in range(rows):
            self.read_into(info, k * cols + c0, k * cols + c1, out[k * width:(k + 1) * width])
        return out[:rows * width]

    def finish(self) -> str | None:
        """A streamed input, after the run read it: each file it read checked whole (transport.finish)."""
        return self.transport.finish()

    def needs_local(self, command: str) -> None:
        """Refuse a streamed input where a command needs the model's files on this machine (a trainer, an
        evaluation harness: they load whole folders)."""
        if self.transport.streams:
            raise ShadowMergeError(f"{self.label} {self.ref}: {command} loads whole model folders, and this one is read "
                                   f"by range; copy it down first (e.g. `hf download`, `aws s3 sync URL DIR`) and pass "
                                   f"the folder, or a Hub id without --stream/hf://")

    def close(self) -> None:
        self.transport.close()


# Tensors that only quantized checkpoints have: FP8 scales, MXFP4 blocks/scales, GPTQ/AWQ packs, bitsandbytes state.
_QUANT_TENSOR = re.compile(r"(^|\.)(qweight|qzeros|g_idx|scales|weight_scale|weight_scale_inv|input_scale|absmax|"
                           r"quant_map|SCB)$|_(blocks|scales)$|quant_state")
# Name suffixes of quantized releases, to suggest the full-precision one (Qwen/Qwen3-8B-FP8 -> Qwen/Qwen3-8B).
_QUANT_SUFFIX = re.compile(r"(?i)[-_.](fp8(-dynamic)?|fp4|mxfp4|nvfp4|awq|gptq|int[48]|bnb|bnb-[48]bit|[48]bit|"
                           r"w[48]a(8|16)|exl2|unsloth-bnb-4bit|dynamic)$")


class Checkpoint(TensorStore):
    """A model folder opened for lazy reading. Use `Checkpoint.open(ref, label)`."""

    def __init__(self, where: "Path | Transport", label: str, ref: str, allow_pickle: bool = False):
        super().__init__(where, label, ref)
        with self.evicting_metadata():
            self.config = self._read_config()
            self.tensors = self._scan(allow_pickle)
        self._refuse_quantized()
        self.stored = self.tensors             # as the files hold them (an FP8 weight and its scales)
        self.tensors = fp8.detect(self.config, self.tensors, f"{self.label} {self.ref}", TensorInfo)

    @property
    def quantized(self) -> str | None:
        """How the weights are stored when not as plain floating point ("fp8"), else None."""
        return "fp8" if fp8.is_fp8_config(self.config) else None

    def _refuse_quantized(self) -> None:
        """A quantized checkpoint holds packed integers and scales, not weights that can be added: refuse it, but for
        FP8 blocks (formats/fp8.py), which are read as the float32 values they stand for."""
        qc = self.config.get("quantization_config")
        if qc is None and isinstance(self.config.get("text_config"), dict):
            qc = self.config["text_config"].get("quantization_config")
        if fp8.is_fp8_config(self.config):
            return
        fp8_weight = next((n for n, t in self.tensors.items() if t.dtype == fp8.FP8), None)
        if fp8_weight is not None and not qc:
            return                   # fp8.detect names the missing quantization_config
        marker = next((n for n in self.tensors if _QUANT_TENSOR.search(n)), None)
        if not qc and marker is None:
            return
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        what = (f"quantization_config.quant_method {str(method)[:30]!r}" if method
                else "a quantization_config" if qc else f"quantized tensors such as {marker[:80]!r}")
        name = str(self.ref).rstrip("/")
        plain = name
        while _QUANT_SUFFIX.search(plain):
            plain = _QUANT_SUFFIX.sub("", plain)
        suggest = f", e.g. {plain}" if plain != name and plain else " (the same model without a quantization suffix)"
        raise ShadowMergeError(
            f"{self.label} {self.ref} is a quantized checkpoint ({what}); quantized bytes and scales cannot be "
            f"grafted exactly, so pass the bf16/fp16 release of this model instead{suggest}")

    @classmethod
    def open(cls, ref: str | Path, label: str, allow_pickle: bool = False, stream: bool = False) -> "Checkpoint":
        """The model ref names (a folder, a Hub id, a URL); stream=True reads a Hub id's weights by range."""
        return cls(resolve(ref, allow_pickle, stream), label, str(ref), allow_pickle)

    # --- metadata -------------------------------------------------------------------------
    def _read_config(self) -> dict:
        path = self.folder / "config.json"
        if not os.path.lexists(path):
            if os.path.lexists(self.folder / "adapter_config.json"):
                raise ShadowMergeError(f"{self.label} {self.folder}: this looks like a LoRA adapter (adapter_config.json, "
                                       f"no config.json): pass it as --lora, with the Instruct as --instruct")
            raise ShadowMergeError(f"{self.label} {self.folder}: no config.json; pass a Hugging Face model folder "
                                   f"(one saved with save_pretrained, or a Hub id)")
        cfg = jsonfile.load(path, f"{self.label} config", hint="re-download the model or fix its config.json")
        where = f"{self.label} {path}:"
        hint = "fix the config.json"
        jsonfile.expect(cfg.get("model_type"), (str, type(None)), f"{where} model_type", hint)
        archs = jsonfile.expect(cfg.get("architectures"), (list, type(None)), f"{where} architectures", hint)
        for a in archs or ():
            jsonfile.expect(a, str, f"{where} an entry of architectures", hint)
        text = jsonfile.expect(cfg.get("text_config"), (dict, type(None)), f"{where} text_config", hint) or {}
        for prefix, sub in (("", cfg), ("text_config.", text)):
            jsonfile.expect(sub.get("tie_word_embeddings"), (bool, type(None)), f"{where} {prefix}tie_word_embeddings",
                            hint)
        return cfg

    @property
    def architecture(self) -> tuple[str | None, tuple[str, ...]]:
        cfg = self.config
        return cfg.get("model_type"), tuple(cfg.get("architectures") or ())

    @property
    def tie_word_embeddings(self) -> bool:
        cfg = self.config
        if "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
        text = cfg.get("text_config") or {}
        return bool(text.get("tie_word_embeddings", False))

    def _scan(self, allow_pickle: bool) -> dict[str, TensorInfo]:
        folder = self.folder
        index = folder / INDEX
        if os.path.lexists(index):
            files = self._index_files(index)
        elif self._has("model.safetensors"):
            files = [folder / "model.safetensors"]
        else:
            files = [folder / n for n in self._names() if n.endswith(".safetensors") and not n.startswith("adapter_")]
        if files:
            return self._scan_safetensors(files)
        pickles = [folder / n for n in self._names() if n.endswith(".bin") and n != "training_args.bin"]
        if not pickles and not allow_pickle and self.transport.pickles:
            raise ShadowMergeError(
                f"{self.label} {self.transport.name}: the Hub repo has only pickle weights ({self.transport.pickles[0]}); "
                f"pass --allow-pickle to download them and load them with torch.load(weights_only=True), or pass a "
                f"revision or repo with safetensors weights")
        if pickles:
            if not allow_pickle:
                raise ShadowMergeError(
                    f"{self.label} {folder}: only pickle weights ({pickles[0].name}); pass --allow-pickle to "
                    f"load them with torch.load(weights_only=True), or convert the model to safetensors")
            return self._scan_pickles(pickles)
        hint = "; it looks like a PEFT adapter" if self._has("adapter_config.json") else ""
        raise ShadowMergeError(f"{self.label} {folder}: no weights found (expected model.safetensors or "
                               f"{INDEX}){hint}")

    def _index_files(self, index: Path) -> list[Path]:
        where = f"{self.label} {index}"
        hint = "re-download the model or re-save it"
        doc = jsonfile.load(index, f"{self.label} index", hint=hint)
        weight_map = jsonfile.expect(doc.get("weight_map"), dict, f"{where}: weight_map", hint)
        for tensor, name in weight_map.items():
            jsonfile.expect(name, str, f"{where}: the shard of {tensor[:80]!r}", hint)
        files = []
        for name in dict.fromkeys(weight_map.values()):
            path = self.folder / name
            if "\0" in name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ShadowMergeError(f"{where} names the shard {name[:200]!r}, which points outside the model "
                                       f"folder; refusing to open it ({hint})")
            if not name.endswith(".safetensors") or not Path(name).name.strip():
                raise ShadowMergeError(f"{where} names the shard {name[:200]!r}, which is not a .safetensors file; "
                                       f"refusing to open it ({hint})")
            if not self._has(name):
                raise ShadowMergeError(f"{where} names shard {name}, which is missing; re-download the model")
            files.append(path)
        self._weight_map = weight_map
        return files
