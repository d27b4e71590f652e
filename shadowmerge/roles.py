"""Are --instruct, --base and --tuned in the roles they were given? A cheap check; a refusal leaves no output.

Swapped inputs give a wrong model with exit 0 (with --base and --tuned exchanged the update is silently
negated), so the roles are checked from a sample of tensors (up to SAMPLE_TENSORS grafted tensors of
equal shape in all three, SAMPLE_ELEMENTS elements each, float64 sums) by the geometry of Shadow-FT:

- the update is the shortest side of the triangle Instruct / Base / tuned: the tuned model is closer to
  the Base than to the Instruct, and the update no larger than the Base-Instruct gap (a clear swap
  with the Instruct breaks one of these by a wide margin);
- at the Base, the update and the instruction tuning (I - B) are near orthogonal (two unrelated
  trainings; cos about 0). With Base and tuned exchanged, the "update" points back along the real one and
  cos(update, I - B) becomes |update| / |I - B| - cos: refused when it passes COS_SWAPPED. Where the
  update is small against the Base-Instruct gap that difference is small too, so the folders are asked
  as well: a --base that carries a training run's files (training_args.bin, which Trainer.save_model
  writes; a shadowmerge record; a place inside a `shadowmerge train` output) while --tuned carries none
  looks exchanged with it.

A refusal names the two flags that look exchanged (or says all three look rotated) and the override,
--no-role-check, for a deliberate experiment. Nothing here is a library's job, hence written here.
"""

from __future__ import annotations

import math
from itertools import permutations

import torch

from .errors import ShadowMergeError
from .formats.safetensors import itemsize

SAMPLE_TENSORS = 8
SAMPLE_ELEMENTS = 1 << 20
COS_SWAPPED = 0.3           # cos(update, I - B) above which Base and tuned look exchanged
MARGIN = 1.5                # a side that should be the shortest, found this much longer than another: a clear swap
# what transformers' Trainer.save_model writes beside a model it trained (Hub repos often ship trainer_state.json
# and *_results.json of their own training, and never download .bin side files: those tell nothing here)
TRAINING_FILES = ("training_args.bin",)
OVERRIDE = "if this is a deliberate experiment, pass --no-role-check"
GIVEN = ("instruct", "base", "tuned")
BASE_AND_TUNED_EXCHANGED = ("instruct", "tuned", "base")
BASE_LOOKS_TRAINED = "--base holds a training run's files or record (training_args.bin) and --tuned holds none"


