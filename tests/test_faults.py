"""Every command that writes, under every fault, as a real process: a table of commands x faults, so a new command
gets the whole battery by adding a row to COMMANDS.

The faults: SIGKILL mid-run then the same command again (it just runs: the dead run's temporary folder and lock
are cleaned up, and a train that had no checkpoint yet starts over); SIGTERM (exit 143, one line, nothing left);
a disk too small for the output (a real tmpfs, with the free-space check told there is room, so the writes
themselves fail: one line naming the disk, nothing left); two identical runs racing to one output (one wins, the
other says a live run is writing it); a read-only parent (one line at once). After each: the output, where there is
one, passes `shadowmerge verify`, nothing but it is left beside it, and the inputs are unchanged. Cases that mount
a filesystem need root and are skipped, with the reason, without it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from adapters import make_adapter
from conftest import one_line_error, tree_digest

# The CLI, with two test hooks set from the environment: every output's commit waits COMMIT_DELAY seconds first
# (so that a signal sent after the temporary folder appears lands before the rename), and LIE_FREE=1 reports a
# terabyte free (so that a small disk fails in the writes, not in the free-space check).
CLI = """
import os, shutil, sys, time
from collections import namedtuple
from shadowmerge import output
delay = float(os.environ.get("COMMIT_DELAY", "0"))
if delay:
    real_commit = output.OutputFolder.commit
    def commit(self, *a, **k):
        time.sleep(delay)
        return real_commit(self, *a, **k)
    output.OutputFolder.commit = commit
if os.environ.get("LIE_FREE"):
    usage = namedtuple("usage", "total used free")
    shutil.disk_usage = lambda p: usage(10**12, 0, 10**12)
