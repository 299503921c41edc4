"""Targets: how tags become the arrays a model learns, and back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from qdeep import io


class MultiLabelTargets:
    """Planet-style targets: any number of tags per image, one 0/1 column per tag.

    The vocabulary is saved with every model so prediction uses the training order.
    """

    kind = "multilabel"

    def __init__(self, vocabulary: Sequence[str]):
        self.vocabulary = list(vocabulary)
        self._index = {t: i for i, t in enumerate(self.vocabulary)}

    @classmethod
    def from_tags(cls, tag_lists: Sequence[Sequence[str]]) -> "MultiLabelTargets":
        return cls(sorted({t for tags in tag_lists for t in tags}))

    def __len__(self) -> int:
        return len(self.vocabulary)

    def encode(self, tag_lists: Sequence[Sequence[str]]) -> np.ndarray:
        y = np.zeros((len(tag_lists), len(self.vocabulary)), dtype=np.uint8)
        for i, tags in enumerate(tag_lists):
            for t in tags:
                if t not in self._index:
                    raise ValueError(f"tag {t!r} is not in the vocabulary {self.vocabulary}")
                y[i, self._index[t]] = 1
        return y

    def decode(self, y: np.ndarray) -> list[str]:
        """Rows of 0/1 (or bool) to space-separated tag strings, in vocabulary order."""
        vocab = np.asarray(self.vocabulary, dtype=object)
        return [" ".join(vocab[row.astype(bool)]) for row in np.asarray(y)]

    def save(self, path: str | Path) -> None:
        io.write_json(path, {"kind": self.kind, "labels": self.vocabulary})

    @classmethod
    def load(cls, path: str | Path) -> "MultiLabelTargets":
        return cls(json.loads(Path(path).read_text())["labels"])
