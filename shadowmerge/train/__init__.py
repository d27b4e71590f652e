"""`shadowmerge train`: tune the Base with an existing trainer (TRL or LLaMA-Factory), then graft.

recipe.py holds the settings, data.py reads and checks the data, prepare.py runs every check before training
(checks.py, schedule.py, checkpoints.py) and builds the Run the stages share, backends.py is the trainer
interface that trl_backend.py and llamafactory.py implement, run.py is the stages in order, outputs.py the
card and loss plot beside the models.
"""

from .recipe import Recipe, load
from .run import TrainSummary, finish, train

__all__ = ["Recipe", "TrainSummary", "finish", "load", "train"]
