"""The output folder: checked, written in a temporary folder beside the target, put in place atomically.

(What goes in it is the caller's: side files are copied by sidefiles.copy_side_files, the run record and its
manifest are record.py's.) The promises, and how they are kept:

- Nothing this run did not create is removed or replaced, unless --force. One run at a time
  writes a target: it holds an exclusive lock (flock) on `.NAME.shadowmerge.lock` beside it, so a
  second run fails at once with a one-line error. The final step is Linux renameat2: with
  RENAME_NOREPLACE it fails if anything appeared at the target meanwhile (someone else's folder
  stays as it is); with --force, RENAME_EXCHANGE swaps the new folder in, so the target path is
  never missing or half-written, and the old output is deleted only after the new one is in place.
  (Python has no binding for renameat2, hence ctypes; where the filesystem or OS lacks it, a
  fallback claims the target with mkdir and renames over that empty folder.)
- The temporary folder is `.NAME.shadowmerge-HOST-PID-XXXX`; under the lock, a later run on the
  same target removes those whose process on this host is gone (SIGKILL, power loss), and says so.
  On an error, Ctrl-C, SIGTERM or SIGHUP (the CLI turns both into KeyboardInterrupt) it is removed.
- The run record (shadowmerge.json, or train's run.json) gets a manifest: every other file's size and
  sha256, and each safetensors header's tensors, for `shadowmerge verify`.
- Every file and folder is fsynced before the rename, and the parent after it.
- Failures to write (disk full, read-only filesystem, no permission, a file where a folder should
  be) become one-line errors, after cleanup.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from .errors import ShadowMergeError
from .progress import human_bytes
from .record import RECORD, add_timeline, is_shadowmerge_output, seal
from .timeline import Timeline

TMP_TAG = ".shadowmerge-"
_WRITE_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only filesystem",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.ENOTDIR: "a path component is not a folder", errno.EFBIG: "file too large"}


_LIBRARY_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                     "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


_WRITER_FAILED = ("file write failed", "iostream error", "unexpected pos", "inline_container")
_FULL = 1 << 20          # free bytes below which a failed write is taken for a full disk


def os_error_of(exc: BaseException, where: Path | None = None) -> OSError | None:
    """The machine's write failure inside a library's exception, as an OSError (no file name), or None.

    Libraries that write files report a full disk in their own exception types: safetensors' Rust writer as
    `SafetensorError: ... I/O error: No space left on device (os error 28)`, often chained from the OSError.
    The chain is searched for an OSError of a write error, then the messages for an OS error number or text.
    torch.save says only that its stream failed (`RuntimeError: [enforce fail at inline_container.cc] ...
    unexpected pos`, from `basic_ios::clear: iostream error`): with `where` (the folder being written), such a
    failure while less than 1 MiB is free there is the full disk it is."""
    import re

    seen, chain = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in _WRITE_ERRORS:
            return OSError(e.errno, os.strerror(e.errno))
    for e in chain:
        text = str(e)
        found = re.search(r"\(os error (\d{1,4})\)", text)
        if found and int(found.group(1)) in _WRITE_ERRORS:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        for words, number in _LIBRARY_MESSAGES.items():
            if words in text:
                return OSError(number, os.strerror(number))
    if where is not None and any(w in str(e) for e in chain for w in _WRITER_FAILED):
        try:
            if shutil.disk_usage(where).free < _FULL:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            pass
    return None


def rewrite_text(path: Path, text: str) -> None:
    """Give path new text through a new file renamed over it: a file hard-linked from elsewhere (train
    --finish links the trained files) keeps its old contents there."""
    new = path.with_name(f".{path.name}.new")
    new.write_text(text, errors="surrogateescape")
    os.replace(new, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(folder: Path) -> None:
    """Give the files of a folder the usual mode (0666 minus the umask): some writers leave 0600."""
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~_umask())


# --- renameat2 -------------------------------------------------------------------------------
_NOREPLACE, _EXCHANGE = 1, 2
_SYSCALL = {"x86_64": 316, "aarch64": 276, "arm64": 276}


def _renameat2_function():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        return lambda src, dst, flags: fn(-100, src, -100, dst, ctypes.c_uint(flags))
    number = _SYSCALL.get(platform.machine()) if sys.platform.startswith("linux") else None
    if number is None:
        return None
    return lambda src, dst, flags: libc.syscall(number, -100, src, -100, dst, ctypes.c_uint(flags))


_RENAMEAT2 = _renameat2_function()


def rename(src: Path, dst: Path, exchange: bool = False) -> None:
    """rename(2) that never replaces dst (OSError EEXIST), or with exchange=True swaps src and dst atomically.

    Raises OSError ENOSYS where the kernel or filesystem has no renameat2.
    """
    if _RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _RENAMEAT2(os.fsencode(src), os.fsencode(dst), _EXCHANGE if exchange else _NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src), None, str(dst))


# --- small helpers ---------------------------------------------------------------------------
def _lock_key(name: str) -> str:
    """A target's name in its temporary folders and lock file: within NAME_MAX whatever the name."""
    return name if len(name.encode()) <= 100 else \
        name.encode()[:60].decode(errors="ignore") + "~" + hashlib.sha1(name.encode()).hexdigest()[:12]


