"""Shared fixtures: tiny model triples on disk and an in-process CLI runner."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import tinymodels  # noqa: E402

# A shell starts background jobs with SIGINT ignored, and children inherit "ignored" (never a handler): the
# tests that interrupt a real process with Ctrl-C would then see it carry on. Handle it here, so children
# start with the default, as under a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# torch's thread count for the exactness tests under other kernels and thread counts (test_kernels.py)
if os.environ.get("SHADOWMERGE_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["SHADOWMERGE_TEST_THREADS"]))


# Where the arithmetic runs: every exactness test takes `device` from here. The cuda cases are skipped on a
# machine without a GPU (CI's); on the lent GPU machine `pytest -m gpu` runs just them.
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run there with: pytest -m gpu)")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.gpu])]


@pytest.fixture
def make_triple(tmp_path):
    def make(family="llama", dtype=None, shard=None, **overrides):
        import torch

        return tinymodels.triple(tmp_path / f"{family}-{len(list(tmp_path.iterdir()))}", family,
                                 dtype or torch.bfloat16, shard, **overrides)
    return make


@pytest.fixture
def cli():
    from shadowmerge.cli import main

    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, [str(a) for a in args])
    return run


def tree_digest(*folders: Path) -> str:
    """A digest of every file (name, mode, bytes) under the folders: inputs must never change."""
    h = hashlib.sha256()
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            h.update(str(p).encode())
            if p.is_file():
                h.update(str(p.stat().st_mode).encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def run_bad(cli, tmp_path, inputs, *args, expect: str, out_name="out", command=("graft",)):
    """Run a command that must fail; check message, exit code, that nothing was left and inputs are intact."""
    before = tree_digest(*inputs)
    listing = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / out_name
    if command == ("mergekit",):      # mergekit CONFIG OUT [options]
        res = cli(*command, args[0], out, *args[1:])
    else:
        res = cli(*command, *args, "--out", out, *(["-q"] if command == ("graft",) else []))
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    err = one_line_error(res.stderr, expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "output or temporary folder left behind"
    assert tree_digest(*inputs) == before, "an input was modified"
    return err


def one_line_error(stderr: str, expect: str) -> str:
    """stderr ends in exactly one `error: ...` line (mergekit's own progress bars may come before it); return it."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr and lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and expect in lines[-1], stderr
    return lines[-1]


@pytest.fixture
def mount(tmp_path):
    """mount(kind, size) -> a fresh mount point: a tmpfs of that size, or a read-only bind mount ("ro"); root only
    (skipped with the reason otherwise); unmounted afterwards."""
    import subprocess

    points = []

    def make(kind, size="1m"):
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a tmpfs or a read-only bind mount")
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        cmds = ([["mount", "--bind", str(point), str(point)], ["mount", "-o", "remount,bind,ro", str(point)]]
                if kind == "ro" else [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)]])
        for cmd in cmds:
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                pytest.skip(f"cannot {' '.join(cmd[:3])} here")
            points.append(point)
        return point
    yield make
    for point in reversed(points):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
