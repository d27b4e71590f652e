"""RangeStream: remote files read by range the way a graft needs them: in order, each byte once, checked on the way.

A streamed transport (hub.HubStream, objectstore.ObjectFiles) gives this class one primitive, `get(name, start,
end)` (bytes [start, end) of a file, one request), and the facts it pinned when it opened the model: each file's
size, version and the digests its store keeps (the Hub: the LFS sha256 or the git blob sha1; S3: a full-object
CRC32/SHA-256 or a single-part ETag's MD5). RangeStream turns the engine's preads into requests:

- Each file has a cursor. A read at or just after the cursor is served by reading forward from it (the bytes in
  between too, at least one request's worth: small tensors cost one request per REQUEST_SIZE, not one each), in
  requests of REQUEST_SIZE with up to REQUESTS in flight; every byte passing the cursor goes through the file's
  hashes, and the bytes from the read's start on are kept in a window (at most the read plus one request) for the
  reads that follow. A read far ahead of the cursor or behind the window (another thread's sample, a model whose
  files hold the tensors in another order) is fetched on its own and counted as read again.
- When a cursor reaches the end of its file, the file's digests must equal the store's: a mismatch is a one-line
  error naming the file, raised in the read, so the run stops and nothing is written. `finish()` reads the rest of
  every file the run read from (padding, tensors it did not need) so that each is checked whole, and asks the
  transport whether a file's version changed while it was read.
- Every request is retried with backoff on a dropped connection, a timeout, HTTP 5xx/429 or a short answer, up to
  TRIES times (the wait for each bounded by the transport's timeout); one line at the end counts the retries.

Written here: fsspec's caches (readahead, blockcache) and huggingface_hub's downloads neither check a stream
against a digest as it flows nor bound what they hold by the reader's position; this is the small part no library
does.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ShadowMergeError

MiB = 1 << 20
AHEAD_BYTES = 64 * MiB       # samples kept ahead of the cursors, a model


@dataclass(frozen=True)
class Settings:
    """How a stream reads: requests in flight, bytes per request, tries per request, seconds of silence per try."""

    requests: int = 8
    request_size: int = 8 * MiB
    tries: int = 5
    timeout: float = 60.0

    @classmethod
    def from_env(cls, timeout: float) -> "Settings":
        """SHADOWMERGE_STREAM_REQUESTS, SHADOWMERGE_STREAM_REQUEST_SIZE (e.g. 16MiB), SHADOWMERGE_STREAM_TRIES;
        the timeout is the transport's (the Hub's HF_HUB_ETAG_TIMEOUT, or SHADOWMERGE_STREAM_TIMEOUT)."""
        from ..writer import parse_size

        def number(var: str, default: int, low: int, high: int, parse=int) -> int:
            text = os.environ.get(var)
            if text is None or not text.strip():
                return default
            try:
                value = parse(text.strip())
            except (ValueError, ShadowMergeError):
                value = None
            if value is None or not low <= value <= high:
                raise ShadowMergeError(f"{var}={text[:40]!r} is not a number from {low} to {high}; set it so, or "
                                       f"unset it for the default ({default})")
            return value

        return cls(requests=number("SHADOWMERGE_STREAM_REQUESTS", cls.requests, 1, 64),
                   request_size=number("SHADOWMERGE_STREAM_REQUEST_SIZE", cls.request_size, 64 << 10, 256 * MiB,
                                       parse_size),
                   tries=number("SHADOWMERGE_STREAM_TRIES", cls.tries, 1, 20), timeout=timeout)


def stream_timeout(default: float) -> float:
    """Seconds without an answer before a try fails: SHADOWMERGE_STREAM_TIMEOUT when set, else `default`."""
    text = os.environ.get("SHADOWMERGE_STREAM_TIMEOUT", "").strip()
    if not text:
        return default
    try:
        value = float(text)
        if 0 < value < 86400:
            return value
    except ValueError:
        pass
    raise ShadowMergeError(f"SHADOWMERGE_STREAM_TIMEOUT={text[:40]!r} is not a number of seconds; set it so (e.g. 60), "
                           f"or unset it")


class Retry(Exception):
    """A failure worth another try (a dropped connection, a timeout, HTTP 5xx/429, a short answer)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


