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
from ..record import local_ref
from ..record import new as new_record
from . import models as modelrefs
from . import stats
from .settings import EvalSettings, Sweep, check_pairs, pairs

_EXAMPLES = 10                   # disagreeing items shown per pair, task and direction in report.html
_PROMPT = 20_000                 # characters of a prompt kept for report.html (few-shot prompts are long)
_TEXT = 2_000                    # characters of a gold answer, answer or raw output kept


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
        _check_grid(sweep)
        taken = {label for label, _ in models}
        clash = next((label for label, _, _ in sweep.points() if label in taken), None) or \
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
                                                        settings.heldout else None))
        if sweep is not None:
            from ..pipeline import check_roles
            from ..spec import GraftSpec

            for k in range(len(sweep.settings())):                     # from headers, + a sample
                plan = check_roles(GraftSpec(sweep.instruct, sweep.base, sweep.tuned, sweep.lora,
                                             allow_pickle=allow_pickle, progress=progress and k == 0,
                                             **sweep.graft_options(k)))
            prepared.sweep_bytes = plan.total_bytes
            at = 1 if prepared.models else 0
            for k, (label, alpha, setting) in enumerate(sweep.points()):
                said = sweep.described(setting)
                prepared.models.insert(at + k, modelrefs.Model(label, f"I + {alpha:g}·Δ" + (f" ({said})" if said else ""),
                                                               alpha=alpha, setting=setting))
        check_pairs(settings.compare, [m.label for m in prepared.models])
    except BaseException:
        prepared.close()
        raise
    return prepared


def _check_grid(sweep: Sweep) -> None:
    """The sweep's settings: known methods, each setting once, --density only where a method uses it."""
    from ..multi import COMBINE

    methods = sweep.methods()
    bad = next((m for m in methods if m not in COMBINE), None)
    if bad is not None:
        raise ShadowMergeError(f"--combine {sweep.combine!r}: {bad!r} is not a method; use {', '.join(COMBINE)}, or "
                               f"several separated by commas, e.g. --combine sum,ties")
    sets = sweep.weight_sets()
    for what, values in (("--combine", methods), ("--weights", sets)):
        if len(set(values)) != len(values):
            raise ShadowMergeError(f"{what} names a setting twice; give each setting once, e.g. --combine sum,ties")
    if sweep.density is not None and all(m == "sum" for m in methods):
        raise ShadowMergeError("--density goes with --combine ties, dare_ties or dare_linear; leave it out for sum")


def _answers(res: dict) -> dict:
    """{task: {doc_id: {prompt, target, answer, raw}}} from lm_eval's per-item records, for report.html: the full
    prompt, the gold answer, the filtered answer the metric scored and the model's raw output (a generation, or
    each choice's log-likelihood for multiple choice)."""
    out: dict = {}
    for task, samples in (res.get("samples") or {}).items():
        per = out.setdefault(task, {})
        for s in samples:
            doc = str(s.get("doc_id"))
            if doc in per:                # one record per filter: the first is enough to show
                continue
            args = s.get("arguments") or []
            prompt = str(args[0][0]) if args and isinstance(args[0], (list, tuple)) and args[0] else ""
            resps, target = s.get("filtered_resps"), s.get("target")
            answer, raw = resps, s.get("resps")
            try:
                if resps and all(isinstance(r, (list, tuple)) and r and isinstance(r[0], (int, float))
                                 for r in resps):          # multiple choice: (loglikelihood, greedy) per choice
                    choices = [str(a[1]) if isinstance(a, (list, tuple)) and len(a) > 1 else str(i)
                               for i, a in enumerate(args)]
                    best = max(range(len(resps)), key=lambda i: resps[i][0])
                    answer = choices[best] if best < len(choices) else best
                    raw = "; ".join(f"{c.strip()!r}: {r[0]:.3f}" for c, r in zip(choices, resps))
                    raw = f"log-likelihood per choice: {raw}"
                    if str(target).isdigit() and int(target) < len(choices):
                        target = choices[int(target)]
                else:
                    if isinstance(resps, (list, tuple)) and len(resps) == 1:
                        answer = resps[0]
                    while isinstance(raw, (list, tuple)) and len(raw) == 1:
                        raw = raw[0]
            except (TypeError, IndexError, ValueError):
                pass
            per[doc] = {"prompt": prompt[:_PROMPT], "target": str(target)[:_TEXT], "answer": str(answer)[:_TEXT],
                        "raw": str(raw)[:_TEXT]}
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

    from ..formats.fp8 import load_kwargs

    decode = load_kwargs(folder, "model")
    dtype = "auto" if settings.dtype == "auto" else getattr(torch, settings.dtype)
    if decode and dtype == "auto":
        dtype = torch.bfloat16         # FP8 weights are decoded into the model's compute dtype
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **decode)
    return model.to(settings.device).eval()


