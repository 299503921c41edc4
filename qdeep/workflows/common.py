"""Pieces every workflow shares: where the data comes from, image features under the policy."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from qdeep.data import BadInputPolicy, Dataset, ImageSet, load_class_folders, load_labeled_folder, load_planet
from qdeep.errors import QdeepError
from qdeep.parallel import check_visible_everywhere, map_images


def load_dataset(policy: BadInputPolicy, data: str | Path | None = None, labels: str | Path | None = None,
                 images: str | Path | None = None) -> Dataset:
    """`--data DIR` (Kaggle Planet layout), `--labels CSV --images DIR`, or `--images DIR` alone
    (one sub-folder per class)."""
    if data and not (labels or images):
        return load_planet(data, policy)
    if labels and images and not data:
        return load_labeled_folder(labels, images, policy)
    if images and not (data or labels):
        return load_class_folders(images, policy)
    raise QdeepError("give --data DIR, or --labels CSV with --images DIR, or --images DIR (a folder per class)")


def image_features(fn: Callable, images: ImageSet, policy: BadInputPolicy, desc: str) -> tuple[np.ndarray, ImageSet]:
    """Features of every decodable image; undecodable ones go to the policy and are left out. Images
    some node cannot see stop the run (`ImagesNotVisible`), whatever the policy."""
    check_visible_everywhere(images.paths)
    x, errors = map_images(fn, images.paths, desc=desc)
    keep = np.ones(len(images), dtype=bool)
    for i, reason in errors:
        origin = images.origins[i] if images.origins else None
        if origin and origin != str(images.paths[i]):  # the CSV line that names the image
            reason = f"{reason}, named on {origin}"
        policy.report(str(images.paths[i]), reason)
        keep[i] = False
    if keep.all():
        return x, images
    return x[keep], images.subset(keep.tolist())


def _decode_only(image) -> np.ndarray:
    return np.zeros(0, dtype=np.float32)


def check_images(images: ImageSet, policy: BadInputPolicy, desc: str = "checking images") -> ImageSet:
    """Decode every image once on Ray so bad files meet the policy before training starts."""
    return image_features(_decode_only, images, policy, desc)[1]
