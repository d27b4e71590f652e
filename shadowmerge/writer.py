"""Writer: streams tensors into safetensors shards whose headers are computed from the plan.

Every header is known before the first byte is written, so a tensor's bytes go straight from the
compute buffer (or, for copies, from the input file, in the kernel) to disk: no shard is ever
held in memory. Files are created 0666 minus the umask (0644 as usual), like any other tool's.
Each shard's sha256, for the run record's manifest, is computed off the writer's thread, in the order
the bytes were written, from the very buffers written (kernel copies are read back from the page
cache). One sha256 stream cannot be split, so on a machine with cores to spare several shards are
hashed at once, a lagging one from the page cache (see Hasher). A caller's buffer is handed back
(`release`) once it is hashed. The kernel is asked every 64 MiB to start writing the pages back
(sync_file_range, through ctypes: Python has no binding). A flusher thread fdatasyncs the open shard
every 128 MiB and each shard as it closes, while the next bytes are computed: a disk (or a virtual
disk's host cache) that takes writes faster than it makes them durable then drains during the run,
and the final fsync of the output finds little left. Durability itself is unchanged: the output
folder's fsync before its rename is still what guarantees it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import queue
import re
import threading
import time
from fractions import Fraction
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorInfo
from .errors import ShadowMergeError
from .sidefiles import INDEX
from .formats.safetensors import build_header, itemsize
from .timeline import Timeline

_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


@dataclass
class Shard:
    filename: str
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int]]   # name, dtype, shape, nbytes
    header: bytes = b""

    @property
    def size(self) -> int:
        return len(self.header) + sum(e[3] for e in self.entries)


_SIZE = re.compile(r"((?:\d{1,20}(?:\.\d{0,20})?|\.\d{1,20})(?:E\+?\d{1,2})?)(TIB|GIB|MIB|KIB|TB|GB|MB|KB|B)?")
_UNITS = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10,
          "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1, None: 1}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024), ints as bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text).strip().upper().replace(" ", ""))
        value = int(Fraction(m[1]) * _UNITS[m[2]]) if m else 0
    if value <= 0:
        raise ShadowMergeError(f"shard size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return value


def layout(entries: list[tuple[str, torch.dtype, tuple[int, ...], int]], shard_size: int) -> list[Shard]:
    """Split tensors, in order, into shards of at most shard_size bytes (a bigger tensor gets its own)."""
    groups: list[list] = [[]]
    used = 0
    for e in entries:
        if groups[-1] and used + e[3] > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(e)
        used += e[3]
    n = len(groups)
    shards = []
    for i, group in enumerate(groups, 1):
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        shard = Shard(name, group)
        shard.header, _ = build_header(group, {"format": "pt"})
        shards.append(shard)
    return shards


def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, start, n: None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, start, n: fn(fd, start, n, 2)       # SYNC_FILE_RANGE_WRITE: start writeback, do not wait


_START_WRITEBACK = _sync_file_range()
_KEEP = lambda: None        # noqa: E731  (release of a buffer nobody reuses)
WRITEBACK_BYTES = 64 << 20
FLUSH_BYTES = 128 << 20


class Flusher:
    """fdatasync of descriptors handed over while writing goes on, on a thread of its own (which waits on the
    disk, not on a core). Each descriptor is a dup the flusher owns and closes; requests for one that is still
    waiting are merged."""

    def __init__(self, timeline: Timeline):
        self.timeline = timeline
        self._cv = threading.Condition()
        self._pending: dict[int, bool] = {}      # descriptor -> close it after its sync
        self._stopping = False
        self._thread: threading.Thread | None = None

    def request(self, fd: int, last: bool = False) -> None:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="shadowmerge-flusher")
                self._thread.start()
            self._pending[fd] = self._pending.get(fd, False) or last
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if not self._pending:
                    return
                fd, last = next(iter(self._pending.items()))
                del self._pending[fd]
            t0 = time.perf_counter()
            try:
                os.fdatasync(fd)
            except OSError:
                pass                        # the output's own fsync reports what went wrong
            self.timeline.add("flush", time.perf_counter() - t0)
            if last:
                os.close(fd)

    def close(self, wait: bool = True) -> None:
        """Stop the thread; with wait, after the pending syncs (else they are dropped); close every descriptor."""
        with self._cv:
            if not wait:
                for fd, last in list(self._pending.items()):
                    if last:
                        os.close(fd)
                self._pending.clear()
            self._stopping = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join()


MAX_HASH_LANES = 4
LAG_BYTES = 64 << 20


def hash_lanes() -> int:
    """How many shards may be hashed at once: one per 4 of torch's threads (the compute threads keep the
    rest), at most MAX_HASH_LANES; 1 on a small machine, where a second lane would only take a core from the
    arithmetic."""
    return max(1, min(MAX_HASH_LANES, torch.get_num_threads() // 4))


class _Lane:
    """One hashing thread and its queue; it hashes whole shards, one after another, in the order handed over."""

    def __init__(self, owner: "Hasher"):
        self.owner = owner
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.handed = 0             # bytes handed over (written by the writer's thread only)
        self.hashed = 0             # ... and hashed (written by the lane's thread only)
        self.thread = threading.Thread(target=self._loop, daemon=True, name="shadowmerge-hasher")
        self.thread.start()

    def _loop(self) -> None:
        owner, scratch, fd, sha = self.owner, None, None, None
        while True:
            item = self.q.get()
            kind = item[0]
            if kind == "stop":
                if fd is not None:
                    os.close(fd)
                return
            if owner.dropping or owner.error is not None:      # the run is over: hand buffers back, close
                if kind == "begin":
                    os.close(item[1])
                elif kind == "end" and fd is not None:
                    os.close(fd)
                    fd = None
                elif kind == "data":
                    item[2]()
                continue
            try:
                t0 = time.perf_counter()
                if kind == "begin":
                    fd, sha = item[1], hashlib.sha256()
                elif kind == "data":
                    sha.update(item[1])
                    self.hashed += len(item[1])
                    owner.timeline.add("hash", time.perf_counter() - t0, len(item[1]))
                    item[2]()
                elif kind == "back":
                    scratch = scratch or memoryview(bytearray(owner.scratch_bytes))
                    _read_back(fd, item[1], item[2], scratch, sha)
                    self.hashed += item[2]
                    owner.timeline.add("hash", time.perf_counter() - t0, item[2])
                else:
                    owner.digests[item[1]] = sha.hexdigest()
                    os.close(fd)
                    fd = None
            except BaseException as exc:       # reported to the writer (finish, or its next call)
                owner.error = exc


def _read_back(fd: int, start: int, n: int, view: memoryview, sha) -> None:
    done = 0
    while done < n:
        got = os.preadv(fd, [view[: min(len(view), n - done)]], start + done)
        if got <= 0:
            raise OSError(errno.EIO, "short read of a shard just written")
        sha.update(view[:got])
        done += got


class Hasher:
    """The sha256 of each shard, off the writer's thread (hashlib lets go of the GIL on large buffers), fed in
    the order the bytes were written: a buffer the writer wrote (`data`, handed back by `release` once hashed),
    or bytes of the open shard that the kernel copied (`back`, read back from the page cache through a
    descriptor of the hasher's own). `end` records the shard's digest into `digests`.

    One shard's sha256 is one sequential stream (about 1.2 GB/s on a core), so with `lanes` > 1 the shards are
    spread over that many threads: while one lags more than LAG_BYTES behind the writer, the buffers written
    to it are handed back at once and hashed later from the page cache, so the writer goes on to the next
    shard, which another lane hashes beside it. With one lane (a small machine) a lagging hash holds the
    buffers instead, which slows the reader rather than adding work for the same cores."""

    def __init__(self, digests: dict[str, str], timeline: Timeline, scratch_bytes: int = 8 << 20,
                 lanes: int = 1):
        self.digests, self.timeline, self.scratch_bytes = digests, timeline, scratch_bytes
        self.error: BaseException | None = None
        self.dropping = False
        self.lanes = max(1, lanes)
        self._closed = False
        self._running: list[_Lane] = []
        self._lane: _Lane | None = None      # the open shard's
        self._pos = 0                        # bytes of the open shard handed over

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self._closed:
            raise RuntimeError("the writer was closed while writing")

    def begin(self, fd: int) -> None:
        """A new shard: `fd` is a descriptor of it the hasher owns (and closes at `end`). It goes to the lane
        with the fewest bytes waiting (a new one while fewer than `lanes` run)."""
        try:
            self._check()
        except BaseException:
            os.close(fd)
            raise
        if len(self._running) < self.lanes:
            self._running.append(_Lane(self))
        self._lane = min(self._running, key=lambda lane: lane.handed - lane.hashed)
        self._pos = 0
        self._lane.q.put(("begin", fd))

    def data(self, view: memoryview, release=None) -> None:
        """Hash `view` next, then call release(); without release, wait until it is hashed (the caller reuses it).
        Under several lanes, a lane that lags takes the bytes from the file instead and release() runs at once."""
        self._check()
        lane, n = self._lane, len(view)
        if self.lanes > 1 and lane.handed - lane.hashed > LAG_BYTES:
            self.back(n)
            if release is not None:
                release()
            return
        self._pos += n
        lane.handed += n
        if release is not None:
            lane.q.put(("data", view, release))
            return
        done = threading.Event()
        lane.q.put(("data", view, done.set))
        while not done.wait(0.1):
            if self.error is not None:
                raise self.error

    def back(self, n: int) -> None:
        """The next n bytes of the open shard were written by the kernel: hash them from the file."""
        self._check()
        self._lane.handed += n
        self._lane.q.put(("back", self._pos, n))
        self._pos += n

    def end(self, filename: str) -> None:
        """The open shard is complete (after close() a no-op: its lane closes the descriptor as it stops)."""
        if self._lane is not None:
            self._lane.q.put(("end", filename))
            self._lane = None

    def close(self, wait: bool = True) -> None:
        """Stop the threads: with wait, after everything handed over is hashed (raising what went wrong), else
        dropping what is left unhashed; every descriptor is closed."""
        self._closed = True
        if not wait:
            self.dropping = True
        for lane in self._running:
            lane.q.put(("stop",))
        for lane in self._running:
            lane.thread.join()
        self._running = []
        if wait and self.error is not None:
            raise self.error


class ShardWriter:
    """Receives tensors in plan order, as byte chunks or as copies from an input file."""

    def __init__(self, folder: Path, shards: list[Shard], on_bytes=None, timeline: Timeline | None = None):
        self.folder = folder
        self.timeline = timeline or Timeline()
        self.shards = shards
        self.on_bytes = on_bytes or (lambda n: None)
        self.digests: dict[str, str] = {}       # shard file name -> sha256 of its bytes, as written
        self._order = [(si, e) for si, s in enumerate(shards) for e in s.entries]
        self._next = 0          # index into _order of the tensor being written
        self._left = 0          # bytes still owed to it
        self._shard = -1
        self._fd: int | None = None
        self.hasher = Hasher(self.digests, self.timeline, lanes=hash_lanes())
        self._pos = self._synced = 0     # bytes written to the open shard, and handed to writeback
        self._flushed = 0                # ... and handed to the flusher
        self._dup: int | None = None     # the flusher's descriptor of the open shard
        self.flusher = Flusher(self.timeline)

    def _start(self, name: str) -> None:
        if self._left:
            raise RuntimeError(f"tensor {self._order[self._next - 1][1][0]} is incomplete")
        si, (expected, _, _, nbytes) = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"writer expected {expected}, got {name}")
        if si != self._shard:
            self._close_shard()
            self._shard = si
            path = self.folder / self.shards[si].filename
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            self._dup = os.dup(self._fd)
            self.hasher.begin(os.dup(self._fd))
            self._pos, self._synced, self._flushed = 0, 0, 0
            self._write(memoryview(self.shards[si].header), release=_KEEP)     # (the header is not reused)
        self._next += 1
        self._left = nbytes

    def _close_shard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.flusher.request(self._dup, last=True)
            self._dup = None
            self.hasher.end(self.shards[self._shard].filename)

    def _write(self, view: memoryview, release=None) -> None:
        """Write view, then hand it to the hasher (release: see Hasher.data)."""
        done, t0 = 0, time.perf_counter()
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self.timeline.add("write", time.perf_counter() - t0, len(view))
        self.hasher.data(view, release)
        self._advance(len(view))

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._pos - self._synced >= WRITEBACK_BYTES:
            with self.timeline("writeback"):
                _START_WRITEBACK(self._fd, self._synced, self._pos - self._synced)
            self._synced = self._pos
        if self._pos - self._flushed >= FLUSH_BYTES:
            self.flusher.request(self._dup)
            self._flushed = self._pos

    def write(self, name: str, data: torch.Tensor, first: bool, release=None) -> None:
        """Append a chunk (uint8 CPU tensor) of tensor `name`; first=True for its first chunk. With `release`,
        return at once and call release() once `data` is hashed (the caller must not change it before);
        without, return when it is."""
        if first:
            self._start(name)
        n = data.numel()
        if n > self._left:
            raise RuntimeError(f"too many bytes for {name}")
        self._write(memoryview(data.numpy()), release)
        self._left -= n
        self.on_bytes(n)

    def copy(self, ckpt: Checkpoint, info: TensorInfo, e0: int, e1: int, first: bool,
             scratch: torch.Tensor) -> None:
        """Append elements [e0, e1) of an input tensor unchanged: in the kernel where it can, never decoded."""
        if first:
            self._start(info.name)
        size = itemsize(info.dtype)
        n = (e1 - e0) * size
        src = ckpt.transport.zero_copy_fd(info.file) if info.offset is not None and n else None
        if src is not None:
            pos, done, t0 = info.offset + e0 * size, 0, time.perf_counter()
            try:
                while done < n:
                    got = os.copy_file_range(src, self._fd, n - done, pos + done)
                    if got == 0:
                        raise ShadowMergeError(f"{ckpt.label} {info.file}: file ended while copying "
                                               f"{info.name}; it was truncated or changed during the run")
                    done += got
                    self.on_bytes(got)
            except OSError as exc:
                if done or exc.errno not in _NO_KERNEL_COPY:
                    raise
            self.timeline.add("copy", time.perf_counter() - t0, done)
            if done:
                self.hasher.back(done)
            self._advance(done)
            self._left -= done
            e0 += done // size
        step = max(1, scratch.numel() // size)
        for e in range(e0, e1, step):
            with self.timeline("read", (min(e + step, e1) - e) * size):
                chunk = ckpt.read_into(info, e, min(e + step, e1), scratch)
            self._write(memoryview(chunk.numpy()))
            self._left -= chunk.numel()
            self.on_bytes(chunk.numel())

    def finish(self) -> list[Path]:
        """Check every planned byte was written, close, write the index; return the files written."""
        if self._next != len(self._order) or self._left:
            raise RuntimeError("writer finished before the plan was complete")
        self._close_shard()
        for shard in self.shards:
            if (self.folder / shard.filename).stat().st_size != shard.size:
                raise RuntimeError(f"{shard.filename} has the wrong size")
        files = [self.folder / s.filename for s in self.shards]
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(e[3] for s in self.shards for e in s.entries)},
                     "weight_map": {e[0]: s.filename for s in self.shards for e in s.entries}}
            path = self.folder / INDEX
            path.write_text(json.dumps(index, indent=2) + "\n")
            files.append(path)
        self.hasher.close(wait=True)
        self.flusher.close(wait=True)
        return files

    def abort(self) -> None:
        """Close what is open (after finish(): nothing); pending hashes and flushes are dropped."""
        self._close_shard()
        self.hasher.close(wait=False)
        self.flusher.close(wait=False)
