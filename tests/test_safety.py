"""Outputs are never lost or clobbered: targets that appear mid-run, racing processes, --force, signals,
SIGKILL leftovers, fsync, and write failures (a file as parent, a read-only mount, a full disk)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from adapters import make_adapter
from conftest import one_line_error, tree_digest

SLOW_CLI = """
import sys, time
from shadowmerge import writer
real = writer.ShardWriter.write
def slow(self, *a, **k):
    time.sleep(float(__import__("os").environ.get("SLOW", "0.05")))
    return real(self, *a, **k)
writer.ShardWriter.write = slow
from shadowmerge.cli import main
sys.argv = ["shadowmerge"] + sys.argv[1:]
main()
"""


@pytest.fixture
def triple(make_triple):
    return make_triple("llama")


def graft_args(triple, out, *extra):
    i, b, t = triple
    return ["graft", "--instruct", str(i), "--base", str(b), "--tuned", str(t), "--out", str(out), "-q", *extra]


def start(args, slow=0.05):
    env = dict(os.environ, SLOW=str(slow))
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def shadowmerge(*args):
    return subprocess.run([sys.executable, "-m", "shadowmerge", *map(str, args)], capture_output=True, text=True)


def beside(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def wait_for_temp(parent: Path, proc, name="out"):
    deadline = time.time() + 60
    while not any(p.name.startswith(f".{name}.shadowmerge-") for p in parent.iterdir()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)


# --- a target that appears while a run writes ---------------------------------------------------

def _commands(tmp_path, triple):
    """Every command that writes an output folder, as CLI arguments with OUT last-but-one (before -q)."""
    i, b, t = triple
    adapter = make_adapter(b, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "shadow_graft", "base_model": str(b), "dtype": "bfloat16",
                                   "models": [{"model": str(i), "parameters": {"role": "instruct"}},
                                              {"model": str(t), "parameters": {"role": "tuned"}}]}))
    from tinymodels import chat_pair

    chat_inst, chat_base = chat_pair(tmp_path / "pair")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    return {
        "train --emit-only": lambda out: ["train", "--base", chat_base, "--instruct", chat_inst, "--data", data,
                                          "--out", out, "--backend", "llamafactory", "--emit-only",
                                          "--template", "qwen3"],
        "graft": lambda out: graft_args(triple, out),
        "graft --lora": lambda out: ["graft", "--instruct", i, "--lora", adapter, "--out", out, "-q"],
        "similarity": lambda out: ["similarity", "--base", b, "--instruct", i, "--out", out, "-q"],
        "lora retarget": lambda out: ["lora", "retarget", adapter, "--instruct", i, "--out", out],
        "mergekit": lambda out: ["mergekit", cfg, out],
    }


@pytest.mark.parametrize("command", ["graft", "graft --lora", "similarity", "lora retarget", "mergekit",
                                     "train --emit-only"])
def test_a_folder_that_appears_at_the_target_is_never_replaced(cli, tmp_path, triple, monkeypatch, command):
    from shadowmerge import output

    args = _commands(tmp_path, triple)[command]
    out = tmp_path / "out"
    real = output.OutputFolder._put_in_place

    def someone_else_first(self):
        self.target.mkdir()
        (self.target / "theirs.txt").write_text("precious")
        return real(self)
    monkeypatch.setattr(output.OutputFolder, "_put_in_place", someone_else_first)
    before, listing = tree_digest(*triple), beside(tmp_path)
    res = cli(*args(out))
    assert res.exit_code == 1, res.output
    one_line_error(res.stderr, "appeared while this run was writing; it was left as it is")
    assert beside(out) == ["theirs.txt"] and (out / "theirs.txt").read_text() == "precious"
    assert beside(tmp_path) == sorted(set(listing) | {"out"}), "a temporary folder or lock was left behind"
    assert tree_digest(*triple) == before

    # with --force too: --force replaces only an output shadowmerge wrote, and this folder is someone else's
    (out / "theirs.txt").unlink()
    out.rmdir()
    res = cli(*args(out), "--force")
    assert res.exit_code == 1, res.output
    one_line_error(res.stderr, "was not written by shadowmerge (it has no shadowmerge record); --force replaces only")
    assert beside(out) == ["theirs.txt"] and (out / "theirs.txt").read_text() == "precious"
    assert beside(tmp_path) == sorted(set(listing) | {"out"}), "a temporary folder or lock was left behind"


def test_without_renameat2_the_fallback_keeps_the_same_promises(cli, tmp_path, triple, monkeypatch):
    """Not Linux, or a filesystem without renameat2: mkdir claims the target, then a rename over that folder."""
    from shadowmerge import output

    monkeypatch.setattr(output, "_RENAMEAT2", None)
    out = tmp_path / "out"
    res = cli(*graft_args(triple, out))
    assert res.exit_code == 0, res.output
    assert beside(tmp_path) == sorted([triple[0].parent.name, "out"])
    assert cli("verify", out, "-q").exit_code == 0
    real = output.OutputFolder._put_in_place
    listing = beside(tmp_path)

    def appear(self):
        self.target.mkdir(exist_ok=True)
        (self.target / "theirs.txt").write_text("precious")
        return real(self)
    monkeypatch.setattr(output.OutputFolder, "_put_in_place", appear)
    res = cli(*graft_args(triple, tmp_path / "new"))
    assert res.exit_code == 1
    one_line_error(res.stderr, "appeared while this run was writing; it was left as it is")
    assert (tmp_path / "new" / "theirs.txt").read_text() == "precious"
    assert beside(tmp_path) == sorted(listing + ["new"])
    res = cli(*graft_args(triple, out, "--force", "--alpha", "0.5"))      # --force replaces it, the old one is removed
    assert res.exit_code == 0, res.output
    assert json.loads((out / "shadowmerge.json").read_text())["alpha"] == 0.5 and not (out / "theirs.txt").exists()
    assert beside(tmp_path) == sorted(listing + ["new"])


# --- racing processes ---------------------------------------------------------------------------

@pytest.mark.parametrize("force", [False, True])
def test_two_racing_grafts_exactly_one_wins(tmp_path, triple, force):
    out = tmp_path / "out"
    extra = ["--force"] if force else []
    procs = [start(graft_args(triple, out, *extra)), start(graft_args(triple, out, "--alpha", "0.5", *extra))]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    loser = next(r for r in results if r[0] == 1)
    one_line_error(loser[2], "is writing")
    assert beside(tmp_path) == sorted([triple[0].parent.name, "out"])
    assert shadowmerge("verify", out, "--recompute", "-q").returncode == 0


def test_force_never_leaves_the_target_missing(tmp_path, triple):
    out = tmp_path / "out"
    assert shadowmerge(*graft_args(triple, out)).returncode == 0
    old = json.loads((out / "shadowmerge.json").read_text())["alpha"]
    proc = start(graft_args(triple, out, "--force", "--alpha", "0.25"), slow=0.01)
    missing = 0
    while proc.poll() is None:
        missing += not (out / "model.safetensors").is_file() or not (out / "shadowmerge.json").is_file()
    assert proc.wait() == 0, proc.communicate()
    assert missing == 0, "the target was missing or half-written during a --force replace"
    assert old == 1.0 and json.loads((out / "shadowmerge.json").read_text())["alpha"] == 0.25
    assert beside(tmp_path) == sorted([triple[0].parent.name, "out"])


# --- signals and SIGKILL --------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, triple, sig):
    before = tree_digest(*triple)
    proc = start(graft_args(triple, tmp_path / "out"), slow=0.2)
    wait_for_temp(tmp_path, proc)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted ({signal.Signals(sig).name})" in err and "Traceback" not in err
    assert beside(tmp_path) == [triple[0].parent.name]
    assert tree_digest(*triple) == before


def test_sigkill_at_random_points_keeps_the_old_output_and_the_next_run_cleans_up(tmp_path, triple):
    out = tmp_path / "out"
    assert shadowmerge(*graft_args(triple, out)).returncode == 0
    before = tree_digest(*triple)
    rng = random.Random(10)
    for _ in range(4):
        proc = start(graft_args(triple, out, "--force", "--alpha", "0.5"), slow=0.02)
        time.sleep(rng.uniform(0.5, 3.0))
        proc.kill()
        proc.wait()
        # whatever point it died at: the target is a complete output (old or new), the inputs are untouched
        assert shadowmerge("verify", out, "--recompute", "-q").returncode == 0
        assert tree_digest(*triple) == before
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.shadowmerge")]
    res = shadowmerge(*graft_args(triple, out, "--force"))
    assert res.returncode == 0, res.stderr
    temps = [p for p in leftovers if p.is_dir() or not p.name.endswith(".lock")]
    assert res.stderr.count("left behind by an interrupted run") == len(temps), (res.stderr, leftovers)
    assert beside(tmp_path) == sorted([triple[0].parent.name, "out"])


def test_a_live_runs_temporary_folder_is_not_removed(tmp_path, triple):
    """Another live process's folder (another target) stays; so does a folder named by another host."""
    other = tmp_path / f".out.shadowmerge-otherhost-{os.getpid()}-abc"
    other.mkdir()
    res = shadowmerge(*graft_args(triple, tmp_path / "out"))
    assert res.returncode == 0 and other.is_dir() and "interrupted" not in res.stderr


