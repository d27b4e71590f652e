"""Hostile or broken input files and option values: always a one-line error, never a traceback or a hang.

Each class is tried with several members (headers, index files, config.json, adapter_config.json,
pickles, patterns from files, option values), then fuzzed with hypothesis: any bytes end in a
ShadowMergeError or a valid parse, never another exception, within a time bound.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import make_adapter
from conftest import run_bad

SLOW_PATTERN = r"(.|[a-z])*\d\d"      # catastrophic backtracking on any module path (re and peft hang on it)


@pytest.fixture
def triple(make_triple):
    return make_triple("llama")


def args(i, b, t):
    return ["--instruct", i, "--base", b, "--tuned", t]


def st_file(header, data: bytes = b"", raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HEADERS = {
    "bytes after the last tensor": (st_file({"a": F32}, b"x" * 12), "truncated, or has bytes beyond"),
    "a gap between tensors": (st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"x" * 8),
                              "invalid offset"),
    "overlapping tensors": (st_file({"a": F32, "b": F32}, b"x" * 8), "invalid offset"),
    "a negative dim": (st_file({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"x" * 8), "header"),
    "a float dim": (st_file({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"x" * 8), "header"),
    "an infinite offset": (st_file(None, b"x" * 8, raw=b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": '
                                                       b'[0, 1e999]}}'), "header"),
    "an overflowing shape": (st_file({"a": {"dtype": "F32", "shape": [2**62, 8], "data_offsets": [0, 8]}}, b"x" * 8),
                             "overflow"),
    "deep nesting": (st_file(None, raw=b"[" * 100_000 + b"]" * 100_000), "corrupt safetensors header"),
    "not UTF-8": (st_file(None, raw=b'{"\xff\xfe": 1}'), "corrupt safetensors header"),
    "not an object": (st_file(None, raw=b"[1, 2, 3]"), "corrupt safetensors header"),
    "metadata that is not strings": (st_file({"__metadata__": {"format": 1}}), "corrupt safetensors header"),
    "an unknown dtype": (st_file({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"x"),
                         "does not merge"),
    "a huge header length": (struct.pack("<Q", 2**63) + b"{}", "corrupt or truncated safetensors header"),
    "fewer than 8 bytes": (b"\x01\x02", "not a safetensors file"),
    "a name of a million characters": (st_file({"x" * 1_000_000: {"dtype": "F32", "shape": [0],
                                                                   "data_offsets": [0, 0]}}), "characters long"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_hostile_safetensors_headers(cli, tmp_path, triple, case):
    i, b, t = triple
    data, expect = HEADERS[case]
    (t / "model.safetensors").write_bytes(data)
    err = run_bad(cli, tmp_path, triple, *args(i, b, t), expect=expect or str(t / "model.safetensors"))
    assert str(t / "model.safetensors") in err


# --- index files --------------------------------------------------------------------------------

def sharded(make_triple):
    i, b, t = make_triple("llama", shard="60KB")
    assert (t / "model.safetensors.index.json").is_file()
    return i, b, t


INDEXES = {
    "weight_map is a list": (lambda d: {"weight_map": list(d["weight_map"])}, "weight_map is a list"),
    "a shard named by a number": (lambda d: {"weight_map": {k: 7 for k in d["weight_map"]}}, "must be a string"),
    "the index is a list": (lambda d: [d], "not a JSON object"),
    "no weight_map": (lambda d: {"metadata": {}}, "weight_map is null"),
    "a shard that is not safetensors": (lambda d: {"weight_map": {k: "config.json" for k in d["weight_map"]}},
                                        "which is not a .safetensors file; refusing to open it"),
}


@pytest.mark.parametrize("case", sorted(INDEXES))
def test_hostile_index_files(cli, tmp_path, make_triple, case):
    i, b, t = sharded(make_triple)
    edit, expect = INDEXES[case]
    index = t / "model.safetensors.index.json"
    index.write_text(json.dumps(edit(json.loads(index.read_text()))))
    run_bad(cli, tmp_path, (i, b, t), *args(i, b, t), expect=expect)


@pytest.mark.parametrize("raw, expect", [(b'{"weight_map": {"\xff": 1}}', "not UTF-8"),
                                         (b"[" * 50_000, "nested too deeply"),
                                         (b"{\"weight_map\": ", "not valid JSON")])
def test_index_that_is_not_json(cli, tmp_path, make_triple, raw, expect):
    i, b, t = sharded(make_triple)
    (t / "model.safetensors.index.json").write_bytes(raw)
    run_bad(cli, tmp_path, (i, b, t), *args(i, b, t), expect=expect)


def test_index_that_is_a_directory(cli, tmp_path, make_triple):
    i, b, t = sharded(make_triple)
    (t / "model.safetensors.index.json").unlink()
    (t / "model.safetensors.index.json").mkdir()
    run_bad(cli, tmp_path, (i, b, t), *args(i, b, t), expect="is a folder, not a JSON file")


@pytest.mark.parametrize("outside", ["absolute", "parent", "deeper parent"])
def test_index_entry_leaving_the_folder_is_refused_before_it_is_opened(cli, tmp_path, make_triple, outside):
    """The outside file is a FIFO: opening it would hang the run, so finishing proves it was never opened."""
    i, b, t = sharded(make_triple)
    fifo = tmp_path / "secret.safetensors"
    os.mkfifo(fifo)
    name = {"absolute": str(fifo), "parent": "../../secret.safetensors",
            "deeper parent": "sub/../../../secret.safetensors"}[outside]
    index = t / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = name
    index.write_text(json.dumps(doc))
    start = time.monotonic()
    err = run_bad(cli, tmp_path, (i, b, t), *args(i, b, t), expect="which points outside the model folder")
    assert "refusing to open it" in err and time.monotonic() - start < 60


# --- config.json ----------------------------------------------------------------------------------

CONFIGS = {
    "a list": (b"[1, 2]", "is a list, not a JSON object"),
    "not UTF-8": (b'{"model_type": "\xff"}', "not UTF-8"),
    "architectures is a number": (b'{"model_type": "llama", "architectures": 5}', "architectures is a number"),
    "an architecture that is not a string": (b'{"model_type": "llama", "architectures": [[1]]}', "must be a string"),
    "model_type is a list": (b'{"model_type": ["llama"]}', "model_type is a list"),
    "tie_word_embeddings is a string": (b'{"model_type": "llama", "tie_word_embeddings": "yes"}',
                                        "tie_word_embeddings is a string"),
    "text_config is a list": (b'{"model_type": "llama", "text_config": [1]}', "text_config is a list"),
    "deep nesting": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_hostile_config_json(cli, tmp_path, triple, case):
    i, b, t = triple
    raw, expect = CONFIGS[case]
    (b / "config.json").write_bytes(raw)
    run_bad(cli, tmp_path, triple, *args(i, b, t), expect=expect)


def test_config_json_that_is_a_directory(cli, tmp_path, triple):
    i, b, t = triple
    (b / "config.json").unlink()
    (b / "config.json").mkdir()
    run_bad(cli, tmp_path, triple, *args(i, b, t), expect="is a folder, not a JSON file")


def test_weights_file_that_is_a_directory(cli, tmp_path, triple):
    i, b, t = triple
    (t / "model.safetensors").unlink()
    (t / "model.safetensors").mkdir()
    run_bad(cli, tmp_path, triple, *args(i, b, t), expect="cannot be read")


def test_adapter_config_that_is_a_directory(cli, tmp_path, triple):
    i, b, _ = triple
    adapter = make_adapter(b, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").mkdir()
    run_bad(cli, tmp_path, [i, adapter], "--instruct", i, "--lora", adapter, expect="is a folder, not a JSON file")


# --- pickles (--allow-pickle) ---------------------------------------------------------------------

@pytest.mark.parametrize("payload, expect", [(torch.zeros(3), "holds a Tensor, not a dict of tensors"),
                                             ([torch.zeros(3)], "holds a list, not a dict of tensors"),
                                             ({"a": torch.zeros(2, dtype=torch.complex64)}, "does not merge")])
def test_pickle_that_is_not_a_state_dict(cli, tmp_path, triple, payload, expect):
    i, b, t = triple
    (t / "model.safetensors").unlink()
    torch.save(payload, t / "pytorch_model.bin")
    run_bad(cli, tmp_path, triple, *args(i, b, t), "--allow-pickle", expect=expect)


# --- adapter_config.json and patterns from files ----------------------------------------------------

@pytest.fixture
def adapter(triple, tmp_path):
    return make_adapter(triple[1], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def edit_config(adapter: Path, **changes) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


ADAPTER_CONFIGS = {
    "lora_alpha NaN": ({"lora_alpha": float("nan")}, "lora_alpha is nan; it must be a finite positive number"),
    "lora_alpha Infinity": ({"lora_alpha": float("inf")}, "lora_alpha is inf"),
    "lora_alpha a string": ({"lora_alpha": "8"}, "lora_alpha is 8; it must be a finite positive number"),
    "lora_alpha negative": ({"lora_alpha": -8}, "lora_alpha is -8"),
    "r a fraction": ({"r": 4.5}, "r is 4.5; it must be a positive integer"),
    "r true": ({"r": True}, "r is True"),
    "r absurd": ({"r": 10**30}, "says r=1000000000000000000000000000000 but lora_A has rank 4"),
    "rank_pattern a list": ({"rank_pattern": ["q_proj"]}, "rank_pattern is a list"),
    "rank_pattern value NaN": ({"rank_pattern": {"q_proj": float("nan")}}, "rank_pattern['q_proj'] is nan"),
    "alpha_pattern value absurd": ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern['q_proj'] is -1"),
    "an invalid pattern": ({"rank_pattern": {"(": 4}}, "is not a valid regular expression"),
    "the issue's pattern": ({"rank_pattern": {"(.*)*X": 4}}, "rank_pattern key '(.*)*X'"),
    "nested repeats in alpha_pattern": ({"alpha_pattern": {r"(\w+\.?)*q_proj": 4}}, "nests one unbounded repetition"),
    "a slow pattern": ({"rank_pattern": {SLOW_PATTERN: 4}}, "takes too long to match"),
    "a slow alpha pattern": ({"alpha_pattern": {SLOW_PATTERN: 4}}, "takes too long to match"),
    "a huge repetition": ({"alpha_pattern": {"a{1000000000}": 4}}, "repeats too much"),
    "a nested repetition": ({"rank_pattern": {"((a{100}){100}){100}": 4}}, "repeats too much"),
    "a pattern too long": ({"rank_pattern": {"a" * 5000: 4}}, "characters long"),
    "modules_to_save a number": ({"modules_to_save": 3}, "modules_to_save is a number"),
    "use_rslora a string": ({"use_rslora": "yes"}, "use_rslora is a string"),
    "peft_type a number": ({"peft_type": 1}, "peft_type is a number"),
    "init_lora_weights a list": ({"init_lora_weights": [1]}, "init_lora_weights is a list"),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CONFIGS))
def test_hostile_adapter_config(cli, tmp_path, triple, adapter, case):
    changes, expect = ADAPTER_CONFIGS[case]
    edit_config(adapter, **changes)
    start = time.process_time()           # CPU time: a busy machine's wall clock would bound the machine, not us
    run_bad(cli, tmp_path, [triple[0], adapter], "--instruct", triple[0], "--lora", adapter, expect=expect)
    assert time.process_time() - start < 30, "a pattern from the adapter was not matched at a bounded cost"


@pytest.mark.parametrize("name", ["a\0b", "x" * 5000, "~no-such-user/model", "../" * 40, ""])
@pytest.mark.parametrize("command", ["graft", "retarget"])
def test_a_hostile_base_model_name_is_only_a_name(cli, tmp_path, triple, adapter, name, command):
    """base_model_name_or_path is compared with --instruct (an adapter onto its own Base is refused): a name
    that is no usable path never becomes a traceback."""
    edit_config(adapter, base_model_name_or_path=name)
    args = (["graft", "--instruct", triple[0], "--lora", adapter, "-q"] if command == "graft" else
            ["lora", "retarget", adapter, "--instruct", triple[0]])
    res = cli(*args, "--out", tmp_path / "out")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output


def test_hostile_adapter_config_in_retarget_too(cli, tmp_path, triple, adapter):
    edit_config(adapter, rank_pattern={SLOW_PATTERN: 4})
    run_bad(cli, tmp_path, [triple[0], adapter], adapter, "--instruct", triple[0], command=("lora", "retarget"),
            expect="takes too long to match")


def test_adapter_bin_holding_a_tensor(cli, tmp_path, triple, adapter):
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(torch.zeros(4), adapter / "adapter_model.bin")
    run_bad(cli, tmp_path, [triple[0], adapter], "--instruct", triple[0], "--lora", adapter, "--allow-pickle",
            expect="not a dict of tensors")


def test_valid_patterns_still_match_as_peft_does(tmp_path, triple, adapter):
    """A rank/alpha pattern written for peft's re still selects the same modules through the bounded matcher."""
    from shadowmerge.lora import Adapter

    edit_config(adapter, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32, "v_proj": 2})
    ad = Adapter.open(adapter)
    scales = {m: round(mod.scale, 6) for m, mod in ad.modules.items()}
    assert scales["model.layers.1.self_attn.q_proj"] == 8.0
    assert scales["model.layers.0.self_attn.q_proj"] == 2.0
    assert scales["model.layers.0.self_attn.v_proj"] == 0.5


