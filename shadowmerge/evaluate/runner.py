"""The evaluation itself: prepare() checks everything cheap first; run() evaluates one model at a time (loaded
once, for lm_eval's tasks and the held-out loss alike, freed before the next; an α sweep's models grafted one at a
time), writes lm_eval's per-item logs as it goes, and compares each model with the reference item by item."""

from __future__ import annotations

import gc
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .._version import versions
from ..errors import ShadowMergeError, first_line
from ..record import new as new_record
from . import models as modelrefs
from . import stats
from .settings import EvalSettings, Sweep

_EXAMPLES = 3                    # disagreeing items shown per model, task and direction in report.html


@dataclass
class Prepared:
    settings: EvalSettings
    models: list                          # models.Model, in order; the first is the reference
    tasks: object = None                  # harness.Tasks
    heldout: object = None                # heldout.Heldout
    sweep: Sweep | None = None
    sweep_bytes: int = 0

    def close(self) -> None:
        for m in self.models:
            if m.checkpoint is not None:
                m.checkpoint.close()


def _log(text: str) -> None:
    print(f"[shadowmerge eval] {text}", file=sys.stderr, flush=True)


def prepare(models: list[tuple[str, str]], settings: EvalSettings, *, sweep: Sweep | None = None,
            allow_pickle: bool = False, progress: bool = True, open_models: bool = True) -> Prepared:
    """Every check that needs no model evaluated: a bad input fails here, in seconds, before anything is written."""
    from . import harness, heldout

    settings = settings.checked()
    if sweep is not None:
        if not sweep.alphas:
            raise ShadowMergeError("--alpha needs at least one value; pass e.g. --alpha 0.5,1")
        if any(not math.isfinite(a) for a in sweep.alphas) or len(set(sweep.alphas)) != len(sweep.alphas):
            raise ShadowMergeError("--alpha values must be finite numbers, each given once; pass e.g. "
                                   "--alpha 0.5,0.75,1")
        taken = {label for label, _ in models}
        clash = next((sweep.label(a) for a in sweep.alphas if sweep.label(a) in taken), None) or \
            ("instruct" if "instruct" in taken else None)
        if clash:
            raise ShadowMergeError(f"the label {clash!r} is the α sweep's own; give that model another label")
    prepared = Prepared(settings, [], sweep=sweep)
    try:
        if settings.heldout:
            prepared.heldout = heldout.read(settings.heldout)
        if settings.tasks:
            harness.check_backend(settings.backend)
            prepared.tasks = harness.resolve(list(settings.tasks), list(settings.include_path))
            harness.load(prepared.tasks)
        if not open_models:
            return prepared
        if not models and sweep is None:
            raise ShadowMergeError("no models: pass LABEL=PATH_OR_HUB_ID for each model (the first is the "
                                   "reference), or --instruct with --alpha for an α sweep")
        template = settings.apply_chat_template or bool(settings.heldout)
        entries = ([("instruct", sweep.instruct)] if sweep is not None else []) + list(models)
        if len(entries) < 2 and sweep is None:
            raise ShadowMergeError("give at least two models to compare (the first is the reference), e.g. "
                                   "instruct=Qwen/Qwen3-4B shadow=./shadow")
        for label, ref in entries:
            prepared.models.append(modelrefs.open_model(label, ref, template, allow_pickle, progress,
                                                        why="--heldout rows are conversations" if
                                                        not settings.apply_chat_template else None))
        if sweep is not None:
            from ..pipeline import check_roles
            from ..spec import GraftSpec

            plan = check_roles(GraftSpec(sweep.instruct, sweep.base, sweep.tuned, sweep.lora,
                                         allow_pickle=allow_pickle, progress=progress))   # from headers, + a sample
            prepared.sweep_bytes = plan.total_bytes
            at = 1 if prepared.models else 0
            for k, alpha in enumerate(sweep.alphas):
                prepared.models.insert(at + k, modelrefs.Model(sweep.label(alpha), f"I + {alpha:g}·Δ", alpha=alpha))
    except BaseException:
        prepared.close()
        raise
    return prepared


