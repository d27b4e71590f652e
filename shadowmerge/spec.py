"""GraftSpec: everything one graft is asked to do, in one frozen value (and ExtractSpec, an extraction's).

`shadowmerge graft` builds it from its options (the options themselves are generated from the fields
below: a field's `cli` metadata is its flag and help), `pipeline.graft()` takes it (or builds it from
keywords), the run record stores it as it is (`"spec"`), and `verify --recompute` rebuilds it from there.
So a new graft setting is a new field here plus the code that uses it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .options import FORCE_HELP, option as _option

SPEC_VERSION = 1


def _one_or_many(value):
    """--tuned / --lora as given: nothing -> None, one -> its text, several -> a tuple of texts (a record's list too)."""
    if value is None or isinstance(value, (str, Path)):
        return None if value is None else str(value)
    items = tuple(str(v) for v in value)
    return None if not items else items[0] if len(items) == 1 else items


@dataclass(frozen=True)
class GraftSpec:
    """A graft: OUT = INSTRUCT + ALPHA * delta, the delta from TUNED - BASE or from a LoRA adapter."""

    instruct: str = field(metadata=_option("--instruct", "Instruct model: local folder or Hub id.", required=True,
                                           metavar="MODEL"))
    base: str | None = field(default=None, metadata=_option(
        "--base", "Base model that was fine-tuned: local folder or Hub id.", metavar="MODEL"))
    tuned: str | tuple[str, ...] | None = field(default=None, metadata=_option(
        "--tuned", "The fine-tuned Base (full fine-tune): local folder or Hub id. Repeat it (and --lora) to graft "
                   "several updates at once (--combine).", metavar="MODEL", multiple=True, convert=_one_or_many))
    lora: str | tuple[str, ...] | None = field(default=None, metadata=_option(
        "--lora", "A PEFT LoRA adapter trained on the Base (DoRA and modules_to_save also need --base); "
                  "repeatable, and may go with --tuned.", metavar="ADAPTER", multiple=True, convert=_one_or_many))
    out: str | None = field(default=None, metadata=_option(
        "--out", "Output folder (written beside, then renamed into place).", metavar="DIR"))
    alpha: float = field(default=1.0, metadata=_option("--alpha", "Scale of the grafted update.", type=float,
                                                       show_default=True))
    weights: str | None = field(default=None, metadata=_option(
        "--weights", "Several updates: one weight each, in order (the --tuned ones, then the --lora ones) "
                     "[default: 1 each].", metavar="W1,W2,..."))
    combine: str = field(default="sum", metadata=_option(
        "--combine", "How several updates are combined: sum (Σ w·Δ), ties (trim to --density by magnitude, elect "
                     "signs, disjoint mean), dare_ties / dare_linear (random drop to --density, rescaled; seeded).",
        choices=("sum", "ties", "dare_ties", "dare_linear"), show_default=True))
    density: float | None = field(default=None, metadata=_option(
        "--density", "ties/dare: the share of each update kept, in (0, 1].", type=float))
    seed: int = field(default=0, metadata=_option("--seed", "dare: the seed of the drop (recorded; the same on every "
                                                            "device and thread count).", type=int, show_default=True))
    include: str | None = field(default=None, metadata=_option(
        "--include", "Graft only tensors whose name matches (re.search).", metavar="REGEX"))
    exclude: str | None = field(default=None, metadata=_option(
        "--exclude", "Never graft tensors whose name matches; copy them from Instruct.", metavar="REGEX"))
    dtype: str | None = field(default=None, metadata=_option(
        "--dtype", "Output dtype of floating tensors [default: each Instruct tensor's dtype; an FP8 Instruct's FP8 "
                   "weights: bfloat16]. fp8: the FP8 Instruct's own block format (same grid and scales; a block "
                   "without update keeps its bytes).", choices=("bfloat16", "float16", "float32", "fp8")))
    shard_size: str | int = field(default="5GB", metadata=_option(
        "--shard-size", "Maximum shard size (5GB, 500MB, 2GiB).", show_default=True))
    device: str = field(default="cpu", metadata=_option(
        "--device", "Where the arithmetic runs: cpu, cuda, cuda:N.", show_default=True))
    vocab: str = field(default="error", metadata=_option(
        "--vocab", "If embedding row counts differ: refuse, or graft the common rows and keep the Instruct's rest.",
        choices=("error", "common"), show_default=True))
    force: bool = field(default=False, metadata=_option("--force", FORCE_HELP, is_flag=True))
    dry_run: bool = field(default=False, metadata=_option(
        "--dry-run", "Print the plan from the headers; read no tensor data, write nothing.", is_flag=True))
    profile: bool = field(default=False, metadata=_option(
        "--profile", "Print where the time went: each stage's seconds (read, convert, arithmetic, cast, write, hash, "
                     "fsync, ...); shadowmerge.json keeps the same timeline either way.", is_flag=True))
    allow_pickle: bool = field(default=False, metadata=_option(
        "--allow-pickle", "Allow .bin weights (loaded with torch.load(weights_only=True)).", is_flag=True))
    stream: bool = field(default=False, metadata=_option(
        "--stream", "Read Hub inputs by HTTP range, each byte once and checked against the Hub's sha256, instead of "
                    "downloading them (s3://, gs://, az:// and hf:// inputs are always read so).", is_flag=True))
    allow_nonfinite: bool = field(default=False, metadata=_option(
        "--allow-nonfinite", "Write NaN/Inf results with a warning instead of failing.", is_flag=True))
    check_roles: bool = field(default=True, metadata=_option(
        "--no-role-check", "Graft even when --instruct, --base and --tuned look exchanged (checked on a sample of "
                           "tensors), or one model is given in two roles, or --instruct is the model a --lora adapter "
                           "was trained on; for deliberate experiments.", is_flag=True, invert=True))
    progress: bool = field(default=True, metadata=_option("-q/--quiet", "No progress bar.", is_flag=True,
                                                          invert=True))
    command: str | None = None        # the command line, for the model card (the CLI fills it in)

    def __post_init__(self):
        """Paths as text and the dtype by its canonical name; the inputs must make one delta."""
        import math

        from .errors import ShadowMergeError
        from .tensors import dtype_name, parse_dtype

        for name in ("tuned", "lora"):                 # one reference, several (a tuple), or none
            object.__setattr__(self, name, _one_or_many(getattr(self, name)))
        if self.tuned is not None and self.base is None:
            raise ShadowMergeError("a graft needs --base (the model that was tuned) and --tuned (its fine-tuned "
                                   "copy), or --lora (an adapter trained on it); pass one of them")
        if self.lora is None and (self.base is None or self.tuned is None):
            raise ShadowMergeError("a graft needs --base (the model that was tuned) and --tuned (its fine-tuned "
                                   "copy), or --lora (an adapter trained on the Base); pass one of them")
        if isinstance(self.alpha, (int, float)) and not math.isfinite(self.alpha):
            raise ShadowMergeError(f"--alpha must be a finite number, not {self.alpha}; pass e.g. --alpha 1")
        for name in ("instruct", "base", "tuned", "lora", "out"):
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))
        if self.dtype != "fp8":           # fp8: the Instruct's stored format, not one dtype (plan.build_plan)
            object.__setattr__(self, "dtype", dtype_name(parse_dtype(self.dtype)))

    # --- the run record ----------------------------------------------------------------------------
    def as_record(self) -> dict:
        return {"version": SPEC_VERSION, **asdict(self)}

    @classmethod
    def from_record(cls, data: dict, **overrides) -> "GraftSpec":
        """The spec a record stored (fields this version does not know are an error: a newer shadowmerge wrote it)."""
        from .errors import ShadowMergeError

        from . import jsonfile

        known = {f.name: f.type for f in fields(cls)}
        values = {k: v for k, v in data.items() if k != "version"}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ShadowMergeError(f"the record's graft spec has setting(s) {', '.join(unknown)[:120]} that this "
                                   f"shadowmerge does not know (a newer version wrote it); upgrade shadowmerge")
        for name, value in values.items():          # a record may come from a stranger: its types are checked
            jsonfile.expect(value, _JSON_TYPES[str(known[name])], f"the record's graft spec: {name}",
                            "re-run the graft that made it")
        if "instruct" not in values and "instruct" not in overrides:
            raise ShadowMergeError("the record's graft spec names no instruct; re-run the graft that made it")
        return replace(cls(**{"instruct": overrides.get("instruct"), **values}), **overrides)

    @classmethod
    def from_legacy_record(cls, rec: dict, **overrides) -> "GraftSpec":
        """The spec of a record written before specs were recorded (its flat alpha/include/exclude/dtype/... keys)."""
        dtype = rec.get("dtype")
        return cls(instruct=overrides.pop("instruct"), alpha=float(rec.get("alpha", 1.0)), include=rec.get("include"),
                   exclude=rec.get("exclude"), dtype=None if dtype == "as the instruct" else dtype,
                   vocab=rec.get("vocab", "error"), allow_pickle=bool(rec.get("allow_pickle")), **overrides)


