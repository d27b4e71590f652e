"""Engine: carries out a Plan, overlapping reading, arithmetic and writing.

A reader thread fills buffer slots with raw bytes (pread), compute threads do the float32 arithmetic
on the chosen device (several pieces at once: on a CPU each thread on its share of the cores, on a GPU
each on a CUDA stream of its own; see workers()), and a writer thread streams the results out in plan
order. Tensors move in pieces of at most CHUNK_ELEMENTS elements (chunks.ranges: whole rows, or
segments of a huge row), through a fixed set of reusable slots, so memory is bounded by the chunk
size, not by a tensor, a row, a shard or the model.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .chunks import CHUNK_ELEMENTS, ranges
from .devices import exact_float32
from .errors import ShadowMergeError
from .plan import Plan, TensorPlan
from .formats.safetensors import itemsize
from .tensors import Buffers, widen
from .timeline import Timeline
from .writer import ShardWriter

MAX_WORKERS = 3             # compute threads on a CPU: their buffers (and the slots) bound the memory
CUDA_WORKERS = 2            # compute threads on a GPU, one CUDA stream each
_PER_THREAD_COUNT = "OpenMP" in torch.__config__.parallel_info()    # torch.set_num_threads is per thread


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
        if t.scales_of is not None:          # an encoded tensor's scale grid: made by its pieces, or copied
            yield Job(t, "scales" if t.scales_of.graft_rows else "copy", 0, info.numel, True)
            continue
        row, first = info.row_numel, True
        graft_end = t.graft_rows * row
        align = t.encoder.block[0] if t.encoder is not None else None
        for e0, e1 in ranges(0, graft_end, row, chunk_elements, getattr(t.entry, "tile", None), align):
            yield Job(t, "graft", e0, e1, first)
            first = False
        if t.out_dtype == t.stored.dtype and (info.codec is None or t.encoder is not None):   # copied, not decoded
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
    if hasattr(payload, "decode"):           # an encoded piece (formats/): the bytes it read
        return payload.nbytes
    if isinstance(payload, (tuple, list)):
        return sum(_nbytes(p) for p in payload)
    return 0


def finite_after_cast(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Exact test that `out` (x cast to its dtype) has no NaN/Inf, mostly without touching `out`.

    For a float32 output, a float32 sum is finite only if every element is: one allocation-free reduction.
    Otherwise one min/max pass over x: NaN propagates into both, and values within the output dtype's finite
    range cannot round to Inf. Only when a value lies beyond that range (or the sum overflowed) does the
    element-wise test run on `out` itself, so the answer is always the output's own.
    """
    if x.numel() == 0:
        return True
    if out.dtype == torch.float32:
        if bool(torch.isfinite(x.sum())):
            return True
    else:
        limit = torch.finfo(out.dtype).max
        lo, hi = torch.stack(torch.aminmax(x)).tolist()        # one device sync
        if -limit <= lo and hi <= limit:        # False for NaN
            return True
    return bool(torch.isfinite(out).all())


def all_zero(d: torch.Tensor, zeros: torch.Tensor) -> bool:
    """Exactly `not d.any()` (NaN counts as non-zero, -0.0 as zero), but torch.equal stops at the first element
    that differs: for a tensor the fine-tune changed, that is the first one, instead of a pass over all."""
    return torch.equal(d, zeros[: d.numel()].view(d.shape))


class _Zeros:
    """A float32 zero buffer grown on demand (what all_zero compares against). Only read once made, so the CPU
    compute threads share one; on a GPU each thread has its own, since a buffer filled on one CUDA stream is
    not yet zero for another."""

    def __init__(self, device: torch.device):
        self.device, self.buf = device, torch.zeros(0, device=device)
        self.lock = threading.Lock()

    def __call__(self, n: int) -> torch.Tensor:
        buf = self.buf
        if buf.numel() < n:
            with self.lock:
                if self.buf.numel() < n:
                    self.buf = torch.zeros(n, device=self.device)
                buf = self.buf
        return buf


