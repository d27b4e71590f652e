"""Engine: carries out a Plan, overlapping reading, arithmetic and writing.

A reader thread fills buffer slots with raw bytes (pread), the calling thread does the float32
arithmetic on the chosen device, and a writer thread streams the results out. Tensors move in
pieces of at most CHUNK_ELEMENTS elements (chunks.ranges: whole rows, or segments of a huge row),
through a fixed set of reusable slots, so memory is bounded by the chunk size, not by a tensor, a
row, a shard or the model.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from .chunks import CHUNK_ELEMENTS, ranges
from .devices import exact_float32
from .errors import ShadowMergeError
from .plan import Plan, TensorPlan
from .stformat import itemsize
from .tensors import Buffers, widen
from .timeline import Timeline
from .writer import ShardWriter

SLOTS = 3                   # chunks in flight: one being read, one computed, one written


@dataclass
class Job:
    tensor: TensorPlan
    kind: str                 # "graft", "cast" or "copy"
    e0: int                   # flat element range [e0, e1) of the tensor
    e1: int
    first: bool


def jobs(plan: Plan, chunk_elements: int = CHUNK_ELEMENTS):
    for t in plan.tensors:
        info = t.info
        row, first = info.row_numel, True
        graft_end = t.graft_rows * row
        for e0, e1 in ranges(0, graft_end, row, chunk_elements, getattr(t.entry, "tile", None)):
            yield Job(t, "graft", e0, e1, first)
            first = False
        if t.out_dtype == info.dtype:
            if info.numel > graft_end or first:
                yield Job(t, "copy", graft_end, info.numel, first)
        else:
            for e0, e1 in ranges(graft_end, info.numel, row, chunk_elements):
                yield Job(t, "cast", e0, e1, first)
                first = False
            if first:
                yield Job(t, "copy", 0, 0, True)    # an empty tensor


class Slot:
    def __init__(self, pin: bool):
        self.buffers = Buffers(torch.device("cpu"))
        self.buffers.pin = pin
        self.instruct: torch.Tensor | None = None
        self.payload = None
        self.out: torch.Tensor | None = None


class Stopped(Exception):
    pass


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise Stopped
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            pass


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise Stopped
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            pass


def _nbytes(payload) -> int:
    """The bytes a delta source read for one piece (its payload: tensors, possibly nested in tuples)."""
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, (tuple, list)):
        return sum(_nbytes(p) for p in payload)
    return 0


def _all_finite(x: torch.Tensor) -> bool:
    """Exact NaN/Inf test. A float32 sum is finite only if every element is, so the common case costs
    one allocation-free reduction; the element-wise test runs only when the sum is not finite."""
    return bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all())


@dataclass
class RunStats:
    unchanged: list[str]          # grafted tensors whose delta was zero everywhere
    nonfinite: list[str]          # tensors written with NaN/Inf (only with allow_nonfinite)
    identical: list[str]          # grafted tensors written byte-identical to the instruct's (update below precision)


def run(plan: Plan, writer: ShardWriter, device: str | torch.device = "cpu", allow_nonfinite: bool = False,
        chunk_elements: int = CHUNK_ELEMENTS, timeline: Timeline | None = None) -> RunStats:
    device = torch.device(device)
    with exact_float32(device):
        return _run(plan, writer, device, allow_nonfinite, chunk_elements, timeline or Timeline())


def _run(plan: Plan, writer: ShardWriter, device: torch.device, allow_nonfinite: bool, chunk_elements: int,
         timeline: Timeline) -> RunStats:
    cuda = device.type == "cuda"
    clock = time.perf_counter
    instruct, source, alpha = plan.instruct, plan.source, float(plan.alpha)
    work = Buffers(device, torch.float32)
    staging = Buffers(device)
    free: queue.Queue = queue.Queue()
    for _ in range(SLOTS):
        free.put(Slot(pin=cuda))
    ready: queue.Queue = queue.Queue(maxsize=SLOTS)
    done: queue.Queue = queue.Queue(maxsize=SLOTS)
    stop = threading.Event()
    errors: list[BaseException] = []
    changed: dict[str, bool] = {}
    differs: dict[str, bool] = {}
    nonfinite: list[str] = []

    def reader():
        try:
            for job in jobs(plan, chunk_elements):
                if job.kind == "copy":
                    _put(ready, (job, None), stop)
                    continue
                slot = _get(free, stop)
                t = job.tensor
                size = (job.e1 - job.e0) * itemsize(t.info.dtype)
                t0 = clock()
                slot.instruct = instruct.read_into(t.info, job.e0, job.e1, slot.buffers("instruct", size))
                slot.payload = source.read(t.entry, job.e0, job.e1, slot.buffers) if job.kind == "graft" else None
                timeline.add("read", clock() - t0, size + _nbytes(slot.payload))
                _put(ready, (job, slot), stop)
            _put(ready, None, stop)
        except Stopped:
            pass
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    def write():
        scratch = torch.empty(chunk_elements * 4, dtype=torch.uint8)
        try:
            while True:
                item = _get(done, stop)
                if item is None:
                    return
                job, slot = item
                if slot is None:
                    writer.copy(instruct, job.tensor.info, job.e0, job.e1, job.first, scratch)
                else:
                    writer.write(job.tensor.name, slot.out, job.first)
                    free.put(slot)
        except Stopped:
            pass
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    converting = [0.0]           # seconds spent widening inside the current arithmetic (counted as convert)

    def to_float(raw: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
        n = raw.numel() // itemsize(dtype)
        t0 = clock()
        if cuda:
            raw = staging(key, raw.numel()).copy_(raw, non_blocking=True)
        elif dtype == torch.float32:
            return raw.view(torch.float32)
        out = widen(raw, dtype, work(key, n))
        spent = clock() - t0
        converting[0] += spent
        timeline.add("convert", spent, raw.numel())
        return out

    def compute(job: Job, slot: Slot) -> None:
        t = job.tensor
        x = to_float(slot.instruct, t.info.dtype, "instruct")
        if job.kind == "graft":
            t0, converting[0] = clock(), 0.0
            d = source.delta_into(t.entry, slot.payload, work("delta", x.numel()), to_float)
            if not changed.get(t.name):
                changed[t.name] = bool(d.any())
            if alpha != 1.0:
                d.mul_(alpha)
            x = d.add_(x)      # == I + alpha * delta, bit for bit: float addition is commutative
            timeline.add("arithmetic", clock() - t0 - converting[0], x.numel() * 4)
        nbytes = x.numel() * itemsize(t.out_dtype)
        host = slot.buffers("out", nbytes)
        t0 = clock()
        if cuda:
            out = staging("out", nbytes).view(t.out_dtype).copy_(x)
            host.copy_(out.view(torch.uint8), non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
        else:
            out = host.view(t.out_dtype).copy_(x)
        timeline.add("cast", clock() - t0, nbytes)
        t0 = clock()
        if job.kind == "graft" and t.out_dtype == t.info.dtype and not differs.get(t.name):
            differs[t.name] = not torch.equal(host, slot.instruct)
        if job.kind == "graft" and not _all_finite(out):
            if not allow_nonfinite:
                raise ShadowMergeError(f"the result for {t.name} has NaN/Inf values; check the inputs (or pass "
                                       f"--allow-nonfinite to write them anyway)")
            if t.name not in nonfinite:
                nonfinite.append(t.name)
        timeline.add("check", clock() - t0)
        slot.out = host

    threads = [threading.Thread(target=reader, daemon=True, name="shadowmerge-reader"),
               threading.Thread(target=write, daemon=True, name="shadowmerge-writer")]
    for th in threads:
        th.start()
    try:
        while True:
            item = _get(ready, stop)
            if item is None:
                _put(done, None, stop)
                break
            job, slot = item
            if slot is not None:
                compute(job, slot)
            _put(done, item, stop)
        threads[1].join()
    except Stopped:
        pass
    except BaseException:
        stop.set()
        raise
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=10)
    if errors:
        raise errors[0]
    grafted = [t for t in plan.tensors if t.graft_rows]
    unchanged = [t.name for t in grafted if not changed.get(t.name)]
    identical = [t.name for t in grafted if changed.get(t.name) and t.out_dtype == t.info.dtype
                 and not differs.get(t.name)]
    return RunStats(unchanged, nonfinite, identical)
