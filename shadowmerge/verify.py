"""verify(): check an output folder against the run record written with it.

Every output of graft, graft --lora, lora retarget, mergekit, train, eval, extract and similarity carries a
record (shadowmerge.json; train: run.json; eval: eval.json; extract: extract.json; similarity: report.json)
whose manifest lists every other file's size and sha256,
and each safetensors header's tensors (names, dtypes, shapes). verify checks that nothing is
missing, added or changed. With `recompute`, it re-reads the inputs named in graft records
(`input_paths`) and recomputes every tensor (or a sample of them) with the same plan and engine
as the graft, comparing bytes instead of writing them: the output must be bit-identical. An extracted
adapter is recomputed as far as an SVD allows (_recompute_extract).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import engine, jsonfile
from .checkpoint import Checkpoint, TensorStore
from .errors import ShadowMergeError
from .record import files_under, header_tensors, sha256_file
from .devices import parse_device
from .pipeline import finish_streams, open_and_plan
from .transports import pinned
from .spec import GraftSpec
from .progress import bar as progress_bar
from .record import RECORD, read
from .formats.safetensors import itemsize


@dataclass
class VerifySummary:
    out: Path
    files: int
    tensors: int
    recomputed: int

    def __str__(self) -> str:
        extra = f"; {self.recomputed} tensor(s) recomputed from the inputs, bit-identical" if self.recomputed else ""
        return (f"verified {self.out}: {self.files} file(s) match their sha256, {self.tensors} tensor header(s) "
                f"match the record{extra}")


HINT = "re-run the command that made it, or re-download it"


def _manifest(folder: Path, name: str, record: dict) -> dict:
    manifest = record.get("manifest")
    if manifest is None:
        raise ShadowMergeError(f"{folder / name} has no manifest (written by an older shadowmerge); re-run the "
                               f"command that made it to get one")
    jsonfile.expect(manifest, dict, f"{folder / name}: manifest", HINT)
    for rel, entry in manifest.items():
        jsonfile.expect(entry, dict, f"{folder / name}: manifest entry {rel[:80]!r}", HINT)
        jsonfile.expect(entry.get("size"), int, f"{folder / name}: the size of {rel[:80]!r}", HINT)
        jsonfile.expect(entry.get("sha256"), str, f"{folder / name}: the sha256 of {rel[:80]!r}", HINT)
        jsonfile.expect(entry.get("tensors", {}), dict, f"{folder / name}: the tensors of {rel[:80]!r}", HINT)
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ShadowMergeError(f"{folder / name}: manifest entry {rel[:80]!r} leaves the folder; {HINT}")
    return manifest


def check_files(folder: Path, name: str, manifest: dict, on_bytes=None) -> tuple[int, int]:
    """Files, headers and sha256 against a record's (checked) manifest; returns (files, tensors) checked."""
    present = set(files_under(folder)) - {name}
    missing, added = sorted(set(manifest) - present), sorted(present - set(manifest))
    if missing:
        raise ShadowMergeError(f"{folder / missing[0]} is missing (the record lists it); {HINT}")
    if added:
        raise ShadowMergeError(f"{folder / added[0]} is not in the record's manifest (added after the run?); remove "
                               f"it or {HINT}")
    tensors = 0
    for rel in sorted(manifest):
        entry = manifest[rel]
        path, size = folder / rel, (folder / rel).stat().st_size
        if size != entry.get("size"):
            raise ShadowMergeError(f"{path} has {size} bytes, the record says {entry.get('size')}; {HINT}")
        if "tensors" in entry:
            have = header_tensors(path, size)
            if have != entry["tensors"]:
                wrong = sorted(set(have) ^ set(entry["tensors"])) or \
                    sorted(t for t in have if have[t] != entry["tensors"][t])
                raise ShadowMergeError(f"{path}: the header differs from the record at tensor {wrong[0]!r}; {HINT}")
            tensors += len(have)
    for rel in sorted(manifest):
        if sha256_file(folder / rel) != manifest[rel].get("sha256"):
            raise ShadowMergeError(f"{folder / rel}: sha256 differs from the record (the file changed); {HINT}")
        if on_bytes is not None:
            on_bytes(manifest[rel]["size"])
    return len(manifest), tensors