def _host() -> str:
    return "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a folder tree, or a file or link, without following links; missing is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under folder (the folder itself last)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:      # some filesystems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done (main thread only), then deliver them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(sig)
        if callable(handler):
            old[sig] = signal.signal(sig, lambda s, f: pending.append(s))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


class TargetLock:
    """An exclusive flock on `.NAME.shadowmerge.lock` beside a target, removed when released."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.fd: int | None = None

    @classmethod
    def for_target(cls, target: Path) -> "TargetLock":
        target = Path(target).expanduser().absolute()
        return cls(target.parent / f".{_lock_key(target.name)}.shadowmerge.lock", str(target))

    def holder(self) -> str | None:
        """Who holds the lock now ("pid N on HOST"), or None when no live process does. Read from the lock file
        that the holder writes (a run killed with SIGKILL leaves it, naming a process that is gone), without taking
        the lock, which would make a run acquiring it at that moment fail; another host's process is asked of the
        lock itself (flock dies with its process)."""
        try:
            with open(self.path, "rb") as f:
                owner = f.read(200).decode(errors="replace").strip()
        except OSError:
            return None
        words = owner.split()
        if len(words) == 4 and words[0] == "pid" and words[1].isdigit() and words[2] == "on" and words[3] == _host():
            return owner if _pid_alive(int(words[1])) else None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return owner or "another process"
        except OSError:
            return None
        finally:
            os.close(fd)
        return None

    def check_free(self) -> None:
        """A one-line error when a live run holds the lock (before work that the lock would only guard later)."""
        owner = self.holder()
        if owner is not None:
            raise ShadowMergeError(f"another shadowmerge run ({owner}) is writing {self.what} now; wait for it to "
                                   f"finish, or choose another output folder")

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ShadowMergeError(f"another shadowmerge run ({owner}) is writing {self.what} now; wait for it "
                                       f"to finish, or choose another output folder") from None
            except BaseException:
                os.close(fd)
                raise
            try:         # the file we locked may have been unlinked by its last holder: lock the current one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                with contextlib.suppress(OSError):      # who holds it, for the error above; a full disk is fine
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"pid {os.getpid()} on {_host()}".encode(), 0)
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


class OutputFolder:
    """with OutputFolder(target, force, inputs) as tmp: write into tmp; then .commit() puts it in place."""

    def __init__(self, target: str | Path, *, force: bool, inputs: list[Path], need_bytes: int, flag: str = "--out",
                 record: str = RECORD):
        self.target = Path(target).expanduser().absolute()
        self.force, self.flag, self.need, self.record = force, flag, need_bytes, record
        name = self.target.name
        if not name or name in (".", ".."):
            raise ShadowMergeError(f"{flag} {target} does not name a folder; choose e.g. ./merged")
        self._key = _lock_key(name)
        real = self.target.resolve()
        for folder in inputs:
            inp = folder.resolve()
            if real == inp or inp in real.parents:
                raise ShadowMergeError(f"{flag} {target} is inside the input {folder}; choose a folder elsewhere")
            if real in inp.parents:
                raise ShadowMergeError(f"{flag} {target} contains the input {folder}; choose another folder")
        probe = self.target.parent
        while not os.path.lexists(probe):
            probe = probe.parent
        if not probe.is_dir():
            raise ShadowMergeError(f"{flag} {target}: {probe} is a file, not a folder; choose another {flag}")
        fs = _virtual_filesystem(probe)
        if fs:
            raise ShadowMergeError(f"{flag} {target}: {probe} is on a virtual filesystem (like /proc or /sys) that "
                                   f"cannot hold files ({fs}); choose a folder on a disk")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ShadowMergeError(f"{flag} {target}: cannot write in {probe} (read-only or no permission); "
                                   f"choose a writable {flag}")
        if os.path.lexists(self.target):
            if not force:
                self._check_replaceable(f"{target} already exists and ")
                raise ShadowMergeError(f"{target} already exists; choose another {flag} or pass --force to replace it")
            self._check_replaceable()
        free = shutil.disk_usage(probe).free
        if need_bytes > free:
            raise ShadowMergeError(f"not enough disk space in {probe}: the output needs {human_bytes(need_bytes)}, "
                                   f"{human_bytes(free)} is free; free some space or choose another {flag}")
        self._made: list[Path] = []
        self._lock: TargetLock | None = None
        self._old: Path | None = None
        self.tmp: Path | None = None
        self.digests: dict[str, str] = {}        # sha256 of files already hashed while written (relative names)

    def _check_replaceable(self, lead: str | None = None) -> None:
        """--force replaces only what shadowmerge wrote: a folder with one of its run records, or an empty one. (lead:
        the target exists and --force was not given: the error must not suggest it for what it would refuse.)"""
        target = self.target
        lead = lead or f"{target} "
        if target.is_symlink() or not target.is_dir():
            raise ShadowMergeError(f"{lead}is not a folder; --force replaces only an output shadowmerge wrote: move it "
                                   f"away or choose another {self.flag}")
        if not is_shadowmerge_output(target) and any(target.iterdir()):
            raise ShadowMergeError(f"{lead}was not written by shadowmerge (it has no shadowmerge record); --force "
                                   f"replaces only shadowmerge's outputs: move it away or choose another {self.flag}")

    # --- entering: parents, lock, stale leftovers, the temporary folder --------------------------
    def __enter__(self) -> Path:
        try:
            missing = []
            p = self.target.parent
            while not os.path.lexists(p):
                missing.append(p)
                p = p.parent
            for p in reversed(missing):
                p.mkdir()
                self._made.append(p)
            self._lock = TargetLock.for_target(self.target)
            self._lock.acquire()
            self._remove_stale()
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self._key}{TMP_TAG}{_host()}-{os.getpid()}-",
                                             dir=self.target.parent))
        except BaseException as exc:
            self._cleanup()
            if isinstance(exc, OSError):
                raise self._write_error(exc) from None
            raise
        return self.tmp

    def _remove_stale(self) -> None:
        """Temporary folders of this target whose owner process on this host is gone (we hold the lock)."""
        prefix, host = f".{self._key}{TMP_TAG}", _host()
        for p in self.target.parent.iterdir():
            if not p.name.startswith(prefix):
                continue
            owner = p.name[len(prefix):].rsplit("-", 2)
            if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
                continue          # another host's (its lock may not reach us), or not ours: leave it
            if int(owner[1]) != os.getpid() and _pid_alive(int(owner[1])):
                continue
            _remove(p)
            print(f"shadowmerge: removed {p}, left behind by an interrupted run (pid {owner[1]})", file=sys.stderr)

    # --- the final step ----------------------------------------------------------------------
    def commit(self, timeline=None) -> None:
        """Seal the record with the manifest, fsync everything, put the folder in place. With a timeline
        (timeline.py), the record also gets the run's timeline up to the fsync."""
        assert self.tmp is not None
        line = timeline if timeline is not None else Timeline()
        try:
            with line("manifest"):
                seal(self.tmp, self.record, self.digests)
            with line("fsync"):
                fsync_tree(self.tmp)
            if timeline is not None:
                add_timeline(self.tmp / self.record, timeline)
            os.chmod(self.tmp, 0o777 & ~_umask())
            with line("rename"):
                with deferred_signals():
                    self._put_in_place()
                fsync_dir(self.target.parent)
            line.stop()
        except OSError as exc:
            raise self._write_error(exc) from None
        if self._old is not None:
            _remove(self._old)
            self._old = None

    def _put_in_place(self) -> None:
        tmp, target = self.tmp, self.target
        try:
            while True:
                try:
                    rename(tmp, target)
                    break
                except FileExistsError:
                    if not self.force:
                        raise self._appeared() from None
                    self._check_replaceable()       # what appeared meanwhile must be ours too
                try:
                    rename(tmp, target, exchange=True)
                    self._old = tmp          # the old output now lives at the temporary name
                    break
                except FileNotFoundError:    # removed meanwhile: try the plain rename again
                    continue
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
                raise
            self._fallback_put_in_place()
        self.tmp = None
        self._made = []          # the parents made for the target now hold it

    def _appeared(self) -> ShadowMergeError:
        return ShadowMergeError(f"{self.target} appeared while this run was writing; it was left as it is and this "
                                f"run's output was removed; choose another {self.flag} or pass --force to replace it")

    def _fallback_put_in_place(self) -> None:
        """Without renameat2: claim the target with mkdir (atomic), then rename over that empty folder."""
        tmp, target = self.tmp, self.target
        if os.path.lexists(target):
            if not self.force:
                raise self._appeared()
            self._check_replaceable()
            old = Path(f"{tmp}old")      # still named like this run's temporary folders, so a later run can clean it
            os.rename(target, old)
            self._old = old
        os.mkdir(target)
        os.rename(tmp, target)

    # --- leaving: remove what is ours, release the lock, explain write errors -----------------
    def _cleanup(self) -> None:
        for path in (self.tmp, self._old):
            if path is not None:
                _remove(path)
        self.tmp = self._old = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        for p in reversed(self._made):
            with contextlib.suppress(OSError):
                p.rmdir()
        self._made = []

    def __exit__(self, exc_type, exc, tb) -> None:
        ours = isinstance(exc, OSError) and exc.errno in _WRITE_ERRORS and self._is_ours(exc)
        self._cleanup()
        if ours:
            raise self._write_error(exc) from None

    def _is_ours(self, exc: OSError) -> bool:
        """An error about a path in the temporary folder, or about no path (a write to an open descriptor)."""
        names = [n for n in (exc.filename, exc.filename2) if n is not None]    # shutil names (source, target)
        return not names or (self.tmp is not None and
                             any(Path(os.fsdecode(n)).absolute().is_relative_to(self.tmp) for n in names))

    def _write_error(self, exc: OSError) -> ShadowMergeError:
        what = _WRITE_ERRORS.get(exc.errno, exc.strerror or type(exc).__name__)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            amount = f"at least {human_bytes(self.need)}" if self.need else "some space"
            return ShadowMergeError(f"{what} while writing {self.target}; the partial output was removed; free "
                                    f"{amount} there (or choose another {self.flag}) and run again")
        return ShadowMergeError(f"cannot write {self.target}: {what} ({exc.strerror}); nothing was left behind; "
                                f"choose a writable {self.flag}")


VIRTUAL_FILESYSTEMS = {"proc", "sysfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
                       "configfs", "pstore", "bpf", "mqueue", "efivarfs", "binfmt_misc", "fusectl", "hugetlbfs"}


def _virtual_filesystem(path: Path) -> str | None:
    """The type of the kernel's virtual filesystem that holds path (proc, sysfs, ...), else None (Linux's
    /proc/self/mounts; elsewhere nothing is known and nothing is refused)."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return None
    where, best = str(Path(path).resolve()), ("", None)
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        if (where == point or where.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, kind)
    return best[1] if best[1] in VIRTUAL_FILESYSTEMS else None
