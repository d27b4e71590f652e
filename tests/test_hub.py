"""Hub ids, header first: against a Hub-compatible server on 127.0.0.1 (tests/hubserver.py), never the real Hub.

Each run is the real CLI in a subprocess, pointed at the server by HF_ENDPOINT, with its own HF_HOME.
The server logs every byte it sends, so the tests assert what was downloaded: no weight bytes for a
dry run or a refused input, only the files a run needs, into the standard cache layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shadowmerge
import tinymodels
from conftest import one_line_error
from hubserver import TOKEN, FakeHub

SHARDS = ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors")
WEIGHTS = {"model.safetensors.index.json", *SHARDS}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    i, b, t = tinymodels.triple(root / "triple", "llama", torch.bfloat16, "100KB")
    other = tinymodels.save(tinymodels.build("llama", 0, hidden_size=32, intermediate_size=64), root / "other")
    t2 = tinymodels.save(tinymodels.perturb(tinymodels.build("llama", 0), 0.05, 9), root / "tuned2", shard="100KB")
    from adapters import make_adapter

    adapter = make_adapter(b, root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return {"instruct": i, "base": b, "tuned": t, "other": other, "tuned2": t2, "adapter": adapter}


@pytest.fixture(scope="module")
def hub(models):
    with FakeHub() as server:
        extra = {"pytorch_model.bin": b"never fetched", "original/consolidated.00.pth": b"never fetched"}
        server.shas = {
            "inst": server.add("org/inst", models["instruct"], extra=extra),
            "base": server.add("org/base", models["base"]),
            "tuned": server.add("org/tuned", models["tuned"]),
            "other": server.add("org/other", models["other"]),
            "adapter": server.add("org/adapter", models["adapter"]),
            "gated": server.add("org/gated-inst", models["instruct"], gated=True),
            "private": server.add("org/private-inst", models["instruct"], private=True),
            "v1": server.add("org/tuned-rev", models["tuned"], branch="v1"),
        }
        server.shas["main"] = server.add("org/tuned-rev", models["tuned2"])
        sub = {n: d for n, d in _files(models["tuned"]).items() if not n.endswith(".safetensors")}
        index = json.loads(sub["model.safetensors.index.json"])
        index["weight_map"] = {k: f"weights/{v}" for k, v in index["weight_map"].items()}
        sub["model.safetensors.index.json"] = json.dumps(index).encode()
        sub.update({f"weights/{n}": d for n, d in _files(models["tuned"]).items() if n.endswith(".safetensors")})
        server.shas["sub"] = server.add("org/tuned-sub", sub)
        data = (models["other"] / "model.safetensors").read_bytes()
        server.add("org/truncated", {"config.json": (models["other"] / "config.json").read_bytes(),
                                     "model.safetensors": data[: len(data) // 2]})
        yield server


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def run(hub, home: Path, *args, token: str | None = None, offline: bool = False,
        env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}, **(env or {})}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), NO_PROXY="127.0.0.1,127.0.0.2", no_proxy="127.0.0.1,127.0.0.2")
    if token:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    hub.log.clear()
    return subprocess.run([sys.executable, "-m", "shadowmerge", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=home.parent)


def snapshot(home: Path, repo: str, sha: str) -> Path:
    return home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / sha


def files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


GRAFT = ("graft", "--instruct", "org/inst", "--base", "org/base", "--tuned", "org/tuned")


def test_dry_run_reads_headers_only(hub, tmp_path):
    home = tmp_path / "hf"
    res = run(hub, home, *GRAFT, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "model.layers.1.self_attn.q_proj.weight" in res.stdout
    assert hub.weight_bytes() == 0, "a dry run downloaded tensor data"
    ranges = {(s.repo, s.file, s.start) for s in hub.log if s.method == "GET" and s.file and s.file.endswith(".safetensors")
              and s.nbytes}
    assert {start for *_, start in ranges} == {0, 8} and len(ranges) == 3 * 2 * len(SHARDS)   # length, then header
    for repo in ("inst", "base", "tuned"):
        assert files(snapshot(home, f"org/{repo}", hub.shas[repo])) == {"config.json", "model.safetensors.index.json"}
    assert not any(s.file and s.file.endswith((".bin", ".pth")) for s in hub.log)


def test_graft_from_hub_ids_is_the_local_graft(hub, models, tmp_path):
    home, out = tmp_path / "hf", tmp_path / "out"
    res = run(hub, home, *GRAFT, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "download instruct org/inst" in res.stderr                    # one progress bar per model, in bytes
    shadowmerge.graft(models["instruct"], models["base"], models["tuned"], tmp_path / "local", progress=False)
    got, want = tinymodels.state(out), tinymodels.state(tmp_path / "local")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    record = json.loads((out / "shadowmerge.json").read_text())
    assert record["inputs"]["instruct"] == "org/inst"
    assert record["hub"] == {role: {"repo": f"org/{repo}", "revision": "main", "sha": hub.shas[repo]}
                             for role, repo in (("instruct", "inst"), ("base", "base"), ("tuned", "tuned"))}
    # the standard cache: refs/main -> sha, snapshots/<sha>/<file> -> ../../blobs/<hash>
    repo_dir = home / "hub" / "models--org--base"
    assert (repo_dir / "refs" / "main").read_text() == hub.shas["base"]
    shard = snapshot(home, "org/base", hub.shas["base"]) / SHARDS[0]
    assert shard.is_symlink() and shard.resolve().parent == (repo_dir / "blobs").resolve()
    # only what the graft needs: the Base's and the tuned model's weights and config; the Instruct's side files too
    assert files(snapshot(home, "org/base", hub.shas["base"])) == {"config.json", *WEIGHTS}
    inst_files = files(snapshot(home, "org/inst", hub.shas["inst"]))
    assert {"tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= inst_files
    assert not inst_files & {"pytorch_model.bin", "original/consolidated.00.pth"}
    assert (out / "chat_template.jinja").read_text() == "<instruct>"
    assert not any(s.file and s.file.endswith((".bin", ".pth")) for s in hub.log)
    # verify --recompute re-reads the inputs from the cache
    check = run(hub, home, "verify", out, "--recompute", "-q")
    assert check.returncode == 0, check.stderr
    # quiet: no progress bars, and the weights already cached are not downloaded again
    again = run(hub, home, *GRAFT, "--out", tmp_path / "again", "-q")
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert hub.sent() == 0


def test_revision_pins_a_commit(hub, models, tmp_path):
    home = tmp_path / "hf"
    res = run(hub, home, "graft", "--instruct", "org/inst", "--base", "org/base", "--tuned", "org/tuned-rev@v1",
              "--out", tmp_path / "v1", "-q")
    assert res.returncode == 0, res.stderr
    record = json.loads((tmp_path / "v1" / "shadowmerge.json").read_text())
    assert record["hub"]["tuned"] == {"repo": "org/tuned-rev", "revision": "v1", "sha": hub.shas["v1"]}
    shadowmerge.graft(models["instruct"], models["base"], models["tuned"], tmp_path / "local", progress=False)
    got, want = tinymodels.state(tmp_path / "v1"), tinymodels.state(tmp_path / "local")
    assert all(torch.equal(got[k], want[k]) for k in want)
    # main is another commit (other weights); a commit sha pins it too
    res = run(hub, home, "similarity", "--base", "org/tuned-rev", "--instruct", f"org/tuned-rev@{hub.shas['v1']}",
              "--out", tmp_path / "sim", "-q")
    assert res.returncode == 0, res.stderr
    pair = json.loads((tmp_path / "sim" / "report.json").read_text())["pairs"][0]
    assert pair["hub"]["base"]["sha"] == hub.shas["main"] and pair["hub"]["instruct"]["sha"] == hub.shas["v1"]
    assert pair["weighted_sigma"]["value"] > 0


@pytest.mark.parametrize("args, expect", [
    (("--instruct", "org/gated-inst"), "org/gated-inst is a gated model: accept its terms"),
    (("--instruct", "org/private-inst"), "no such model on the Hugging Face Hub, or it is private"),
    (("--instruct", "org/no-such-model"), "no such model on the Hugging Face Hub"),
    (("--instruct", "org/inst@nope"), "the Hub has no revision 'nope'"),
    (("--instruct", "org/inst@"), "is not a revision"),
    (("--instruct", "org/inst", "--base", "org/other"), "shape"),
    (("--instruct", "org/inst", "--base", "org/truncated"), "org/truncated: model.safetensors"),
], ids=["gated", "private", "unknown", "revision", "empty-revision", "refused-shapes", "truncated"])
def test_errors_before_any_weight_byte(hub, tmp_path, args, expect):
    home = tmp_path / "hf"
    given = dict(zip(args[::2], args[1::2]))
    full = {"--instruct": "org/inst", "--base": "org/base", "--tuned": "org/tuned", **given}
    res = run(hub, home, "graft", *[x for kv in full.items() for x in kv], "--out", tmp_path / "out", "-q")
    assert res.returncode == 1, res.stderr
    line = one_line_error(res.stderr, expect)
    assert "hf auth login" in line or "gated" not in expect
    assert hub.weight_bytes() == 0 and not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_gated_and_private_with_a_token(hub, tmp_path):
    for repo in ("org/gated-inst", "org/private-inst"):
        res = run(hub, tmp_path / "hf", "graft", "--instruct", repo, "--base", "org/base", "--tuned", "org/tuned",
                  "--dry-run", token=TOKEN)
        assert res.returncode == 0, res.stderr
        assert hub.weight_bytes() == 0


def test_offline_uses_the_cache(hub, tmp_path):
    home = tmp_path / "hf"
    assert run(hub, home, *GRAFT, "--dry-run").returncode == 0             # headers only in the cache
    res = run(hub, home, *GRAFT, "--out", tmp_path / "out", offline=True)
    assert res.returncode == 1 and not hub.log
    one_line_error(res.stderr, "org/inst: only its headers are in the Hugging Face cache")
    assert run(hub, home, *GRAFT, "--out", tmp_path / "online", "-q").returncode == 0
    res = run(hub, home, *GRAFT, "--out", tmp_path / "out", "-q", offline=True)
    assert res.returncode == 0 and not hub.log, res.stderr
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    assert record["hub"]["base"] == {"repo": "org/base", "revision": "main", "sha": hub.shas["base"]}
    res = run(hub, home, "graft", "--instruct", "org/not-cached", "--base", "org/base", "--tuned", "org/tuned",
              "--out", tmp_path / "x", offline=True)
    one_line_error(res.stderr, "cannot be reached")


def test_retarget_onto_a_hub_instruct_reads_headers_only(hub, models, tmp_path):
    home = tmp_path / "hf"
    res = run(hub, home, "lora", "retarget", "org/adapter", "--instruct", "org/inst", "--out", tmp_path / "a", "-q")
    assert res.returncode == 0, res.stderr
    assert hub.weight_bytes("org/inst") == 0 and hub.sent(repo="org/adapter") > 0
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/inst" and cfg["revision"] is None
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (models["adapter"] / "adapter_model.safetensors").read_bytes()
    sha = hub.shas["inst"]
    res = run(hub, home, "lora", "retarget", models["adapter"], "--instruct", f"org/inst@{sha}", "--out",
              tmp_path / "b", "-q")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/inst" and cfg["revision"] == sha


def test_graft_a_hub_adapter(hub, models, tmp_path):
    res = run(hub, tmp_path / "hf", "graft", "--instruct", "org/inst", "--lora", "org/adapter", "--out",
              tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    shadowmerge.graft(models["instruct"], out=tmp_path / "local", lora=models["adapter"], progress=False)
    got, want = tinymodels.state(tmp_path / "out"), tinymodels.state(tmp_path / "local")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "out" / "shadowmerge.json").read_text())["hub"]["lora"]["sha"] == hub.shas["adapter"]


@pytest.mark.parametrize("fault, value, expect", [
    ("tamper", True, "differs from the header read before"),
    ("info_sha", "", "the Hub's answer names no commit"),
    ("info_sha", "f" * 40, "the Hub repo changed while it was being opened"),
    ("listed", {SHARDS[0]: 12345}, "bytes, the Hub lists it as 12345; run again"),
    ("listed", {"config.json": 65 << 20}, "config.json is 68157440 bytes on the Hub, more than a model's JSON"),
    ({"no_content_range": True, "unsized": True}, None, "the server's answer for model-0000"),
    ("encoding", "gzip", "with HTTP 206 (gzip); it cannot be read header first"),
], ids=["tampered", "no-sha", "stale-sha", "wrong-size", "huge-config", "no-size-anywhere", "encoded"])
def test_a_server_that_breaks_its_word(hub, tmp_path, fault, value, expect):
    """A server that omits sizes or commits, or contradicts itself, is refused before it sends a weight byte;
    one whose files differ from the headers it served is caught before any byte of them is used."""
    with faults(hub, fault if isinstance(fault, dict) else {fault: value}):
        res = run(hub, tmp_path / "hf", *GRAFT, "--out", tmp_path / "out", "-q")
    assert res.returncode == 1
    one_line_error(res.stderr, expect)
    assert fault == "tamper" or hub.weight_bytes() == 0          # a tampering server sends what it likes
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_a_damaged_download_leaves_the_cache_and_a_rerun_fetches_it_again(hub, models, tmp_path):
    """A weight file whose downloaded header differs from the one read by range requests is removed from the
    huggingface_hub cache (link and blob) before the error; the next run downloads it again and succeeds,
    instead of blaming the user's models forever."""
    home = tmp_path / "hf"
    with faults(hub, {"tamper": True}):
        res = run(hub, home, *GRAFT, "--out", tmp_path / "out", "-q")
    assert res.returncode == 1
    one_line_error(res.stderr, "it was removed from the cache: run again")
    for repo in ("inst", "base", "tuned"):
        assert not files(snapshot(home, f"org/{repo}", hub.shas[repo])) & set(SHARDS), "a damaged file stayed cached"
    blobs = home / "hub" / "models--org--base" / "blobs"
    assert all(p.stat().st_size < 4096 for p in blobs.iterdir()), "a damaged blob stayed cached"
    res = run(hub, home, *GRAFT, "--out", tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    assert hub.weight_bytes() > 0, "the files were not fetched again"
    shadowmerge.graft(models["instruct"], models["base"], models["tuned"], tmp_path / "local", progress=False)
    got, want = tinymodels.state(tmp_path / "out"), tinymodels.state(tmp_path / "local")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_cached_file_of_the_wrong_size_is_fetched_again(hub, models, tmp_path):
    """A cached weight file whose size is not the one the Hub lists (a download cut short and left by another
    tool) is not trusted: it is removed and read from the Hub again."""
    home = tmp_path / "hf"
    assert run(hub, home, *GRAFT, "--out", tmp_path / "first", "-q").returncode == 0
    cached = snapshot(home, "org/tuned", hub.shas["tuned"]) / SHARDS[1]
    blob = cached.resolve()
    blob.write_bytes(blob.read_bytes()[:-100])
    res = run(hub, home, *GRAFT, "--out", tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    got, want = tinymodels.state(tmp_path / "out"), tinymodels.state(tmp_path / "first")
    assert all(torch.equal(got[k], want[k]) for k in want)


@contextlib.contextmanager
def faults(hub, settings: dict):
    before = {k: getattr(hub, k) for k in settings}
    for k, v in settings.items():
        setattr(hub, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(hub, k, v)


@pytest.mark.parametrize("settings", [{"ignore_range": True}, {"no_content_range": True}, {"unsized": True}],
                         ids=["ignores-range", "no-content-range", "no-sizes-listed"])
def test_a_lax_server_still_works(hub, models, tmp_path, settings):
    """A server (or proxy) that drops Range, omits Content-Range, or lists no sizes still gives the exact graft."""
    with faults(hub, settings):
        res = run(hub, tmp_path / "hf", *GRAFT, "--out", tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    shadowmerge.graft(models["instruct"], models["base"], models["tuned"], tmp_path / "local", progress=False)
    got, want = tinymodels.state(tmp_path / "out"), tinymodels.state(tmp_path / "local")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_server_ignoring_range_is_left_after_the_header(hub, tmp_path):
    """Without Range the server sends whole files; a dry run reads each header and hangs up, so it takes a small
    part of a 64 MiB file (what sockets buffer), not the file."""
    import safetensors.torch

    folder = tmp_path / "big"
    tinymodels.save(tinymodels.build("llama", 0), folder)
    safetensors.torch.save_file({"model.embed_tokens.weight": torch.zeros(4096, 4096)}, folder / "model.safetensors")
    hub.add("org/big", folder)
    with faults(hub, {"ignore_range": True}):
        res = run(hub, tmp_path / "hf", "graft", "--instruct", "org/big", "--base", "org/big", "--tuned", "org/big",
                  "--dry-run", "--no-role-check")      # one model in three roles: only its header matters here
    size = (folder / "model.safetensors").stat().st_size
    sent = hub.sent(repo="org/big")
    assert sent < size // 2, f"{sent} of {size} bytes sent for a header"
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("where, expect", [("^/api/models/", "cannot be reached (ReadTimeout: timed out after 1 s"),
                                           (r"\d\.safetensors$", "could not be fetched from the Hugging Face Hub (ReadTimeout: timed out after 1 s")],
                         ids=["model-info", "header"])
def test_a_stalled_server_times_out(hub, tmp_path, where, expect):
    """A server that stops answering fails the run after HF_HUB_ETAG_TIMEOUT seconds, with one line."""
    with faults(hub, {"stall": (where, 4.0)}):
        res = run(hub, tmp_path / "hf", *GRAFT, "--dry-run", env={"HF_HUB_ETAG_TIMEOUT": "1"})
    assert res.returncode == 1
    one_line_error(res.stderr, expect)


def test_a_download_that_stalls_after_its_first_bytes(hub, tmp_path):
    """huggingface_hub's own download waits as long as every other request (HF_HUB_ETAG_TIMEOUT), its retries
    print nothing, and the one error line says what happened: no data for that long, how many tries."""
    import time

    start = time.monotonic()
    with faults(hub, {"stall_after": (r"00002-of-00003\.safetensors$", 3.0)}):
        res = run(hub, tmp_path / "hf", *GRAFT, "--out", tmp_path / "out", env={"HF_HUB_ETAG_TIMEOUT": "1"})
    assert res.returncode == 1, res.stderr
    err = one_line_error(res.stderr, "the download stalled: no data for 1 s, 6 tries")
    assert "HF_HUB_ETAG_TIMEOUT=SECONDS" in err and "hf download org/" in err
    assert "Trying to resume" not in res.stderr and "Error while downloading" not in res.stderr
    assert res.stderr.count("\n") <= 8, res.stderr        # a line per download stage, then the error
    assert time.monotonic() - start < 60, "each try waited longer than HF_HUB_ETAG_TIMEOUT"
    assert not (tmp_path / "out").exists()


def test_a_pickle_only_hub_repo_names_the_id_and_the_flag(hub, models, tmp_path):
    """As for a local folder: the error names the repo (not a cache path) and --allow-pickle."""
    import io

    buffer = io.BytesIO()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, buffer)
    hub.add("org/pickled", {"config.json": (models["base"] / "config.json").read_bytes(),
                            "pytorch_model.bin": buffer.getvalue()})
    res = run(hub, tmp_path / "hf", "graft", "--instruct", "org/inst", "--base", "org/pickled", "--tuned",
              "org/tuned", "--out", tmp_path / "out", "-q")
    assert res.returncode == 1
    err = one_line_error(res.stderr, "base org/pickled: the Hub repo has only pickle weights (pytorch_model.bin); "
                                     "pass --allow-pickle")
    assert "snapshots" not in err and hub.sent(".bin") == 0
    assert not (tmp_path / "out").exists()


def test_a_damaged_cached_config_is_fetched_again(hub, models, tmp_path):
    """A config.json that fails its check after download is removed from the cache, so a re-run fetches it."""
    home = tmp_path / "hf"
    assert run(hub, home, *GRAFT, "--dry-run").returncode == 0
    cached = snapshot(home, "org/base", hub.shas["base"]) / "config.json"
    cached.resolve().write_bytes(b"{not json")
    res = run(hub, home, *GRAFT, "--dry-run")
    assert res.returncode == 1
    one_line_error(res.stderr, "is not valid JSON")
    assert not cached.exists()
    res = run(hub, home, *GRAFT, "--dry-run")
    assert res.returncode == 0, res.stderr


def test_a_repo_without_a_config(hub, tmp_path):
    hub.add("org/readme-only", {"README.md": b"# nothing here"})
    res = run(hub, tmp_path / "hf", "graft", "--instruct", "org/readme-only", "--base", "org/base", "--tuned",
              "org/tuned", "--out", tmp_path / "out", "-q")
    assert res.returncode == 1
    one_line_error(res.stderr, "org/readme-only: the Hub repo has no config.json or adapter_config.json")
    assert not (tmp_path / "out").exists()


def test_extract_for_a_hub_instruct(hub, tmp_path):
    sha = hub.shas["inst"]
    res = run(hub, tmp_path / "hf", "extract", "--base", "org/base", "--tuned", "org/tuned", "--rank", "4",
              "--for-instruct", f"org/inst@{sha}", "--out", tmp_path / "lora", "-q")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/inst" and cfg["revision"] == sha
    record = json.loads((tmp_path / "lora" / "extract.json").read_text())
    assert record["hub"]["instruct"] == {"repo": "org/inst", "revision": sha, "sha": sha}
    assert record["hub"]["tuned"]["sha"] == hub.shas["tuned"]
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "lora" / "README.md")
    assert card.data.base_model == ["org/inst", "org/base", "org/tuned"] and card.data.library_name == "peft"


def test_shards_in_a_subfolder(hub, models, tmp_path):
    """An index may name shards in a subfolder: their headers and files are fetched by their full names."""
    res = run(hub, tmp_path / "hf", "graft", "--instruct", "org/inst", "--base", "org/base", "--tuned",
              "org/tuned-sub", "--out", tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    assert {s.file for s in hub.log if s.repo == "org/tuned-sub" and s.file.endswith(".safetensors")} == \
        {f"weights/{n}" for n in SHARDS}
    shadowmerge.graft(models["instruct"], models["base"], models["tuned"], tmp_path / "local", progress=False)
    got, want = tinymodels.state(tmp_path / "out"), tinymodels.state(tmp_path / "local")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_train_from_hub_ids(hub, tmp_path):
    """train reads Hub ids header first too: a pair that does not belong together fails with no weight byte sent;
    a good pair downloads the Base's weights, config and generation config (not its tokenizer) and the whole
    Instruct, and the LLaMA-Factory configs point into the cache; run.json records both commits."""
    inst, base = tinymodels.chat_pair(tmp_path / "models")
    shas = {"inst": hub.add("org/chat-inst", inst), "base": hub.add("org/chat-base", base)}
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "who is pip"},
                                             {"role": "assistant", "content": "a grey heron"}]}) + "\n")
    common = ("train", "--data", data, "--backend", "llamafactory", "--emit-only", "--template", "llama3")
    home = tmp_path / "hf"
    res = run(hub, home, *common, "--base", "org/chat-base", "--instruct", "org/other", "--out", tmp_path / "bad")
    assert res.returncode == 1 and hub.weight_bytes() == 0 and not (tmp_path / "bad").exists()
    one_line_error(res.stderr, "base and instruct differ in 0 tensor name(s) and 21 shape(s)")
    home = tmp_path / "hf-fresh"
    res = run(hub, home, *common, "--base", "org/chat-base", "--instruct", "org/chat-inst", "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    got = {repo: {s.file for s in hub.log if s.repo == repo and s.method == "GET" and s.nbytes and not s.start}
           for repo in ("org/chat-base", "org/chat-inst")}
    assert got["org/chat-base"] == {"config.json", "generation_config.json", "model.safetensors"}
    assert got["org/chat-inst"] == files(inst)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["inputs"]["base"]["sha"] == shas["base"] and record["inputs"]["instruct"]["sha"] == shas["inst"]
    import yaml

    cfg = yaml.safe_load((tmp_path / "run" / "llamafactory" / "train_base-lora.yaml").read_text())
    view = Path(cfg["model_name_or_path"])        # the Base's weights, linked from the cache
    cached = snapshot(home, "org/chat-base", shas["base"]) / "model.safetensors"
    assert (view / "model.safetensors").resolve() == cached.resolve()
    assert (view / "tokenizer.json").read_bytes() == (inst / "tokenizer.json").read_bytes()
