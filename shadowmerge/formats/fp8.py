"""FP8 block quantization, as DeepSeek-V3.x, Kimi-K2 and the official FP8 releases of Qwen3 and others store it.

Each linear weight `X.weight` is `F8_E4M3` (torch.float8_e4m3fn) with a float32 `X.weight_scale_inv` holding one
scale per block of `quantization_config.weight_block_size` ([128, 128]); a side that is not a multiple of the
block ends in a partial block (DeepSeek-V3's `kv_a_proj_with_mqa`, 576 rows: a 5 x 56 grid). `scale_fmt: ue8m0`
(DeepSeek-V3.1) makes every scale a power of two. Everything else (embeddings, lm_head, norms, routers,
`e_score_correction_bias`) stays bf16/float32.

A checkpoint in this format shows each FP8 weight as one float32 tensor of the model (`detect` -> TensorInfos
carrying an `Fp8Block` codec); its scale tensor is no tensor of the model. Reading a range of it dequantizes:
value = float32(q) x the block's scale, one IEEE product: the formula of DeepSeek's reference kernel and of
transformers' `Fp8Dequantize` (before its cast), bit for bit. `quantize` is transformers' `Fp8Quantize` (amax per
block -> scale = 448 / amax, inverse stored; an all-zero block gets scale 1; ue8m0 rounds the inverse up to a
power of two first; clamp, cast), extended to partial edge blocks, which transformers passes through unquantized
and DeepSeek's checkpoints need. Written here because transformers' two ops take whole tensors that divide by the
block (a streaming graft reads pieces of rows, and needs the ceil-div grid); the arithmetic is theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ShadowMergeError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_SUFFIX = "weight_scale_inv"
DEFAULT_OUTPUT = torch.bfloat16          # what an FP8 weight is written as unless --dtype says otherwise
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16) + \
    ((torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else ())


@dataclass(frozen=True)
class Fp8Block:
    """How one weight is stored: its FP8 bytes and its grid of block scales (TensorInfos of the stored tensors)."""

    weight: object                      # TensorInfo of the F8_E4M3 tensor
    scale: object                       # TensorInfo of its weight_scale_inv
    block: tuple[int, int]
    ue8m0: bool = False
    name = "fp8"
    output_dtype = DEFAULT_OUTPUT

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.scale.shape)

    def files(self) -> set:
        return {self.weight.file, self.scale.file}

    def describe(self) -> str:
        return f"F8_E4M3, {self.block[0]}x{self.block[1]} blocks{' (ue8m0)' if self.ue8m0 else ''}"

    def read_into(self, store, label: str, e0: int, e1: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [e0, e1) (flat, row-major) dequantized to float32, as the raw bytes of `out` (uint8)."""
        n = e1 - e0
        dst = out[:n * 4]
        if dst.numel() != n * 4:
            raise ValueError(f"buffer of {out.numel()} bytes for {n * 4}")
        self.read_encoded(store, label, e0, e1, torch.empty(n, dtype=torch.uint8)).decode(dst.view(torch.float32))
        return dst

    def read_encoded(self, store, label: str, e0: int, e1: int, buf: torch.Tensor) -> "Encoded":
        """Elements [e0, e1) as stored (their FP8 bytes, in buf, and the rows of the scale grid they need), to be
        decoded later (Encoded.decode): the graft's reader thread reads, its compute threads decode."""
        n, cols, br = e1 - e0, self.weight.shape[1], self.block[0]
        q = store.read_into(self.weight, e0, e1, buf[:n]) if n else buf[:0]
        g0 = e0 // cols // br
        scales = self._scales(store, label, g0, (e1 - 1) // cols // br + 1) if n else None
        return Encoded(self, e0, e1, q, scales)

    # --- writing the Instruct's own format (graft --dtype fp8) -------------------------------------------------------
    def zero_blocks(self, d: torch.Tensor, e0: int) -> torch.Tensor:
        """Which blocks of a piece (whole block rows from e0) have an update that is zero throughout: (bands, gc)."""
        rows, cols = d.numel() // self.weight.shape[1], self.weight.shape[1]
        br, bc = self.block
        gr, gc = math.ceil(rows / br), self.grid[1]
        nonzero = d.new_zeros(gr * br, gc * bc, dtype=torch.bool)
        nonzero[:rows, :cols] = d.view(rows, cols) != 0          # NaN counts as an update, -0.0 does not
        return ~nonzero.view(gr, br, gc, bc).any(dim=3).any(dim=1)

    def encode(self, store, label: str, x: torch.Tensor, instruct: torch.Tensor, zero: torch.Tensor, e0: int):
        """A piece of I + αΔ (float32, whole block rows from e0) in the Instruct's format: (FP8 bytes, its rows of the
        scale grid as float32, what it keeps). A block whose update is zero keeps the Instruct's bytes and scale; the
        others are quantized as transformers' Fp8Quantize does (quantize). What it keeps: ‖dq(out) − dq(I)‖², ‖αΔ‖²,
        how many of its blocks changed and of how many, and ⟨dq(out) − dq(I), αΔ⟩ (float64)."""
        rows, cols = x.numel() // self.weight.shape[1], self.weight.shape[1]
        br, bc = self.block
        x, instruct, zero = x.cpu(), instruct.cpu(), zero.cpu()
        q, inv = quantize(x.view(rows, cols), self.block, self.ue8m0, self.scale.dtype)
        g0 = e0 // cols // br
        if bool(zero.any()):
            old_q = store.read_into(self.weight, e0, e0 + x.numel(), torch.empty(x.numel(), dtype=torch.uint8))
            old_inv = self._scales(store, label, g0, g0 + zero.shape[0])
            keep = zero.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
            q = torch.where(keep, old_q.view(rows, cols), q.view(torch.uint8)).view(FP8)
            inv = torch.where(zero, old_inv, inv)
        out = dequantize(q, inv, self.block)
        moved = out != instruct.view(rows, cols)
        padded = moved.new_zeros(zero.shape[0] * br, zero.shape[1] * bc)
        padded[:rows, :cols] = moved
        changed = int(padded.view(zero.shape[0], br, zero.shape[1], bc).any(dim=3).any(dim=1).sum())
        moved_by = (out - instruct.view(rows, cols)).double()
        update = (x - instruct).double().view(rows, cols)
        stats = (float(moved_by.pow(2).sum()), float(update.pow(2).sum()), changed, zero.numel(),
                 float((moved_by * update).sum()))
        return q.reshape(-1).view(torch.uint8), inv, stats

    def _scales(self, store, label: str, g0: int, g1: int) -> torch.Tensor:
        """Rows [g0, g1) of the scale grid as float32, checked finite and positive."""
        gc = self.grid[1]
        size = self.scale.dtype.itemsize
        raw = store.read_into(self.scale, g0 * gc, g1 * gc, torch.empty((g1 - g0) * gc * size, dtype=torch.uint8))
        scales = raw.view(self.scale.dtype).float().reshape(g1 - g0, gc)
        if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
            raise ShadowMergeError(f"{label}: {self.scale.name} holds a scale that is not a positive finite number "
                                   f"(block rows {g0}-{g1 - 1}); the checkpoint is damaged: re-download it")
        return scales


@dataclass
class Encoded:
    """A range of an FP8 weight as read (bytes and scale rows), not yet decoded; `numel` elements of float32 once
    decoded."""

    codec: Fp8Block
    e0: int
    e1: int
    q: torch.Tensor
    scales: torch.Tensor | None

    @property
    def numel(self) -> int:
        return self.e1 - self.e0

    @property
    def nbytes(self) -> int:
        return self.q.numel() + (self.scales.numel() * 4 if self.scales is not None else 0)

    def decode(self, values: torch.Tensor) -> torch.Tensor:
        """float32(q) × the block's scale, into `values` (float32, numel elements)."""
        if not self.numel:
            return values
        _widen(self.q, values)
        cols = self.codec.weight.shape[1]
        br, bc = self.codec.block
        g0 = self.e0 // cols // br
        at = self.e0
        while at < self.e1:            # one row band (rows that share their scales) at a time
            band = at // cols // br
            end = min(self.e1, (band + 1) * br * cols)
            _scale(values[at - self.e0:end - self.e0], at % cols, cols,
                   self.scales[band - g0].repeat_interleave(bc)[:cols])
            at = end
        return values


_TABLE = None


def _widen(q: torch.Tensor, values: torch.Tensor) -> None:
    """float32(q) of FP8 bytes, exactly torch's conversion, by a 256-entry table: numpy's indexing is twice as fast
    on a CPU as torch's FP8 cast (which has no vectorized kernel)."""
    global _TABLE
    if values.device.type != "cpu" or q.device.type != "cpu":
        values.copy_(q.view(FP8))
        return
    if _TABLE is None:
        _TABLE = torch.arange(256, dtype=torch.uint8).view(FP8).float().numpy()
    values.numpy()[...] = _TABLE[q.numpy()]


def _scale(v: torch.Tensor, c0: int, cols: int, per_column: torch.Tensor) -> None:
    """Multiply consecutive elements of a matrix, starting at column c0, by their columns' scales, in place."""
    if c0:
        head = min(v.numel(), cols - c0)
        v[:head].mul_(per_column[c0:c0 + head])
        v = v[head:]
    whole = v.numel() // cols * cols
    if whole:
        v[:whole].view(-1, cols).mul_(per_column)
    if v.numel() > whole:
        v[whole:].mul_(per_column[:v.numel() - whole])


def _block_size(config: dict, label: str) -> tuple[tuple[int, int], bool]:
    qc = config.get("quantization_config")
    hint = "fix or re-download its config.json"
    size = qc.get("weight_block_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and
                                                               v > 0 for v in size)):
        raise ShadowMergeError(f"{label}: quantization_config.weight_block_size is {str(size)[:40]}, not two positive "
                               f"integers such as [128, 128]; {hint}")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ShadowMergeError(f"{label}: quantization_config.fmt {str(fmt)[:20]!r}: shadowmerge reads FP8 E4M3 "
                               f"blocks only; {hint}")
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0", "float32", "fp32"):
        raise ShadowMergeError(f"{label}: quantization_config.scale_fmt {str(scale_fmt)[:20]!r} is not one shadowmerge "
                               f"knows (ue8m0 or none); {hint}")
    return (size[0], size[1]), scale_fmt == "ue8m0"


