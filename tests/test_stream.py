"""Streamed inputs: Hub ids with --stream (and hf://) against the tests' Hub server, s3:// against a real S3-protocol
server (moto) behind a proxy that counts and breaks. Each run is the real CLI in a subprocess.

What is asserted: a streamed graft is byte-identical to the graft of the same models from local folders, each input
byte crosses the wire once (counted at the server), no weight byte lands in HF_HOME; a damaged byte, a file replaced
mid-run, a burst of 503s, a dropped connection and a stall end as docs/graft.md says (a one-line error naming the
file and nothing written, or the right output with one line on the retries); `verify --recompute` re-reads the inputs
by URL; missing credentials and a missing bucket are one line each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinymodels
from conftest import one_line_error as _one_line
from hubserver import FakeHub

pytest.importorskip("s3fs", reason="s3fs (the test extra) reads s3:// inputs")
pytest.importorskip("moto", reason="moto[server] (the test extra) is the tests' S3 server")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    i, b, t = tinymodels.triple(root / "triple", "llama", torch.bfloat16, "100KB")
    local = root / "local"
    res = _cli({}, "graft", "--instruct", i, "--base", b, "--tuned", t, "--out", local, "-q")
    assert res.returncode == 0, res.stderr
    return {"instruct": i, "base": b, "tuned": t, "local": local}


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    return _one_line(res.stderr, "")


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _input_bytes(models) -> int:
    return sum(len(d) for role in ("instruct", "base", "tuned") for d in _weights(models[role]).values())


def _cli(env: dict, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_", "SHADOWMERGE_STREAM"))
            and "proxy" not in k.lower()}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "shadowmerge", *map(str, args)], env=full, capture_output=True,
                          text=True, timeout=300, cwd=cwd)


# --- the Hub ---------------------------------------------------------------------------------------------------
@pytest.fixture
def hub(models, tmp_path):
    with FakeHub() as server:
        for role in ("instruct", "base", "tuned"):
            server.add(f"org/{role}", models[role])
        server.env = {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"),
                      "NO_PROXY": "127.0.0.1,127.0.0.2", "no_proxy": "127.0.0.1,127.0.0.2"}
        yield server


def _hub_graft(hub, out: Path, *extra, env: dict | None = None, refs=("org/instruct", "org/base", "org/tuned")):
    hub.log.clear()
    return _cli({**hub.env, **(env or {})}, "graft", "--instruct", refs[0], "--base", refs[1], "--tuned", refs[2],
                "--out", out, "-q", *extra)


def test_hub_stream_is_the_local_graft_read_once(hub, models, tmp_path):
    res = _hub_graft(hub, tmp_path / "out", "--stream")
    assert res.returncode == 0, res.stderr
    assert _weights(tmp_path / "out") == _weights(models["local"])
    assert hub.sent() == _input_bytes(models), "each input byte once"
    assert not list((tmp_path / "hf").rglob("*.safetensors")), "a weight file was written into HF_HOME"
    assert "warning" not in res.stdout
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    urls = record["input_urls"]
    assert set(urls) == {"instruct", "base", "tuned"}
    sha = hub.repos["org/base"].refs["main"]
    assert urls["base"]["url"] == f"hf://org/base@{sha}"
    assert set(urls["base"]["files"]) == set(_weights(models["base"]))
    import hashlib

    for name, data in _weights(models["base"]).items():
        assert urls["base"]["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
    # verify --recompute reads them the same way: by range from the Hub, checked again
    hub.log.clear()
    res = _cli(hub.env, "verify", tmp_path / "out", "--recompute", "-q")
    assert res.returncode == 0 and "bit-identical" in res.stdout, res.stderr
    assert hub.sent() == _input_bytes(models)
    hub.corrupt["model-00002-of-00003.safetensors"] = 5000
    res = _cli(hub.env, "verify", tmp_path / "out", "--recompute", "-q")
    assert res.returncode != 0 and "model-00002-of-00003.safetensors" in one_line_error(res)


def test_hf_url_streams_without_the_flag(hub, models, tmp_path):
    res = _hub_graft(hub, tmp_path / "out", refs=("hf://org/instruct", "org/base", "hf://org/tuned@main"))
    assert res.returncode == 0, res.stderr
    assert _weights(tmp_path / "out") == _weights(models["local"])
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    assert set(record["input_urls"]) == {"instruct", "tuned"}          # --base was downloaded, as without --stream
    assert {p.name for p in (tmp_path / "hf").rglob("*.safetensors")} == set(_weights(models["base"]))


def _damage(hub):
    hub.corrupt["model-00002-of-00003.safetensors"] = 70000          # a byte of tensor data, of every model's shard 2


def _replace_mid_run(hub):
    data = (hub.models_base / "model-00003-of-00003.safetensors").read_bytes()
    changed = data[:-1] + bytes([data[-1] ^ 0x80])
    seen = []

    def on_range(name, start):
        seen.append(name)
        if len(seen) == 2:
            hub.replace("org/base", "model-00003-of-00003.safetensors", changed)
    hub.on_range = on_range


@pytest.mark.parametrize("fault, outcome", [
    ("damaged", "fails"), ("replaced", "fails"), ("503", "retried"), ("drop", "retried"), ("stall", "retried"),
    ("stall-forever", "fails")])
def test_hub_stream_faults(hub, models, tmp_path, fault, outcome):
    hub.models_base = models["base"]
    env = {"SHADOWMERGE_STREAM_TIMEOUT": "1", "SHADOWMERGE_STREAM_TRIES": "3"}
    if fault == "damaged":
        _damage(hub)
    elif fault == "replaced":
        _replace_mid_run(hub)
    elif fault == "503":
        hub.range_faults = ["503"] * 2
    elif fault == "drop":
        hub.range_faults = ["drop"]
    elif fault.startswith("stall"):
        hub.stall_seconds = 2.5
        hub.range_faults = ["stall"] * (1 if fault == "stall" else 3)
    out = tmp_path / "out"
    res = _hub_graft(hub, out, "--stream", env=env)
    if outcome == "fails":
        line = one_line_error(res)
        assert not out.exists() and not list(tmp_path.glob("out*")), "partial output"
        if fault == "stall-forever":
            assert "3 tries" in line and "timeout" in line and "SHADOWMERGE_STREAM_TIMEOUT" in line
        else:
            assert ".safetensors" in line and ("sha256" in line or "changed" in line), line
            assert "nothing was written" in line
    else:
        assert res.returncode == 0, res.stderr
        assert _weights(out) == _weights(models["local"])
        notes = [line for line in res.stdout.splitlines() if "tried again" in line]
        assert len(notes) == 1 and len(res.stderr.strip().splitlines()) == 0, res.stdout + res.stderr
        assert {"503": "HTTP 503 ×2", "drop": "dropped connection ×1", "stall": "timeout ×1"}[fault] in notes[0]


# --- S3 ------------------------------------------------------------------------------------------------------
@pytest.fixture
def s3(models):
    from s3server import S3Server

    with S3Server() as server:
        for role in ("instruct", "base", "tuned"):
            server.upload("models", role, models[role])
        yield server


S3 = ("s3://models/instruct", "s3://models/base", "s3://models/tuned")


def _s3_graft(s3, out: Path, *extra, env=None, refs=S3):
    s3.log.clear()
    return _cli({**s3.env, **(env or {})}, "graft", "--instruct", refs[0], "--base", refs[1], "--tuned", refs[2],
                "--out", out, "-q", *extra)


def test_s3_graft_is_the_local_graft_read_once(s3, models, tmp_path):
    res = _s3_graft(s3, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert _weights(tmp_path / "out") == _weights(models["local"])
    assert s3.sent() == _input_bytes(models)
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    base = record["input_urls"]["base"]
    assert base["url"] == "s3://models/base" and all(f["version"] for f in base["files"].values())
    assert all("md5" in f or "crc32" in f for f in base["files"].values())
    assert "AWS_SECRET" not in json.dumps(record) and "testing" not in json.dumps(record)
    res = _cli(s3.env, "verify", tmp_path / "out", "--recompute", "-q")
    assert res.returncode == 0 and "bit-identical" in res.stdout, res.stderr
    # the input changed since: --recompute says so (an unversioned bucket cannot give the old bytes back)
    c = s3.client()
    data = (models["tuned"] / "model-00001-of-00003.safetensors").read_bytes()
    c.put_object(Bucket="models", Key="tuned/model-00001-of-00003.safetensors", Body=data[:-1] + b"\x01")
    res = _cli(s3.env, "verify", tmp_path / "out", "--recompute", "-q")
    line = one_line_error(res)
    assert "model-00001-of-00003.safetensors" in line and "changed" in line


def test_s3_versioned_input_is_read_as_recorded(models, tmp_path):
    from s3server import S3Server

    with S3Server() as s3:
        for role in ("instruct", "base", "tuned"):
            s3.upload("vers", role, models[role], versioned=True)
        refs = tuple(r.replace("models", "vers") for r in S3)
        res = _s3_graft(s3, tmp_path / "out", refs=refs)
        assert res.returncode == 0, res.stderr
        record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
        assert not any(f["version"].startswith("etag:") for f in record["input_urls"]["tuned"]["files"].values())
        data = (models["tuned"] / "model-00001-of-00003.safetensors").read_bytes()
        s3.client().put_object(Bucket="vers", Key="tuned/model-00001-of-00003.safetensors", Body=data[:-1] + b"\x01")
        res = _cli(s3.env, "verify", tmp_path / "out", "--recompute", "-q")   # the recorded version, kept by S3
        assert res.returncode == 0 and "bit-identical" in res.stdout, res.stderr


@pytest.mark.parametrize("fault", ["damaged", "replaced", "503", "drop", "stall"])
def test_s3_faults(s3, models, tmp_path, fault):
    env = {"SHADOWMERGE_STREAM_TIMEOUT": "1", "SHADOWMERGE_STREAM_TRIES": "3"}
    if fault == "damaged":
        s3.corrupt["base/model-00002-of-00003.safetensors"] = 70000
    elif fault == "replaced":
        data = (models["base"] / "model-00003-of-00003.safetensors").read_bytes()
        seen = []

        def on_range(key, start):              # its third range: the first of its data (after its length, its header)
            seen.append(key)
            if seen.count("/models/base/model-00003-of-00003.safetensors") == 3 and key == seen[-1] == \
                    "/models/base/model-00003-of-00003.safetensors":
                s3.client().put_object(Bucket="models", Key="base/model-00003-of-00003.safetensors",
                                       Body=data[:-1] + bytes([data[-1] ^ 0x80]))
        s3.on_range = on_range
    elif fault == "stall":
        s3.stall = 2.5
        s3.faults = ["stall"]
    else:
        s3.faults = [fault] * 2
    out = tmp_path / "out"
    res = _s3_graft(s3, out, env=env)
    if fault in ("damaged", "replaced"):
        line = one_line_error(res)
        assert not list(tmp_path.glob("out*")), "partial output"
        assert "model-0000" in line and "nothing was written" in line, line
    else:
        assert res.returncode == 0, res.stderr
        assert _weights(out) == _weights(models["local"])
        assert len(res.stderr.strip().splitlines()) == 0 and len(res.stdout.strip().splitlines()) <= 2, res.stdout


def test_s3_missing_credentials_and_bucket(s3, tmp_path):
    env = {k: v for k, v in s3.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_"))}
    res = subprocess.run([sys.executable, "-m", "shadowmerge", "graft", "--instruct", S3[0], "--base", S3[1],
                          "--tuned", S3[2], "--out", tmp_path / "out", "-q"], env={**full, **env},
                         capture_output=True, text=True, timeout=120)
    line = one_line_error(res)
    assert "no credentials" in line and "AWS_ACCESS_KEY_ID" in line and not (tmp_path / "out").exists()
    res = _s3_graft(s3, tmp_path / "out", refs=("s3://no-such-bucket/instruct", S3[1], S3[2]))
    line = one_line_error(res)
    assert "no such bucket" in line and "s3://no-such-bucket/instruct" in line and not (tmp_path / "out").exists()
    res = _s3_graft(s3, tmp_path / "out", refs=("s3://models/nothing-here", S3[1], S3[2]))
    assert "no such bucket or folder" in one_line_error(res)
    res = _s3_graft(s3, tmp_path / "out", refs=("ftp://models/instruct", S3[1], S3[2]))
    assert "ftp://" in one_line_error(res)


def test_a_server_that_ignores_range_cannot_be_streamed_but_downloaded(hub, models, tmp_path):
    hub.ignore_range = True
    res = _hub_graft(hub, tmp_path / "out", "--stream")
    line = one_line_error(res)
    assert "cannot be streamed" in line and "leave out --stream" in line and not (tmp_path / "out").exists()
    res = _hub_graft(hub, tmp_path / "out")                      # the advice: without --stream, downloaded
    assert res.returncode == 0, res.stderr
    assert _weights(tmp_path / "out") == _weights(models["local"])


@pytest.mark.parametrize("command", ["eval", "lora retarget"])
def test_commands_that_load_whole_folders_refuse_a_streamed_input(hub, models, tmp_path, command):
    if command == "eval":
        args = ["eval", "a=hf://org/instruct", "b=hf://org/base", "--heldout", tmp_path / "h.jsonl", "--out", tmp_path / "e", "-q"]
        (tmp_path / "h.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "hello"}]}) + "\n")
    else:
        from adapters import make_adapter

        adapter = make_adapter(models["base"], tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
        hub.add("org/adapter", adapter)
        args = ["lora", "retarget", "hf://org/adapter", "--instruct", "org/instruct", "--out", tmp_path / "e", "-q"]
    res = _cli(hub.env, *args)
    line = one_line_error(res)
    assert "loads whole model folders, and this one is read by range" in line and "copy it down first" in line
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("how", ["sigterm", "sigkill then rerun"])
def test_a_streamed_graft_stopped_mid_run_leaves_nothing_and_runs_again(hub, models, tmp_path, how):
    """A streamed graft stopped by a signal: SIGTERM is one line and exit 143, SIGKILL leaves a temporary folder the
    next run clears; nothing but HF_HOME's side files is left, and the rerun equals the local graft."""
    import signal

    from test_faults import CLI, wait_for_temp

    where = tmp_path / "work"
    where.mkdir()
    out = where / "out"
    args = ["graft", "--instruct", "org/instruct", "--base", "org/base", "--tuned", "org/tuned", "--stream", "--out",
            out, "-q"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SHADOWMERGE_STREAM"))}
    proc = subprocess.Popen([sys.executable, "-c", CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**env, **hub.env, "COMMIT_DELAY": "3"})
    wait_for_temp(where, proc)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err and "interrupted (SIGTERM)" in err.strip().splitlines()[-1], err
        assert list(where.iterdir()) == [], err
        return
    proc.kill()
    proc.communicate()
    res = _hub_graft(hub, out, "--stream")
    assert res.returncode == 0, res.stderr
    assert [p.name for p in where.iterdir()] == ["out"]
    assert _weights(out) == _weights(models["local"])


def test_s3_model_json_past_the_limit_is_refused_unread(s3, tmp_path, monkeypatch):
    """A "model folder" whose config.json is larger than any model's JSON (jsonfile.MAX_BYTES; lowered here so
    the test uploads little): its size, read from the listing, is refused in one line saying it is not a model
    folder, and no temporary folder is left."""
    import shadowmerge.jsonfile as jsonfile
    from shadowmerge.errors import ShadowMergeError
    from shadowmerge.transports.objectstore import ObjectFiles

    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "padding": "x" * 5000}))
    s3.upload("models", "hostile", folder)
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(jsonfile, "MAX_BYTES", 4096)
    made = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("shadowmerge-stream-*"))
    with pytest.raises(ShadowMergeError) as err:
        ObjectFiles.open("s3://models/hostile")
    line = str(err.value)
    assert "\n" not in line and "config.json is 5" in line and "more than a model's JSON can be (4096)" in line
    assert "not a model folder: check the URL" in line
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("shadowmerge-stream-*")) == made


