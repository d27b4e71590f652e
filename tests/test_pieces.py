"""Memory bounded by elements: pieces cut inside huge rows give the same bits as whole tensors.

The engine, the writer's copies and casts, the LoRA source (slices of A and B per piece) and DoRA
(norms from a streamed pass) are run with tiny chunk and tile sizes, so that rows are cut into segments
and LoRA factors are read in blocks (entries.Wide), and compared with the reference expression and with
peft's own merge.
"""

from __future__ import annotations

import errno
import json

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import shadowmerge
from adapters import assert_close_to_merge, make_adapter, peft_merged, shadow_reference
from conftest import DEVICES
from test_lora import BASE_CASES, PLAIN_CASES
from tinymodels import state


@pytest.fixture
def small_pieces(monkeypatch):
    """set(chunk, tile_elements, block_elements=None): every graft in the test cuts tensors that finely (and reads
    Wide factors in blocks of that many elements, by default a quarter of a tile)."""
    from shadowmerge import engine
    from shadowmerge.lora import entries, source

    def set_(chunk: int, tile: int, block: int | None = None):
        run = engine.run.__wrapped__ if hasattr(engine.run, "__wrapped__") else engine.run

        def small(*a, **k):
            k["chunk_elements"] = chunk
            return run(*a, **k)
        small.__wrapped__ = run
        monkeypatch.setattr(engine, "run", small)
        monkeypatch.setattr(entries, "TILE_ELEMENTS", tile)
        monkeypatch.setattr(entries, "BLOCK_ELEMENTS", block or max(1, tile // 4))
        monkeypatch.setattr(source, "CHUNK_ELEMENTS", chunk)
    return set_


def raw_triple(root, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], seed=0):
    """instruct/base/tuned folders holding just these tensors (a Llama config; names and shapes are free)."""
    g = torch.Generator().manual_seed(seed)
    folders = []
    for k, name in enumerate(("instruct", "base", "tuned")):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                        "tie_word_embeddings": False}))
        sd = {n: (torch.randn(shape, generator=g) * (1 + 0.01 * k)).to(dtype) for n, (shape, dtype) in tensors.items()}
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders


WIDE = {"model.layers.0.mlp.experts.gate_up_proj": ((4, 24, 40), torch.bfloat16),    # rows of 960 elements
        "model.layers.0.mlp.experts.down_proj": ((4, 20, 24), torch.float16),
        "model.embed_tokens.weight": ((50, 16), torch.bfloat16),
        "model.norm.weight": ((16,), torch.float32),
        "scalar": ((), torch.float32),
        "empty": ((0, 7), torch.bfloat16)}


