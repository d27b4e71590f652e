"""A PEFT LoRA adapter folder, read lazily: its config checked, every key sorted into a module.

adapter_config.json gives each module's scale (lora_alpha / r, or / sqrt(r) with rsLoRA, with
per-module rank_pattern / alpha_pattern); adapter_model.safetensors holds lora_A / lora_B (or
lora_embedding_A / _B), lora_B biases, DoRA magnitudes, full copies of modules_to_save and, for
embeddings, a copy of the Base's own weight. A key that fits none of these, or an option that
shadowmerge cannot merge exactly, is refused by name before any tensor is read.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import jsonfile
from ..transports import hub
from ..checkpoint import TensorInfo, TensorStore
from ..errors import ShadowMergeError
from ..patterns import Matcher
from ..transports import Transport, resolve

CONFIG = "adapter_config.json"
SAVE = "re-save the adapter with peft's save_pretrained"      # the next step for an adapter that is not what peft saves
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."

_PART = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                   r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$")
_WRAPPERS = re.compile(r"\.modules_to_save\.[^.]+(?=\.)|\.original_module(?=\.)")

# Options whose merge is not W + scale * B @ A: refused by name.
_VARIANTS = {
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "megatron_config": "Megatron-parallel LoRA (megatron_config)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
# Initialisations that also rewrite the base weights, so the adapter alone is not the update.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_PEFT_NAMES = {"LOHA": "LoHa", "LOKR": "LoKr", "IA3": "IA3", "ADALORA": "AdaLoRA", "OFT": "OFT", "BOFT": "BOFT",
               "VERA": "VeRA", "FOURIERFT": "FourierFT", "HRA": "HRA", "VBLORA": "VB-LoRA", "BONE": "Bone",
               "PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning", "P_TUNING": "p-tuning"}
_QUANTIZED_NAME = re.compile(r"(?i)(bnb|[48]bit|gptq|awq|nf4|int[48]|hqq|eetq|aqlm|quanto)")


@dataclass
class LoraModule:
    """One adapted module: W += scale * B @ A (transposed for embeddings and fan_in_fan_out)."""

    name: str                               # module path in the model, e.g. model.layers.0.self_attn.q_proj
    A: TensorInfo | None = None
    B: TensorInfo | None = None
    bias: TensorInfo | None = None          # lora_B.bias (lora_bias=True)
    magnitude: TensorInfo | None = None     # DoRA's m
    embedding: bool = False
    fan_in_fan_out: bool = False
    scale: float = 0.0
    rank: int = 0
    keys: list[str] = field(default_factory=list)
    # LoRA on a parameter (peft's target_parameters): which one is decided against the model (source.py);
    # for one expert of a fused 3-D parameter, B's rank columns for expert e of E are e, e + E, e + 2E, ...
    on_parameter: bool = False
    expert: tuple[int, int] | None = None   # (e, E)

    @property
    def transposed(self) -> bool:
        """The stored weight is (in, out): rows of the update come from columns of A."""
        return self.embedding or self.fan_in_fan_out

    @property
    def shape(self) -> tuple[int, int]:
        out_dim, in_dim = self.B.shape[0], self.A.shape[1]
        return (in_dim, out_dim) if self.transposed else (out_dim, in_dim)


class Adapter(TensorStore):
    """A PEFT LoRA adapter folder. Use `Adapter.open(ref)`."""

    def __init__(self, where: "Path | Transport", ref: str, allow_pickle: bool = False):
        super().__init__(where, "adapter", ref)
        self._patterns = Matcher(f"--lora {ref}: {CONFIG}")
        with self.evicting_metadata():
            self.config = self._read_config()
            self._check_config()
            self.tensors = self._scan(allow_pickle)
        self.modules: dict[str, LoraModule] = {}
        self.saved: dict[str, TensorInfo] = {}          # full tensors trained on the Base (modules_to_save, bias)
        self.base_copies: dict[str, TensorInfo] = {}    # the Base's own weights saved alongside (not an update)
        self._sort_keys()

    @classmethod
    def open(cls, ref: str | Path, allow_pickle: bool = False, stream: bool = False) -> "Adapter":
        return cls(resolve(ref, allow_pickle, stream), str(ref), allow_pickle)

    # --- config ---------------------------------------------------------------------------
    def _read_config(self) -> dict:
        path = self.folder / CONFIG
        if not os.path.lexists(path):
            hint = "; it looks like a full model: pass it as --tuned" if (self.folder / "config.json").is_file() else ""
            raise ShadowMergeError(f"--lora {self.ref}: no {CONFIG}; pass a PEFT adapter folder "
                                   f"(saved with save_pretrained){hint}")
        return jsonfile.load(path, "--lora", hint="pass a PEFT adapter folder saved with save_pretrained")

    def _check_config(self) -> None:
        cfg, ref = self.config, self.ref
        where, hint = f"--lora {ref}: {CONFIG}", "the adapter config is damaged or not peft's"
        expect = jsonfile.expect
        kind = str(expect(cfg.get("peft_type", "LORA"), str, f"{where} peft_type", hint)).upper()
        if kind != "LORA":
            name = _PEFT_NAMES.get(kind, kind[:40])
            raise ShadowMergeError(
                f"--lora {ref} is a {name} adapter; shadowmerge merges LoRA adapters only. Merge it into the Base "
                f"with peft (merge_and_unload), save that, and graft it with --base/--tuned")
        for key, label in _VARIANTS.items():
            if cfg.get(key):
                raise ShadowMergeError(f"--lora {ref} uses {label}, which shadowmerge does not merge; merge it into "
                                       f"the Base with peft, save that, and graft it with --base/--tuned")
        init = expect(cfg.get("init_lora_weights", True), (bool, str), f"{where} init_lora_weights", hint)
        if (isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS)) or cfg.get("loftq_config"):
            label = init if isinstance(init, str) else "loftq"
            raise ShadowMergeError(
                f"--lora {ref} was initialised with {label[:40]}, which also changes the base weights it trains "
                f"against, so the adapter alone is not the update; convert it to a plain LoRA with peft "
                f"(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and pass that")
        _positive(cfg.get("r"), f"{where} r", integer=True)
        _positive(cfg.get("lora_alpha"), f"{where} lora_alpha")
        for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
            expect(cfg.get(key), (bool, type(None)), f"{where} {key}", hint)
        expect(cfg.get("bias", "none"), (str, type(None)), f"{where} bias", hint)
        expect(cfg.get("base_model_name_or_path"), (str, type(None)), f"{where} base_model_name_or_path", hint)
        for key in ("modules_to_save", "target_parameters"):
            for item in expect(cfg.get(key) or [], list, f"{where} {key}", hint):
                expect(item, str, f"{where} an entry of {key}", hint)
        for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
            for pattern, value in expect(cfg.get(key) or {}, dict, f"{where} {key}", hint).items():
                _positive(value, f"{where} {key}[{pattern[:60]!r}]", integer=integer)
                self._patterns.compile(rf"(.*\.)?({pattern})$", f"{key} key {pattern[:60]!r}")

    @property
    def dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def trained_on(self) -> str | None:
        """The model the adapter was trained on. A retargeted adapter's record keeps it, an extracted one's
        record names the Base it came from (their configs name the Instruct they are meant for); otherwise
        base_model_name_or_path."""
        from ..record import FILES, read

        for command, key in (("lora retarget", ("trained_on",)), ("extract", ("inputs", "base"))):
            try:
                found = read(self.folder, (FILES[command],))
            except ShadowMergeError:
                continue
            if found.command == command:
                data = found.data
                for k in key:
                    data = data.get(k) if isinstance(data, dict) else None
                return data if isinstance(data, str) else None
        return self.base_model

    def refuse_own_base(self, store, hint: str) -> None:
        """--instruct `store` is the model the adapter was trained on: one line, ending in `hint` (what to do)."""
        if _names(self.trained_on, store):
            raise ShadowMergeError(f"--instruct {store.ref} is the model the adapter was trained on (its "
                                   f"base_model_name_or_path); {hint}")

    def made_for(self, store) -> bool:
        """Does the adapter's config name `store` as the model it applies to (base_model_name_or_path)?"""
        return _names(self.base_model, store)

    def needs_base(self) -> list[str]:
        """Why this adapter cannot be merged without the Base weights (empty: it can)."""
        why = []
        if self.dora:
            why.append("uses DoRA (its update depends on the Base weights it normalises)")
        if self.saved:
            names = sorted({n.rsplit(".", 1)[0] for n in self.saved})
            why.append(f"holds full Base-trained copies of {', '.join(names[:3])}"
                       f"{', ...' if len(names) > 3 else ''} (modules_to_save / bias), whose update is copy - Base")
        return why

    def quantized_hint(self) -> str | None:
        name = self.base_model or ""
        return name if _QUANTIZED_NAME.search(name) else None

    def describe(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        opts = [o for o, on in (("rsLoRA", self.config.get("use_rslora")), ("DoRA", self.dora),
                                ("fan_in_fan_out", self.config.get("fan_in_fan_out")),
                                ("lora_bias", self.config.get("lora_bias")),
                                ("embedding", any(m.embedding for m in self.modules.values())),
                                ("modules_to_save", self.saved)) if on]
        rank = "/".join(map(str, ranks)) or "-"
        return (f"{self.ref}  ({len(self.modules)} modules, rank {rank}, lora_alpha {self.config['lora_alpha']:g}"
                f"{', ' + ', '.join(opts) if opts else ''})")

    # --- weights --------------------------------------------------------------------------
    def _scan(self, allow_pickle: bool) -> dict[str, TensorInfo]:
        if self._has(WEIGHTS):
            return self._scan_safetensors([self.folder / WEIGHTS])
        if self._has(PICKLE):
            if not allow_pickle:
                raise ShadowMergeError(f"--lora {self.folder}: only pickle weights ({PICKLE}); pass --allow-pickle to "
                                       f"load them with torch.load(weights_only=True), or re-save as safetensors")
            return self._scan_pickles([self.folder / PICKLE])
        raise ShadowMergeError(f"--lora {self.folder}: no {WEIGHTS}; pass a PEFT adapter folder")

    def _sort_keys(self) -> None:
        cfg = self.config
        others: dict[str, TensorInfo] = {}
        for key, info in self.tensors.items():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = _PART.match(name)
            if m is None:
                others[_WRAPPERS.sub("", name)] = info
                continue
            mod = self.modules.setdefault(m["module"], LoraModule(m["module"]))
            mod.keys.append(key)
            part, param = m["part"], m["param"]
            if part == "lora_magnitude_vector":
                mod.magnitude = info
            elif part in ("lora_embedding_A", "lora_embedding_B"):
                mod.embedding = True
                setattr(mod, part[-1], info)
            elif param == "bias":
                if part != "lora_B":
                    raise ShadowMergeError(f"--lora {self.ref}: unexpected key {key}; only lora_B has a bias: {SAVE}")
                mod.bias = info
            else:
                setattr(mod, part[-1], info)
        for name, info in others.items():
            module, _, param = name.rpartition(".")
            if module.endswith(".base_layer") and module[: -len(".base_layer")] in self.modules:
                owner = module[: -len(".base_layer")]
                if param == "weight":
                    self.base_copies[f"{owner}.weight"] = info
                    continue
                name = f"{owner}.{param}"
            if not self._trainable(name):
                raise ShadowMergeError(
                    f"--lora {self.ref}: key {name!r} is neither a LoRA tensor nor in modules_to_save/bias; "
                    f"the adapter was not saved by peft's LoRA, or its {CONFIG} does not match its weights: {SAVE}")
            self.saved[name] = info
        for mod in self.modules.values():
            self._finish(mod, cfg)

    def _trainable(self, name: str) -> bool:
        """peft's rule for modules_to_save: the module path ends with one of the names (plain names, not patterns)."""
        module, _, param = name.rpartition(".")
        if param == "bias" and self.config.get("bias") in ("all", "lora_only"):
            return True
        return any(module == t or module.endswith("." + t) for t in self.config.get("modules_to_save") or [])

    def _finish(self, mod: LoraModule, cfg: dict) -> None:
        where = f"--lora {self.ref}: module {mod.name}"
        if mod.A is None or mod.B is None:
            have = "lora_A" if mod.A is not None else "lora_B" if mod.B is not None else "only a magnitude/bias"
            raise ShadowMergeError(f"{where} has {have} but not both lora_A and lora_B; the adapter is incomplete: "
                                   f"{SAVE}, or download it again")
        if len(mod.A.shape) != 2 or len(mod.B.shape) != 2:
            raise ShadowMergeError(f"{where}: LoRA on a convolution or a {len(mod.A.shape)}-D weight is not "
                                   f"supported (only linear and embedding layers); merge it with peft's "
                                   f"merge_and_unload into the Base, then pass that as --tuned")
        for info in (mod.A, mod.B, mod.bias, mod.magnitude):
            if info is not None and not info.dtype.is_floating_point:
                raise ShadowMergeError(f"{where}: {info.name} is {info.dtype}; a quantized adapter cannot be "
                                       f"merged exactly: save the adapter in float32/bfloat16")
        rank = mod.A.shape[0]
        if mod.B.shape[1] != rank:
            raise ShadowMergeError(f"{where}: lora_A has rank {rank} but lora_B has {mod.B.shape[1]} columns; "
                                   f"the factors do not belong together: {SAVE}, or download it again")
        if cfg.get("target_parameters") and (".base_layer" in mod.name or mod.embedding is False and
                                             rank != self._pattern("rank_pattern", mod.name, cfg["r"])):
            mod.on_parameter = True      # rank x experts rows: checked with the parameter (source.py)
            return
        r = self._pattern("rank_pattern", mod.name, cfg["r"])
        alpha = self._pattern("alpha_pattern", mod.name, cfg["lora_alpha"])
        if r != rank:
            raise ShadowMergeError(f"{where}: {CONFIG} says r={r} but lora_A has rank {rank}; the config does not "
                                   f"belong to these weights: fix r (or rank_pattern), or {SAVE}")
        mod.rank = rank
        mod.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        mod.fan_in_fan_out = bool(cfg.get("fan_in_fan_out")) and not mod.embedding
        out_dim = mod.shape[1] if mod.transposed else mod.shape[0]
        for info, what in ((mod.bias, "lora_B bias"), (mod.magnitude, "DoRA magnitude")):
            if info is not None and tuple(info.shape) != (out_dim,):
                raise ShadowMergeError(f"{where}: {what} has shape {list(info.shape)}, expected [{out_dim}]; {SAVE}")
        if cfg.get("use_dora") and mod.magnitude is None:
            raise ShadowMergeError(f"{where}: {CONFIG} says use_dora but there is no lora_magnitude_vector; {SAVE}, "
                                   f"or set use_dora to false if it was trained without DoRA")


    def parameter_scale(self, mod: LoraModule, param: str, experts: int) -> None:
        """Rank and scale of a LoRA on the parameter `param` (its full name) of `experts` stacked experts."""
        cfg, where = self.config, f"--lora {self.ref}: parameter {param}"
        if mod.bias is not None or mod.magnitude is not None or mod.embedding:
            raise ShadowMergeError(f"{where} has a lora_B bias, DoRA magnitude or embedding factors, which peft "
                                   f"does not make for a parameter; the adapter is not peft's: {SAVE}")
        r = self._pattern("rank_pattern", param, cfg["r"])
        alpha = self._pattern("alpha_pattern", param, cfg["lora_alpha"])
        if mod.A.shape[0] != r * experts or mod.B.shape[1] != r * experts:
            raise ShadowMergeError(f"{where}: {CONFIG} says r={r} for {experts} expert(s), so lora_A should have "
                                   f"{r * experts} rows, but it has {mod.A.shape[0]}; the config does not belong to "
                                   f"these weights: fix r (or rank_pattern), or {SAVE}")
        mod.rank = r
        mod.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def _pattern(self, key: str, module: str, default):
        """peft's get_pattern_key: the first key that matches the end of the module path, else the default."""
        for pattern, value in (self.config.get(key) or {}).items():
            if self._patterns.match(rf"(.*\.)?({pattern})$", module, f"{key} key {pattern[:60]!r}"):
                return value
        return default


def _names(name: str | None, store) -> bool:
    """Does a config's model name (a Hub id or a path) name `store`, an opened model?"""
    if not name:
        return False
    if name in (str(store.ref), hub.reference(store)[0]):
        return True
    try:                        # a stranger's config: a name with a NUL byte, or too long, names nothing here
        path = Path(name).expanduser()
        return store.transport.commit is None and path.is_dir() and path.resolve() == Path(store.folder).resolve()
    except (OSError, ValueError, RuntimeError):
        return False


def _positive(value, what: str, integer: bool = False) -> None:
    """A finite positive number (an integer where integer=True), else a one-line error."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok and integer:
        ok = isinstance(value, int) or float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a finite positive number"
        raise ShadowMergeError(f"{what} is {str(value)[:40]}; it must be {kind}: fix it there")