def test_time_spent_elsewhere_is_not_charged_to_patterns():
    """The budget counts CPU time spent matching: a Matcher built long before it matches (checkpoints opened, a
    meta model built, a loaded machine) still matches a legitimate pattern."""
    from shadowmerge.patterns import Matcher

    m = Matcher("x", budget=0.05)
    time.sleep(0.2)
    assert m.match(r"(.*\.)?(.*\.gate_up_proj)$", "model.layers.0.mlp.experts.gate_up_proj", "key")


def test_a_real_large_pattern_set_matches_as_re_does():
    """A 48-layer, 128-expert model's module names against dozens of keys (peft's own rank_pattern keys and a
    user's) match within the budget and select exactly what re selects; the slow shapes are still refused."""
    import re

    from shadowmerge.errors import ShadowMergeError
    from shadowmerge.patterns import Matcher

    names = [f"model.layers.{layer}.mlp.experts.{e}.{w}" for layer in range(48) for e in range(128)
             for w in ("gate_proj", "up_proj", "down_proj")]
    names += [f"model.layers.{layer}.self_attn.{p}" for layer in range(48) for p in ("q_proj", "k_proj", "v_proj")]
    keys = [r".*\.gate_up_proj", r".*\.down_proj", "q_proj"] + [rf"layers\.{k}\.mlp\.experts\.\d+\.up_proj"
                                                                 for k in range(0, 48, 2)]
    m = Matcher("--lora x: adapter_config.json")
    for name in names:
        for key in keys:
            pattern = rf"(.*\.)?({key})$"
            assert bool(m.match(pattern, name, "rank_pattern key")) == bool(re.match(pattern, name)), (key, name)
    for slow, text in [(SLOW_PATTERN, names[0]), (r"(x+x+)+y", "x" * 40)]:
        with pytest.raises(ShadowMergeError, match="takes too long to match|nests one unbounded"):
            Matcher("x").search(slow, text, "key")