@pytest.mark.parametrize("chunk", [7, 100, 960, 10_000])
@pytest.mark.parametrize("dtype", [None, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_full_graft_of_huge_rows_is_bit_exact(tmp_path, small_pieces, chunk, dtype, device):
    small_pieces(chunk, 1 << 24)
    inst, base, tuned = raw_triple(tmp_path, WIDE)
    shadowmerge.graft(inst, base, tuned, tmp_path / "out", alpha=0.7, dtype=dtype, device=device, progress=False)
    I, B, T, out = (load_file(f / "model.safetensors") for f in (inst, base, tuned, tmp_path / "out"))
    for name, got in out.items():
        want = (I[name].float() + 0.7 * (T[name].float() - B[name].float())).to(dtype or I[name].dtype)
        assert torch.equal(got, want), name


def test_copies_and_casts_of_huge_rows_without_kernel_copy(tmp_path, small_pieces, monkeypatch):
    """The writer's fallback copy (no copy_file_range) and casts cut rows bigger than their buffer."""
    from shadowmerge import writer

    monkeypatch.setattr(writer.os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))
    small_pieces(50, 1 << 24)
    inst, base, tuned = raw_triple(tmp_path, WIDE)
    shadowmerge.graft(inst, base, tuned, tmp_path / "out", exclude="experts|embed", progress=False)
    I, out = load_file(inst / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
                 "model.embed_tokens.weight"):
        assert torch.equal(out[name], I[name]), name
    shadowmerge.graft(inst, base, tuned, tmp_path / "cast", exclude="experts", dtype="float32", progress=False)
    cast = load_file(tmp_path / "cast" / "model.safetensors")
    assert torch.equal(cast["model.layers.0.mlp.experts.gate_up_proj"], I["model.layers.0.mlp.experts.gate_up_proj"].float())


def test_vocab_boundary_with_pieces_inside_rows(tmp_path, small_pieces):
    small_pieces(5, 1 << 24)
    inst, _, _ = raw_triple(tmp_path / "a", {"model.embed_tokens.weight": ((30, 16), torch.bfloat16)})
    _, base, tuned = raw_triple(tmp_path / "b", {"model.embed_tokens.weight": ((20, 16), torch.bfloat16)}, seed=1)
    shadowmerge.graft(inst, base, tuned, tmp_path / "out", vocab="common", progress=False)
    I, B, T = (load_file(f / "model.safetensors")["model.embed_tokens.weight"] for f in (inst, base, tuned))
    got = load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(got[:20], (I[:20].float() + (T.float() - B.float())).to(torch.bfloat16))
    assert torch.equal(got[20:], I[20:])


# (chunk elements, tile elements): whole rows with few rows per piece; segments of rows; tiny tiles
PIECES = [(1000, 32), (40, 64)]


@pytest.mark.parametrize("pieces", PIECES, ids=lambda p: f"chunk{p[0]}-tile{p[1]}")
@pytest.mark.parametrize("case", ["plain", "embedding", "fan-in-fan-out", "lora-bias"])
@pytest.mark.parametrize("device", DEVICES)
def test_lora_pieces_equal_peft(case, pieces, make_triple, cli, tmp_path, small_pieces, device):
    small_pieces(*pieces)
    family, dtype, lora_kwargs = PLAIN_CASES[case]
    inst, base, _ = make_triple(family, dtype)
    adapter = make_adapter(base, tmp_path / "adapter", **lora_kwargs)
    res = cli("graft", "--instruct", inst, "--lora", adapter, "--out", tmp_path / "out", "-q", "--device", device)
    assert res.exit_code == 0, res.output
    out, peft_i = state(tmp_path / "out"), peft_merged(inst, adapter)
    for name, got in out.items():     # pieces smaller than a matrix: B @ A summed in another order than peft's
        assert_close_to_merge(got, peft_i[name].to(dtype), device, name, order_differs=True)


@pytest.mark.parametrize("pieces", PIECES, ids=lambda p: f"chunk{p[0]}-tile{p[1]}")
@pytest.mark.parametrize("case", ["dora", "dora-fan-in-fan-out", "modules-to-save"])
@pytest.mark.parametrize("device", DEVICES)
def test_dora_and_full_copies_in_pieces_equal_peft(case, pieces, make_triple, cli, tmp_path, small_pieces, device):
    """DoRA norms over huge rows, and over all rows (embeddings, fan_in_fan_out), come from the streamed pass."""
    small_pieces(*pieces)
    family, lora_kwargs, _ = BASE_CASES[case]
    inst, base, _ = make_triple(family)
    adapter = make_adapter(base, tmp_path / "adapter", **lora_kwargs)
    res = cli("graft", "--instruct", inst, "--lora", adapter, "--base", base, "--out", tmp_path / "out", "-q",
              "--device", device)
    assert res.exit_code == 0, res.output
    out, I, B = state(tmp_path / "out"), state(inst), state(base)
    shadow = shadow_reference(I, B, peft_merged(base, adapter), torch.bfloat16)
    for name, got in out.items():
        assert_close_to_merge(got, shadow[name], device, name, order_differs=True, norm_terms=max(got.shape, default=0))


def test_ranges_cover_every_element_once_within_the_bounds():
    from shadowmerge.chunks import geometry, ranges

    for rows, row, chunk, tile in [(5, 7, 3, None), (5, 7, 20, 2), (4, 960, 100, 16), (3, 1, 4, 2), (0, 5, 4, None),
                                   (6, 64, 1000, 8), (2, 10, 10, None)]:
        pieces = list(ranges(0, rows * row, row, chunk, tile))
        assert [e for p in pieces for e in range(*p)] == list(range(rows * row))
        for e0, e1 in pieces:
            r0, r1, c0, c1 = geometry(e0, e1, row)
            assert e1 - e0 <= chunk or (row <= chunk and e1 - e0 == row)
            assert (r1 - r0) * (c1 - c0) == e1 - e0 and (r1 - r0 == 1 or (c0, c1) == (0, row))
            assert (c0, c1) == (0, row) or row > chunk          # rows are cut only where one passes the chunk
            if tile:
                assert r1 - r0 <= tile


@pytest.mark.parametrize("case", ["plain", "embedding", "fan-in-fan-out", "dora"])
def test_a_high_rank_on_a_wide_layer_reads_its_factors_once_per_piece(case, make_triple, cli, tmp_path, small_pieces,
                                                                      monkeypatch):
    """rank x width above the tile (rank 16 on layers 64 to 256 wide, tile 512): pieces stay whole rows and the
    wide factor is read in blocks once per piece, not once per row (which made a rank-4096 LoRA on an 8192-wide
    layer take hours). A piece has up to 512 // 16 = 32 rows and no tensor here more than 256 rows, so no factor
    is read more than 8 times; one read per row segment read the adapter 36-85 times over. The result is still
    peft's."""
    from shadowmerge import transports as transport

    small_pieces(1 << 22, 512)
    family, dtype, kwargs = PLAIN_CASES[case] if case in PLAIN_CASES else (*BASE_CASES[case][:1], torch.bfloat16,
                                                                           BASE_CASES[case][1])
    inst, base, _ = make_triple(family, dtype)
    adapter = make_adapter(base, tmp_path / "adapter", **dict(kwargs, r=16, lora_alpha=32))
    read = {"bytes": 0}
    pread = transport.LocalFiles.pread

    def counting(self, path, view, pos):
        got = pread(self, path, view, pos)
        if path.name == "adapter_model.safetensors":
            read["bytes"] += got
        return got
    monkeypatch.setattr(transport.LocalFiles, "pread", counting)
    extra = ["--base", base] if case == "dora" else []
    res = cli("graft", "--instruct", inst, "--lora", adapter, *extra, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert 0 < read["bytes"] <= 8 * size, (read["bytes"], size)
    out, merged = state(tmp_path / "out"), peft_merged(base if case == "dora" else inst, adapter)
    want = shadow_reference(state(inst), state(base), merged, dtype) if case == "dora" else merged
    for name, got in out.items():
        assert_close_to_merge(got, want[name].to(dtype), "cpu", name, order_differs=True,
                              norm_terms=max(got.shape, default=0) if case == "dora" else 0)


@st.composite
def lora_cuts(draw):
    """A shape, a rank and piece sizes drawn against them: chunks from one element to several whole tensors (whole
    rows, or row segments), tiles below and above rank x width (factors read ahead, or Wide), blocks from one
    column to the whole slice."""
    rows, cols, rank = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(1, 12))
    below = st.integers(1, max(1, cols - 1)), st.integers(1, max(1, rank * cols - 1))
    return dict(rows=rows, cols=cols, rank=rank, chunk=draw(st.one_of(below[0], st.integers(cols, 3 * rows * cols))),
                tile=draw(st.one_of(below[1], st.integers(rank * cols, 2 * rank * cols))),
                block=draw(st.integers(1, rank * cols)),
                transposed=draw(st.booleans()), factors=draw(st.sampled_from([torch.float32, torch.bfloat16,
                                                                               torch.float16])))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=lora_cuts())