@dataclass
class RunStats:
    unchanged: list[str]          # grafted tensors whose delta was zero everywhere
    nonfinite: list[str]          # tensors written with NaN/Inf (only with allow_nonfinite)
    identical: list[str]          # grafted tensors written byte-identical to the instruct's (update below precision)
    kept: dict = field(default_factory=dict)    # encoded tensors: (moved², update², blocks changed, blocks, dot)


def workers(device: torch.device) -> tuple[int, int]:
    """(compute threads, torch intra-op threads of each) for a run on `device`.

    On a CPU the pieces are shared among up to MAX_WORKERS threads, each running its operations on
    torch.get_num_threads() // workers threads (1 on a 2-core machine): several pieces in flight keep every
    core busy beside the reader and the writer, without OpenMP's fork, join and spinning on each small
    operation. The split is per thread (OpenMP's thread count is a per-thread setting), so the caller's own
    torch threads are untouched. A GPU gets CUDA_WORKERS threads, each on a CUDA stream of its own, so that one
    piece's copies to and from the device overlap another's arithmetic; a torch built without OpenMP gets one.
    """
    threads = max(1, torch.get_num_threads())
    if device.type == "cuda":
        return CUDA_WORKERS, threads
    if not _PER_THREAD_COUNT:
        return 1, threads
    n = min(threads, MAX_WORKERS)
    return n, max(1, threads // n)


def run(plan: Plan, writer: ShardWriter, device: str | torch.device = "cpu", allow_nonfinite: bool = False,
        chunk_elements: int | None = None, timeline: Timeline | None = None,
        cancel: threading.Event | None = None) -> RunStats:
    """Carry out the plan into the writer. `cancel`, when another thread sets it, stops the run within a piece
    (raising Cancelled): the graft's role check does, on a refusal, so that nothing more is read or written.
    chunk_elements: the pieces' size (default: the source's own `chunk_elements`, else CHUNK_ELEMENTS)."""
    device = torch.device(device)
    if chunk_elements is None:
        chunk_elements = getattr(plan.source, "chunk_elements", CHUNK_ELEMENTS)
    with exact_float32(device):
        return _Run(plan, writer, device, allow_nonfinite, chunk_elements, timeline or Timeline(), cancel).go()


class Cancelled(Exception):
    """The run was stopped from outside (run's `cancel`); the caller knows why."""


@dataclass
class _Piece:
    job: Job
    slot: Slot | None                  # None: a copy, straight from the Instruct's file
    done: threading.Event


class _Run:
    """One run: a reader thread, compute workers and a writer thread around a fixed set of slots. The reader
    hands every piece to the writer in plan order and every computed piece to the workers; the writer waits
    for each piece's `done` in that order, so the output's bytes do not depend on which worker was faster."""

    def __init__(self, plan: Plan, writer: ShardWriter, device: torch.device, allow_nonfinite: bool,
                 chunk_elements: int, timeline: Timeline, cancel: threading.Event | None = None):
        self.plan, self.writer, self.device = plan, writer, device
        self.cancel = cancel or threading.Event()
        self.allow_nonfinite, self.chunk_elements, self.timeline = allow_nonfinite, chunk_elements, timeline
        self.cuda = device.type == "cuda"
        self.alpha = float(plan.alpha)
        self.workers, self.intra = workers(device)
        slots = self.workers + 3                 # one being read, one being written, one hashed, one per worker
        self.free: queue.Queue = queue.Queue()
        for _ in range(slots):
            self.free.put(Slot(pin=self.cuda))
        self.ready: queue.Queue = queue.Queue(maxsize=slots)     # pieces for the workers
        self.order: queue.Queue = queue.Queue(maxsize=4 * slots)  # every piece, in plan order, for the writer
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.zeros = None if self.cuda else _Zeros(device)        # shared by the CPU compute threads
        self.scales: dict[str, torch.Tensor] = {}     # encoded tensors' scale grids, filled by their pieces
        self.kept: dict[str, list] = {}          # encoded tensors: what the codec's encode measured, summed
        self.changed: set[str] = set()           # grafted tensors with a non-zero delta somewhere
        self.differs: set[str] = set()           # ... whose output bytes differ from the Instruct's somewhere
        self.nonfinite: list[str] = []

    def go(self) -> RunStats:
        threads = [threading.Thread(target=self._guard, args=(self.read,), daemon=True, name="shadowmerge-reader"),
                   threading.Thread(target=self._guard, args=(self.write,), daemon=True, name="shadowmerge-writer")]
        threads += [threading.Thread(target=self._guard, args=(self.compute,), daemon=True,
                                     name=f"shadowmerge-compute-{i}") for i in range(self.workers)]
        for th in threads:
            th.start()
        try:
            while threads[1].is_alive() and not self.stop.is_set() and not self.cancel.is_set():
                threads[1].join(0.1)
        finally:
            self.stop.set()
            for th in threads:
                th.join(timeout=10)
        if self.errors:
            raise self.errors[0]
        if self.cancel.is_set():
            raise Cancelled("the run was cancelled")
        grafted = [t for t in self.plan.tensors if t.graft_rows]
        unchanged = [t.name for t in grafted if t.name not in self.changed]
        identical = [t.name for t in grafted if t.name in self.changed and (t.out_dtype == t.info.dtype or
                                                                            t.encoder is not None)
                     and t.name not in self.differs]
        nonfinite = set(self.nonfinite)
        return RunStats(unchanged, [t.name for t in self.plan.tensors if t.name in nonfinite], identical,
                        {n: tuple(v) for n, v in self.kept.items()})

    def _guard(self, work) -> None:
        try:
            work()
        except Stopped:
            pass
        except BaseException as exc:
            with self.lock:
                self.errors.append(exc)
            self.stop.set()

    # --- the threads ---------------------------------------------------------------------------------------
    def read(self) -> None:
        instruct, source, clock = self.plan.instruct, self.plan.source, time.perf_counter
        if hasattr(source, "upcoming"):          # a source that works ahead (multi.py's TIES passes)
            source.upcoming([t.entry for t in self.plan.tensors if t.graft_rows and t.scales_of is None], self.stop)
        for job in jobs(self.plan, self.chunk_elements):
            if job.kind in ("copy", "scales"):
                piece = _Piece(job, None, threading.Event())
                piece.done.set()
                _put(self.order, piece, self.stop)
                continue
            slot = _get(self.free, self.stop)
            t = job.tensor
            size = (job.e1 - job.e0) * itemsize(t.info.dtype)
            t0 = clock()
            slot.instruct = instruct.read_piece(t.info, job.e0, job.e1, slot.buffers("instruct", size))
            slot.payload = source.read(t.entry, job.e0, job.e1, slot.buffers) if job.kind == "graft" else None
            self.timeline.add("read", clock() - t0, size + _nbytes(slot.payload))
            piece = _Piece(job, slot, threading.Event())
            _put(self.order, piece, self.stop)
            _put(self.ready, piece, self.stop)
        _put(self.order, None, self.stop)
        for _ in range(self.workers):
            _put(self.ready, None, self.stop)

    def write(self) -> None:
        scratch = torch.empty(self.chunk_elements * 4, dtype=torch.uint8)
        instruct = self.plan.instruct
        while True:
            piece = _get(self.order, self.stop)
            if piece is None:
                return
            while not piece.done.wait(0.1):
                if self.stop.is_set():
                    raise Stopped
            job, slot = piece.job, piece.slot
            if job.kind == "scales":           # every piece of its tensor was computed before this one was reached
                grid = self.scales.pop(job.tensor.scales_of.name).to(job.tensor.out_dtype).contiguous()
                self.writer.write(job.tensor.name, grid.reshape(-1).view(torch.uint8), True)
            elif slot is None:
                self.writer.copy(instruct, job.tensor.stored, job.e0, job.e1, job.first, scratch)
            else:
                self.writer.write(job.tensor.name, slot.out, job.first, release=lambda s=slot: self.free.put(s))

    def compute(self) -> None:
        if self.intra != torch.get_num_threads():
            torch.set_num_threads(self.intra)        # this thread's own count (see workers())
        worker = _Worker(self)
        with torch.cuda.stream(torch.cuda.Stream(self.device)) if self.cuda else contextlib.nullcontext():
            while True:
                piece = _get(self.ready, self.stop)
                if piece is None:
                    return
                worker.compute(piece.job, piece.slot)
                piece.done.set()


class _Worker:
    """One compute thread's buffers and its float32 arithmetic of a piece: widen, delta, add, cast, check."""

    def __init__(self, run: _Run):
        self.run, self.device, self.cuda, self.timeline = run, run.device, run.cuda, run.timeline
        self.work = Buffers(run.device, torch.float32)
        self.staging = Buffers(run.device)
        self.zeros = _Zeros(run.device) if self.cuda else run.zeros
        self.converting = 0.0        # seconds spent widening inside the current delta (counted as convert)

    def to_float(self, raw: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
        t0 = time.perf_counter()
        if hasattr(raw, "decode"):           # an encoded piece (formats/): decoded here, on this compute thread
            out = raw.decode(self.work(key, raw.numel))
            if self.cuda:
                out = self.staging(key, raw.numel * 4).view(torch.float32).copy_(out, non_blocking=True)
            spent = time.perf_counter() - t0
            self.converting += spent
            self.timeline.add("convert", spent, raw.nbytes)
            return out
        n = raw.numel() // itemsize(dtype)
        if self.cuda:
            raw = self.staging(key, raw.numel()).copy_(raw, non_blocking=True)
        elif dtype == torch.float32:
            return raw.view(torch.float32)
        out = widen(raw, dtype, self.work(key, n))
        spent = time.perf_counter() - t0
        self.converting += spent
        self.timeline.add("convert", spent, raw.numel())
        return out

    def compute(self, job: Job, slot: Slot) -> None:
        run, t, clock = self.run, job.tensor, time.perf_counter
        x = self.to_float(slot.instruct, t.info.dtype, "instruct")
        if job.kind == "graft":
            t0, self.converting = clock(), 0.0
            d = run.plan.source.delta_into(t.entry, slot.payload, self.work("delta", x.numel()), self.to_float)
            if t.name not in run.changed and not all_zero(d, self.zeros(d.numel())):
                run.changed.add(t.name)
            if run.alpha != 1.0:
                d.mul_(run.alpha)
            zero = t.encoder.zero_blocks(d, job.e0) if t.encoder is not None else None
            inst, x = x, d.add_(x)      # == I + alpha * delta, bit for bit: float addition is commutative
            self.timeline.add("arithmetic", clock() - t0 - self.converting, x.numel() * 4)
        nbytes = x.numel() * itemsize(t.out_dtype)
        host = slot.buffers("out", nbytes)
        t0 = clock()
        if t.encoder is not None:            # the Instruct's own format: blocks quantized, its scales kept aside
            q, inv, kept = t.encoder.encode(run.plan.instruct, f"instruct {run.plan.instruct.ref}", x, inst, zero,
                                            job.e0)
            host.copy_(q)
            out = x                          # (finite: checked on x, whose values the blocks were scaled from)
            g0 = job.e0 // t.info.shape[1] // t.encoder.block[0]
            with run.lock:
                grid = run.scales.setdefault(t.name, torch.empty(t.encoder.grid, dtype=torch.float32))
                grid[g0:g0 + inv.shape[0]] = inv
                totals = run.kept.setdefault(t.name, [0] * len(kept))
                for k, v in enumerate(kept):
                    totals[k] += v
        elif self.cuda:
            out = self.staging("out", nbytes).view(t.out_dtype).copy_(x)
            host.copy_(out.view(torch.uint8), non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            out = host.view(t.out_dtype).copy_(x)
        self.timeline.add("cast", clock() - t0, nbytes)
        t0 = clock()
        if job.kind == "graft":
            if t.out_dtype == t.info.dtype and t.name not in run.differs and not torch.equal(
                    host, slot.instruct if isinstance(slot.instruct, torch.Tensor) else inst.view(torch.uint8)):
                run.differs.add(t.name)
            if t.encoder is not None and t.name not in run.differs and kept[2]:
                run.differs.add(t.name)
            if not finite_after_cast(x, out):
                if not run.allow_nonfinite:
                    raise ShadowMergeError(f"the result for {t.name} has NaN/Inf values; check the inputs (or pass "
                                           f"--allow-nonfinite to write them anyway)")
                with run.lock:
                    if t.name not in run.nonfinite:
                        run.nonfinite.append(t.name)
        self.timeline.add("check", clock() - t0)
        slot.out = host
