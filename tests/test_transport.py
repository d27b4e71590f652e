"""The transport interface: a transport written outside the package and registered with one line reads models
for graft, graft --lora, similarity and verify --recompute, with no other change (docs/architecture.md's claim).
It serves its bytes through pread only and offers no descriptor for copies in the kernel, as an HTTP-range or
object-store transport would, so the writer's copy of unchanged tensors goes through pread too."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters import make_adapter


@pytest.fixture
def pread_only(monkeypatch):
    from shadowmerge import transports as transport

    transport._load()                    # the built-in ones first: the test's list is restored afterwards
    monkeypatch.setattr(transport, "TRANSPORTS", list(transport.TRANSPORTS))

    @transport.register
    class PreadOnly(transport.LocalFiles):
        prefix = "pread-only://"
        reads = 0

        @classmethod
        def claims(cls, ref):
            return str(ref).startswith(cls.prefix)

        @classmethod
        def open(cls, ref, allow_pickle=False):
            return cls(Path(str(ref)[len(cls.prefix):]))

        def pread(self, path, view, pos):
            type(self).reads += 1
            return super().pread(path, view, pos)

        def zero_copy_fd(self, path):
            return None

    return PreadOnly


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_a_registered_transport_serves_every_reader(pread_only, make_triple, tmp_path, cli):
    from shadowmerge import graft
    from shadowmerge.analyzer import similarity
    from shadowmerge.verify import verify

    inst, base, tuned = make_triple(shard="30KB")
    via = [f"{pread_only.prefix}{p}" for p in (inst, base, tuned)]
    graft(inst, base, tuned, tmp_path / "local", shard_size="30KB", progress=False)
    graft(*via, tmp_path / "via", shard_size="30KB", progress=False)
    assert shards(tmp_path / "via") == shards(tmp_path / "local") and len(shards(tmp_path / "local")) > 1
    assert pread_only.reads > 0
    assert verify(tmp_path / "via", recompute=True, progress=False).recomputed > 0

    adapter = make_adapter(base, tmp_path / "adapter")
    graft(inst, out=tmp_path / "lora-local", lora=adapter, progress=False)
    graft(via[0], out=tmp_path / "lora-via", lora=f"{pread_only.prefix}{adapter}", progress=False)
    assert shards(tmp_path / "lora-via") == shards(tmp_path / "lora-local")

    here = similarity(base, inst, progress=False).pairs[0]
    there = similarity(via[1], via[0], progress=False).pairs[0]
    assert (there.official, there.weighted) == (here.official, here.weighted)


def test_a_reference_no_transport_claims_is_one_line(cli, tmp_path):
    from conftest import one_line_error

    res = cli("graft", "--instruct", "no-such-scheme://x/y", "--base", tmp_path, "--tuned", tmp_path,
              "--out", tmp_path / "o")
    assert res.exit_code != 0
    one_line_error(res.stderr, "no-such-scheme:// is not a model location shadowmerge reads")


def test_a_file_read_by_several_threads_at_once_is_opened_once(tmp_path, monkeypatch):
    """The reader and the compute threads (a LoRA's Wide factors) read the same adapter file at once: its
    descriptor is opened once, none leaks."""
    import threading
    import time

    from shadowmerge import transports as transport

    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(bytes(range(256)) * 16)
    files = transport.LocalFiles(tmp_path)
    from shadowmerge.transports import local

    opened, real_open = [], local.os.open

    def slow_open(*args, **kwargs):
        time.sleep(0.02)                     # wide enough a window for every thread to miss the cached one
        fd = real_open(*args, **kwargs)
        opened.append(fd)
        return fd

    monkeypatch.setattr(local.os, "open", slow_open)
    start, got = threading.Barrier(8), []

    def read():
        start.wait()
        buf = bytearray(4)
        files.pread(path, memoryview(buf), 256)
        got.append(bytes(buf))

    threads = [threading.Thread(target=read) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    files.close()
    assert got == [bytes([0, 1, 2, 3])] * 8
    assert len(opened) == 1, opened