def _answers(res: dict) -> dict:
    """{task: {doc_id: (prompt end, target, answer)}} from lm_eval's per-item records, for report.html."""
    out: dict = {}
    for task, samples in (res.get("samples") or {}).items():
        per = out.setdefault(task, {})
        for s in samples:
            args = s.get("arguments") or []
            prompt = str(args[0][0]) if args and isinstance(args[0], (list, tuple)) and args[0] else ""
            resps, target = s.get("filtered_resps"), s.get("target")
            answer = resps
            try:
                if resps and all(isinstance(r, (list, tuple)) and r and isinstance(r[0], (int, float))
                                 for r in resps):          # multiple choice: (loglikelihood, greedy) per choice
                    best = max(range(len(resps)), key=lambda i: resps[i][0])
                    answer = args[best][1] if best < len(args) and len(args[best]) > 1 else best
                    if str(target).isdigit() and int(target) < len(args):
                        target = args[int(target)][1]
                elif isinstance(resps, (list, tuple)) and len(resps) == 1:
                    answer = resps[0]
            except (TypeError, IndexError, ValueError):
                pass
            per.setdefault(str(s.get("doc_id")), (prompt[-160:], str(target)[:120], str(answer)[:160]))
    return out


def _write_samples(folder: Path, label: str, res: dict) -> list[str]:
    from lm_eval.utils import handle_non_serializable

    names = []
    where = folder / "samples" / label
    where.mkdir(parents=True, exist_ok=True)
    for task, samples in (res.get("samples") or {}).items():
        path = where / f"samples_{modelrefs.label_of(task)}.jsonl"
        with open(path, "w") as f:
            for s in samples:
                f.write(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n")
        names.append(path.relative_to(folder).as_posix())
    return names


def _load_for_loss(folder: Path, settings: EvalSettings):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = "auto" if settings.dtype == "auto" else getattr(torch, settings.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(settings.device).eval()


def _evaluate_one(model, prepared: Prepared, folder: Path | None, progress: bool) -> dict:
    from transformers import AutoTokenizer

    from . import harness, heldout

    settings, out = prepared.settings, {"scores": [], "items": {}, "answers": {}, "losses": None, "samples": []}
    lm = None
    step = "loading it"
    try:
        if prepared.tasks is not None:
            with harness.quiet_libraries(not progress):
                lm = harness.build_model(model.folder, settings)
                step = "running the tasks"
                res = harness.evaluate(lm, prepared.tasks, settings)
            out["scores"] = harness.scores(model.label, res)
            out["items"] = harness.item_values(res)
            out["answers"] = _answers(res)
            if folder is not None:
                out["samples"] = _write_samples(folder, model.label, res)
            del res
        if prepared.heldout is not None:
            step = "computing the held-out loss"
            torch_model = getattr(lm, "model", None) if settings.backend == "hf" and lm is not None else None
            if torch_model is None:
                lm = None
                gc.collect()
                torch_model = _load_for_loss(model.folder, settings)
            tokenizer = AutoTokenizer.from_pretrained(model.folder)
            rows = heldout.tokens(tokenizer, prepared.heldout, settings.heldout_cutoff)
            out["losses"] = heldout.score(torch_model, rows)
            del torch_model
    except (ShadowMergeError, KeyboardInterrupt, MemoryError):
        raise
    except OSError as exc:
        if exc.errno is not None:         # the machine (a full disk, no permission): the CLI says so in one line
            raise
        raise _failed(model, step, exc) from None
    except Exception as exc:              # noqa: BLE001 - a stranger's task or model that lm_eval cannot run
        raise _failed(model, step, exc) from None
    finally:
        del lm
        gc.collect()
        _free_gpu()
    return out


def _failed(model, step: str, exc: BaseException) -> ShadowMergeError:
    why = f"{type(exc).__name__}: {first_line(exc, empty='')}"
    return ShadowMergeError(f"model {model.label}: {step} failed ({why}); check the task "
                            f"files and the model (run `lm_eval run` on it alone to see lm_eval's own report), then "
                            f"run again")


def _free_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(prepared: Prepared, folder: Path | None, *, progress: bool = True, command: str | None = None,
        log=_log) -> tuple[dict, dict]:
    """Evaluate every model (one in memory at a time); per-item logs go into folder/samples/. Returns eval.json's
    contents and the example items for report.html."""
    from ..pipeline import graft

    log = log or _log

    settings, results, described = prepared.settings, {}, {}
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    for k, model in enumerate(prepared.models, 1):
        t = time.perf_counter()
        made = None
        try:
            if model.alpha is not None:
                sweep = prepared.sweep
                if folder is None:
                    raise ShadowMergeError("an α sweep needs an output folder; pass one")
                made = folder / f".model-{model.label}"
                log(f"model {k}/{len(prepared.models)} {model.label}: grafting I + {model.alpha:g}·Δ")
                graft(sweep.instruct, sweep.base, sweep.tuned, made, lora=sweep.lora, alpha=model.alpha,
                      progress=progress, check_roles=False)      # checked in prepare()
                model.folder = made
                model.described = {"ref": f"graft --alpha {model.alpha:g}", "path": None, "commit": None,
                                   "alpha": model.alpha, "instruct": sweep.instruct,
                                   **({"lora": sweep.lora} if sweep.lora else {"base": sweep.base,
                                                                                "tuned": sweep.tuned})}
            else:
                model.fetch(progress)
            what = " and ".join(x for x, on in (("tasks " + ",".join(settings.tasks), settings.tasks),
                                                ("held-out loss", settings.heldout)) if on)
            log(f"model {k}/{len(prepared.models)} {model.label}: {what}")
            results[model.label] = _evaluate_one(model, prepared, folder, progress)
        finally:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
        described[model.label] = model.described
        seconds[model.label] = time.perf_counter() - t
        log(f"model {k}/{len(prepared.models)} {model.label} done in {seconds[model.label]:.1f} s")

    reference = prepared.models[0].label
    data = _record(prepared, results, described, command)
    examples = _pair_up(data, results, reference)
    if prepared.sweep is not None:
        data["best_alpha"] = _best_alpha(data, prepared.sweep)
    seconds["total"] = time.perf_counter() - start
    data["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return data, examples


def _record(prepared: Prepared, results: dict, described: dict, command: str | None) -> dict:
    """eval.json's contents but the paired comparisons and the best α: settings, models, scores, held-out loss."""
    settings = prepared.settings
    data = new_record("eval", {"command": command or "the Python API of shadowmerge",
            "reference": prepared.models[0].label, "models": described,
            "settings": asdict(settings), "scores": [], "heldout": [], "paired": [], "unpaired": [],
            "versions": versions("torch", "transformers", "lm_eval", "datasets", "peft"),
            "samples": {label: r["samples"] for label, r in results.items() if r["samples"]}})
    for r in results.values():
        data["scores"] += r["scores"]
    if prepared.heldout is not None:
        h = prepared.heldout
        data["heldout_data"] = {"ref": h.ref, "hash": h.digest, "format": h.fmt, "rows": len(h.rows),
                                "cutoff": settings.heldout_cutoff}
        for label, r in results.items():
            losses = r["losses"]
            nll = losses.nll_per_token
            data["heldout"].append({"model": label, "nll_per_token": nll, "perplexity": math.exp(min(nll, 700)),
                                    "tokens": sum(losses.tokens), "rows": len(losses.tokens),
                                    "ci95": list(stats.loss_interval(losses.nll, losses.tokens))})
    return data


def _pair_up(data: dict, results: dict, reference: str) -> dict:
    """Each model against the reference, item by item; returns example items for report.html."""
    ref = results[reference]
    hib = {(s["task"], s["metric"]): s.get("higher_is_better", True) for s in ref["scores"]}
    value = {(s["model"], s["task"], s["metric"], s["filter"]): s["value"] for r in results.values()
             for s in r["scores"]}
    examples: dict = {}
    for label, r in results.items():
        if label == reference:
            continue
        for key, items in r["items"].items():
            task, metric, filt = key
            theirs = ref["items"].get(key)
            if theirs is None:
                continue
            ids = [i for i in theirs if i in items]
            if not ids:
                continue
            m, rr = [items[i] for i in ids], [theirs[i] for i in ids]
            reported = (value.get((label, task, metric, filt)), value.get((reference, task, metric, filt)))
            if any(v is None or not _is_mean(v, vals) for v, vals in zip(reported, (m, rr))):
                data["unpaired"].append({"model": label, "task": task, "metric": metric, "filter": filt,
                                         "why": "lm_eval's score is not the mean of its per-item values (a corpus-"
                                                "level metric), so items cannot be paired"})
                continue
            higher = hib.get((task, metric), True)
            p = stats.compare_items(m, rr, higher)
            data["paired"].append({"model": label, "task": task, "metric": metric, "filter": filt, "n": len(ids),
                                   **p.as_dict()})
            if (label, task) not in examples:
                examples[(label, task)] = _examples(ids, m, rr, higher, r["answers"].get(task, {}),
                                                    ref["answers"].get(task, {}))
    if data["heldout"]:
        base = ref["losses"]
        for label, r in results.items():
            if label != reference and r["losses"] is not None:
                p = stats.compare_losses((r["losses"].nll, r["losses"].tokens), (base.nll, base.tokens))
                data["paired"].append({"model": label, "task": "heldout", "metric": "nll_per_token", "filter": "none",
                                       "n": len(base.nll), **p.as_dict()})
    return {k: v for k, v in examples.items() if v}


def _is_mean(value: float, items: list[float]) -> bool:
    mean = math.fsum(items) / len(items)
    return abs(mean - value) <= 1e-9 * max(1.0, abs(value))


def _examples(ids, m, r, higher: bool, answers: dict, ref_answers: dict) -> list:
    rows = []
    for outcome, pick in (("win", lambda a, b: a > b if higher else a < b), ("loss", lambda a, b: a < b if higher
                                                                            else a > b)):
        for i, a, b in zip(ids, m, r):
            if pick(a, b) and sum(1 for x in rows if x[1] == outcome) < _EXAMPLES:
                prompt, target, answer = answers.get(i, ("", "", ""))
                rows.append([i, outcome, prompt, target, ref_answers.get(i, ("", "", ""))[2], answer])
    return rows


def _best_alpha(data: dict, sweep: Sweep) -> dict:
    from .report import primary

    labels = {sweep.label(a): a for a in sweep.alphas}
    per_task, means = {}, {}
    hib = {(s["task"], s["metric"]): s.get("higher_is_better", True) for s in data["scores"]}
    for task, metric, filt in primary(data):
        vals = {label: s["value"] for s in data["scores"] for label in labels
                if s["model"] == label and (s["task"], s["metric"], s["filter"]) == (task, metric, filt)}
        if not vals:
            continue
        higher = hib.get((task, metric), True)
        best = (max if higher else min)(vals, key=vals.get)
        per_task[task] = {"alpha": labels[best], "metric": metric, "filter": filt, "value": vals[best]}
        for label, v in vals.items():
            means.setdefault(label, []).append(v if higher else -v)
    out: dict = {"per_task": per_task}
    if means:
        avg = {label: sum(v) / len(v) for label, v in means.items()}
        best = max(avg, key=avg.get)
        out["overall"] = {"alpha": labels[best], "by": "mean primary score over tasks", "value": avg[best]}
    held = {h["model"]: h["nll_per_token"] for h in data["heldout"] if h["model"] in labels}
    if held:
        best = min(held, key=held.get)
        out["heldout"] = {"alpha": labels[best], "nll_per_token": held[best]}
        if "overall" not in out:
            out["overall"] = {"alpha": labels[best], "by": "held-out NLL per token", "value": held[best]}
    return out