# --- option values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expect", [
    (["--shard-size", "inf"], "shard size 'inf' is not a size"),
    (["--shard-size", "nan"], "shard size 'nan' is not a size"),
    (["--shard-size", "-1GB"], "is not a size"),
    (["--shard-size", "1e-5GB"], "is not a size"),
    (["--alpha", "inf"], "--alpha must be a finite number"),
    (["--include", SLOW_PATTERN], "takes too long to match"),
    (["--include", "(a+)+$"], "nests one unbounded repetition in another"),
    (["--exclude", "a{1000000000}"], "repeats too much"),
    (["--exclude", "[z-a]"], "--exclude '[z-a]' is not a valid regular expression"),
    (["--out", "\0bad"], "is not a usable path"),
])
def test_hostile_option_values(cli, tmp_path, triple, extra, expect):
    i, b, t = triple
    if extra[0] == "--out":      # a NUL in a path: click hands it over as is
        res = cli("graft", *args(i, b, t), "--out", "x\0y", "-q")
        assert res.exit_code == 1 and "Traceback" not in res.output
        return
    run_bad(cli, tmp_path, triple, *args(i, b, t), *extra, expect=expect)


def test_input_path_with_a_nul_byte(cli, tmp_path, triple):
    i, b, t = triple
    run_bad(cli, tmp_path, triple, *args(i, b, "x\0y"), expect="is not a usable path or Hub id")