@dataclass
class FileFacts:
    """What the store said of a file when the model was opened: its size, version and digests (hex), by algorithm:
    sha256, md5, git-sha1 (sha1 of "blob SIZE\\0" + data, a Hub file outside LFS), crc32 (big-endian)."""

    name: str
    size: int
    digests: dict[str, str] = field(default_factory=dict)
    version: str | None = None

    def record(self) -> dict:
        return {"size": self.size, "version": self.version, **self.digests}


class _Crc32:
    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return self.value.to_bytes(4, "big").hex()


def _hasher(algorithm: str, size: int):
    if algorithm == "crc32":
        return _Crc32()
    if algorithm == "git-sha1":
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)
        return h
    return hashlib.new(algorithm)


def b64_hex(text: str) -> str:
    """A base64 digest (S3's and GCS's checksums) as hex."""
    return base64.b64decode(text).hex()


class _Cursor:
    def __init__(self, facts: FileFacts):
        self.facts = facts
        self.pos = 0                                   # bytes [0, pos) have been through the hashes
        self.hashers = {a: _hasher(a, facts.size) for a in facts.digests}
        self.window = bytearray()                      # bytes [wstart, pos) kept for the reads that follow
        self.wstart = 0
        self.ahead: dict[int, bytes] = {}              # samples read ahead of pos, used when pos gets there
        self.lock = threading.Lock()
        self.checked = False
        self.read = False                              # whether the run read data (not only the header or samples)


_SAMPLING = threading.local()


def is_sampling() -> bool:
    """Whether this thread's reads are samples (for a worker thread to read as its caller does)."""
    return bool(getattr(_SAMPLING, "on", 0))


class sampling:
    """Within (on this thread): reads are samples (a role check, a sampled σ) that never move a cursor; those ahead
    of it are kept (up to AHEAD_BYTES a model) for the run's own reads, so that no byte is fetched twice."""

    def __enter__(self):
        _SAMPLING.on = getattr(_SAMPLING, "on", 0) + 1

    def __exit__(self, *exc):
        _SAMPLING.on -= 1
        return False


