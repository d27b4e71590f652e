"""The Hub transport (HubFiles): a Hugging Face Hub id (`org/name[@revision]`) read header first.

A Hub id is resolved once, with huggingface_hub, to one commit (model_info: its sha and file list);
its small JSON files (config, index, adapter config) are downloaded, and each safetensors header is
fetched with two HTTP range requests (the 8-byte length, then the header; a server that ignores
Range is read up to the header's end and left). So every check a local
folder gets runs before a single weight byte is downloaded, and `--dry-run` never downloads any.
The files a run needs are downloaded later, pinned to that commit, into the standard
huggingface_hub cache (`hf_hub_download`: its locks, its layout, `HF_HOME`/`HF_HUB_CACHE`,
`HF_TOKEN`, `HF_ENDPOINT`), with one progress bar. Offline (`HF_HUB_OFFLINE=1`, or the Hub out of
reach), a revision already in the cache is used as a local folder.

Written here rather than taken from huggingface_hub: the range reads. Its get_safetensors_metadata
fetches the first 100 kB of each file (the whole of a small shard) and returns parsed tensors
without the header's length, which the byte offsets depend on; here the raw header bytes are kept
and validated by the safetensors library itself (see Remote.header_file).
"""

from __future__ import annotations

import contextlib
import re
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import jsonfile
from ..errors import ShadowMergeError
from ..formats.safetensors import MAX_HEADER, read_header
from . import register
from .local import LocalFiles
from .stream import FileFacts, RangeStream, Retry, Settings, stream_timeout

