r"""Regular expressions from strangers (adapter configs, --include/--exclude), matched at a bounded cost.

Python's `re` has no timeout, and `(.*)*X` against a long module name backtracks for minutes. The
`regex` package matches with a timeout, but compiles counted repetitions by expanding them
(`a{1000000000}` takes many GB). So a pattern is first parsed by `re`'s own parser (peft and
transformers use `re`, so this is the syntax adapters are written for, and parsing expands
nothing); patterns that are too long, that nest an unbounded repetition in another (`(.*)*X`, the
classic catastrophic shape), or whose repetitions would expand too far are refused; then `regex`
compiles it and every match runs under a timeout (the backstop for the slow patterns no static rule
sees, like `(.|[a-z])*\d\d`).

The budget counts only the CPU time this thread spends matching, never the wall clock: time spent
elsewhere (opening checkpoints, building a meta model, other processes on a busy machine) is not
charged to a pattern. One match may take at most MATCH_SECONDS, and all the matches of one Matcher
at most BUDGET_SECONDS plus MATCH_ALLOWANCE per match made (a legitimate pattern costs a few
microseconds per module name, so thousands of names times dozens of keys stay far inside it).
`regex`'s own timeout is wall-clock, so a match that timed out while this thread was descheduled
is run again with the CPU time it has left.
"""

from __future__ import annotations

import re
import time

import regex

from .errors import ShadowMergeError

try:                                    # Python 3.11+
    from re import _constants as _c, _parser as _p
except ImportError:                     # pragma: no cover - Python 3.10
    import sre_constants as _c
    import sre_parse as _p

MAX_LENGTH = 1000           # characters of one pattern
MAX_EXPANSION = 10_000      # pattern items after expanding counted repetitions
MATCH_SECONDS = 1.0         # CPU time of one match
BUDGET_SECONDS = 2.0        # CPU time of all matching of one Matcher (an adapter config, or --include/--exclude) ...
MATCH_ALLOWANCE = 50e-6     # ... plus this much per match made


_REPEATS = tuple(op for op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)) if op)


def _children(op, av) -> list:
    """The sub-patterns of one node of re's parse tree (empty for a leaf: a literal, a class, an anchor)."""
    if op in _REPEATS:
        return [av[2]]
    if op == _c.SUBPATTERN:
        return [av[-1]]
    if op == _c.BRANCH:
        return list(av[1])
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [av[1]]
    if op == getattr(_c, "ATOMIC_GROUP", None):
        return [av]
    if op == _c.GROUPREF_EXISTS:
        return [b for b in av[1:] if b is not None]
    return []


def _nested_unbounded(items, inside: bool = False) -> bool:
    """Does an unbounded repetition contain another one (`(.*)*`, `(a+)+`): the shape that backtracks exponentially."""
    for op, av in items:
        unbounded = op in _REPEATS and av[1] == _c.MAXREPEAT
        if unbounded and inside:
            return True
        if any(_nested_unbounded(sub, inside or unbounded) for sub in _children(op, av)):
            return True
    return False


def _expansion(items) -> int:
    """Pattern items after expanding counted repetitions (what `regex` compiles), stopping past the bound."""
    total = 0
    for op, av in items:
        subs = _children(op, av)
        if op in _REPEATS:
            lo, hi, _ = av
            total += (max(lo, 1) if hi == _c.MAXREPEAT else max(lo, hi, 1)) * _expansion(subs[0])
        else:
            total += sum(_expansion(sub) for sub in subs) if subs else 1
        if total > MAX_EXPANSION:
            break
    return total


class Matcher:
    """Compiles and matches patterns of one source; `what` names it in errors (e.g. "--lora X: rank_pattern")."""

    def __init__(self, what: str, budget: float = BUDGET_SECONDS):
        self.what = what
        self.budget = budget            # CPU seconds left; grows by MATCH_ALLOWANCE with each match
        self._compiled: dict[str, regex.Pattern] = {}

    def compile(self, pattern: str, label: str) -> regex.Pattern:
        found = self._compiled.get(pattern)
        if found is not None:
            return found
        where = f"{self.what} {label}".strip()
        if not isinstance(pattern, str):
            raise ShadowMergeError(f"{where} is {type(pattern).__name__}, not a regular expression; write it as "
                                   f"a string")
        if len(pattern) > MAX_LENGTH:
            raise ShadowMergeError(f"{where} is {len(pattern)} characters long (at most {MAX_LENGTH}); shorten it")
        try:
            parsed = _p.parse(pattern)
        except (re.error, OverflowError, RecursionError) as exc:
            raise ShadowMergeError(f"{where} {pattern[:80]!r} is not a valid regular expression ({exc}); fix the "
                                   f"key (Python re syntax, with literal dots and brackets escaped by \\)") from None
        if _nested_unbounded(parsed):
            raise ShadowMergeError(f"{where} {pattern[:80]!r} nests one unbounded repetition in another (like "
                                   f"(.*)*), which can backtrack for minutes; simplify it")
        if _expansion(parsed) > MAX_EXPANSION:
            raise ShadowMergeError(f"{where} {pattern[:80]!r} repeats too much (counted repetitions expand past "
                                   f"{MAX_EXPANSION} items); simplify it")
        try:
            compiled = regex.compile(pattern, flags=regex.VERSION0)
        except (regex.error, OverflowError, RecursionError) as exc:
            raise ShadowMergeError(f"{where} {pattern[:80]!r} is not a valid regular expression ({exc}); fix the "
                                   f"key (Python re syntax, with literal dots and brackets escaped by \\)") from None
        self._compiled[pattern] = compiled
        return compiled

    def _run(self, method: str, pattern: str, text: str, label: str):
        compiled = self.compile(pattern, label)
        self.budget += MATCH_ALLOWANCE
        spent = 0.0
        while True:
            left = min(self.budget, MATCH_SECONDS - spent)
            if left <= 0:
                raise ShadowMergeError(f"{self.what} {label}".strip() + f" {pattern[:80]!r} takes too long to match "
                                       f"(catastrophic backtracking, e.g. on {text[:80]!r}); simplify it, e.g. "
                                       f"replace '.*' by '[^.]*' or anchor it to a module name") from None
            start = time.thread_time()
            try:
                return getattr(compiled, method)(text, timeout=left)
            except TimeoutError:
                pass                    # out of time, or descheduled: what it used decides
            finally:
                used = time.thread_time() - start
                spent += used
                self.budget -= used

    def search(self, pattern: str, text: str, label: str):
        return self._run("search", pattern, text, label)

    def match(self, pattern: str, text: str, label: str):
        return self._run("match", pattern, text, label)

    def fullmatch(self, pattern: str, text: str, label: str):
        return self._run("fullmatch", pattern, text, label)