class RangeStream:
    """The cursors, requests and checks of one streamed model (see the module's docstring)."""

    def __init__(self, where: str, facts: dict[str, FileFacts], get: Callable[[str, int, int], bytes],
                 settings: Settings, changed: Callable[[str], str | None] | None = None):
        self.where, self.facts, self.get, self.settings = where, facts, get, settings
        self.changed = changed                 # name -> why it changed since it was opened, or None
        self.cursors: dict[str, _Cursor] = {}
        self._lock = threading.Lock()
        self.fetched = 0                       # bytes received
        self.again = 0                         # of them, bytes received more than once
        self.retries: dict[str, int] = {}      # why -> count
        self._held = 0                         # bytes of samples kept ahead of the cursors
        self._recent: list[_Cursor] = []       # the cursors whose windows are kept, the latest last
        self._pool = ThreadPoolExecutor(max_workers=settings.requests, thread_name_prefix="shadowmerge-stream")

    def cursor(self, name: str) -> _Cursor:
        with self._lock:
            c = self.cursors.get(name)
            if c is None:
                facts = self.facts.get(name)
                if facts is None:
                    raise ShadowMergeError(f"{self.where}: {name} is not a file of this model; check the model")
                c = self.cursors[name] = _Cursor(facts)
            return c

    # --- requests -------------------------------------------------------------------------
    def _one(self, name: str, start: int, end: int) -> bytes:
        """One request, tried again on a passing failure."""
        for attempt in range(self.settings.tries):
            try:
                data = self.get(name, start, end)
                if len(data) != end - start:
                    raise Retry("short answer")
                with self._lock:
                    self.fetched += len(data)
                return data
            except Retry as exc:
                with self._lock:
                    self.retries[exc.why] = self.retries.get(exc.why, 0) + 1
                if attempt + 1 == self.settings.tries:
                    raise ShadowMergeError(
                        f"{self.where}: {name} could not be read ({exc.why}, {self.settings.tries} tries); check the "
                        f"connection and run again (a slow link may need SHADOWMERGE_STREAM_TIMEOUT=SECONDS, more "
                        f"tries SHADOWMERGE_STREAM_TRIES=N)") from None
                time.sleep(min(0.25 * 2 ** attempt, 4.0))
        raise AssertionError("unreachable")

    def _spans(self, name: str, start: int, end: int):
        """Bytes [start, end) in order, as pieces of at most REQUEST_SIZE, at most REQUESTS of them in flight."""
        size, most = self.settings.request_size, self.settings.requests
        bounds = [(a, min(a + size, end)) for a in range(start, end, size)]
        for k in range(0, len(bounds), most):
            batch = bounds[k:k + most]
            if len(batch) == 1:
                yield self._one(name, *batch[0])
                continue
            futures = [self._pool.submit(self._one, name, a, b) for a, b in batch]
            try:
                for f in futures:
                    yield f.result()
            finally:
                for f in futures:
                    f.cancel()

    # --- reads ----------------------------------------------------------------------------
    def header(self, name: str, label: str) -> tuple[int, dict]:
        """A safetensors file's validated header, from two range requests (its 8-byte length, then its JSON), whose
        bytes go through the file's hashes: the run reads them once. Validated by the safetensors library itself, on
        a sparse stand-in file (the real header, then a hole as long as the data)."""
        import tempfile
        from pathlib import Path

        from ..formats.safetensors import MAX_HEADER, read_header

        size = self.facts[name].size
        head = self._one(name, 0, min(8, size))
        if len(head) != 8:
            raise ShadowMergeError(f"{label}: not a safetensors file (only {len(head)} bytes); the file is damaged: "
                                   f"check the model, or ask its owner to upload it again")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise ShadowMergeError(f"{label}: corrupt or truncated safetensors header ({n} bytes of {size}); the file "
                                   f"is damaged: check the model, or ask its owner to upload it again")
        raw = head + (self._one(name, 8, 8 + n) if n else b"")
        self.seed(name, raw)
        with tempfile.TemporaryDirectory(prefix="shadowmerge-header-") as tmp:
            stand_in = Path(tmp) / Path(name).name
            with open(stand_in, "wb") as f:
                f.write(raw)
                f.truncate(size)
            start, header, _ = read_header(stand_in, size, label=label)
        return start, header

    def seed(self, name: str, data: bytes) -> None:
        """The first len(data) bytes of a file, already fetched (its header): through the hashes, not read again."""
        c = self.cursor(name)
        with c.lock:
            if c.pos == 0 and data:
                self._advance(c, data, keep_from=None)
                c.wstart = c.pos

    def _advance(self, c: _Cursor, data, keep_from: int | None) -> None:
        for h in c.hashers.values():
            h.update(data)
        if keep_from is not None and c.pos + len(data) > keep_from:
            c.window += memoryview(data)[max(0, keep_from - c.pos):]
        c.pos += len(data)
        if c.pos == c.facts.size:
            self._check(c)

    def _check(self, c: _Cursor) -> None:
        c.checked = True
        for algorithm, want in c.facts.digests.items():
            got = c.hashers[algorithm].hexdigest()
            if got != want.lower():
                raise ShadowMergeError(
                    f"{self.where}: {c.facts.name} does not match its {algorithm} ({got[:16]}… read, {want[:16]}… "
                    f"expected): the file changed during the run or was damaged on the way; nothing was written: run "
                    f"again")

    def _forward(self, c: _Cursor, name: str, stop: int):
        """Bytes [c.pos, stop) in order: samples kept ahead where they cover it, requests for the rest."""
        x = c.pos
        while x < stop:
            held = next(((p, d) for p, d in c.ahead.items() if p <= x < p + len(d)), None)
            if held is not None:
                p, d = held
                piece = d[x - p:min(len(d), stop - p)]
                x += len(piece)
                yield piece
                continue
            nxt = min([p for p in c.ahead if x < p < stop] + [stop])
            for data in self._spans(name, x, nxt):
                x += len(data)
                yield data
        for p in [p for p, d in c.ahead.items() if p + len(d) <= stop]:
            with self._lock:
                self._held -= len(c.ahead.pop(p))

    def _trim(self, c: _Cursor, need: int) -> None:
        """Keep the window at most `need` plus two requests long, and at most two files' windows a model."""
        cap = need + 2 * self.settings.request_size
        if len(c.window) > cap:
            del c.window[:len(c.window) - cap]
            c.wstart = c.pos - len(c.window)
        with self._lock:
            if c in self._recent:
                self._recent.remove(c)
            self._recent.append(c)
            old = self._recent[:-2]
            del self._recent[:-2]
        for o in old:                    # (another file's lock is never waited on while holding this one)
            if o.lock.acquire(blocking=False):
                o.window, o.wstart = bytearray(), o.pos
                o.lock.release()

    def pread(self, name: str, view: memoryview, pos: int) -> int:
        c = self.cursor(name)
        size = c.facts.size
        if pos >= size or not len(view):
            return 0
        end = min(pos + len(view), size)
        n = end - pos
        with c.lock:
            if c.wstart <= pos and end <= c.pos:                             # in the window ([wstart, pos))
                view[:n] = c.window[pos - c.wstart:end - c.wstart]
                return n
            if getattr(_SAMPLING, "on", 0):                                  # a sample: never moves the cursor
                got = b"".join(self._spans(name, pos, end))
                with self._lock:
                    if pos >= c.pos and self._held + n <= AHEAD_BYTES:
                        c.ahead[pos], self._held = got, self._held + n
                    self.again += max(0, min(end, c.pos) - pos)
                view[:n] = got
                return n
            c.read = True
            if pos < c.wstart:                                               # behind the window: read again
                view[:n] = b"".join(self._spans(name, pos, end))
                with self._lock:
                    self.again += min(end, c.pos) - pos
                return n
            # from the cursor on, through the hashes: at least one request, kept from the read's start (or from the
            # cursor, when the read is just ahead of it), the bytes between (padding, tensors not read) only hashed
            stop = min(size, max(end, c.pos + self.settings.request_size))
            keep = min(pos, c.pos) if pos - c.pos <= self.settings.request_size else pos
            if keep >= c.pos:
                c.window, c.wstart = bytearray(), keep
            for data in self._forward(c, name, stop):
                self._advance(c, data, keep_from=keep)
            view[:n] = c.window[pos - c.wstart:end - c.wstart]
            self._trim(c, n)
            return n

    def finish(self) -> str | None:
        """Check every file the run read from whole (its rest read through the hashes, then nothing kept), and that
        none changed version; the line on retries and re-reads, or None."""
        for name, c in list(self.cursors.items()):
            if not c.read:
                continue
            with c.lock:
                c.window = bytearray()
                if not c.checked:
                    for data in self._forward(c, name, c.facts.size):
                        self._advance(c, data, keep_from=None)
                    if not c.checked:
                        self._check(c)
                c.wstart = c.pos
            why = self.changed(name) if self.changed is not None else None
            if why:
                raise ShadowMergeError(f"{self.where}: {name} changed during the run ({why}); nothing was written: run "
                                       f"again")
        return self.note()

    def note(self) -> str | None:
        parts = []
        if self.retries:
            kinds = ", ".join(f"{why} ×{n}" for why, n in sorted(self.retries.items()))
            parts.append(f"{sum(self.retries.values())} request(s) tried again ({kinds})")
        if self.again:
            parts.append(f"{self.again} bytes read twice (tensors read out of file order)")
        return f"{self.where}: {'; '.join(parts)}" if parts else None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.cursors.clear()
