"""GraftSpec: everything one graft is asked to do, in one frozen value.

`shadowmerge graft` builds it from its options (the options themselves are generated from the fields
below: a field's `cli` metadata is its flag and help), `pipeline.graft()` takes it (or builds it from
keywords), the run record stores it as it is (`"spec"`), and `verify --recompute` rebuilds it from there.
So a new graft setting is a new field here plus the code that uses it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

SPEC_VERSION = 1
FORCE_HELP = "Replace --out if it exists and shadowmerge wrote it (a user's own folder is never replaced)."


def _option(flag: str, help: str, **click) -> dict:
    return {"cli": dict(flag=flag, help=help, **click)}


@dataclass(frozen=True)
class GraftSpec:
    """A graft: OUT = INSTRUCT + ALPHA * delta, the delta from TUNED - BASE or from a LoRA adapter."""

    instruct: str = field(metadata=_option("--instruct", "Instruct model: local folder or Hub id.", required=True,
                                           metavar="MODEL"))
    base: str | None = field(default=None, metadata=_option(
        "--base", "Base model that was fine-tuned: local folder or Hub id.", metavar="MODEL"))
    tuned: str | None = field(default=None, metadata=_option(
        "--tuned", "The fine-tuned Base (full fine-tune): local folder or Hub id.", metavar="MODEL"))
    lora: str | None = field(default=None, metadata=_option(
        "--lora", "A PEFT LoRA adapter trained on the Base, instead of --tuned (DoRA and modules_to_save also need "
                  "--base).", metavar="ADAPTER"))
    out: str | None = field(default=None, metadata=_option(
        "--out", "Output folder (written beside, then renamed into place).", metavar="DIR"))
    alpha: float = field(default=1.0, metadata=_option("--alpha", "Scale of the grafted update.", type=float,
                                                       show_default=True))
    include: str | None = field(default=None, metadata=_option(
        "--include", "Graft only tensors whose name matches (re.search).", metavar="REGEX"))
    exclude: str | None = field(default=None, metadata=_option(
        "--exclude", "Never graft tensors whose name matches; copy them from Instruct.", metavar="REGEX"))
    dtype: str | None = field(default=None, metadata=_option(
        "--dtype", "Output dtype of floating tensors [default: each Instruct tensor's dtype].",
        choices=("bfloat16", "float16", "float32")))
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
    allow_pickle: bool = field(default=False, metadata=_option(
        "--allow-pickle", "Allow .bin weights (loaded with torch.load(weights_only=True)).", is_flag=True))
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

        if self.lora is not None and self.tuned is not None:
            raise ShadowMergeError("pass either --tuned (a full fine-tune of the Base) or --lora (an adapter trained "
                                   "on it), not both")
        if self.lora is None and (self.base is None or self.tuned is None):
            raise ShadowMergeError("a graft needs --base (the model that was tuned) and --tuned (its fine-tuned "
                                   "copy), or --lora (an adapter trained on the Base); pass one of them")
        if isinstance(self.alpha, (int, float)) and not math.isfinite(self.alpha):
            raise ShadowMergeError(f"--alpha must be a finite number, not {self.alpha}; pass e.g. --alpha 1")
        for name in ("instruct", "base", "tuned", "lora", "out"):
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))
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
               "str | int": (str, int)}


def cli_options(spec_class):
    """A decorator adding one click option per field of spec_class that has `cli` metadata, in field order."""
    import click

    def decorate(command):
        for f in reversed(fields(spec_class)):
            cli = dict(f.metadata.get("cli") or {})
            if not cli:
                continue
            flag, invert, choices = cli.pop("flag"), cli.pop("invert", False), cli.pop("choices", None)
            if choices:
                cli["type"] = click.Choice(list(choices))
            if not cli.get("is_flag") and f.default is not None:
                cli["default"] = f.default
            name = f"_not_{f.name}" if invert else f.name       # --no-role-check / --quiet set their field False
            command = click.option(*flag.split("/"), name, **cli)(command)
        return command
    return decorate


def from_cli(spec_class, options: dict, **extra):
    """The spec from the options cli_options added (an inverted flag, e.g. --no-role-check, sets its field False)."""
    values = dict(extra)
    for f in fields(spec_class):
        if f"_not_{f.name}" in options:
            values[f.name] = not options[f"_not_{f.name}"]
        elif f.name in options:
            values[f.name] = options[f.name]
    return spec_class(**values)
