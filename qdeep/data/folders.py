"""Generic image folders: any tree of images, for prediction and clustering."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qdeep.data.images import IMAGE_EXTENSIONS, BadInputPolicy, is_image_file
from qdeep.errors import QdeepError


def image_id(path: Path, root: Path) -> str:
    """The name a prediction row carries: path below the root, without extension ('test_0')."""
    return path.relative_to(root).with_suffix("").as_posix()


def scan_images(root: str | Path, policy: BadInputPolicy, recursive: bool = True) -> list[Path]:
    """All supported images under `root` (absolute paths, sorted); other files go to the policy."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise QdeepError(f"{root}: not a directory")
    found = root.rglob("*") if recursive else root.iterdir()
    images = []
    for path in sorted(found):
        if path.is_dir():
            continue
        if is_image_file(path):
            images.append(path)
        else:
            policy.report(str(path), f"unsupported file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    return images


def spread(items: Sequence, n: int) -> list:
    """Up to n of `items` evenly spread over the list, first and last included."""
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]