def test_hub_stream_of_several_updates_with_ties_equals_the_local_graft(hub, models, tmp_path):
    """TIES over streamed inputs: the threshold passes read each tensor again by range (on the reader, in order)
    before its graft; the output is the local graft's, byte for byte, and verify --recompute re-reads by URL."""
    second = tinymodels.save(tinymodels.perturb(tinymodels.perturb(tinymodels.build("llama", 0), 0.02, 1), 0.01, 9),
                             tmp_path / "tuned2", torch.bfloat16, eos=7, template="base", shard="100KB")
    hub.add("org/tuned2", second)
    extra = ("--combine", "ties", "--density", "0.4", "--weights", "1,0.5")
    local = _cli({}, "graft", "--instruct", models["instruct"], "--base", models["base"], "--tuned", models["tuned"],
                 "--tuned", second, *extra, "--out", tmp_path / "local", "-q")
    assert local.returncode == 0, local.stderr
    res = _hub_graft(hub, tmp_path / "out", "--stream", "--tuned", "org/tuned2", *extra)
    assert res.returncode == 0, res.stderr
    assert _weights(tmp_path / "out") == _weights(tmp_path / "local")
    res = _cli(hub.env, "verify", tmp_path / "out", "--recompute", "-q")
    assert res.returncode == 0 and "bit-identical" in res.stdout, res.stdout + res.stderr