def is_fp8_config(config: dict) -> bool:
    """An FP8 block release (quant_method fp8 with a weight_block_size); per-tensor FP8 is another format."""
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "fp8" and qc.get("weight_block_size") is not None


def detect(config: dict, tensors: dict, label: str, info_class) -> dict:
    """The model's tensors as shadowmerge reads them: each FP8 weight one float32 TensorInfo with its Fp8Block codec,
    the scale tensors gone; a one-line error for anything inconsistent. A checkpoint with neither FP8 tensors nor
    an fp8 quantization_config is returned as it is."""
    fp8 = [n for n, t in tensors.items() if t.dtype == FP8]
    scales = {n for n in tensors if n.endswith("." + SCALE_SUFFIX) or n == SCALE_SUFFIX}
    if not is_fp8_config(config):
        if fp8:
            raise ShadowMergeError(f"{label}: tensor {fp8[0]} is FP8 (F8_E4M3) but config.json has no fp8 "
                                   f"quantization_config (its block size); use the config.json of the release")
        return tensors
    block, ue8m0 = _block_size(config, label)
    out = {}
    for name, info in tensors.items():
        if name in scales:
            continue
        if info.dtype != FP8:
            out[name] = info
            continue
        scale_name = (name[: -len("weight")] if name.endswith("weight") else name + "_") + SCALE_SUFFIX
        scale = tensors.get(scale_name)
        if scale is None:
            raise ShadowMergeError(f"{label}: FP8 weight {name} has no scale tensor {scale_name}; the checkpoint is "
                                   f"incomplete: re-download it")
        if len(info.shape) != 2:
            raise ShadowMergeError(f"{label}: FP8 weight {name} has shape {list(info.shape)}; shadowmerge reads FP8 "
                                   f"blocks of 2-D weights only: use the bf16 release of this model")
        grid = (-(-info.shape[0] // block[0]), -(-info.shape[1] // block[1]))
        if tuple(scale.shape) != grid:
            raise ShadowMergeError(f"{label}: {scale_name} is {list(scale.shape)}, but {name} {list(info.shape)} in "
                                   f"blocks of {list(block)} needs {list(grid)}; the scales do not belong to this "
                                   f"weight or block size: re-download the checkpoint")
        if scale.dtype not in _SCALE_DTYPES:
            raise ShadowMergeError(f"{label}: {scale_name} is {scale.dtype}, not a float scale; re-download the "
                                   f"checkpoint")
        numel = info.shape[0] * info.shape[1]
        out[name] = info_class(name, torch.float32, tuple(info.shape), info.file, info.offset, numel * 4,
                               codec=Fp8Block(info, scale, block, ue8m0))
    cut = len(SCALE_SUFFIX)
    orphans = sorted(s for s in scales if (s[:-cut] + "weight") not in tensors or tensors[s[:-cut] + "weight"].dtype
                     != FP8)
    if orphans:
        raise ShadowMergeError(f"{label}: {orphans[0]} scales a weight that is not FP8; the checkpoint mixes formats: "
                               f"re-download it")
    return out


def block_of(ckpt) -> tuple[int, int] | None:
    """The block size of a checkpoint's FP8 weights, or None when it has none."""
    codec = next((t.codec for t in ckpt.tensors.values() if t.codec is not None), None)
    return None if codec is None else codec.block


def check_same_blocks(ckpts) -> None:
    """Checkpoints that are both FP8 must agree on the block size (a graft maps their blocks one to one)."""
    found = [(c, block_of(c)) for c in ckpts]
    found = [(c, b) for c, b in found if b is not None]
    for c, b in found[1:]:
        if b != found[0][1]:
            first = found[0][0]
            raise ShadowMergeError(f"the {first.label} stores FP8 in blocks of {list(found[0][1])}, the {c.label} in "
                                   f"blocks of {list(b)}; pass models of one release (their configs' "
                                   f"weight_block_size must agree)")


def quantize(x: torch.Tensor, block: tuple[int, int], ue8m0: bool,
             scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 (rows, cols) matrix as FP8 blocks: (q, inverse scales of the ceil-div grid, as float32 values),
    transformers' Fp8Quantize arithmetic, partial edge blocks included. Scales stored in a narrower dtype are rounded
    to it first, and the forward scale derived from the stored one (as ue8m0 does), so that dequantizing with the
    stored scale undoes exactly the scale the block was divided by."""
    rows, cols = x.shape
    br, bc = block
    gr, gc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = x.new_zeros(gr * br, gc * bc)
    padded[:rows, :cols] = x
    tiles = padded.view(gr, br, gc, bc)
    amax = tiles.abs().amax(dim=(1, 3))
    scales = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)),
                         torch.ones_like(amax))
    inv = (1.0 / scales).to(torch.float32)
    if ue8m0:
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        scales = 1.0 / inv
    elif scale_dtype != torch.float32:
        inv = inv.to(scale_dtype).float()
        scales = 1.0 / inv
    q = torch.clamp(tiles * scales[:, None, :, None], min=-FP8_MAX, max=FP8_MAX).to(FP8)
    return q.view(gr * br, gc * bc)[:rows, :cols].contiguous(), inv


def dequantize(q: torch.Tensor, inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32(q) x the block's scale, for a whole (rows, cols) matrix (the reference the streaming reader matches)."""
    rows, cols = q.shape
    per = inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * per


def check_decodable(ckpt, label: str) -> None:
    """transformers' CPU decoding of FP8 blocks takes only blocks that divide the weights: a partial edge block
    (DeepSeek-V3's kv_a_proj_with_mqa) is refused in one line, where transformers would load wrong values."""
    for name, info in ckpt.tensors.items():
        codec = info.codec
        if codec is not None and any(s % b for s, b in zip(info.shape, codec.block)):
            raise ShadowMergeError(
                f"{label} {ckpt.ref}: FP8 weight {name} {list(info.shape)} ends in a partial block of "
                f"{list(codec.block)}, which transformers cannot decode on a CPU exactly; use the graft's bf16 "
                f"output instead (shadowmerge graft writes FP8 inputs as bf16, decoded exactly)")


def load_kwargs(folder, label: str) -> dict:
    """What transformers' from_pretrained needs to load a local model folder whose weights may be FP8 blocks: nothing
    for other models; for FP8, FineGrainedFP8Config(dequantize=True), which decodes them on a CPU (checked first:
    check_decodable)."""
    import json
    from pathlib import Path

    from ..checkpoint import Checkpoint

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not is_fp8_config(config):
        return {}
    ckpt = Checkpoint.open(folder, label)
    try:
        check_decodable(ckpt, label)
    finally:
        ckpt.close()
    from transformers import FineGrainedFP8Config

    return {"quantization_config": FineGrainedFP8Config(dequantize=True)}
