"""ObjectFiles: a model folder in object storage (s3://, gs://, az://), read by range through fsspec's own filesystems.

The URL names the folder (a prefix) a trainer wrote: `s3://bucket/runs/llama-tuned`. fsspec's filesystem for its
scheme (s3fs, gcsfs, adlfs: extras `shadowmerge[s3]`, `[gcs]`, `[azure]`) lists it and reads ranges; credentials
come from each library's usual environment and config files (AWS_* and ~/.aws, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_*; fsspec's FSSPEC_S3_ANON=true and the like), are never printed and never recorded. When the model
is opened, each file's version is pinned (S3 VersionId, GCS generation, else its ETag) with the digests the store
keeps (S3: a full-object CRC32 or SHA-256, or a single-part ETag's MD5; GCS: MD5; Azure: Content-MD5): every range
is read from the pinned version where the store keeps versions, every file the run reads is checked whole against
them as it flows (stream.RangeStream), and a file whose version changed while it was read fails the run. The small
JSON files (config, index, adapter config) and, when a command needs them, the other side files are copied into a
temporary folder of this machine, removed at the end.

Written here: the facts of each store's metadata (which version and digest fields it has) — fsspec passes them
through as each library names them.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from pathlib import Path

from .. import jsonfile
from ..errors import ShadowMergeError
from . import pins_of, register
from .stream import FileFacts, RangeStream, Retry, Settings, b64_hex, stream_timeout

SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
LIBRARY = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}
METADATA = ("config.json", "adapter_config.json", "model.safetensors.index.json")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_HINTS = {"s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials); a public "
                "bucket: FSSPEC_S3_ANON=true",
          "gcs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
          "azure": "set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_CONNECTION_STRING"}


@register
class ObjectFiles:
    """A model under an object-store URL (see the module's docstring)."""

    commit = None
    streams = True
    pickles: list[str] = []

    @classmethod
    def claims(cls, ref: str) -> bool:
        m = _URL.match(ref)
        return m is not None and m[1].lower() not in ("hf", "file")

    @classmethod
    def open(cls, ref: str | Path, allow_pickle: bool = False) -> "ObjectFiles":
        url = str(ref).rstrip("/")
        m = _URL.match(url)
        scheme = m[1].lower()
        store = SCHEMES.get(scheme)
        if store is None:
            raise ShadowMergeError(f"{url[:200]}: {scheme}:// is not a model location shadowmerge reads; pass a local "
                                   f"folder, a Hub id (or hf://org/name), or an s3://, gs:// or az:// URL")
        if not m[2].strip("/"):
            raise ShadowMergeError(f"{url}: the URL names no bucket; write it as {scheme}://BUCKET/FOLDER")
        return cls(url, scheme, store, allow_pickle)

    def __init__(self, url: str, scheme: str, store: str, allow_pickle: bool):
        import fsspec

        self.url, self.name, self.store, self.label = url, url, store, ""
        self.settings = Settings.from_env(stream_timeout(60.0))
        options = {"s3": {"config_kwargs": {"connect_timeout": self.settings.timeout,
                                            "read_timeout": self.settings.timeout}}}.get(store, {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **options)
        except ImportError:
            raise ShadowMergeError(f"{url}: reading {scheme}:// needs {LIBRARY[store]}: pip install "
                                   f"'shadowmerge[{store}]'") from None
        except Exception as exc:
            raise self._explain(exc, url) from None
        self.root = self.root.rstrip("/")
        self._held: set[str] = set()              # files read as the version a record names (verify --recompute)
        self._versioned = None                    # s3: a version-aware twin of fs, for reads of a pinned version
        self.facts: dict[str, FileFacts] = {}
        self.entries = self._list()
        pins = pins_of(url)
        if pins is not None:
            self._pin(pins)
        self.folder = Path(tempfile.mkdtemp(prefix="shadowmerge-stream-"))
        try:
            for name in METADATA:
                if name in self.entries:
                    self._copy_down(name, limit=jsonfile.MAX_BYTES)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.stream = RangeStream(url, self.facts, self._get, self.settings, changed=self._changed)

    # --- listing and pins -----------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShadowMergeError:
            raise
        except Exception as exc:
            raise self._explain(exc, f"{self.url} ({what})") from None

    def _explain(self, exc: BaseException, where: str) -> ShadowMergeError:
        kind = type(exc).__name__
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else kind
        hint = _HINTS.get(getattr(self, "store", ""), "check the URL and your credentials")
        if "NoCredentials" in kind or "credential" in text.lower() and "no " in text.lower():
            return ShadowMergeError(f"{where}: no credentials to read it; {hint}")
        if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "403" in text:
            return ShadowMergeError(f"{where}: access denied ({text}); use credentials that can read it: {hint}")
        if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
            return ShadowMergeError(f"{where}: no such bucket or folder ({text}); check the URL")
        return ShadowMergeError(f"{where}: the store could not be read ({kind}: {text}); check the URL, the "
                                f"endpoint and your connection, then run again")

    def _list(self) -> dict[str, dict]:
        """The folder's top-level files: name -> fsspec's info of it."""
        found = self._call("listing", self.fs.ls, self.root, detail=True, refresh=True)
        entries = {}
        for e in found:
            if e.get("type") != "file":
                continue
            name = e["name"].rstrip("/")[len(self.root) + 1:]
            if name and "/" not in name:
                entries[name] = e
        if not entries:
            raise ShadowMergeError(f"{self.url}: no files there; check the URL (it names the model's folder, e.g. "
                                   f"s3://bucket/run/checkpoint-1000)")
        for name, e in entries.items():
            if name.endswith(".safetensors"):
                self.facts[name] = self._facts(name, e)
        return entries

    def _info(self, name: str) -> dict:
        path = f"{self.root}/{name}"
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)
        return self._call(name, self.fs.info, path)

    def _facts(self, name: str, e: dict) -> FileFacts:
        """Size, version and digests of one file, from its listing entry and (S3) its HEAD with checksums."""
        size = int(e.get("size") or 0)
        version, digests = None, {}
        if self.store == "s3":
            head = self._head(name)
            version = head.get("VersionId") if head.get("VersionId") not in (None, "null") else None
            etag = str(head.get("ETag") or e.get("ETag") or "").strip('"')
            version = version or (f"etag:{etag}" if etag else None)
            if head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
                for key, algorithm in (("ChecksumSHA256", "sha256"), ("ChecksumCRC32", "crc32")):
                    if head.get(key):
                        with contextlib.suppress(ValueError):
                            digests[algorithm] = b64_hex(head[key].split("-")[0])
            if re.fullmatch(r"[0-9a-f]{32}", etag) and head.get("ServerSideEncryption") in (None, "AES256"):
                digests["md5"] = etag            # a single-part upload without KMS: its ETag is the MD5 of its bytes
        elif self.store == "gcs":
            version = str(e.get("generation")) if e.get("generation") else None
            if e.get("md5Hash") and not e.get("componentCount"):
                with contextlib.suppress(ValueError):
                    digests["md5"] = b64_hex(e["md5Hash"])
        else:
            version = e.get("version_id") or (f"etag:{e['etag']}" if e.get("etag") else None)
            md5 = (e.get("content_settings") or {}).get("content_md5") if isinstance(e.get("content_settings"), dict) \
                else None
            if md5:
                digests["md5"] = bytes(md5).hex()
        return FileFacts(name, size, digests, version)

    def _head(self, name: str) -> dict:
        bucket, key, _ = self.fs.split_path(f"{self.root}/{name}")
        return self._call(name, self.fs.call_s3, "head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")

    def _pin(self, pins: dict) -> None:
        """A record's files: each must still be there with its version (read as that version where kept)."""
        for name, want in (pins.get("files") or {}).items():
            have = self.facts.get(name)
            version = want.get("version") if isinstance(want, dict) else None
            if have is None:
                raise ShadowMergeError(f"{self.url}: {name}, read by the run, is not there any more; --recompute "
                                       f"needs the inputs as they were: run verify without --recompute (sha256 and headers)")
            if version and have.version != version:
                if self.store == "s3" and not str(version).startswith("etag:"):
                    self._held.add(name)
                    have.version = version                    # read the recorded version, kept by the bucket
                    have.digests = {k: v for k, v in want.items() if k in ("sha256", "md5", "crc32")}
                    have.size = int(want.get("size", have.size))
                else:
                    raise ShadowMergeError(f"{self.url}: {name} changed since the run (version {have.version}, the "
                                           f"record says {version}); --recompute needs the inputs as they were: run verify "
                                           f"without --recompute (sha256 and headers)")

    # --- the Transport interface ----------------------------------------------------------
    def has(self, name: str) -> bool:
        if name in self.entries:
            return True
        if "/" in name and name.endswith(".safetensors"):        # a shard in a subfolder, named by the index
            with contextlib.suppress(ShadowMergeError):
                e = self._info(name)
                if e.get("type") == "file":
                    self.entries[name] = e
                    self.facts[name] = self._facts(name, e)
                    return True
        return False

    def names(self) -> list[str]:
        return sorted(self.entries)

    def size(self, name: str) -> int:
        return int(self.entries.get(name, {}).get("size") or 0)

    def header(self, path: Path) -> tuple[int, dict]:
        name = path.relative_to(self.folder).as_posix()
        return self.stream.header(name, f"{self.label} {self.url}: {name}")

    def fetch(self, names: list[str], progress: bool = False, desc: str | None = None) -> None:
        """Side files (and pickles, read whole) are copied into the temporary folder; weights are read by range."""
        for name in names:
            if not name.endswith(".safetensors") and not (self.folder / name).is_file() and name in self.entries:
                self._copy_down(name)

    def _copy_down(self, name: str, limit: int | None = None) -> None:
        size = self.size(name)
        if limit is not None and size > limit:
            raise ShadowMergeError(f"{self.url}: {name} is {size} bytes, more than a model's JSON can be ({limit}); "
                                   f"this is not a model folder: check the URL")
        data = self._call(name, self.fs.cat_file, f"{self.root}/{name}")
        (self.folder / name).write_bytes(data)

    def pread(self, path: Path, view: memoryview, pos: int) -> int:
        return self.stream.pread(path.relative_to(self.folder).as_posix(), view, pos)

    def zero_copy_fd(self, path: Path) -> int | None:
        return None

    def evicting_metadata(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def describe(self) -> dict | None:
        return None

    def source(self) -> dict | None:
        return {"url": self.url, "files": {n: c.facts.record() for n, c in sorted(self.stream.cursors.items())
                                           if c.read}}

    def finish(self) -> str | None:
        return self.stream.finish()

    def close(self) -> None:
        self.stream.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- reads ----------------------------------------------------------------------------
    def _get(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file, of its pinned version where the store keeps versions."""
        path, version = f"{self.root}/{name}", self.facts[name].version
        fs, extra = self.fs, {}
        if self.store == "s3" and version and not version.startswith("etag:"):
            if self._versioned is None:
                self._versioned = type(self.fs)(**{**self.fs.storage_options, "version_aware": True})
            fs, extra = self._versioned, {"version_id": version}
        elif self.store == "gcs" and version:
            path = f"{path}#{version}"
        try:
            return fs.cat_file(path, start=start, end=end, **extra)
        except (FileNotFoundError, PermissionError) as exc:
            raise self._explain(exc, f"{self.url}: {name}") from None
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            if "NoCredentials" in text or "AccessDenied" in text or "NoSuchBucket" in text:
                raise self._explain(exc, f"{self.url}: {name}") from None
            raise Retry("timeout" if "imeout" in text else "store error") from None

    def _changed(self, name: str) -> str | None:
        """Why a file read by the run is not the version pinned at the start any more, or None."""
        was = self.facts[name].version
        if was is None or name in self._held:
            return None
        now = self._facts(name, self._info(name)).version
        return None if now == was else f"version {was[:40]} when opened, {str(now)[:40]} now"
