"""Targets: how labels become the arrays a model learns, which activation and loss go with them,
and how predictions become labels again. The vocabulary is saved with every model so prediction
uses the training order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qdeep import io
from qdeep.errors import QdeepError
from qdeep.registry import Registry

TARGETS: Registry = Registry("task")


class Targets:
    """The contract every task's targets keep; subclasses fill in the encoding and the loss."""

    name: str  # the registry name, set by TARGETS.register
    validation = "f2"  # the validation part that scores this task by default
    dtype = np.float32  # what the loss takes (float rows for BCE, int64 class ids for cross-entropy)

    def __init__(self, vocabulary: Sequence[str]):
        self.vocabulary = [str(v) for v in vocabulary]
        self._index = {t: i for i, t in enumerate(self.vocabulary)}

    @classmethod
    def from_labels(cls, label_lists: Sequence[Sequence[str]]) -> "Targets":
        return cls(sorted({t for labels in label_lists for t in labels}))

    def __len__(self) -> int:
        return len(self.vocabulary)

    @property
    def kind(self) -> str:
        return self.name

    def encode(self, label_lists: Sequence[Sequence[str]], origins: Sequence[str] | None = None) -> np.ndarray:
        """One row per image; errors name the image by `origins[i]` (its CSV line) when given."""
        raise NotImplementedError

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, weights: Sequence[float] | None = None) -> torch.nn.Module:
        raise NotImplementedError

    def loss_weights(self, y: np.ndarray) -> list[float]:
        """Weights that balance rare labels or classes in the loss (`--balance weights`)."""
        raise NotImplementedError

    def decide(self, proba: np.ndarray, thresholds: Sequence[float] | None = None) -> np.ndarray:
        """Probabilities to predictions (what `decode` and the scores take)."""
        raise NotImplementedError

    def decode(self, pred: np.ndarray) -> list[str]:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """labels.json, which `load_targets` reads back."""
        io.write_json(path, {"kind": self.kind, "labels": self.vocabulary})

    def _ids(self, labels: Sequence[str], where: str) -> list[int]:
        """Vocabulary indices of one image's labels; an unknown label names `where` the image came from."""
        for label in labels:
            if label not in self._index:
                raise QdeepError(f"{where}: label {label!r} is not in the vocabulary {self.vocabulary}")
        return [self._index[label] for label in labels]


def _where(origins: Sequence[str] | None, i: int) -> str:
    """How an error names image `i`: its origin (a CSV line) when known."""
    return origins[i] if origins else f"image {i}"


@TARGETS.register("multilabel")
class MultiLabelTargets(Targets):
    """Planet-style: any number of tags per image, one 0/1 column per tag; sigmoid + BCE."""

    @classmethod
    def from_tags(cls, tag_lists: Sequence[Sequence[str]]) -> "MultiLabelTargets":
        return cls.from_labels(tag_lists)

    def encode(self, label_lists, origins=None) -> np.ndarray:
        y = np.zeros((len(label_lists), len(self)), dtype=np.uint8)
        for i, tags in enumerate(label_lists):
            y[i, self._ids(tags, _where(origins, i))] = 1
        return y

    def activation(self, logits):
        return torch.sigmoid(logits)

    def loss(self, weights=None):
        return torch.nn.BCEWithLogitsLoss(pos_weight=None if weights is None else torch.tensor(weights))

    def loss_weights(self, y):
        positives = y.sum(0)
        return ((len(y) - positives) / np.maximum(positives, 1)).tolist()

    def decide(self, proba, thresholds=None):
        from qdeep.metrics import binarize

        return binarize(proba, np.full(proba.shape[1], 0.5) if thresholds is None else np.asarray(thresholds))

    def decode(self, pred) -> list[str]:
        """Rows of 0/1 (or bool) to space-separated tag strings, in vocabulary order."""
        vocab = np.asarray(self.vocabulary, dtype=object)
        return [" ".join(vocab[row.astype(bool)]) for row in np.asarray(pred)]


@TARGETS.register("multiclass")
class MultiClassTargets(Targets):
    """Exactly one label per image (a folder per class, or one label per CSV row); softmax + cross-entropy."""

    validation = "accuracy"
    dtype = np.int64

    def encode(self, label_lists, origins=None) -> np.ndarray:
        y = np.empty(len(label_lists), dtype=np.int64)
        for i, labels in enumerate(label_lists):
            if len(labels) != 1:
                raise QdeepError(f"{_where(origins, i)}: {len(labels)} labels {' '.join(labels)!r}; "
                                 "a multiclass task needs exactly one per image (use --task multilabel?)")
            y[i] = self._ids(labels, _where(origins, i))[0]
        return y

    def activation(self, logits):
        return torch.softmax(logits, dim=1)

    def loss(self, weights=None):
        return torch.nn.CrossEntropyLoss(weight=None if weights is None else torch.tensor(weights, dtype=torch.float32))

    def loss_weights(self, y):
        return balanced_class_weights(y, len(self)).tolist()

    def decide(self, proba, thresholds=None):
        return np.asarray(proba).argmax(1)

    def decode(self, pred) -> list[str]:
        return [self.vocabulary[int(i)] for i in np.asarray(pred)]


@TARGETS.register("pseudo")
class PseudoTargets(MultiClassTargets):
    """Cluster ids as classes (what DeepCluster trains on): the vocabulary is "0".."k-1"."""

    @classmethod
    def for_clusters(cls, k: int) -> "PseudoTargets":
        return cls([str(i) for i in range(k)])


def balanced_class_weights(labels: np.ndarray, k: int) -> np.ndarray:
    """Per-class loss weights inversely proportional to size (scikit-learn's "balanced", the seed
    article's choice for clusters); classes no image carries get weight 0."""
    from sklearn.utils.class_weight import compute_class_weight

    weights = np.zeros(k, dtype=np.float32)
    present = np.unique(labels)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights


def infer_task(data=None, labels=None, images=None) -> str:
    """A Planet layout or a labels CSV means multilabel; `--images DIR` alone (a folder per class), multiclass."""
    return "multiclass" if images and not (data or labels) else "multilabel"


def load_targets(path: str | Path) -> Targets:
    """A model's labels.json, as the targets part that wrote it."""
    saved = json.loads(Path(path).read_text())
    return TARGETS.get(saved.get("kind", "multilabel"))(saved["labels"])
