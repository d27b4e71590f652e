"""Print, as JSON, the token ids TRL's trainer (shadowmerge's trl backend, built but not trained) tokenizes
the rows of a data file into, and the positions it trains on. Run by test_roundtrip.py with the main
virtualenv's Python (TRL >= 0.29 cannot share LLaMA-Factory's): python trl_tokens.py STAGE BASE INSTRUCT DATA
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from shadowmerge.train import data, trl_backend
from shadowmerge.train.recipe import Recipe


def main(stage: str, base: str, instruct: str, path: str) -> None:
    raw, _ = data.read_rows(path)
    rows, _ = data.prepare(raw, stage, path, None)
    recipe = Recipe(base=base, instruct=instruct, data=path, out="unused", stage=stage, bf16=False, lora_rank=4,
                    max_steps=1).resolved()
    trainer = trl_backend.build(recipe, Path(base), Path(instruct), rows, Path(tempfile.mkdtemp()) / "model")
    out = []
    for row in trainer.train_dataset:
        if stage == "sft":
            ids = list(row["input_ids"])
            if "labels" in row:
                trained = [k for k, label in enumerate(row["labels"]) if label != -100]
            else:
                trained = [k for k, m in enumerate(row["completion_mask"]) if m]
            out.append([{"ids": ids, "trained": trained}])
        else:
            prompt = list(row["prompt_ids"])
            out.append([{"ids": prompt + list(row[f"{side}_ids"]),
                         "trained": list(range(len(prompt), len(prompt) + len(row[f"{side}_ids"])))}
                        for side in ("chosen", "rejected")])
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:5])