class CompareSink:
    """Takes the engine's output like a ShardWriter would, and compares it with the output folder's bytes."""

    def __init__(self, out: TensorStore, on_bytes=None):
        self.out, self.on_bytes = out, on_bytes or (lambda n: None)
        self.info = None
        self.pos = 0                # elements of the current tensor compared so far
        self._buf = torch.empty(0, dtype=torch.uint8)

    def _against(self, name: str, first: bool, data: torch.Tensor) -> None:
        if first:
            self.info, self.pos = self.out.stored[name], 0
        n = data.numel() // itemsize(self.info.dtype)
        if self._buf.numel() < data.numel():
            self._buf = torch.empty(data.numel(), dtype=torch.uint8)
        stored = self.out.read_into(self.info, self.pos, self.pos + n, self._buf)
        if not torch.equal(stored, data):
            bad = int((stored != data).nonzero()[0]) // itemsize(self.info.dtype) + self.pos
            raise ShadowMergeError(f"{self.out.folder}: tensor {name} differs from its recomputation from the inputs "
                                   f"(first at element {bad}); the output, or an input, changed since the run")
        self.pos += n
        self.on_bytes(data.numel())

    def write(self, name: str, data: torch.Tensor, first: bool, release=None) -> None:
        self._against(name, first, data)
        if release is not None:
            release()

    def copy(self, ckpt, info, e0: int, e1: int, first: bool, scratch: torch.Tensor) -> None:
        if first and e0 == e1:
            self._against(info.name, True, scratch[:0])
        step = max(1, scratch.numel() // itemsize(info.dtype))
        for e in range(e0, e1, step):
            self._against(info.name, first and e == e0, ckpt.read_into(info, e, min(e + step, e1), scratch))


def _streamed(where: Path, rec: dict) -> dict:
    """The streamed inputs a record names (`input_urls`: role -> {url, files}), checked for shape."""
    urls = rec.get("input_urls") or {}
    jsonfile.expect(urls, dict, f"{where}: input_urls", HINT)
    for role, source in urls.items():
        jsonfile.expect(source, dict, f"{where}: input_urls.{role}", HINT)
        jsonfile.expect(source.get("url"), str, f"{where}: input_urls.{role}.url", HINT)
        jsonfile.expect(source.get("files", {}), dict, f"{where}: input_urls.{role}.files", HINT)
    return urls


def _input_paths(where: Path, rec: dict, roles: tuple[str, ...]) -> dict:
    """The input folders a record names (`input_paths`), each still there: --recompute re-reads them (a streamed
    input: its URL, read by range again)."""
    paths = rec.get("input_paths")
    if not isinstance(paths, dict) or any(r not in paths for r in roles):
        raise ShadowMergeError(f"{where} names no input folders (written by an older shadowmerge); only the "
                               f"sha256 and headers can be checked: run verify without --recompute")
    urls = _streamed(where, rec)
    paths = {**paths, **{role: source["url"] for role, source in urls.items()}}
    for label, path in paths.items():
        if label in urls:
            continue
        if path is not None and (not isinstance(path, str) or not Path(path).is_dir()):
            raise ShadowMergeError(f"--recompute needs the {label} input {path}, which is not there; run verify where "
                                   f"the inputs are, or without --recompute")
    return paths


def _recompute(folder: Path, rec: dict, sample: int | None, device, progress: bool) -> int:
    """Recompute the tensors of one graft output folder from the inputs its record names."""
    paths = _input_paths(folder / RECORD, rec, ("instruct",))
    inputs = {role: paths.get(role) for role in ("instruct", "base")}
    for role in ("tuned", "lora"):          # several updates: "tuned", "tuned 2", ... in order
        found = sorted((int(k[len(role):] or 1), v) for k, v in paths.items()
                       if k == role or (k.startswith(role + " ") and k[len(role) + 1:].isdigit()))
        inputs[role] = None if not found else found[0][1] if len(found) == 1 else tuple(v for _, v in found)
    if isinstance(rec.get("spec"), dict):
        spec = GraftSpec.from_record(rec["spec"], **inputs)
    else:                                    # a record written before the spec was recorded
        spec = GraftSpec.from_legacy_record(rec, **inputs)
    urls = _streamed(folder / RECORD, rec)
    ckpts: list = []
    try:
        with pinned({source["url"]: source for source in urls.values()}):
            plan = open_and_plan(ckpts, spec)
        out = Checkpoint.open(folder, "output")
        ckpts.append(out)
        planned = {t.name: t for t in plan.tensors}
        if set(planned) != set(out.stored):
            odd = sorted(set(planned) ^ set(out.stored))[0]
            raise ShadowMergeError(f"{folder}: tensor {odd} is {'missing from' if odd in planned else 'extra in'} the "
                                   f"output, by the recomputed plan; the output or an input changed since the run")
        for t in plan.tensors:
            o = out.stored[t.name]
            if (o.dtype, o.shape) != (t.out_dtype, t.info.shape):
                raise ShadowMergeError(f"{folder}: tensor {t.name} is {o.dtype} {list(o.shape)}, the recomputed plan "
                                       f"says {t.out_dtype} {list(t.info.shape)}; the output or its inputs changed since it "
                                       f"was written: write it again")
        if sample is not None and sample < len(plan.tensors):
            keep = set(random.Random(0).sample(sorted(planned), sample))
            for t in plan.tensors:           # an encoded weight and its scale grid are made together
                if t.scales_of is not None and (t.name in keep or t.scales_of.name in keep):
                    keep |= {t.name, t.scales_of.name}
            plan.tensors = [t for t in plan.tensors if t.name in keep]
        with progress_bar(sum(t.out_nbytes for t in plan.tensors), progress, "recompute") as bar:
            engine.run(plan, CompareSink(out, bar.update), device, allow_nonfinite=True)
        if sample is None:                   # streamed inputs: each file read checked whole against its digests
            finish_streams(ckpts)
        return len(plan.tensors)
    finally:
        for c in ckpts:
            c.close()


def _recompute_extract(folder: Path, rec: dict, sample: int | None, progress: bool) -> int:
    """An extracted adapter against the inputs its extract.json names: each LoRA module's update ΔW = T − B is
    recomputed (float32, exact: the same bits on every machine) and its norm must be the recorded one; the stored
    factors must be the truncated SVD of it: ‖ΔW − B·A‖/‖ΔW‖ (float64) equals the recorded relative error, and
    the recorded rank, to within the float32 SVD's error; each full copy (--others copy) is recomputed bit for bit.

    Not bit-for-bit for the factors: LAPACK's singular vectors differ between CPUs and thread counts (and in sign),
    while the product B·A is the best rank-r approximation wherever computed. The bound: a float32 SVD is
    backward stable, U·S·Vᵀ = ΔW + E with ‖E‖ ≤ p·ε·‖ΔW‖ (ε = 2⁻²⁴, p taken as max(m, n), LAPACK's norm-wise
    bound grows no faster), the factors' forming adds 2ε, and the recorded error came from such an SVD too: the two
    relative errors agree to 2·(max(m, n) + 2)·ε. A norm in float64 of the same float32 values agrees to
    numel·2⁻⁵² whatever the order of summation. Mixture-of-experts parameters (one LoRA per fused parameter) are
    checked by their headers only."""
    from safetensors import safe_open

    from .extract import as_trained

    paths = _input_paths(folder / "extract.json", rec, ("base", "tuned"))
    modules = [m for m in jsonfile.expect(rec.get("modules"), list, f"{folder / 'extract.json'}: modules", HINT)
               if isinstance(m, dict) and isinstance(m.get("tensor"), str) and "experts" not in m]
    others = [o for o in rec.get("others") or [] if isinstance(o, dict) and o.get("kept")]
    if sample is not None and sample < len(modules):
        modules = random.Random(0).sample(modules, sample)
    with pinned({source["url"]: source for source in _streamed(folder / "extract.json", rec).values()}):
        ckpts = {role: Checkpoint.open(path, role) for role, path in paths.items() if path}
    eps32 = 2.0 ** -24
    done = 0
    try:
        b, t, inst = ckpts["base"], ckpts["tuned"], ckpts.get("instruct")
        with safe_open(folder / "adapter_model.safetensors", "pt") as adapter, \
                progress_bar(sum(t.tensors[m["tensor"]].nbytes for m in modules), progress, "recompute") as bar:
            stored = set(adapter.keys())
            for m in modules:
                name, module = m["tensor"], m["module"]
                if name not in t.tensors or name not in b.tensors:
                    raise ShadowMergeError(f"{folder}: {name}, recorded as extracted, is not in the inputs; an input "
                                           f"changed since the run: extract again")
                delta = _whole(t, name) - as_trained(b, t, name)
                norm = float(delta.double().norm())
                if abs(norm - m["update_norm"]) > delta.numel() * 2.0 ** -52 * max(norm, m["update_norm"]):
                    raise ShadowMergeError(f"{folder}: the update of {name} has norm {norm:.9g} from the inputs, the "
                                           f"record says {m['update_norm']:.9g}; an input changed since the run: "
                                           f"extract again")
                keys = [f"base_model.model.{module}.lora_{f}.weight" for f in "AB"]
                if not all(k in stored for k in keys):
                    raise ShadowMergeError(f"{folder}: the adapter has no factors for {module}; {HINT}")
                a, bf = (adapter.get_tensor(k).double() for k in keys)
                if a.shape[0] != m["rank"] or bf.shape[1] != m["rank"]:
                    raise ShadowMergeError(f"{folder}: {module}'s factors have rank {a.shape[0]}, the record says "
                                           f"{m['rank']}; {HINT}")
                measured = float(((delta.double() - bf @ a).norm() / norm)) if norm else 0.0
                bound = 2 * (max(delta.shape) + 2) * eps32
                if abs(measured - m["rel_error"]) > bound:
                    raise ShadowMergeError(f"{folder}: {module}'s factors miss the update of the inputs by "
                                           f"{measured:.6g} (relative), the record says {m['rel_error']:.6g}; they are "
                                           f"not its rank-{m['rank']} truncation: the adapter or an input changed "
                                           f"since the run: extract again")
                bar.update(t.tensors[name].nbytes)
                done += 1
            for o in others:
                name = o["tensor"]
                key = next((k for k in stored if k.endswith("." + name) or k == f"base_model.model.{name}"), None)
                if key is None:
                    continue          # renamed on load (names.disk_to_memory): its header was checked
                have = adapter.get_tensor(key)
                full = _whole(t, name) if inst is None else _whole(inst, name) + (_whole(t, name) - as_trained(b, t, name))
                if not torch.equal(full.to(have.dtype), have):
                    raise ShadowMergeError(f"{folder}: the full copy {name} differs from its recomputation from the "
                                           f"inputs; the adapter or an input changed since the run: extract again")
                done += 1
    finally:
        for c in ckpts.values():
            c.close()
    return done


def _whole(ckpt, name: str) -> torch.Tensor:
    info = ckpt.tensors[name]
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    ckpt.read_into(info, 0, info.numel, raw)
    return raw.view(info.dtype).reshape(info.shape).float()


def verify(out: str | Path, *, recompute: bool = False, sample: int | None = None, device: str = "cpu",
           progress: bool = True) -> VerifySummary:
    """Check an output folder against its run record; raise ShadowMergeError naming the first thing that differs."""
    folder = Path(out).expanduser()
    if not folder.is_dir():
        raise ShadowMergeError(f"{out} is not a folder; pass the output folder of a shadowmerge command")
    if sample is not None and sample < 1:
        raise ShadowMergeError("--sample must be at least 1; pass e.g. --sample 20")
    if sample is not None and not recompute:
        raise ShadowMergeError("--sample goes with --recompute (it picks the tensors to recompute); add "
                               "--recompute, or leave --sample out")
    dev = parse_device(device)
    found = read(folder)
    name, record = found.file, found.data
    manifest = _manifest(folder, name, record)
    with progress_bar(sum(e["size"] for e in manifest.values()), progress, "verify") as bar:
        files, tensors = check_files(folder, name, manifest, bar.update)
    recomputed = 0
    if recompute and found.command == "extract":
        recomputed = _recompute_extract(folder, record, sample, progress)
    elif recompute:
        targets = []
        if found.command == "graft":
            targets.append((folder, record))
        elif isinstance(record.get("recompute"), dict):           # mergekit's shadow_graft
            targets.append((folder, record["recompute"]))
        else:                                                      # train: its graft outputs
            for sub in sorted(p for p in folder.iterdir() if (p / RECORD).is_file()):
                rec = read(sub, (RECORD,))
                if rec.command == "graft":
                    targets.append((sub, rec.data))
        if not targets:
            raise ShadowMergeError(f"{folder}: nothing to recompute ({record.get('tool', 'this output')} names no "
                                   f"graft inputs), and its sha256 and headers match the record; run verify "
                                   f"without --recompute")
        for sub, rec in targets:
            recomputed += _recompute(sub, rec, sample, dev, progress)
    return VerifySummary(folder, files, tensors, recomputed)