_JSON_TYPES = {"str": (str,), "str | None": (str, type(None)), "float": (int, float), "bool": (bool,),
               "str | int": (str, int), "str | tuple[str, ...] | None": (str, list, tuple, type(None)),
               "float | None": (int, float, type(None)), "int": (int,)}


@dataclass(frozen=True)
class ExtractSpec:
    """An extraction: the update TUNED - BASE as a LoRA adapter at OUT (`shadowmerge extract`'s options are these
    fields; extract.py takes it; extract.json records its settings)."""

    base: str = field(metadata=_option("--base", "The Base the full fine-tune started from.", required=True,
                                       metavar="MODEL"))
    tuned: str = field(metadata=_option("--tuned", "The full fine-tune of that Base.", required=True,
                                        metavar="MODEL"))
    out: str = field(metadata=_option("--out", "The adapter folder to write.", required=True, metavar="DIR"))
    rank: int | None = field(default=None, metadata=_option(
        "--rank", "LoRA rank of every module (give this or --energy).", type=int))
    energy: float | None = field(default=None, metadata=_option(
        "--energy", "Per module, the smallest rank keeping this share of Σ s² (e.g. 0.99).", type=float))
    max_rank: int = field(default=256, metadata=_option(
        "--max-rank", "With --energy: the largest rank.", type=int, show_default=True))
    for_instruct: str | None = field(default=None, metadata=_option(
        "--for-instruct", "Write the adapter for this Instruct (its base_model_name_or_path; full copies are the "
                          "Instruct's plus the update).", metavar="MODEL"))
    others: str = field(default="drop", metadata=_option(
        "--others", "Changed embeddings, head and norms: dropped, or kept as peft modules_to_save full copies.",
        choices=("drop", "copy"), show_default=True))
    dtype: str | None = field(default=None, metadata=_option(
        "--dtype", "dtype of the adapter's tensors; bfloat16 halves the file, and the recorded error is then that "
                   "of the stored factors [default: float32 factors, full copies in the tuned model's dtype].",
        choices=("bfloat16", "float16", "float32")))
    device: str = field(default="cpu", metadata=_option(
        "--device", "Where the SVDs run: cpu, cuda, cuda:N.", show_default=True))
    force: bool = field(default=False, metadata=_option("--force", FORCE_HELP, is_flag=True))
    allow_pickle: bool = field(default=False, metadata=_option(
        "--allow-pickle", "Allow .bin weights (loaded with torch.load(weights_only=True)).", is_flag=True))
    check_roles: bool = field(default=True, metadata=_option(
        "--no-role-check", "Extract even when --base and --tuned (and --for-instruct) look exchanged, or are one "
                           "model; for deliberate experiments.", is_flag=True, invert=True))
    progress: bool = field(default=True, metadata=_option("-q/--quiet", "No progress bars.", is_flag=True,
                                                          invert=True))
    command: str | None = None        # the command line, for the model card (the CLI fills it in)

    def __post_init__(self):
        """Paths as text; rank/energy/max-rank/others checked (one line each)."""
        from .errors import ShadowMergeError

        for name in ("base", "tuned", "out", "for_instruct"):
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))
        if (self.rank is None) == (self.energy is None):
            raise ShadowMergeError("give one of --rank R or --energy E (e.g. --energy 0.99)")
        if self.rank is not None and self.rank < 1:
            raise ShadowMergeError(f"--rank must be at least 1, not {self.rank}; pass e.g. --rank 64")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ShadowMergeError(f"--energy is a share of the update's squared singular values in (0, 1], not "
                                   f"{self.energy}")
        if self.max_rank < 1:
            raise ShadowMergeError(f"--max-rank must be at least 1, not {self.max_rank}; pass e.g. --max-rank 256")
        if self.others not in ("drop", "copy"):
            raise ShadowMergeError(f"--others is one of drop, copy, not {self.others!r}; pass one of them")

    def settings(self, out_dtype, device) -> dict:
        """The settings extract.json records (the dtype and device as resolved)."""
        from .tensors import dtype_name

        return {"rank": self.rank, "energy": self.energy, "max_rank": self.max_rank, "others": self.others,
                "dtype": dtype_name(out_dtype), "device": str(device)}