def _evaluate_one(model, prepared: Prepared, folder: Path | None, progress: bool) -> dict:
    """One model's scores, per-item values, answers, held-out losses and samples; a failure of lm_eval or the model
    is one line naming the model and the step. The libraries' bars (loading weights, ...) only on a terminal."""
    from ..progress import library_bars

    out = {"scores": [], "items": {}, "answers": {}, "losses": None, "samples": []}
    step = "loading it"
    try:
        with library_bars(not progress):
            _evaluate_into(out, model, prepared, folder, progress)
    except (ShadowMergeError, KeyboardInterrupt, MemoryError):
        raise
    except OSError as exc:
        if exc.errno is not None:         # the machine (a full disk, no permission): the CLI says so in one line
            raise
        raise _failed(model, out.get("step", step), exc) from None
    except Exception as exc:              # noqa: BLE001 - a stranger's task or model that lm_eval cannot run
        raise _failed(model, out.get("step", step), exc) from None
    finally:
        out.pop("step", None)
        gc.collect()
        _free_gpu()
    return out


def _evaluate_into(out: dict, model, prepared: Prepared, folder: Path | None, progress: bool) -> None:
    """One model's tasks and held-out loss into out (out["step"]: what it was doing, for an error)."""
    from transformers import AutoTokenizer

    from . import harness, heldout

    settings, lm = prepared.settings, None
    out["step"] = "loading it"
    try:
        if prepared.tasks is not None:
            with harness.quiet_libraries(not progress):
                lm = harness.build_model(model.folder, settings)
                out["step"] = "running the tasks"
                res = harness.evaluate(lm, prepared.tasks, settings)
            out["scores"] = harness.scores(model.label, res)
            out["items"] = harness.item_values(res)
            out["answers"] = _answers(res)
            if folder is not None:
                out["samples"] = _write_samples(folder, model.label, res)
            del res
        if prepared.heldout is not None:
            out["step"] = "computing the held-out loss"
            torch_model = getattr(lm, "model", None) if settings.backend == "hf" and lm is not None else None
            if torch_model is None:
                lm = None
                gc.collect()
                torch_model = _load_for_loss(model.folder, settings)
            tokenizer = AutoTokenizer.from_pretrained(model.folder)
            rows = heldout.tokens(tokenizer, prepared.heldout, settings.heldout_cutoff)
            out["losses"] = heldout.score(torch_model, rows)
            del torch_model
    finally:
        del lm


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
                log(f"model {k}/{len(prepared.models)} {model.label}: grafting {model.ref}")
                graft(sweep.instruct, sweep.base, sweep.tuned, made, lora=sweep.lora, alpha=model.alpha,
                      progress=progress, check_roles=False, **sweep.graft_options(model.setting))   # checked before
                model.folder = made
                model.described = {"ref": f"graft --alpha {model.alpha:g}", "path": None, "commit": None,
                                   "alpha": model.alpha, "instruct": local_ref(sweep.instruct),
                                   **_sweep_inputs(sweep, model.setting)}
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

    labels = [m.label for m in prepared.models]
    data = _record(prepared, results, described, command)
    data["compare"] = [list(pair) for pair in pairs(settings.compare)]
    examples = _pair_up(data, results, comparisons(labels, pairs(settings.compare)))
    if prepared.sweep is not None:
        data["best_alpha"] = best_alpha(data, prepared.sweep, results)
    seconds["total"] = time.perf_counter() - start
    data["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return data, examples


def comparisons(labels: list[str], named: list[tuple[str, str]]) -> list[tuple[str, str, bool]]:
    """(model, against, headline): the pairs named by --compare first (the headline), then every other model
    against the reference (the first), unless that pair is named already (either way round)."""
    out = [(a, b, True) for a, b in named]
    for label in labels[1:]:
        if (label, labels[0]) not in named and (labels[0], label) not in named:
            out.append((label, labels[0], False))
    return out


def _record(prepared: Prepared, results: dict, described: dict, command: str | None) -> dict:
    """eval.json's contents but the paired comparisons and the best α: settings, models, scores, held-out loss."""
    settings = prepared.settings
    data = new_record("eval", {"command": command or "the Python API of shadowmerge",
            "reference": prepared.models[0].label, "models": described,
            "settings": asdict(settings), "scores": [], "heldout": [], "paired": [], "unpaired": [],
            "versions": versions("torch", "transformers", "lm_eval", "datasets", "peft"),
            "samples": {label: r["samples"] for label, r in results.items() if r["samples"]}})
    for r in results.values():
        for row in r["scores"]:
            items = r["items"].get((row["task"], row["metric"], row["filter"]))
            row["ci95"] = (list(stats.score_interval(list(items.values())))
                           if items and _is_mean(row["value"], list(items.values())) else None)
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


def _pair_up(data: dict, results: dict, wanted: list[tuple[str, str, bool]]) -> dict:
    """Each pair (model, against) item by item on every task, metric and filter, and on the held-out rows; Holm's
    correction within each family (correct()). Returns example items for report.html, per pair and task."""
    from .report import primary

    hib = {(s["task"], s["metric"]): s.get("higher_is_better", True) for s in data["scores"]}
    value = {(s["model"], s["task"], s["metric"], s["filter"]): s["value"] for s in data["scores"]}
    first = set(primary(data))
    examples: dict = {}
    for label, against, headline in wanted:
        mine, theirs = results[label], results[against]
        for key, items in mine["items"].items():
            task, metric, filt = key
            other = theirs["items"].get(key)
            ids = [i for i in (other or {}) if i in items]
            if not ids:
                continue
            m, r = [items[i] for i in ids], [other[i] for i in ids]
            reported = (value.get((label, task, metric, filt)), value.get((against, task, metric, filt)))
            where = {"model": label, "against": against, "task": task, "metric": metric, "filter": filt}
            if any(v is None or not _is_mean(v, vals) for v, vals in zip(reported, (m, r))):
                data["unpaired"].append({**where, "why": "lm_eval's score is not the mean of its per-item values (a "
                                                          "corpus-level metric), so items cannot be paired"})
                continue
            higher = hib.get((task, metric), True)
            data["paired"].append({**where, "headline": headline, **stats.compare_items(m, r, higher).as_dict()})
            if key in first:
                shown = _examples(ids, m, r, higher, mine["answers"].get(task, {}), theirs["answers"].get(task, {}))
                if shown["rows"]:
                    examples[(label, against, task)] = shown
        if mine["losses"] is not None and theirs["losses"] is not None:
            p = stats.compare_losses((mine["losses"].nll, mine["losses"].tokens),
                                     (theirs["losses"].nll, theirs["losses"].tokens))
            data["paired"].append({"model": label, "against": against, "task": "heldout", "metric": "nll_per_token",
                                   "filter": "none", "headline": headline, **p.as_dict()})
    data["multiplicity"] = correct(data["paired"])
    return examples


def correct(paired: list[dict]) -> dict:
    """Holm's correction within each family of comparisons: the pairs the user named (the questions asked before
    looking) and the comparisons with the reference; each row gets its adjusted p (p_holm)."""
    families = []
    for name, headline in (("named pairs", True), ("against the reference", False)):
        tested = [p for p in paired if p["p"] is not None and bool(p.get("headline")) == headline]
        if not tested:
            continue
        for p, adjusted in zip(tested, stats.holm([p["p"] for p in tested])):
            p["p_holm"] = adjusted
        called = [p for p in tested if p["verdict"] in (stats.BETTER, stats.WORSE)]
        families.append({"family": name, "comparisons": len(tested), "called": len(called),
                         "called_after_holm": sum(p["p_holm"] < stats.ALPHA for p in called)})
    return {"method": "holm", "alpha": stats.ALPHA, "families": families}


def _is_mean(value: float, items: list[float]) -> bool:
    mean = math.fsum(items) / len(items)
    return abs(mean - value) <= 1e-9 * max(1.0, abs(value))


def _examples(ids, m, r, higher: bool, answers: dict, theirs: dict) -> dict:
    """Up to _EXAMPLES items each way where the two models differ: {"rows": [...], "differ": k, "shown": j}."""
    rows, counts = [], {"win": 0, "loss": 0}
    for i, a, b in zip(ids, m, r):
        if a == b:
            continue
        outcome = "win" if (a > b) == higher else "loss"
        counts[outcome] += 1
        if counts[outcome] <= _EXAMPLES:
            rows.append({"item": i, "outcome": outcome, "scores": [a, b], "model": answers.get(i, {}),
                         "against": theirs.get(i, {})})
    from .report import common_ends

    return {"rows": rows, "differ": counts["win"] + counts["loss"],
            "ends": common_ends([a["prompt"] for a in answers.values()])}


def best_alpha(data: dict, sweep: Sweep, results: dict) -> dict:
    """The best α per task (its first metric), over tasks and by held-out loss, each with its paired comparison
    against the reference and against α = 1, and what the grid cannot tell said in words (`notes`): a best at
    the edge of the grid, a tie, tasks that disagree (with each other or with held-out loss), and the reference
    beating every α. A sweep over several settings (weight sets, combine methods) picks among every (setting, α):
    each pick then names its setting, and is compared with α = 1 of the same setting."""
    from .report import primary

    points = {label: (alpha, k) for label, alpha, k in sweep.points()}
    labels = {label: alpha for label, (alpha, _) in points.items()}
    grid = sorted(sweep.alphas)
    several = len(sweep.settings()) > 1
    ref = data["reference"]
    hib = {(s["task"], s["metric"]): s.get("higher_is_better", True) for s in data["scores"]}
    paired = {(p["model"], p["against"], p["task"], p["metric"], p["filter"]): p for p in data["paired"]}
    per_task, means, notes = {}, {}, []

    def edge(alpha: float) -> str | None:
        if len(grid) < 2:
            return None
        return "largest" if alpha == grid[-1] else "smallest" if alpha == grid[0] else None

    def one_of(label: str) -> str | None:
        return sweep.label(1.0, points[label][1]) if 1.0 in sweep.alphas else None

    def nearest_one(tied: list[str]) -> str:                        # of a tie: the α nearest 1 (then the first setting)
        return min(tied, key=lambda label: (abs(labels[label] - 1), labels[label], points[label][1]))

    def told(tied: list[str]) -> list:
        return [labels[label] for label in sorted(tied, key=lambda t: labels[t])] if not several else \
            sorted(tied, key=lambda t: (points[t][1], labels[t]))

    def pick(best: str) -> dict:
        return {"alpha": labels[best], **({"setting": sweep.described(points[best][1]), "model": best}
                                          if several else {})}

    def against_one(label: str, key) -> dict | None:
        one = one_of(label)
        if one is None or label == one:
            return None
        mine, theirs = results[label]["items"].get(key), results[one]["items"].get(key)
        ids = [i for i in (theirs or {}) if i in (mine or {})]
        if not ids:
            return None
        return stats.compare_items([mine[i] for i in ids], [theirs[i] for i in ids], hib.get(key[:2], True)).as_dict()

    for task, metric, filt in primary(data):
        key = (task, metric, filt)
        vals = {s["model"]: s["value"] for s in data["scores"]
                if s["model"] in labels and (s["task"], s["metric"], s["filter"]) == key}
        if not vals:
            continue
        higher = hib.get((task, metric), True)
        top = (max if higher else min)(vals.values())
        tied = [label for label, v in vals.items() if v == top]
        best = nearest_one(tied)
        refv = next((s["value"] for s in data["scores"] if s["model"] == ref
                     and (s["task"], s["metric"], s["filter"]) == key), None)
        beaten = refv is not None and all((refv > v) if higher else (refv < v) for v in vals.values())
        per_task[task] = {**pick(best), "metric": metric, "filter": filt, "value": vals[best],
                          "tied": told(tied) if len(tied) > 1 else [],
                          "edge": edge(labels[best]) if len(tied) == 1 else None,
                          "reference_value": refv, "reference_beats_every_alpha": beaten,
                          "vs_reference": _brief(paired.get((best, ref, *key))), "vs_alpha_1": against_one(best, key)}
        for label, v in vals.items():
            means.setdefault(label, []).append(v if higher else -v)
        notes += _task_notes(task, per_task[task], ref)
    out: dict = {"per_task": per_task}
    if means:
        avg = {label: sum(v) / len(v) for label, v in means.items()}
        best = max(avg, key=lambda label: (avg[label], -abs(labels[label] - 1), -points[label][1]))
        out["overall"] = {**pick(best), "by": "mean primary score over tasks", "value": avg[best],
                          "edge": edge(labels[best])}
        picks = {task: b["tied"] or [b.get("model", b["alpha"])] for task, b in per_task.items()}
        if len(picks) > 1 and not set.intersection(*(set(a) for a in picks.values())):
            notes.append("the tasks disagree: " + ", ".join(f"{task} picks {_picked(a, several)}" for task, a in
                                                            picks.items()) + "; no one α is best for all of them")
    held = {h["model"]: h["nll_per_token"] for h in data["heldout"] if h["model"] in labels}
    if held:
        top = min(held.values())
        tied = [label for label, v in held.items() if v == top]
        best = nearest_one(tied)
        refv = next((h["nll_per_token"] for h in data["heldout"] if h["model"] == ref), None)
        vs_one, one = None, one_of(best)
        if one is not None and best != one:
            mine, theirs = results[best]["losses"], results[one]["losses"]
            vs_one = stats.compare_losses((mine.nll, mine.tokens), (theirs.nll, theirs.tokens)).as_dict()
        out["heldout"] = {**pick(best), "nll_per_token": held[best], "tied": told(tied) if len(tied) > 1 else [],
                          "edge": edge(labels[best]) if len(tied) == 1 else None,
                          "reference_beats_every_alpha": refv is not None and all(refv < v for v in held.values()),
                          "vs_reference": _brief(paired.get((best, ref, "heldout", "nll_per_token", "none"))),
                          "vs_alpha_1": vs_one}
        notes += _task_notes("held-out loss", out["heldout"], ref)
        if "overall" not in out:
            out["overall"] = {**pick(best), "by": "held-out NLL per token", "value": held[best],
                              "edge": out["heldout"]["edge"]}
        elif out["overall"].get("model", out["overall"]["alpha"]) != out["heldout"].get("model", labels[best]):
            notes.append(f"the tasks and the held-out loss disagree: the tasks (mean primary score) pick "
                         f"{_named(out['overall'])}, the held-out loss picks {_named(out['heldout'])}")
    if per_task or held:
        notes.append("the best α is picked on the same items it is scored on, so its comparisons are optimistic; "
                     "confirm it on items it was not picked on")
    out["notes"] = notes
    return out


def _alphas(values) -> str:
    values = [f"{a:g}" if isinstance(a, (int, float)) else str(a) for a in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def _picked(values, several: bool) -> str:
    """What a task picks, in words: α values, or (a grid of settings) model labels."""
    return f"α = {_alphas(values)}" if not several else _alphas(values)


def _named(b: dict) -> str:
    """A pick in words: α = 0.75, or α = 0.75 with weights 1,0.5, ties."""
    return f"α = {b['alpha']:g}" + (f" with {b['setting']}" if b.get("setting") else "")


def _brief(p: dict | None) -> dict | None:
    return None if p is None else {k: p[k] for k in ("delta", "ci95", "n", "differing", "wins", "losses", "p",
                                                      "verdict", "needed")}


def _task_notes(what: str, b: dict, ref: str) -> list[str]:
    """What one task's (or the held-out loss's) best α does not tell, in words."""
    notes = []
    if b["tied"]:
        notes.append(f"{what}: {_picked(b['tied'], 'setting' in b)} tie: the task does not pick one")
    elif b["edge"]:
        beyond = "larger" if b["edge"] == "largest" else "smaller"
        notes.append(f"{what}: the best α ({b['alpha']:g}) is the {b['edge']} value tried, so the best may lie "
                     f"beyond it; add {beyond} values to --alpha")
    if b["reference_beats_every_alpha"]:
        notes.append(f"{what}: the reference ({ref}) does better than every α: grafting did not help here")
    v1 = b.get("vs_alpha_1")
    if v1 is not None and v1["verdict"] in (stats.NOISE, stats.TOO_FEW):
        notes.append(f"{what}: {_named(b)} is not told apart from α = 1 ({v1['verdict']}, "
                     f"{v1['differing']} of {v1['n']} differ)")
    return notes


def _sweep_inputs(sweep, setting: int = 0) -> dict:
    """A swept model's inputs, for eval.json: the adapter(s), or the Base and the tuned model(s); with several
    updates, how they were combined."""
    def refs(v):
        return None if v is None else local_ref(v) if isinstance(v, str) else [local_ref(x) for x in v]
    out = {k: refs(v) for k, v in (("lora", sweep.lora), ("base", sweep.base), ("tuned", sweep.tuned)) if v}
    options = sweep.graft_options(setting)
    if isinstance(sweep.tuned, tuple) or isinstance(sweep.lora, tuple) or (sweep.tuned and sweep.lora) or \
            options["combine"] != "sum" or options["weights"]:
        out["combine"] = {k: v for k, v in options.items() if v is not None}
    return out

