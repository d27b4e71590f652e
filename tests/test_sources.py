"""The delta-source interface: a source written outside the package, registered with one line, is used by graft
(plan, engine, writer, record, dry run and verify --recompute) with no other change: docs/architecture.md's claim."""

from __future__ import annotations

import json
import shutil

import torch

import tinymodels


def test_a_registered_source_is_used_end_to_end(make_triple, tmp_path, monkeypatch, cli):
    from shadowmerge import graft, sources
    from shadowmerge.checkpoint import Checkpoint
    from shadowmerge.formats.safetensors import itemsize

    monkeypatch.setattr(sources, "_REGISTERED", dict(sources.registered()))

    @sources.register
    class HalfDelta:
        """Half of tuned - base: a tuned model in a folder named half-delta (a toy rule, for the test)."""

        kind = "half"
        formula = "out = float32(I) + alpha * (float32(T) - float32(B)) / 2"
        mismatch_hint = "pass matching models"
        strict = True

        @classmethod
        def wanted(cls, spec):
            return spec.tuned is not None and spec.tuned.endswith("half-delta")

        @classmethod
        def open(cls, spec, instruct, opened):
            opened += [Checkpoint.open(spec.base, "base"), Checkpoint.open(spec.tuned, "tuned")]
            return cls(opened[-2], opened[-1])

        def __init__(self, base, tuned):
            self.base, self.tuned, self.checkpoints, self.warnings = base, tuned, (base, tuned), []

        def describe(self):
            return {"base": self.base.ref, "tuned": self.tuned.ref}

        def record(self):
            return {"half": True}

        def card_inputs(self):
            return {}

        def names(self):
            return set(self.tuned.tensors)

        def entry(self, name):
            return self.tuned.tensors.get(name)

        def rows(self, entry):
            return entry.rows

        def read(self, entry, e0, e1, buffers):
            size = (e1 - e0) * itemsize(entry.dtype)
            return (self.tuned.read_into(entry, e0, e1, buffers("t", size)),
                    self.base.read_into(self.base.tensors[entry.name], e0, e1, buffers("b", size)))

        def delta_into(self, entry, payload, out, to_float):
            t, b = to_float(payload[0], entry.dtype, "t"), to_float(payload[1], entry.dtype, "b")
            return torch.sub(t, b, out=out).mul_(0.5)

    inst, base, tuned = make_triple("llama", dtype=torch.float32)
    half = shutil.copytree(tuned, tmp_path / "half-delta")
    summary = graft(inst, base, half, tmp_path / "out", progress=False, check_roles=False)
    graft(inst, base, tuned, tmp_path / "want", alpha=0.5, progress=False)
    got, want = tinymodels.state(tmp_path / "out"), tinymodels.state(tmp_path / "want")
    assert summary.grafted > 0 and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)           # 0.5 * d and 1 * (0.5 * d) round alike
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    assert record["delta"] == "half" and record["half"] is True and record["formula"] == HalfDelta.formula
    res = cli("verify", tmp_path / "out", "--recompute", "-q")
    assert res.exit_code == 0 and "bit-identical" in res.output, res.output
    dry = cli("graft", "--instruct", inst, "--base", base, "--tuned", half, "--dry-run", "--no-role-check")
    assert dry.exit_code == 0 and "model.layers.0.self_attn.q_proj.weight" in dry.output
