"""Swappable pipeline parts, each registered under a name:

- targets: how labels are read and encoded, the activation and the loss (multilabel, multiclass, pseudo);
- validation: the split and the score (f2 with tuned thresholds, accuracy + macro-F1);
- fit strategies: how training proceeds (single, two-stage);
- formatters: what a prediction file looks like (kaggle-planet, csv, jsonl);
- callbacks: what a plugin runs in every Ray Train worker at each epoch (none built in).

A new task is one new small part here (see README, "Adding a task").
"""

from qdeep.parts.callbacks import CALLBACKS
from qdeep.parts.fit import FIT_STRATEGIES
from qdeep.parts.formatters import FORMATTERS
from qdeep.parts.targets import TARGETS, infer_task
from qdeep.parts.validation import VALIDATIONS
from qdeep.registry import load_plugins

__all__ = ["CALLBACKS", "FIT_STRATEGIES", "FORMATTERS", "TARGETS", "VALIDATIONS", "infer_task", "load_plugins"]
