"""Held-out loss: each model's mean negative log-likelihood per trained token on the user's own rows.

The rows are read and checked as `train --data` reads them (messages, alpaca, sharegpt; preference
rows count their chosen answer). Each model formats them with its own tokenizer and chat template,
and the tokens that count are exactly those TRL's SFT trainer puts into the loss: the completion
(the last assistant turn, with the template's end-of-turn tokens), starting where the prompt with a
generation prompt and the whole conversation stop agreeing (train.data.expected_tokens), each
predicted from the tokens before it; a row is cut at `cutoff` tokens as training cuts it. One row
per forward pass (no padding, so a row's loss never depends on its neighbours), the head computed only
at the positions that predict a counted token (`logits_to_keep`); log-softmax in float32, sums in
float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ShadowMergeError


@dataclass
class Heldout:
    ref: str
    digest: str
    fmt: str
    rows: list[dict]                  # {"prompt": [...], "completion": [...]}


@dataclass
class RowLosses:
    nll: list[float]                  # per row: Σ −log p(token) over its counted tokens
    tokens: list[int]                 # per row: how many tokens counted

    @property
    def nll_per_token(self) -> float:
        return sum(self.nll) / sum(self.tokens)


def read(ref: str | Path) -> Heldout:
    """The held-out rows, checked (a bad row: one line naming its number and field)."""
    from ..train import data

    raw, digest = data.read_rows(str(ref))
    if raw and isinstance(raw[0], dict) and data.detect(raw[0], f"{ref} row 1") == "preference":
        rows, fmt = data.prepare(raw, "dpo", str(ref))
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    else:
        rows, fmt = data.prepare(raw, "sft", str(ref))
    if any("images" in r for r in rows):
        raise ShadowMergeError(f"--heldout {ref}: rows with images are not supported for held-out loss; pass "
                               f"text rows")
    return Heldout(str(ref), digest, fmt, rows)


def tokens(tokenizer, heldout: Heldout, cutoff: int) -> list[tuple[list[int], int]]:
    """Per row: (token ids, cut at cutoff; index of the first counted token)."""
    from ..train.data import expected_tokens

    out = []
    for n, row in enumerate(heldout.rows, 1):
        try:
            ids, start = expected_tokens(tokenizer, row["prompt"], row["completion"])
        except Exception as exc:       # noqa: BLE001 - a template that cannot render a stranger's row
            raise ShadowMergeError(f"--heldout {heldout.ref} row {n}: the chat template cannot format it "
                                   f"({type(exc).__name__}: {str(exc)[:120]}); fix the row or the template") from None
        out.append((ids[:cutoff], max(start, 1)))
    if not any(start < len(ids) for ids, start in out):
        raise ShadowMergeError(f"--heldout {heldout.ref}: no row has an answer token within the first {cutoff} "
                               f"tokens; raise --heldout-cutoff")
    return out


def score(model, rows: list[tuple[list[int], int]], on_row=None) -> RowLosses:
    """Each row's NLL sum and token count under model (a transformers causal LM, in eval mode)."""
    import torch

    device = next(model.parameters()).device
    nll, counts = [], []
    with torch.inference_mode():
        for ids, start in rows:
            if start >= len(ids):
                nll.append(0.0)
                counts.append(0)
                continue
            x = torch.tensor([ids], device=device)
            keep = len(ids) - start + 1        # the head only where a counted token is predicted (and the last)
            logits = model(input_ids=x, logits_to_keep=keep).logits[0, :-1].float()
            target = x[0, start:]
            logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
            nll.append(-float(logp.double().sum()))
            counts.append(len(ids) - start)
            if on_row is not None:
                on_row()
    return RowLosses(nll, counts)
