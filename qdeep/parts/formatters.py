"""Output formatters: how predictions are written for their consumer. Each writes atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from qdeep import io
from qdeep.registry import Registry

FORMATTERS: Registry = Registry("output format")


def write_kaggle_submission(path: str | Path, names: Sequence[str], tags: Sequence[str]) -> None:
    """Kaggle Planet format: header `image_name,tags`, tags space-separated; written atomically."""
    io.write_csv(path, ["image_name", "tags"], zip(names, tags))


def _label_key(targets) -> str:
    return "labels" if targets.kind == "multilabel" else "label"


@FORMATTERS.register("kaggle-planet")
class KagglePlanet:
    """`image_name,tags` with space-separated tags: what the Planet competition scores."""

    def write(self, path, names: Sequence[str], targets, proba: np.ndarray, pred: np.ndarray) -> None:
        write_kaggle_submission(path, names, targets.decode(pred))


@FORMATTERS.register("csv")
class Csv:
    """`image`, the prediction (`labels`, space-separated, or `label`), then `p_<class>` per class."""

    def write(self, path, names, targets, proba, pred) -> None:
        io.write_csv(path, ["image", _label_key(targets), *(f"p_{c}" for c in targets.vocabulary)],
                     ([name, decoded, *(f"{p:.6f}" for p in row)]
                      for name, decoded, row in zip(names, targets.decode(pred), np.asarray(proba))))


@FORMATTERS.register("jsonl")
class JsonLines:
    """One object per image: `image`, `labels` (a list) or `label`, and `scores` by class."""

    def write(self, path, names, targets, proba, pred) -> None:
        key = _label_key(targets)
        with io.atomic_path(path) as tmp, open(tmp, "w") as f:
            for name, decoded, row in zip(names, targets.decode(pred), np.asarray(proba)):
                value = decoded.split() if key == "labels" else decoded
                scores = {c: round(float(p), 6) for c, p in zip(targets.vocabulary, row)}
                f.write(json.dumps({"image": name, key: value, "scores": scores}) + "\n")


def default_format(targets) -> str:
    return "kaggle-planet" if targets.kind == "multilabel" else "csv"
