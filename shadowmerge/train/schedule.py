"""The optimizer steps and learning rates a recipe really gives on a data set, worked out before training.

transformers' Trainer (under TRL and LLaMA-Factory alike) takes ceil(rows / (batch x processes)) batches
per epoch, ceil(batches / accumulation) optimizer steps per epoch (at least one), ceil(steps x warmup)
warmup steps, and asks its scheduler for each step's learning rate. With the paper's defaults (batch 2 x 16)
a small data set gives one step, which a linear warmup runs at learning rate 0: training that changes
nothing. The same formulas and the same scheduler (transformers' get_scheduler) are used here, so such a
run is adapted (warmup 0, said in a warning) or refused before it starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import ShadowMergeError, first_line

MAX_STEPS_CHECKED = 100_000     # the schedule is walked step by step up to here (a cheap loop)


@dataclass
class Schedule:
    rows: int
    processes: int
    batches_per_epoch: int
    steps: int
    warmup_steps: int
    trained_steps: int          # optimizer steps at a learning rate above 0
    peak_lr: float

    def describe(self) -> str:
        return (f"{self.steps} optimizer step(s) from {self.rows} rows ({self.batches_per_epoch} batch(es) per "
                f"epoch{f' on {self.processes} processes' if self.processes > 1 else ''}), warmup "
                f"{self.warmup_steps} step(s), {self.trained_steps} step(s) at a learning rate above 0, peak "
                f"{self.peak_lr:.3g}")


def processes() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def work_out(r: dict, rows: int, world: int | None = None) -> Schedule:
    """The schedule recipe r gives on `rows` rows (the Trainer's own arithmetic and scheduler)."""
    import torch
    from transformers import get_scheduler

    world = world or processes()
    batches = math.ceil(rows / (r.batch_size * world))
    per_epoch = max(batches // r.grad_accum + int(batches % r.grad_accum > 0), 1)
    steps = r.max_steps or math.ceil(r.epochs * per_epoch)
    warmup = int(r.warmup) if r.warmup >= 1 else math.ceil(steps * r.warmup)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=r.lr)
    try:
        scheduler = get_scheduler(r.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    except Exception as exc:    # noqa: BLE001 - an unknown name, or one that needs settings a recipe has not
        reason = first_line(exc)
        raise ShadowMergeError(f"scheduler {r.scheduler!r}: {reason}; use cosine, linear or constant") from None
    trained, peak = 0, 0.0
    for _ in range(min(steps, MAX_STEPS_CHECKED)):
        lr = scheduler.get_last_lr()[0]
        trained += lr > 0
        peak = max(peak, lr)
        optimizer.step()
        scheduler.step()
    if steps > MAX_STEPS_CHECKED:
        trained += steps - MAX_STEPS_CHECKED          # far past any warmup: counted as training
    return Schedule(rows, world, batches, steps, warmup, trained, peak)


def check(r: dict, rows: int) -> tuple[Schedule, list[str]]:
    """The schedule, with r adapted in place (warmup 0) where every step would run at learning rate 0."""
    sched = work_out(r, rows)
    warnings = []
    if sched.trained_steps == 0 and r.warmup > 0:
        warnings.append(f"the recipe gives {sched.steps} optimizer step(s) on {rows} rows (batch {r.batch_size} x "
                        f"{r.grad_accum} accumulation), and with warmup {r.warmup} every one would run at "
                        f"learning rate 0, training nothing; warmup is set to 0 for this run (more rows or epochs, "
                        f"or a smaller --grad-accum, give a real warmup)")
        r.warmup = 0.0
        sched = work_out(r, rows)
    if sched.trained_steps == 0:
        raise ShadowMergeError(f"the recipe trains nothing on this data: {sched.describe()}; check --lr, --max-steps "
                               f"and the scheduler")
    return sched, warnings