def _samples(ckpts, names):
    """(I, B, T) float64 samples of up to SAMPLE_TENSORS of the named tensors, spread over the model (those of
    two or more dimensions and one shape in all three), one tensor at a time: the check runs beside the graft,
    and its memory adds to the graft's."""
    inst = ckpts[0]
    same = [n for n in names if n in inst.tensors and len(inst.tensors[n].shape) >= 2
            and all(n in c.tensors and tuple(c.tensors[n].shape) == tuple(inst.tensors[n].shape) for c in ckpts[1:])]
    for name in same[::max(1, len(same) // SAMPLE_TENSORS)][:SAMPLE_TENSORS]:
        n = min(inst.tensors[name].numel, SAMPLE_ELEMENTS)
        values = []
        for c in ckpts:
            info = c.tensors[name]
            raw = c.read_into(info, 0, n, torch.empty(n * itemsize(info.dtype), dtype=torch.uint8))
            values.append(raw.view(info.dtype).double())
        yield tuple(values)


def distances(samples) -> tuple[float, float, float] | None:
    """(|B - I|, |T - B|, |T - I|): root of the summed squares over the samples (None: there were none)."""
    s, seen = [0.0, 0.0, 0.0], False
    for i, b, t in samples:
        s[0] += float((b - i).square().sum())
        s[1] += float((t - b).square().sum())
        s[2] += float((t - i).square().sum())
        seen = True
    return tuple(math.sqrt(x) for x in s) if seen else None


def _looks_trained(folder) -> bool:
    """A training run's files, a shadowmerge record, or a model inside a `shadowmerge train` output folder."""
    from .record import is_shadowmerge_output

    return (any((folder / n).is_file() for n in TRAINING_FILES) or is_shadowmerge_output(folder)
            or (folder.parent / "run.json").is_file() and is_shadowmerge_output(folder.parent))


def plausible_roles(d_bi: float, d_tb: float, d_ti: float, trained: dict[str, bool]) -> tuple[str, str, str]:
    """Which given input plays which role: (the given label that is the Instruct, the Base, the tuned model).
    A training run's files decide which input is the tuned model, where one has them; then the update is
    the shortest side; of its two ends the tuned one is the one with a training run's files, else the one
    farther from the Instruct."""
    side = {frozenset(("base", "instruct")): d_bi, frozenset(("tuned", "base")): d_tb,
            frozenset(("tuned", "instruct")): d_ti}
    best = None
    for inst, base, tuned in permutations(GIVEN):
        update, gap, other = (side[frozenset(pair)] for pair in ((tuned, base), (base, inst), (tuned, inst)))
        score = (any(trained.values()) and not trained[tuned], update > min(gap, other),
                 trained[base] and not trained[tuned], gap > other)
        if best is None or score < best[0]:
            best = (score, (inst, base, tuned))
    return best[1]


def check(instruct, base, tuned, names, instruct_flag: str = "--instruct") -> None:
    """Refuse, in one line, inputs whose roles look exchanged (see the module docstring). `names`: the tensors
    the command uses; without an Instruct (extract alone) only the folders can tell Base from tuned."""
    if instruct is None:
        if _looks_trained(base.folder) and not _looks_trained(tuned.folder):
            _refuse(BASE_LOOKS_TRAINED, BASE_AND_TUNED_EXCHANGED, instruct_flag)
        return
    ckpts = (instruct, base, tuned)
    found = distances(_samples(ckpts, names))
    if found is None:
        return
    d_bi, d_tb, d_ti = found
    if d_tb == 0 or d_bi == 0:
        return                      # a zero update, or Base = Instruct: refused elsewhere with their own errors
    why, real = None, None
    cos = (d_tb ** 2 + d_bi ** 2 - d_ti ** 2) / (2 * d_tb * d_bi)
    trained = [_looks_trained(c.folder) for c in ckpts]
    if d_tb > MARGIN * d_ti:
        why = (f"--tuned is {d_tb / d_ti:.1f}x farther from --base than from {instruct_flag} (a fine-tune of the "
               f"Base stays near the Base)")
    elif d_tb > MARGIN * d_bi:
        why = (f"the update --tuned - --base is {d_tb / d_bi:.1f}x the distance between --base and {instruct_flag} "
               f"(a fine-tune's update is smaller than the Base-Instruct gap)")
    elif MARGIN * d_tb < min(d_bi, d_ti) and cos > COS_SWAPPED and not (trained[2] and not trained[1]):
        # a clear Shadow-FT triangle, pointing back (unless the folders say --tuned is the trained one)
        why = (f"the update --tuned - --base points back toward {instruct_flag} (cos {cos:.2f}; a fine-tune's "
               f"update is near orthogonal to the instruction tuning)")
        real = BASE_AND_TUNED_EXCHANGED
    elif trained[1] and not trained[2]:
        why, real = BASE_LOOKS_TRAINED, BASE_AND_TUNED_EXCHANGED
    if why is not None:
        _refuse(why, real or plausible_roles(d_bi, d_tb, d_ti, dict(zip(GIVEN, trained))), instruct_flag)


def _refuse(why: str, real: tuple[str, str, str], instruct_flag: str) -> None:
    """The one-line error: which flags look exchanged (real: the given label that plays each role), and why;
    nothing when the most plausible roles are the ones given (odd distances, no swap)."""
    flags = {"instruct": instruct_flag, "base": "--base", "tuned": "--tuned"}
    moved = [g for g, r in zip(GIVEN, real) if g != r]
    if not moved:
        return                      # odd distances, but the most plausible roles are the ones given
    if len(moved) == 2:
        what = f"{flags[moved[0]]} and {flags[moved[1]]} look exchanged"
    else:
        role_of = dict(zip(real, GIVEN))
        what = ("the three inputs look rotated (" + ", ".join(f"{flags[g]} looks like the {role_of[g]} model"
                                                             for g in GIVEN) + ")")
    raise ShadowMergeError(f"{what}: {why}; nothing was written; pass them in their roles, or {OVERRIDE}")