# --- durability -----------------------------------------------------------------------------------

def test_every_file_and_folder_is_fsynced_before_the_rename(tmp_path, triple, monkeypatch):
    import shadowmerge
    from shadowmerge import output

    events = []
    real_fsync, real_rename = os.fsync, output.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, exchange=False):
        events.append(("rename", str(src)))
        return real_rename(src, dst, exchange)
    monkeypatch.setattr(output.os, "fsync", fsync)
    monkeypatch.setattr(output, "rename", rename)
    shadowmerge.graft(*triple, tmp_path / "out", shard_size="60KB", progress=False)
    at = next(k for k, e in enumerate(events) if e[0] == "rename")
    tmp = events[at][1]
    synced = {p for kind, p in events[:at] if kind == "fsync"}
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(names) > 3 and all(f"{tmp}/{n}" in synced for n in names) and tmp in synced
    assert ("fsync", str(tmp_path)) in events[at:], "the parent folder is fsynced after the rename"


# --- write failures ---------------------------------------------------------------------------------

def test_parent_of_out_is_a_file(cli, tmp_path, triple):
    (tmp_path / "afile").write_text("x")
    res = cli(*graft_args(triple, tmp_path / "afile" / "sub" / "out"))
    assert res.exit_code == 1
    one_line_error(res.stderr, "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("where", ["/proc/shadowmerge-out", "/sys/shadowmerge-out", "/proc/self/x/out"])
def test_out_on_a_virtual_filesystem_says_so(cli, tmp_path, triple, where):
    """/proc and /sys hold no files: the error says that, not 'not enough disk space'."""
    res = cli(*graft_args(triple, where))
    assert res.exit_code == 1 and "Traceback" not in res.output
    err = one_line_error(res.stderr, "is on a virtual filesystem (like /proc or /sys) that cannot hold files")
    assert "disk space" not in err and not os.path.lexists(where)


def test_read_only_filesystem(cli, tmp_path, triple, mount):
    ro = mount("ro")
    res = cli(*graft_args(triple, ro / "out"))
    assert res.exit_code == 1
    one_line_error(res.stderr, "read-only or no permission")
    assert beside(ro) == []


def _lie_about_free_space(monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 10**12))