from shadowmerge.cli import main
sys.argv = ["shadowmerge"] + sys.argv[1:]
main()
"""


@dataclass
class Command:
    args: Callable[[dict, Path], list]       # (inputs, out) -> CLI arguments
    inputs: tuple[str, ...]                   # the inputs it reads (checked unchanged)
    extra: tuple[str, ...] = ()               # what else it may leave beside OUT on success (train: nothing)


def _inputs(root: Path) -> dict:
    import tinymodels

    inst, base, tuned = tinymodels.triple(root / "triple", "llama")
    tuned2 = tinymodels.save(tinymodels.perturb(tinymodels.perturb(tinymodels.build("llama", 0), 0.02, 1), 0.01, 9),
                             root / "tuned2", eos=7, template="base")         # another fine-tune of the Base
    chat_inst, chat_base = tinymodels.chat_pair(root / "pair")
    adapter = make_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg = root / "merge.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "shadow_graft", "base_model": str(base), "dtype": "bfloat16",
                                   "models": [{"model": str(inst), "parameters": {"role": "instruct"}},
                                              {"model": str(tuned), "parameters": {"role": "tuned"}}]}))
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is w{100 + k}"},
                                                     {"role": "assistant", "content": f"w{200 + k}"}]}) + "\n"
                            for k in range(8)))
    return {"instruct": inst, "base": base, "tuned": tuned, "tuned2": tuned2, "adapter": adapter, "config": cfg,
            "chat_instruct": chat_inst, "chat_base": chat_base, "rows": rows}


COMMANDS = {
    "graft": Command(lambda i, out: ["graft", "--instruct", i["instruct"], "--base", i["base"], "--tuned",
                                     i["tuned"], "--out", out, "-q"], ("instruct", "base", "tuned")),
    "graft, several updates": Command(lambda i, out: ["graft", "--instruct", i["instruct"], "--base", i["base"],
                                                      "--tuned", i["tuned"], "--tuned", i["tuned2"], "--lora",
                                                      i["adapter"], "--combine", "ties", "--density", "0.5", "--out",
                                                      out, "-q"], ("instruct", "base", "tuned", "tuned2", "adapter")),
    "graft --lora": Command(lambda i, out: ["graft", "--instruct", i["instruct"], "--lora", i["adapter"], "--out",
                                            out, "-q"], ("instruct", "adapter")),
    "lora retarget": Command(lambda i, out: ["lora", "retarget", i["adapter"], "--instruct", i["instruct"], "--out",
                                             out, "-q"], ("instruct", "adapter")),
    "extract": Command(lambda i, out: ["extract", "--base", i["base"], "--tuned", i["tuned"], "--rank", "4", "--out",
                                       out, "-q"], ("base", "tuned")),
    "similarity": Command(lambda i, out: ["similarity", "--base", i["base"], "--instruct", i["instruct"], "--out",
                                          out, "-q"], ("instruct", "base")),
    "mergekit": Command(lambda i, out: ["mergekit", i["config"], out, "-q"], ("instruct", "base", "tuned")),
    "eval": Command(lambda i, out: ["eval", f"instruct={i['chat_instruct']}", f"base={i['chat_base']}", "--heldout",
                                    i["rows"], "--device", "cpu", "--out", out, "-q"],
                    ("chat_instruct", "chat_base", "rows")),
    "train": Command(lambda i, out: ["train", "--base", i["chat_base"], "--instruct", i["chat_instruct"], "--data",
                                     i["rows"], "--method", "lora", "--lora-rank", "4", "--max-steps", "3",
                                     "--batch-size", "2", "--grad-accum", "1", "--out", out, "-q"],
                     ("chat_instruct", "chat_base", "rows")),
}
FAULTS = ["sigkill then rerun", "sigterm", "full disk", "race", "read-only parent"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return _inputs(tmp_path_factory.mktemp("fault-inputs"))


def start(args, **env):
    return subprocess.Popen([sys.executable, "-c", CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", **{k: str(v) for k, v in env.items()}))


def wait_for_temp(parent: Path, proc, name: str = "out") -> None:
    deadline = time.time() + 120
    while not any(p.name.startswith(f".{name}.shadowmerge-") for p in parent.iterdir()):
        if proc.poll() is not None or time.time() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (or hung) before writing: {err[-2000:]}")
        time.sleep(0.02)


def beside(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def verified(out: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "shadowmerge", "verify", str(out), "-q"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_fault_ends_in_one_line_or_success_with_nothing_torn(name, fault, inputs, tmp_path, mount):
    command = COMMANDS[name]
    touched = [inputs[k] for k in command.inputs]
    before = tree_digest(*touched)
    where = tmp_path / "work"
    where.mkdir()
    out = where / "out"
    args = command.args(inputs, out)
    rng = random.Random(f"{name}/{fault}")

    if fault == "sigkill then rerun":
        proc = start(args, COMMIT_DELAY=3)
        wait_for_temp(where, proc)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.communicate()
        assert not out.exists()
        again = start(args)
        _, err = again.communicate(timeout=600)
        assert again.returncode == 0, err
        assert "Traceback" not in err
        assert beside(where) == ["out"], err
        verified(out)
    elif fault == "sigterm":
        proc = start(args, COMMIT_DELAY=3)
        wait_for_temp(where, proc)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert "Traceback" not in err and "interrupted (SIGTERM)" in lines[-1], err
        assert beside(where) == [], err
    elif fault == "full disk":
        small = mount("tmpfs", "8k")
        proc = start(command.args(inputs, small / "out"), LIE_FREE=1)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, err
        line = one_line_error(err, "")
        assert "disk full while writing" in line and str(small) in line, err
        assert beside(small) == [], err
    elif fault == "race":
        procs = [start(args, COMMIT_DELAY=1) for _ in range(2)]
        results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
        won = [err for code, err in results if code == 0]
        lost = [err for code, err in results if code != 0]
        assert len(won) >= 1, results
        for err in lost:
            line = one_line_error(err, "")
            assert "another shadowmerge run" in line or "already exists" in line or "appeared while" in line, err
            assert "interrupted" not in line, err
        assert beside(where) == ["out"], results
        verified(out)
    else:
        ro = mount("ro")
        proc = start(command.args(inputs, ro / "out"))
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, err
        one_line_error(err, "read-only or no permission")
        assert beside(ro) == []
    assert tree_digest(*touched) == before


def test_a_librarys_own_full_disk_error_is_read_as_the_os_error(mount):
    """What the trainers' and mergekit's saves raise on a full disk (safetensors' Rust writer, torch.save) is found
    to be ENOSPC, so the output folder can say so in one line; any other error is left alone."""
    import errno

    from safetensors.torch import save_file

    from shadowmerge.output import os_error_of

    small = mount("tmpfs", "8k")
    caught = []
    for save in (lambda: save_file({"w": torch_zeros()}, small / "a.safetensors"),
                 lambda: __import__("torch").save({"w": torch_zeros()}, small / "b.pt")):
        try:
            save()
        except Exception as exc:       # noqa: BLE001 - whatever the library raises
            caught.append(exc)
    assert len(caught) == 2 and not all(isinstance(e, OSError) for e in caught), caught
    assert [os_error_of(e, small).errno for e in caught] == [errno.ENOSPC, errno.ENOSPC]
    assert os_error_of(caught[0]).errno == errno.ENOSPC             # safetensors names the OS error itself
    assert os_error_of(caught[1], Path("/")) is None                # torch's stream failure where there is room
    assert os_error_of(ValueError("shape mismatch"), small) is None


def torch_zeros():
    import torch

    return torch.zeros(1 << 16)