HF_URL = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REVISION = re.compile(r"^[\w.][\w./-]{0,254}$")
# Weight formats we never read; pickles are fetched only when the user allows them.
_NEVER = ("*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.ot", "*.tflite", "original/*")
# Small JSON files every check needs: fetched when a Hub id is opened.
METADATA = ("config.json", "adapter_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def timeout() -> float:
    """Seconds without an answer before a Hub request fails (never a hang): HF_HUB_ETAG_TIMEOUT when set, else 60."""
    from huggingface_hub import constants

    if constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT:
        return float(constants.HF_HUB_ETAG_TIMEOUT)
    return 60.0


def download_timeout() -> float:
    """Seconds without data before huggingface_hub's own download request gives up: HF_HUB_DOWNLOAD_TIMEOUT when
    the user set it, else the same limit as every other Hub request (timeout())."""
    import os

    try:
        return float(os.environ["HF_HUB_DOWNLOAD_TIMEOUT"])
    except (KeyError, ValueError):
        return timeout()


class _Retries:
    """While installed: huggingface_hub's per-retry warnings ("Error while downloading ... Trying to resume") are
    counted instead of printed (dozens of lines on a stalling link), and its download timeout is ours."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def filter(self, record) -> bool:
        if "Error while downloading" in record.getMessage():
            with self._lock:
                self.count += 1
            return False
        return True

    def __enter__(self):
        import logging

        from huggingface_hub import constants

        self._logger = logging.getLogger("huggingface_hub.file_download")
        self._logger.addFilter(self)
        self._old = constants.HF_HUB_DOWNLOAD_TIMEOUT
        constants.HF_HUB_DOWNLOAD_TIMEOUT = download_timeout()
        return self

    def __exit__(self, *exc):
        from huggingface_hub import constants

        self._logger.removeFilter(self)
        constants.HF_HUB_DOWNLOAD_TIMEOUT = self._old
        return False


def split_ref(text: str) -> tuple[str, str | None]:
    """'org/name@revision' -> ('org/name', 'revision'); no '@' -> (text, None)."""
    repo, at, revision = text.partition("@")
    return repo, (revision if at else None)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    text = text.splitlines()[0][:200] if text else type(exc).__name__
    if "Timeout" in type(exc).__name__:
        text += f" after {timeout():g} s; a slow link may need more: HF_HUB_ETAG_TIMEOUT=SECONDS"
    return text


def explain(exc: BaseException, repo: str, revision: str | None) -> ShadowMergeError:
    """A huggingface_hub or network failure as the one-line error a user can act on."""
    from huggingface_hub import constants, errors

    name = f"{repo}@{revision}" if revision else repo
    login = "log in with `hf auth login` or set HF_TOKEN"
    said = {   # in this order: a gated repo's error is also a RepositoryNotFoundError
        errors.GatedRepoError: f"{name} is a gated model: accept its terms on its Hub page "
                               f"({constants.ENDPOINT}/{repo}) with your account, then {login}",
        errors.RepositoryNotFoundError: f"{name}: no such model on the Hugging Face Hub, or it is private; check the "
                                        f"id, or {login} with an account that can read it",
        errors.RevisionNotFoundError: f"{name}: the Hub has no revision {revision!r} (branch, tag or commit sha) for "
                                      f"{repo}; check it on the model's page, or drop '@{revision}' for main",
        errors.EntryNotFoundError: f"{name}: a file listed by the Hub could not be fetched ({_one_line(exc)}); run "
                                   f"again, or download the model (`hf download {repo}`) and pass its folder",
    }
    for kind, hint in said.items():
        if isinstance(exc, kind):
            return ShadowMergeError(hint)
    return ShadowMergeError(
        f"{name!r} is not a local folder and could not be fetched from the Hugging Face Hub "
        f"({type(exc).__name__}: {_one_line(exc)}); check the id and your connection, or download it first "
        f"(`hf download {repo} --local-dir DIR`) and pass DIR")


def _offline_error(exc: BaseException) -> bool:
    """True when the Hub is out of reach (or the user said so), rather than refusing the request."""
    from huggingface_hub import errors

    return isinstance(exc, errors.OfflineModeIsEnabled) or _transport_error(exc)


def _from_cache(repo: str, revision: str | None, why: BaseException) -> Path:
    """Offline: the cached snapshot of a revision, if its weights are there."""
    from huggingface_hub import snapshot_download

    name = f"{repo}@{revision}" if revision else repo
    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:
        raise ShadowMergeError(
            f"{name!r} is not a local folder, the Hugging Face Hub cannot be reached ({type(why).__name__}: "
            f"{_one_line(why)}) and it is not in the cache; connect and run again, or download it first "
            f"(`hf download {repo} --local-dir DIR`) and pass DIR") from None
    if not _has_weights(folder):
        raise ShadowMergeError(
            f"{name}: only its headers are in the Hugging Face cache (a --dry-run or `lora retarget` fetched no "
            f"weights) and the Hub cannot be reached ({type(why).__name__}); connect and run again")
    return folder


def _has_weights(folder: Path) -> bool:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = jsonfile.load(index, "index").get("weight_map")
        except ShadowMergeError:
            return True            # the checkpoint reader says what is wrong with it
        shards = weight_map.values() if isinstance(weight_map, dict) else ()
        return all((folder / s).is_file() for s in shards if isinstance(s, str))
    return any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir())


class Remote:
    """One revision of a Hub model: its commit, its files and their sizes, its folder in the cache.

    Files appear in `folder` (the cache's snapshots/<sha>/) as they are downloaded.
    """

    def __init__(self, repo: str, revision: str | None, sha: str, files: dict[str, int | None], folder: Path):
        self.repo, self.revision, self.sha, self.files, self.folder = repo, revision, sha, files, folder
        self.downloaded: set[str] = set()
        self.pickles: list[str] = []      # the repo's top-level .bin files, fetched only with --allow-pickle
        self.digests: dict[str, dict[str, str]] = {}   # file -> the Hub's digests of it (LFS sha256, git blob sha1)

    @property
    def name(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo

    def evict(self, names) -> None:
        """Remove files of this commit from the cache (the snapshot's link and the blob it points to): a file
        that failed a check after download must not be taken from the cache again by the next run."""
        for name in names:
            path = self.folder / name
            with contextlib.suppress(OSError):
                blob = path.resolve() if path.is_symlink() else None
                path.unlink()
                if blob is not None:
                    blob.unlink()
            self.downloaded.discard(name)

    @contextlib.contextmanager
    def evicting(self, names):
        """Within: a failed check (ShadowMergeError) removes these cached files before it is raised."""
        try:
            yield
        except ShadowMergeError:
            self.evict(names)
            raise

    def describe(self) -> dict:
        """For run records: the id, the revision asked for, and the commit it resolved to."""
        return _described(self.repo, self.revision, self.sha)

    @classmethod
    def open(cls, repo: str, revision: str | None, allow_pickle: bool = False) -> "Path | Remote":
        """Resolve the revision to a commit and fetch the small JSON files; offline, the cached snapshot."""
        from huggingface_hub import HfApi, hf_hub_download

        try:
            info = HfApi().model_info(repo, revision=revision, files_metadata=True, timeout=timeout())
            sha = info.sha
            if not sha or not re.fullmatch(r"[0-9a-f]{40}", sha):
                raise ShadowMergeError(f"{repo}: the Hub's answer names no commit; run again later")
            files = {s.rfilename: s.size for s in info.siblings or () if _wanted(s.rfilename, allow_pickle)}
            pickles = sorted(s.rfilename for s in info.siblings or () if s.rfilename.endswith(".bin")
                             and "/" not in s.rfilename and s.rfilename != "training_args.bin")
            for name in METADATA:       # read whole by jsonfile, which refuses more than MAX_BYTES: never fetch more
                if (files.get(name) or 0) > jsonfile.MAX_BYTES:
                    raise ShadowMergeError(f"{repo}: {name} is {files[name]} bytes on the Hub, more than a model's "
                                           f"JSON can be ({jsonfile.MAX_BYTES}); this is not a usable model repo: check "
                                           f"the id, or pass a local folder")
            first = next((f for f in METADATA if f in files), None)
            if first is None:
                raise ShadowMergeError(f"{repo}{'@' + revision if revision else ''}: the Hub repo has no config.json "
                                       f"or adapter_config.json; pass a model (or PEFT adapter) repo")
            # the branch or tag asked for, so that the cache maps it to the commit (and works offline later)
            path = Path(hf_hub_download(repo, first, revision=revision or "main", etag_timeout=timeout()))
            if path.parent.name != sha:
                raise ShadowMergeError(f"{repo}: the Hub repo changed while it was being opened ({sha[:12]} → "
                                       f"{path.parent.name[:12]}); run again")
        except ShadowMergeError:
            raise
        except Exception as exc:
            if _offline_error(exc):
                return _from_cache(repo, revision, exc)
            raise explain(exc, repo, revision) from None
        remote = cls(repo, revision, sha, files, path.parent)
        remote.pickles = pickles            # listed even when not wanted: to say why no weights were found
        remote.digests = {s.rfilename: _digests(s) for s in info.siblings or () if s.rfilename in files}
        remote.downloaded.add(first)
        remote.download([f for f in METADATA if f in files], progress=False)
        return remote

    def download(self, names: list[str], progress: bool, desc: str | None = None) -> None:
        """Download files of this commit into the cache (those already there are not fetched again)."""
        from huggingface_hub import hf_hub_download

        todo = [n for n in dict.fromkeys(names) if n not in self.downloaded and not (self.folder / n).is_file()]
        self.downloaded.update(n for n in names if n not in todo)
        if not todo:
            return
        from ..progress import bar

        total = sum(self.files.get(n) or 0 for n in todo)
        with bar(total, progress, desc or f"download {self.repo}") as shown:
            forward = _forwarding(shown)
            lock = threading.Lock()

            def one(name: str) -> None:
                got = hf_hub_download(self.repo, name, revision=self.sha, etag_timeout=timeout(), tqdm_class=forward)
                if Path(got) != self.folder / name:
                    raise ShadowMergeError(f"{self.repo}: {name} was stored at {got}, not in {self.folder}; check "
                                           f"HF_HOME / HF_HUB_CACHE, or download the model with `hf download` and "
                                           f"pass its folder")
                with lock:
                    self.downloaded.add(name)

            retries = _Retries()
            try:
                with retries, ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:
                    for future in [pool.submit(one, n) for n in todo]:
                        future.result()
            except ShadowMergeError:
                raise
            except Exception as exc:
                if "Timeout" in type(exc).__name__ or retries.count:
                    raise ShadowMergeError(
                        f"{self.name}: the download stalled: no data for {download_timeout():g} s, "
                        f"{max(retries.count, 1)} tries (huggingface_hub resumes a stalled download up to 5 times in a "
                        f"row); a slow link may need a longer limit: HF_HUB_ETAG_TIMEOUT=SECONDS, or download the "
                        f"model with `hf download {self.repo}` and pass its folder") from None
                raise explain(exc, self.repo, self.revision) from None

    def header(self, name: str) -> tuple[bytes, int]:
        """The raw header of a safetensors file (its 8-byte length and JSON) and the file's size: 2 range reads."""
        try:
            head, size = self._range(name, 0, 7)
            if len(head) != 8:
                raise ShadowMergeError(f"{self.name}: {name} is not a safetensors file (only {len(head)} bytes); the "
                                       f"repo's file is damaged: check the id and revision, or ask its owner to "
                                       f"re-upload it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ShadowMergeError(f"{self.name}: {name}: corrupt or truncated safetensors header "
                                       f"({n} bytes of {size}); the repo's file is damaged: check the id and "
                                       f"revision, or ask the repo's owner to re-upload it")
            body, _ = self._range(name, 8, 8 + n - 1) if n else (b"", size)
        except ShadowMergeError:
            raise
        except Exception as exc:
            raise explain(exc, self.repo, self.revision) from None
        if len(body) != n:
            raise ShadowMergeError(f"{self.name}: {name}: the Hub sent {len(body)} of its {n} header bytes; run again")
        return head + body, size

    @contextlib.contextmanager
    def header_file(self, name: str):
        """A sparse stand-in for a remote safetensors file: its real header, then a hole as long as its data.

        The safetensors library validates headers of files only (offsets against the file's size); the
        hole costs no disk and is never read.
        """
        raw, size = self.header(name)
        with tempfile.TemporaryDirectory(prefix="shadowmerge-header-") as tmp:
            path = Path(tmp) / Path(name).name
            with open(path, "wb") as f:
                f.write(raw)
                f.truncate(size)
            yield path, size

    def _range(self, name: str, start: int, end: int) -> tuple[bytes, int]:
        """Bytes [start, end] of a file of this commit, and the file's size; never more than asked for.

        A server that ignores Range (HTTP 200, the whole file) is read only up to `end`, then left.
        """
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo, name, revision=self.sha, endpoint=constants.ENDPOINT)
        headers = {**build_hf_headers(), "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
        listed = self.files.get(name)
        with get_session().stream("GET", url, headers=headers, timeout=timeout(), follow_redirects=True) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
            if r.status_code not in (200, 206) or encoding != "identity":
                raise ShadowMergeError(f"{self.name}: the server answered a range request for {name} with HTTP "
                                       f"{r.status_code} ({encoding}); it cannot be read header first: bypass the "
                                       f"proxy that rewrites it (e.g. unset HTTPS_PROXY), or download the model with "
                                       f"`hf download` and pass its folder")
            if r.status_code == 206:
                total, skip = r.headers.get("Content-Range", "").rpartition("/")[2], 0
            else:                                       # the whole file: read up to `end`, then leave
                total, skip = r.headers.get("Content-Length", ""), start
            size = int(total) if total.isdigit() else listed
            if size is None:
                raise ShadowMergeError(f"{self.name}: the server's answer for {name} has no file size; bypass the "
                                       f"proxy in between, or download the model with `hf download` and pass its "
                                       f"folder")
            data = bytearray()
            for chunk in r.iter_raw():
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                data += chunk[:end - start + 1 - len(data)]
                if len(data) > end - start:
                    break
        if listed is not None and listed != size:
            raise ShadowMergeError(f"{self.name}: {name} is {size} bytes, the Hub lists it as {listed}; run again")
        return bytes(data), size


@register
class HubFiles(LocalFiles):
    """A Hub revision as a transport: its file list and headers from the Hub (range reads), its files read from the
    cache once downloaded (all the weights at the first read of data, or by fetch())."""

    def __init__(self, remote: Remote):
        super().__init__(remote.folder)
        self.remote, self.name, self.commit, self.pickles = remote, remote.name, remote.sha, remote.pickles
        self._checked: dict[str, tuple[int, dict]] = {}      # headers read from the Hub, by file name

    streamable = True                   # resolve() passes --stream on

    @classmethod
    def claims(cls, ref: str) -> bool:        # not a folder here: a Hub id (or hf://), or nothing
        return ref.startswith(HF_URL) or ("://" not in ref and not Path(ref).expanduser().exists())

    @classmethod
    def open(cls, ref: str | Path, allow_pickle: bool = False, stream: bool = False) -> LocalFiles:
        """A Hub repo id opened header first; offline, its cached snapshot as a local folder. With stream (or an
        hf:// URL) its weights are read by range, never downloaded (HubStream)."""
        text = str(ref)
        if text.startswith(HF_URL):
            text, stream = text[len(HF_URL):].rstrip("/"), True
        repo, revision = split_ref(text)
        if not _REPO_ID.match(repo) or ".." in repo:
            raise ShadowMergeError(f"model folder not found: {ref}; check the path, or pass a Hub id like "
                                   f"org/name")
        if revision is not None and (not _REVISION.match(revision) or ".." in revision):
            raise ShadowMergeError(f"{text[:200]!r}: {revision[:80]!r} is not a revision (a branch, tag or commit "
                                   f"sha after '@'); write it as e.g. {repo}@main")
        found = Remote.open(repo, revision, allow_pickle)
        if isinstance(found, Path):
            return LocalFiles(found)
        return HubStream(found) if stream else cls(found)

    def has(self, name: str) -> bool:
        return name in self.remote.files

    def names(self) -> list[str]:
        return sorted(n for n in self.remote.files if "/" not in n)

    def size(self, name: str) -> int:
        return self.remote.files.get(name) or 0

    def header(self, path: Path) -> tuple[int, dict]:
        name = path.relative_to(self.folder).as_posix()      # an index may name shards in a subfolder
        if path.is_file() and self.remote.files.get(name) not in (None, path.stat().st_size):
            self.remote.evict([name])       # a damaged download left in the cache: read it from the Hub again
        if path.is_file():
            return super().header(path)
        with self.remote.header_file(name) as (stand_in, size):
            start, header, _ = read_header(stand_in, size, label=f"{self.label} {self.remote.name}: {name}")
        self._checked[name] = (start, header)
        return start, header

    def fetch(self, names: list[str], progress: bool = False, desc: str | None = None) -> None:
        """Download these files; the weights must have the headers read from the Hub before (else they are
        evicted from the cache and the run stops)."""
        self.remote.download(names, progress, desc)
        bad = []
        for name in names:
            checked = self._checked.pop(name, None)
            try:
                if checked is not None and self.header(self.folder / name) != checked:
                    bad.append(name)
            except ShadowMergeError:
                bad.append(name)
        if bad:                      # out of the cache, every one, so that the next run fetches them again
            self.remote.evict(bad)
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ShadowMergeError(f"{self.label} {self.remote.name}: the downloaded {bad[0]}{more} differs from the "
                                   f"header read before, so the repo changed or the download is damaged; it was "
                                   f"removed from the cache: run again")

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            with self._opening:
                if path not in self._fds and not path.is_file():     # the first read of data: every weight file
                    self.fetch(sorted(self._checked))
        return super()._fd(path)

    def evicting_metadata(self) -> contextlib.AbstractContextManager:
        return self.remote.evicting([n for n in METADATA if n in self.remote.downloaded])

    def describe(self) -> dict | None:
        return self.remote.describe()


def _digests(sibling) -> dict[str, str]:
    """What the Hub says a file's bytes hash to: its LFS sha256, else its git blob sha1."""
    lfs = getattr(sibling, "lfs", None)
    sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
    if isinstance(lfs, dict):
        sha256 = lfs.get("sha256")
    if isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        return {"sha256": sha256.lower()}
    blob = getattr(sibling, "blob_id", None)
    if isinstance(blob, str) and re.fullmatch(r"[0-9a-fA-F]{40}", blob):
        return {"git-sha1": blob.lower()}
    return {}


def _wanted(name: str, allow_pickle: bool) -> bool:
    from fnmatch import fnmatch

    return not any(fnmatch(name, p) for p in _NEVER) and (allow_pickle or not name.endswith(".bin"))


def _forwarding(shown):
    """A tqdm class for hf_hub_download that shows nothing itself and adds its bytes to our one bar."""
    from tqdm import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            shown.update(n or 0)
            return super().update(n)

    return Forward


def _hub_id_in_cache(store) -> str | None:
    """The commit of an input given as a Hub id and found in the cache offline (a local folder then), else None."""
    sha = cache_revision(store.folder)
    repo = split_ref(store.ref)[0]
    return sha if sha and _REPO_ID.match(repo) and not Path(store.ref).expanduser().exists() else None


def reference(store) -> tuple[str, str | None]:
    """How an adapter config names an input (base_model_name_or_path, revision): its Hub id, with the commit
    sha when a revision was asked for; or, for a local folder, its absolute path."""
    if store.transport.streams and store.transport.commit is None:      # an object-store URL: itself
        return store.ref, None
    repo, revision = split_ref(store.ref.removeprefix(HF_URL))
    sha = store.transport.commit or _hub_id_in_cache(store)
    if sha is None:
        return str(Path(store.folder).absolute()), None
    return repo, (sha if revision else None)


def provenance(stores) -> dict:
    """For run records: each Hub input's id, revision asked for and commit sha, by role (adapter: lora)."""
    out = {}
    for store in stores:
        role = "lora" if store.label == "adapter" else store.label
        if store.transport.describe() is not None:
            out[role] = store.transport.describe()
        elif (sha := _hub_id_in_cache(store)) is not None:
            out[role] = _described(*split_ref(store.ref), sha)
    return out


def _described(repo: str, revision: str | None, sha: str) -> dict:
    return {"repo": repo, "revision": revision or "main", "sha": sha}


def cache_revision(folder: Path) -> str | None:
    """The commit sha of a folder in the huggingface_hub cache (…/snapshots/<sha>), else None."""
    folder = Path(folder).absolute()
    return folder.name if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name) else None



class HubStream(HubFiles):
    """A Hub revision read by HTTP range (`--stream`, `hf://`): headers as HubFiles, then every weight byte by range
    from the commit's URL (the CDN's, once redirected there), each file checked against the Hub's sha256 of it as it
    flows (stream.RangeStream). Nothing is written to the cache but the JSON files read when it is opened and the
    side files a command fetches (tokenizer, chat template)."""

    streams = True

    def __init__(self, remote: Remote):
        super().__init__(remote)
        facts = {n: FileFacts(n, size or 0, remote.digests.get(n, {}), remote.sha)
                 for n, size in remote.files.items() if n.endswith(".safetensors")}
        self.settings = Settings.from_env(stream_timeout(timeout()))
        self.stream = RangeStream(f"{remote.name}", facts, self._get, self.settings)
        self._cdn: dict[str, str] = {}            # file -> the URL its range requests were redirected to

    def header(self, path: Path) -> tuple[int, dict]:
        name = path.relative_to(self.folder).as_posix()
        return self.stream.header(name, f"{self.label} {self.remote.name}: {name}")

    def fetch(self, names: list[str], progress: bool = False, desc: str | None = None) -> None:
        """Side files (and pickles, read whole) are downloaded; safetensors weights are read by range."""
        self.remote.download([n for n in names if not n.endswith(".safetensors")], progress, desc)

    def pread(self, path: Path, view: memoryview, pos: int) -> int:
        return self.stream.pread(path.relative_to(self.folder).as_posix(), view, pos)

    def zero_copy_fd(self, path: Path) -> int | None:
        return None

    def source(self) -> dict | None:
        return {"url": f"{HF_URL}{self.remote.repo}@{self.remote.sha}",
                "files": {n: c.facts.record() for n, c in sorted(self.stream.cursors.items()) if c.read}}

    def finish(self) -> str | None:
        return self.stream.finish()

    def close(self) -> None:
        self.stream.close()
        super().close()

    def _get(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file of this commit: one range request (Retry on a passing failure)."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        cdn = self._cdn.get(name)
        url = cdn or hf_hub_url(self.remote.repo, name, revision=self.remote.sha, endpoint=constants.ENDPOINT)
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity",
                   **({} if cdn else build_hf_headers())}          # the token goes to the Hub, never to its CDN
        size = self.stream.facts[name].size
        try:
            with get_session().stream("GET", url, headers=headers, timeout=self.settings.timeout,
                                      follow_redirects=True) as r:
                if r.status_code == 429 or r.status_code >= 500:
                    raise Retry(f"HTTP {r.status_code}")
                if cdn and r.status_code in (401, 403, 404, 410):       # a signed CDN link that expired
                    self._cdn.pop(name, None)
                    raise Retry("expired link")
                if r.status_code >= 400:
                    r.read()
                    hf_raise_for_status(r)
                if r.status_code != 206:
                    raise ShadowMergeError(
                        f"{self.label} {self.remote.name}: the server answered a range request for {name} with HTTP "
                        f"{r.status_code}; it cannot be streamed: bypass the proxy in between (e.g. unset "
                        f"HTTPS_PROXY), or leave out --stream to download it")
                got = r.headers.get("Content-Range", "")
                first, _, total = got.removeprefix("bytes ").partition("/")
                if not first.startswith(f"{start}-") or total != str(size):
                    raise ShadowMergeError(f"{self.label} {self.remote.name}: {name} changed during the run (the Hub "
                                           f"answered {got[:60]!r} for bytes {start}-{end - 1} of {size}); nothing was "
                                           f"written: run again")
                data = bytearray()
                for chunk in r.iter_raw():
                    data += chunk
                    if len(data) >= end - start:
                        break
                if not cdn and r.url.host != httpx_url_host(url):
                    self._cdn[name] = str(r.url)
                return bytes(data[:end - start])
        except (ShadowMergeError, Retry):
            raise
        except Exception as exc:
            if _transport_error(exc):
                raise Retry("timeout" if "Timeout" in type(exc).__name__ else "dropped connection") from None
            raise explain(exc, self.remote.repo, self.remote.revision) from None


def httpx_url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def _transport_error(exc: BaseException) -> bool:
    """A dropped connection or a timeout (httpx's TransportError, whichever httpx huggingface_hub uses: httpx2 in
    huggingface_hub 2.x, httpx in 1.x)."""
    import importlib

    kinds: list[type] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            kinds.append(importlib.import_module(module).TransportError)
    return isinstance(exc, tuple(kinds))