# --- fuzzing: any bytes end in a one-line error or a valid parse, within a time bound --------------

# no wall-clock deadline: a busy machine must not fail a test; the tool's own bounds are what is tested
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


def _ok_or_one_line(fn):
    from shadowmerge.errors import ShadowMergeError

    try:
        return fn()
    except ShadowMergeError as exc:
        assert "\n" not in str(exc)
        return None


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}, path, metadata={"format": "pt"})
    return path.read_bytes()


@FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_header_reader_on_any_bytes(tmp_path, data):
    from shadowmerge.formats.safetensors import read_header

    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    _ok_or_one_line(lambda: read_header(path, len(data)))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, 400))
def test_fuzz_header_reader_on_damaged_real_files(tmp_path, valid_file, edits, cut):
    from shadowmerge.formats.safetensors import read_header

    data = bytearray(valid_file)
    for pos, value in edits:
        data[pos % len(data)] = value
    data = bytes(data[: len(data) - cut % len(data)])
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    got = _ok_or_one_line(lambda: read_header(path, len(data)))
    if got is not None:
        start, tensors, _ = got
        for dtype, shape, begin, end in tensors.values():      # a valid parse describes bytes inside the file
            assert 0 <= begin <= end <= len(data) - start


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
                    max_leaves=20)


