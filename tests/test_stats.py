"""The paired statistics and what the reports say with them, without any model: "too few to decide" is told from
"within noise", the exact interval and McNemar's test never disagree, the tests are scipy's, Holm's correction,
and the α sweep's best α with its edge, tie, disagreement and "the reference wins" cases said in words."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowmerge.evaluate import EvalReport, report, runner, stats
from shadowmerge.evaluate.settings import EvalSettings, Sweep


def split(wins: int, losses: int, n: int, both_right: int = 0) -> tuple[list[float], list[float]]:
    """Per-item right/wrong scores of a model and a reference: `wins` items only the model got right, `losses`
    only the reference, `both_right` both, the rest neither."""
    rest = n - wins - losses - both_right
    model = [1.0] * wins + [0.0] * losses + [1.0] * both_right + [0.0] * rest
    ref = [0.0] * wins + [1.0] * losses + [1.0] * both_right + [0.0] * rest
    return model, ref


def test_four_wins_and_no_loss_is_too_few_to_decide():
    p = stats.compare_items(*split(4, 0, 10))
    assert p.verdict == stats.TOO_FEW and p.differing == 4 and p.n == 10
    assert p.p == pytest.approx(0.125) and p.ci95[0] < 0 < p.ci95[1]
    assert p.needed is not None and p.needed > 10         # more items than were evaluated
    line = report.sentence({"model": "shadow", "against": "ft", "task": "t", "metric": "acc", "filter": "none",
                            **p.as_dict()}, {"reference": "instruct"})
    assert "too few differing items to decide (4 of 10)" in line and f"about {p.needed} items" in line
    assert "no evidence" not in line
    # the largest split that can never reach 0.05 is 5 to 0; 6 to 0 can
    assert stats.compare_items(*split(5, 0, 10)).verdict == stats.TOO_FEW
    assert stats.compare_items(*split(6, 0, 10)).verdict == stats.BETTER
    assert [k for k in range(12) if stats.decidable(k)] == list(range(6, 12))


@pytest.mark.parametrize("wins, losses, verdict", [(30, 10, stats.BETTER), (10, 30, stats.WORSE), (40, 0, stats.BETTER),
                                                   (24, 16, stats.NOISE)])
def test_forty_of_two_hundred_differing_items_are_decided_by_their_split(wins, losses, verdict):
    p = stats.compare_items(*split(wins, losses, 200, both_right=80))
    assert p.verdict == verdict and p.differing == 40 and p.n == 200 and p.ties == 160
    assert p.delta == pytest.approx((wins - losses) / 200)
    assert (p.p < 0.05) == (verdict != stats.NOISE)
    if verdict == stats.NOISE:
        assert p.needed > 200


def test_the_interval_and_the_test_never_disagree_on_any_split_of_up_to_200_items():
    """Every split (w wins, l losses) with w + l <= 200, on 200 items: the interval excludes 0 exactly when McNemar's
    p < 0.05, and exactly then the verdict is better or worse. The interval's sign depends on (w, l) only (n scales
    it), so n = 200 covers every n up to 200; a few other n are checked too."""
    for n in (200, 57):
        for k in range(n + 1):
            for w in range(k + 1):
                p = stats.compare_items(*split(w, k - w, n))
                excludes = p.ci95[0] > 0 or p.ci95[1] < 0
                assert excludes == (p.p < 0.05) == (p.verdict in (stats.BETTER, stats.WORSE)), (w, k - w, n, p)
                assert p.ci95[0] <= p.delta <= p.ci95[1]
                if k <= 5:
                    assert p.verdict == stats.TOO_FEW


def test_mcnemar_is_scipys_binomial_test():
    from scipy.stats import binomtest

    for k in range(1, 120):
        for w in range(k + 1):
            assert stats.mcnemar_p(w, k - w) == pytest.approx(binomtest(w, k, 0.5).pvalue, rel=1e-12, abs=1e-300)
    assert stats.mcnemar_p(0, 0) == 1.0
    assert stats.mcnemar_p(3, 12) == pytest.approx(0.03515625)          # 2 * P(X <= 3), X ~ Bin(15, 1/2)


def test_the_interval_is_clopper_pearson_scaled_to_the_difference():
    from scipy.stats import binomtest

    p = stats.compare_items(*split(12, 3, 50))
    lo, hi = binomtest(12, 15, 0.5).proportion_ci(0.95, method="exact")
    assert p.ci95 == pytest.approx((15 / 50 * (2 * lo - 1), 15 / 50 * (2 * hi - 1)), rel=1e-9)
    # a lower-is-better right/wrong metric: the same split is the mirror image
    q = stats.compare_items(*split(3, 12, 50), higher_is_better=False)
    assert q.wins == 12 and q.verdict == stats.BETTER and q.ci95 == pytest.approx((-p.ci95[1], -p.ci95[0]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=300))
def test_any_right_wrong_items_give_a_consistent_verdict(pairs):
    model, ref = [float(a) for a, _ in pairs], [float(b) for _, b in pairs]
    p = stats.compare_items(model, ref)
    assert p.wins + p.losses + p.ties == len(pairs) and p.differing == sum(a != b for a, b in pairs)
    excludes = p.ci95[0] > 0 or p.ci95[1] < 0
    assert excludes == (p.verdict in (stats.BETTER, stats.WORSE))
    assert (p.verdict == stats.TOO_FEW) == (p.differing <= 5)
    swapped = stats.compare_items(ref, model)
    assert swapped.ci95 == pytest.approx((-p.ci95[1], -p.ci95[0])) and swapped.p == p.p


def test_scores_that_are_not_right_or_wrong():
    """A continuous per-item score: the paired t-test and its own interval (scipy's), which agree; a lower-is-better
    metric is judged in its own direction; too few differing items are too few here as well."""
    import numpy as np

    rng = np.random.default_rng(5)
    ref = rng.uniform(0, 1, 120)
    better = ref + rng.normal(0.08, 0.1, 120)
    p = stats.compare_items(list(better), list(ref))
    assert p.verdict == stats.BETTER and p.p < 0.05 and 0 < p.ci95[0] < p.delta < p.ci95[1]
    from scipy.stats import ttest_rel

    t = ttest_rel(better, ref)
    assert p.p == pytest.approx(t.pvalue) and p.ci95 == pytest.approx(tuple(t.confidence_interval()))
    lower = stats.compare_items(list(better), list(ref), higher_is_better=False)
    assert lower.verdict == stats.WORSE and lower.wins == p.losses
    noise = stats.compare_items(list(ref + rng.normal(0, 0.2, 120)), list(ref))
    assert noise.verdict == stats.NOISE and noise.ci95[0] < 0 < noise.ci95[1] and noise.needed > 120
    few = list(ref[:10])
    few_better = [v + (0.5 if i < 4 else 0) for i, v in enumerate(few)]
    assert stats.compare_items(few_better, few).verdict == stats.TOO_FEW


def test_held_out_loss_rows_are_resampled_whole():
    same = stats.compare_losses(([2.0, 3.0], [4, 5]), ([2.0, 3.0], [4, 5]))
    assert same.delta == 0 and same.verdict == stats.TOO_FEW and same.ci95 == (0.0, 0.0)
    nll_ref = [10.0 + i % 3 for i in range(40)]
    tokens = [5 + i % 4 for i in range(40)]
    lower = stats.compare_losses(([v * 0.9 for v in nll_ref], tokens), (nll_ref, tokens))
    assert lower.verdict == stats.BETTER and lower.ci95[1] < 0 and lower.wins == 40
    # other tokenizers: other token counts per row; the ratio of sums is still compared, rows kept whole
    other = stats.compare_losses(([v * 0.9 for v in nll_ref], [t + 1 for t in tokens]), (nll_ref, tokens))
    assert other.verdict == stats.BETTER and other.delta == pytest.approx(
        sum(v * 0.9 for v in nll_ref) / sum(t + 1 for t in tokens) - sum(nll_ref) / sum(tokens))


def test_holm():
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert stats.holm([]) == [] and stats.holm([0.2]) == [0.2]
    assert stats.holm([0.3, 0.3]) == [0.6, 0.6]


# ---- the reports, on results made by hand ----------------------------------------------------------------------

def fake_results(items: dict[str, dict[str, list[float]]], losses: dict[str, list[float]] | None = None) -> dict:
    """runner's per-model results from per-item right/wrong values: {label: {task: [values]}}."""
    out = {}
    for label, tasks in items.items():
        scores = [{"model": label, "task": t, "metric": "acc", "filter": "none", "value": sum(v) / len(v),
                   "stderr": 0.1, "n": len(v), "higher_is_better": True} for t, v in tasks.items()]
        nll = (losses or {}).get(label)
        out[label] = {"scores": scores, "items": {(t, "acc", "none"): {str(i): x for i, x in enumerate(v)}
                                                  for t, v in tasks.items()},
                      "answers": {}, "samples": [],
                      "losses": None if nll is None else SimpleNamespace(nll=nll, tokens=[10] * len(nll),
                                                                         nll_per_token=sum(nll) / (10 * len(nll)))}
    return out


def fake_data(results: dict, compare=(), sweep: Sweep | None = None, limit=None) -> dict:
    """eval.json's contents as runner.run makes them, from fake_results."""
    prepared = runner.Prepared(EvalSettings(tasks=("x",), device="cpu", limit=limit, compare=tuple(compare)),
                               [SimpleNamespace(label=label) for label in results])
    prepared.heldout = SimpleNamespace(ref="h.jsonl", digest="0", fmt="messages", rows=[0] * 3) if any(
        r["losses"] for r in results.values()) else None
    data = runner._record(prepared, results, {label: {} for label in results}, "test")
    data["compare"] = [list(p) for p in compare]
    labels = list(results)
    runner._pair_up(data, results, runner.comparisons(labels, list(compare)))
    if sweep is not None:
        data["best_alpha"] = runner.best_alpha(data, sweep, results)
    return data


def test_a_named_pair_is_the_headline_everywhere(tmp_path):
    model_items = {"instruct": {"facts": [0.0] * 10}, "instruct-ft": {"facts": [1.0] * 2 + [0.0] * 8},
                   "shadow": {"facts": [1.0] * 6 + [0.0] * 4}}
    data = fake_data(fake_results(model_items), compare=[("shadow", "instruct-ft")], limit=8.0)
    head = data["paired"][0]
    assert (head["model"], head["against"], head["headline"]) == ("shadow", "instruct-ft", True)
    assert head["verdict"] == stats.TOO_FEW and head["differing"] == 4
    assert {(p["model"], p["against"]) for p in data["paired"]} == {("shadow", "instruct-ft"),
                                                                   ("instruct-ft", "instruct"), ("shadow", "instruct")}
    text = str(EvalReport(data, None))
    lines = text.splitlines()
    at = lines.index("shadow against instruct-ft (Δ = first − second):")      # a terminal ends with the answer
    assert lines[at + 1].split() == ["task", "instruct", "instruct-ft", "shadow", "Δ(shadow", "−", "instruct-ft)"]
    assert "facts (acc, n=10)" in lines[at + 2] and "too few: 4/10 differ" in lines[at + 2]
    assert lines[-1].startswith("shadow vs instruct-ft on facts (acc): too few differing items to decide (4 of 10)")
    assert "1 other comparison is within noise or has too few differing items" in text
    md = report.markdown(data)
    assert md.index("## shadow against instruct-ft") < md.index("## All models")
    assert "| facts (acc, n=10) | 0.000 | 0.200 | 0.600 | Δ +0.400 [" in md
    assert "limit: 8 (items scored: facts 10)" in md and "8.0" not in md
    assert "0 of the 1 better/worse verdicts among the 2 comparisons with the reference hold (not: shadow vs instruct on facts)" in md
    assert md.index("shadow vs instruct-ft") < md.index("instruct-ft vs instruct")
    report.figure(data, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 10_000


def sweep_items(values: dict[str, tuple[int, int]], n: int = 40) -> dict[str, list[float]]:
    return {label: [1.0] * right + [0.0] * (n - right) for label, (right, _) in values.items()}


def run_sweep(rights: dict[str, dict[str, int]], losses=None, alphas=(0.5, 1.0, 1.5), n=40):
    """A sweep whose models got `right` items right (the first ones) of n on each task."""
    items = {label: {task: [1.0] * right + [0.0] * (n - right) for task, right in tasks.items()}
             for label, tasks in rights.items()}
    sweep = Sweep("inst", tuple(alphas), lora="a")
    return fake_data(fake_results(items, losses), sweep=sweep)


def test_the_sweeps_best_at_the_edge_of_the_grid_is_said_and_compared():
    data = run_sweep({"instruct": {"t": 10}, "alpha=0.5": {"t": 12}, "alpha=1": {"t": 20}, "alpha=1.5": {"t": 30}})
    b = data["best_alpha"]
    t = b["per_task"]["t"]
    assert t["alpha"] == 1.5 and t["edge"] == "largest" and not t["tied"]
    assert t["vs_reference"]["verdict"] == stats.BETTER and t["vs_reference"]["differing"] == 20
    assert t["vs_alpha_1"]["verdict"] == stats.BETTER and t["vs_alpha_1"]["differing"] == 10
    assert any("largest value tried" in n and "add larger values to --alpha" in n for n in b["notes"])
    assert any("picked on the same items" in n for n in b["notes"])
    lines = report.alpha_lines(data)
    assert lines[0] == "best α by the tasks (mean primary score over tasks): 1.5"
    assert "against α = 1 Δ +0.250" in lines[1]


def test_a_tie_the_reference_winning_and_disagreements_are_said():
    data = run_sweep({"instruct": {"a": 30, "b": 5}, "alpha=0.5": {"a": 20, "b": 6}, "alpha=1": {"a": 20, "b": 9},
                      "alpha=1.5": {"a": 20, "b": 7}},
                     losses={"instruct": [20.0] * 3, "alpha=0.5": [10.0, 11.0, 9.0], "alpha=1": [15.0] * 3,
                             "alpha=1.5": [30.0] * 3})
    b = data["best_alpha"]
    a = b["per_task"]["a"]
    assert a["tied"] == [0.5, 1.0, 1.5] and a["alpha"] == 1.0 and a["reference_beats_every_alpha"]
    assert b["per_task"]["b"]["alpha"] == 1.0 and b["heldout"]["alpha"] == 0.5
    notes = " | ".join(b["notes"])
    assert "α = 0.5, 1 and 1.5 tie" in notes
    assert "a: the reference (instruct) does better than every α" in notes
    assert "the tasks and the held-out loss disagree" in notes and "held-out loss picks α = 0.5" in notes
    lines = report.alpha_lines(data)
    assert lines[0] == "best α by the tasks (mean primary score over tasks): 1; by held-out loss: 0.5"
    # the tasks disagreeing with each other
    other = run_sweep({"instruct": {"a": 5, "b": 5}, "alpha=0.5": {"a": 30, "b": 5}, "alpha=1": {"a": 6, "b": 30},
                       "alpha=1.5": {"a": 6, "b": 5}})["best_alpha"]
    assert any("the tasks disagree: a picks α = 0.5, b picks α = 1" in n for n in other["notes"])
    assert not any("disagree" in n for n in run_sweep({"instruct": {"a": 5}, "alpha=0.5": {"a": 9},
                                                        "alpha=1": {"a": 30}, "alpha=1.5": {"a": 9}})
                   ["best_alpha"]["notes"])


def test_the_sweeps_figure_is_score_against_alpha(tmp_path):
    data = run_sweep({"instruct": {"t": 10}, "alpha=0.5": {"t": 12}, "alpha=1": {"t": 20}, "alpha=1.5": {"t": 30}})
    assert all(s["ci95"] is not None for s in data["scores"])
    report.figure(data, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    json.dumps(data)                              # eval.json holds it as it is


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=200),
       st.lists(st.integers(1, 50), min_size=200, max_size=200), st.booleans())
def test_any_scores_or_losses_give_an_interval_that_agrees_with_the_test(pairs, tokens, other_tokenizer):
    model, ref = [a for a, _ in pairs], [b for _, b in pairs]
    p = stats.compare_items(model, ref)
    n = len(pairs)
    losses = stats.compare_losses(([a * 10 for a in model], [t + other_tokenizer for t in tokens[:n]]),
                                  ([b * 10 for b in ref], tokens[:n]))
    for q in (p, losses):
        excludes = q.ci95[0] > 0 or q.ci95[1] < 0
        if q.verdict == stats.TOO_FEW:
            assert q.differing <= 5
        else:
            assert q.differing > 5 and excludes == (q.verdict in (stats.BETTER, stats.WORSE)) == (q.p < 0.05), q
        assert q.ci95[0] <= q.delta + 1e-12 and q.delta - 1e-12 <= q.ci95[1]


def test_an_items_summary_is_its_own_part_of_the_prompt_in_whole_words():
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n<|im_start|>user\n"
    prompts = [system + q + "<|im_end|>\n<|im_start|>assistant\n" for q in
               ("What is 2 + 2?", "Which planet is known as the Red Planet?", "What do bees make?")]
    ends = report.common_ends(prompts)
    # what every item shares is left out: the system prompt, the template's turns, even a common "?"
    assert [report._summary(p, ends) for p in prompts] == ["What is 2 + 2", "Which planet is known as the Red Planet",
                                                           "What do bees make"]
    long = system + "word " * 100 + "last words?<|im_end|>"
    assert report._summary(long, report.common_ends([long, system + "x<|im_end|>"])).startswith("…word ")
    assert report.common_ends([prompts[0]]) == (0, 0)
