"""`shadowmerge train`: tune the Base with an existing trainer (TRL or LLaMA-Factory), then graft.

recipe.py holds the settings, data.py reads and checks the data, checks.py the cheap checks before
training, trl_backend.py and llamafactory.py hand the training to a trainer, run.py ties it together.
"""

from .recipe import Recipe, load
from .run import TrainSummary, finish, train

__all__ = ["Recipe", "TrainSummary", "finish", "load", "train"]
