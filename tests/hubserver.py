"""A Hub-compatible HTTP server on 127.0.0.1 for tests (huggingface_hub reaches it through HF_ENDPOINT).

It serves what huggingface_hub asks of the real Hub: model info with file sizes
(`/api/models/ORG/NAME/revision/REV?blobs=true`), files with HEAD and GET under
`/ORG/NAME/resolve/REV/FILE` (large files answered, as on the Hub, with a 302 to a CDN URL that
honours Range), branches and commit shas as revisions, gated and private repos (401 with the
Hub's X-Error-Code unless `Authorization: Bearer TOKEN`). Every request is logged with the bytes
of each file it sent, so tests can assert what was downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

TOKEN = "hf_shadowmerge_test_token"
LFS = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class Sent:
    method: str
    path: str
    repo: str | None = None
    file: str | None = None
    start: int = 0
    nbytes: int = 0


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)               # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    gated: bool = False
    private: bool = False


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the HF_ENDPOINT."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[Sent] = []
        self.blobs: dict[str, tuple[str, str, bytes]] = {}             # sha256 -> (a repo, a file, bytes)
        self._lock = threading.Lock()
        self.ignore_range = False          # hostile or broken servers: answer a range request with the whole file
        self.tamper = False                # ... or serve whole files other than the ranges said
        self.no_content_range = False      # ... or answer a range without saying the file's size
        self.unsized = False               # model info without file sizes
        self.encoding: str | None = None   # a Content-Encoding on every range answer (a compressing proxy)
        self.stall: tuple[str, float] | None = None    # (path regex, seconds): wait that long before answering
        self.stall_after: tuple[str, float] | None = None   # ... or send a file's first KiB, then wait that long
        self.info_sha: str | None = None   # model info naming this commit ("" for none) instead of the real one
        self.listed: dict[str, int] = {}   # file name -> the size model info claims for it
        # faults of range reads of weight files (streamed inputs), each for the next N such requests
        self.range_faults: list[str] = []  # "503", "drop" (half the answer, then the connection closed), "stall"
        self.stall_seconds = 5.0
        self.corrupt: dict[str, int] = {}  # file name -> offset of a byte served flipped (every time)
        self.on_range = None               # called with (file name, start) before each range answer is sent

    # --- content ----------------------------------------------------------------------------
    def add(self, repo_id: str, folder: Path | dict[str, bytes], *, branch: str = "main", gated: bool = False,
            private: bool = False, extra: dict[str, bytes] | None = None) -> str:
        """Push the files of a folder (or a dict name -> bytes) as a new commit of branch; return its sha."""
        if isinstance(folder, dict):
            files = dict(folder)
        else:
            files = {p.relative_to(folder).as_posix(): p.read_bytes()
                     for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        files.update(extra or {})
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated, repo.private = gated, private
        digest = hashlib.sha1(repo_id.encode() + str(len(repo.commits)).encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        repo.commits[sha], repo.refs[branch] = files, sha
        for name, data in files.items():
            self.blobs[hashlib.sha256(data).hexdigest()] = (repo_id, name, data)
        return sha

    def sent(self, suffix: str = ".safetensors", repo: str | None = None) -> int:
        """Bytes of files ending in suffix that GET requests returned (headers included)."""
        return sum(s.nbytes for s in self.log if s.method == "GET" and s.file and s.file.endswith(suffix)
                   and (repo is None or s.repo == repo))

    def weight_bytes(self, repo: str | None = None) -> int:
        """Bytes returned from the tensor data of safetensors files (beyond each file's header)."""
        total = 0
        for s in self.log:
            if s.method != "GET" or not s.file or not s.file.endswith(".safetensors") or (repo and s.repo != repo):
                continue
            data = next(files[s.file] for files in self.repos[s.repo].commits.values() if s.file in files)
            header_end = 8 + struct.unpack("<Q", data[:8])[0]
            total += max(0, s.start + s.nbytes - max(s.start, header_end))
        return total

    # --- server -----------------------------------------------------------------------------
    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):       # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        # the Hub, and its CDN on another host (huggingface_hub follows redirects only within the Hub's host)
        self.servers = [ThreadingHTTPServer((host, 0), Handler) for host in ("127.0.0.1", "127.0.0.2")]
        self.url, self.cdn = (f"http://{s.server_address[0]}:{s.server_address[1]}" for s in self.servers)
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        raw = urlsplit(h.path).path
        entry = Sent("HEAD" if head else "GET", raw)
        with self._lock:
            self.log.append(entry)
        if self.stall and re.search(self.stall[0], raw):
            time.sleep(self.stall[1])
        authorized = h.headers.get("Authorization") == f"Bearer {TOKEN}"
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", raw):
            repo_id, rev = unquote(m[1]), unquote(m[2] or "main")
            repo = self.repos.get(repo_id)
            if repo is None or (repo.private and not authorized):
                return self._error(h, 401, "RepoNotFound", "Repository not found")
            sha = self._commit(repo, rev)
            if sha is None:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = repo.commits[sha]
            siblings = [{"rfilename": n, **({} if self.unsized else {"size": self.listed.get(n, len(d))}),
                         "blobId": _git_sha1(d),
                         **({"lfs": {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                            if n.endswith(LFS) and not self.unsized else {})} for n, d in sorted(files.items())]
            shown = self.info_sha if self.info_sha is not None else sha
            body = json.dumps({"_id": sha[:24], "id": repo_id, "modelId": repo_id, "sha": shown,
                               "private": repo.private, "gated": "manual" if repo.gated else False,
                               "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                               "lastModified": "2026-01-01T00:00:00.000Z", "siblings": siblings}).encode()
            return self._send(h, 200, body, {"Content-Type": "application/json"}, head, entry)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", raw):
            repo_id, rev, name = unquote(m[1]), unquote(m[2]), unquote(m[3])
            repo = self.repos.get(repo_id)
            if repo is None or (repo.private and not authorized):
                return self._error(h, 401, "RepoNotFound", "Repository not found")
            if repo.gated and not authorized:
                return self._error(h, 401, "GatedRepo", "Access to model is restricted. You must have access "
                                                        "to it and be authenticated to access it. Please log in.")
            sha = self._commit(repo, rev)
            if sha is None:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            data = repo.commits[sha].get(name)
            if data is None:
                return self._error(h, 404, "EntryNotFound", f"{name} does not exist on \"{rev}\"")
            entry.repo, entry.file = repo_id, name
            if name.endswith(LFS):       # as the Hub: a redirect to the CDN, the file's facts in X-Linked-*
                oid = hashlib.sha256(data).hexdigest()
                where = urlencode({"repo": repo_id, "file": name})     # as a signed URL's query
                return self._send(h, 302, b"", {"Location": f"{self.cdn}/cdn/{oid}?{where}", "X-Repo-Commit": sha,
                                                "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(len(data)),
                                                "ETag": f'"{_git_sha1(data)}"'}, head, entry)
            return self._file(h, data, {"X-Repo-Commit": sha, "ETag": f'"{_git_sha1(data)}"'}, head, entry)
        if m := re.fullmatch(r"/cdn/([0-9a-f]{64})", raw):
            if m[1] not in self.blobs:
                return self._error(h, 404, None, "no such blob")
            data = self.blobs[m[1]][2]
            query = parse_qs(urlsplit(h.path).query)
            entry.repo, entry.file = query["repo"][0], query["file"][0]
            return self._file(h, data, {"ETag": f'"{m[1]}"'}, head, entry)
        return self._error(h, 404, None, "not found")

    def _current(self, entry: Sent, data: bytes) -> bytes:
        """A file's bytes as they are now (on_range may have replaced them, as a re-upload to the CDN would)."""
        for files in self.repos.get(entry.repo, Repo()).commits.values():
            if entry.file in files and hashlib.sha256(files[entry.file]).hexdigest() in self.blobs:
                return self.blobs[hashlib.sha256(files[entry.file]).hexdigest()][2]
        return data

    def replace(self, repo: str, name: str, data: bytes) -> None:
        """Serve other bytes (of the same length) for a file of every commit: its blob on the CDN changed."""
        for files in self.repos[repo].commits.values():
            if name in files:
                oid = hashlib.sha256(files[name]).hexdigest()
                self.blobs[oid] = (repo, name, data)

    @staticmethod
    def _commit(repo: Repo, rev: str) -> str | None:
        if rev in repo.refs:
            return repo.refs[rev]
        return rev if rev in repo.commits else None

    def _file(self, h, data: bytes, headers: dict, head: bool, entry: Sent) -> None:
        rng = None if self.ignore_range else h.headers.get("Range")
        if self.stall_after and not head and re.search(self.stall_after[0], entry.file or "") and \
                (not rng or rng.strip().endswith("-")):        # a download (a fresh one, or a resume), not a header
            return self._stall(h, data, rng, entry)
        if self.tamper and not rng and entry.file.endswith(".safetensors"):
            data = data[:8] + data[8:].replace(b'"F32"', b'"I32"').replace(b'"BF16"', b'"F16" ')
        if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start, end = int(m[1]), min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                return self._send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, head, entry)
            entry.start = start
            name = entry.file or ""
            if not head and name.endswith(".safetensors"):
                if self.on_range is not None:
                    self.on_range(name, start)
                    data = self._current(entry, data)
                if name in self.corrupt:
                    at = self.corrupt[name]
                    data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
                fault = self.range_faults.pop(0) if self.range_faults else None
                if fault == "503":
                    return self._error(h, 503, None, "Service Unavailable")
                if fault == "stall":
                    time.sleep(self.stall_seconds)
                if fault == "drop":
                    body = data[start:end + 1]
                    h.send_response(206)
                    h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                    h.send_header("Content-Length", str(len(body)))
                    h.end_headers()
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        h.wfile.write(body[:len(body) // 2])
                        h.wfile.flush()
                    entry.nbytes += len(body) // 2
                    h.close_connection = True
                    return
            return self._send(h, 206, data[start:end + 1],
                              {**headers, **({} if self.no_content_range else
                                             {"Content-Range": f"bytes {start}-{end}/{len(data)}"}),
                               **({"Content-Encoding": self.encoding} if self.encoding else {})}, head, entry)
        return self._send(h, 200, data, headers, head, entry)

    def _stall(self, h, data: bytes, rng: str | None, entry: Sent) -> None:
        """A fresh download gets the file's first KiB, a resume nothing; then no more data for a while."""
        sent = b"" if rng else data[:1024]
        h.send_response(206 if rng else 200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            h.wfile.write(sent)
            h.wfile.flush()
        entry.nbytes += len(sent)
        time.sleep(self.stall_after[1])
        h.close_connection = True

    @staticmethod
    def _error(h, status: int, code: str | None, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict, head: bool, entry: Sent) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            return
        for at in range(0, len(body), 1 << 20):       # counting what the client takes before it leaves
            try:
                h.wfile.write(body[at:at + (1 << 20)])
            except (BrokenPipeError, ConnectionResetError):
                h.close_connection = True
                return
            entry.nbytes += len(body[at:at + (1 << 20)])


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
