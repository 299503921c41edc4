"""Output formatters: how predictions are written for their consumer."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from qdeep import io


def write_kaggle_submission(path: str | Path, names: Sequence[str], tags: Sequence[str]) -> None:
    """Kaggle Planet format: header `image_name,tags`, tags space-separated; written atomically."""
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_name", "tags"])
        writer.writerows(zip(names, tags))


FORMATTERS = {"kaggle": write_kaggle_submission}