@example(cut=dict(rows=4, cols=40, rank=8, chunk=2000, tile=16, block=16, transposed=False, factors=torch.float32))
@example(cut=dict(rows=40, cols=4, rank=8, chunk=2000, tile=16, block=16, transposed=True, factors=torch.bfloat16))
def test_any_cut_of_a_lora_product_gives_the_product(tmp_path_factory, small_pieces, cut):
    """Whatever the chunk, tile and block sizes against the rank and the shape (pieces of whole rows or of row
    segments, factors read ahead or Wide, in blocks of any size, transposed or not), the graft is
    I + scale * B @ A within the float32 rounding of its terms (another order of the rank sums)."""
    from peft import LoraConfig

    from adapters import assert_within_float32_terms

    rows, cols, rank, transposed, factors = (cut[k] for k in ("rows", "cols", "rank", "transposed", "factors"))
    small_pieces(cut["chunk"], cut["tile"], cut["block"])
    root = tmp_path_factory.mktemp("cut")
    name = "model.layers.0.self_attn.q_proj"
    inst = raw_triple(root, {f"{name}.weight": ((rows, cols), torch.bfloat16)})[0]
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    a_in, b_out = (rows, cols) if transposed else (cols, rows)
    a = (torch.randn((rank, a_in), generator=g) * 0.3).to(factors)
    b = (torch.randn((b_out, rank), generator=g) * 0.3).to(factors)
    adapter = root / "adapter"
    LoraConfig(r=rank, lora_alpha=3 * rank, target_modules=["q_proj"], fan_in_fan_out=transposed).save_pretrained(adapter)
    save_file({f"base_model.model.{name}.lora_A.weight": a, f"base_model.model.{name}.lora_B.weight": b},
              adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    shadowmerge.graft(inst, out=root / "out", lora=adapter, progress=False, check_roles=False)
    got = load_file(root / "out" / "model.safetensors")[f"{name}.weight"]
    I = load_file(inst / "model.safetensors")[f"{name}.weight"]
    update = b.float() @ a.float()
    want = (I.float() + (update.T if transposed else update) * 3.0).to(torch.bfloat16)
    assert_within_float32_terms(got, want, name)