@pytest.mark.parametrize("where", ["shards", "side files", "run record"])
def test_disk_full_on_a_real_small_filesystem(cli, tmp_path, triple, mount, monkeypatch, where):
    """A tmpfs too small for the output; the free-space check is fooled so the writes themselves fail."""
    i, b, t = triple
    shard = (i / "model.safetensors").stat().st_size
    if where == "shards":
        size = shard // 2
    else:
        (i / "tokenizer.json").write_bytes(os.urandom(300_000))       # a big side file
        size = shard + (100_000 if where == "side files" else 400_000)
    fs = mount("tmpfs", size=str((size // 4096 + 1) * 4096))
    _lie_about_free_space(monkeypatch)
    if where == "run record":
        from shadowmerge import record as output     # the record is written by record.py

        real = output.json.dumps

        def fill_then_dump(*a, **k):      # the disk fills up just before the record is written
            if not (a and isinstance(a[0], dict) and a[0].get("tool") == "shadowmerge graft"):
                return real(*a, **k)
            free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
            if free > 0:
                try:
                    (fs / "filler").write_bytes(b"\0" * free)
                except OSError:
                    pass
            return real(*a, **k)
        monkeypatch.setattr(output.json, "dumps", fill_then_dump)
    before = tree_digest(*triple)
    res = cli(*graft_args(triple, fs / "out"))
    assert res.exit_code == 1, res.output
    one_line_error(res.stderr, "disk full while writing")
    assert [n for n in beside(fs) if n != "filler"] == [], res.stderr
    assert tree_digest(*triple) == before


def test_disk_full_during_side_files_is_translated_even_when_shutil_names_the_source(tmp_path, triple, monkeypatch):
    import shutil

    import shadowmerge
    from shadowmerge.errors import ShadowMergeError

    def full(src, dst, *a, **k):
        err = OSError(errno.ENOSPC, "No space left on device")
        err.filename, err.filename2 = str(src), str(dst)       # as shutil's sendfile path reports it
        raise err
    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(ShadowMergeError, match="disk full while writing"):
        shadowmerge.graft(*triple, tmp_path / "out", progress=False)
    assert beside(tmp_path) == [triple[0].parent.name]


def test_lock_is_per_target_and_released(tmp_path, triple):
    from shadowmerge.errors import ShadowMergeError
    from shadowmerge.output import OutputFolder

    a = OutputFolder(tmp_path / "x", force=False, inputs=[], need_bytes=0)
    b = OutputFolder(tmp_path / "x", force=False, inputs=[], need_bytes=0)
    c = OutputFolder(tmp_path / "y", force=False, inputs=[], need_bytes=0)
    with a as tmp_a:
        with pytest.raises(ShadowMergeError, match=r"another shadowmerge run \(pid \d+ on .*\) is writing"):
            b.__enter__()
        with c:
            pass
        (tmp_a / "f").write_text("1")
        a.commit()
    assert beside(tmp_path) == sorted([triple[0].parent.name, "x"])
    done = threading.Event()

    def hold():
        with OutputFolder(tmp_path / "z", force=False, inputs=[], need_bytes=0):
            done.wait(5)
    th = threading.Thread(target=hold)
    th.start()
    time.sleep(0.2)
    with pytest.raises(ShadowMergeError, match="is writing"):
        OutputFolder(tmp_path / "z", force=False, inputs=[], need_bytes=0).__enter__()
    done.set()
    th.join()