def _model_folder(tmp_path: Path, config: bytes, index: bytes | None) -> Path:
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(config)
    if index is not None:
        (folder / "model.safetensors.index.json").write_bytes(index)
    return folder


@FUZZ
@given(config=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()),
       index=st.none() | st.binary(max_size=200) | JSON.map(lambda v: json.dumps({"weight_map": v}).encode()))
def test_fuzz_config_and_index_readers(tmp_path, config, index):
    from shadowmerge.checkpoint import Checkpoint

    folder = _model_folder(tmp_path, config, index)
    ck = _ok_or_one_line(lambda: Checkpoint(folder, "base", str(folder)))
    if ck is not None:
        ck.architecture, ck.tie_word_embeddings      # a valid parse answers every question asked of it


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
                                                "modules_to_save", "peft_type", "init_lora_weights", "bias",
                                                "fan_in_fan_out", "use_dora", "base_model_name_or_path"]),
                               JSON, max_size=4))
def test_fuzz_adapter_config(tmp_path_factory, changes):
    import shutil

    from shadowmerge.lora import Adapter

    src = _fuzz_adapter(tmp_path_factory)
    folder = tmp_path_factory.mktemp("a")
    for p in src.iterdir():
        shutil.copyfile(p, folder / p.name)
    edit_config(folder, **changes)
    start = time.monotonic()
    ad = _ok_or_one_line(lambda: Adapter.open(folder))
    assert time.monotonic() - start < 5
    if ad is not None:
        ad.describe()
        ad.close()


_ADAPTER: list[Path] = []


def _fuzz_adapter(factory) -> Path:
    if not _ADAPTER:
        from tinymodels import build, save

        base = save(build("llama"), factory.mktemp("fuzzbase") / "base")
        _ADAPTER.append(make_adapter(base, factory.mktemp("fuzzad") / "adapter", r=4, lora_alpha=8,
                                     target_modules=["q_proj"]))
    return _ADAPTER[0]
