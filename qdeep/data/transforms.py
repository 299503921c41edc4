"""Image -> tensor transforms for CNNs. Satellite tiles have no "up": flips and 90-degree
rotations are label-preserving, which makes them the augmentation of choice here."""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_tensor(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize (any input size) and normalise with the architecture's own statistics."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def augment(x: torch.Tensor, rng: random.Random, crop: float = 0.0) -> torch.Tensor:
    """Random flips and 90-degree rotations; with crop > 0, a random crop of up to that fraction
    of the side, resized back."""
    if rng.random() < 0.5:
        x = x.flip(2)
    if rng.random() < 0.5:
        x = x.flip(1)
    x = torch.rot90(x, rng.randrange(4), dims=(1, 2))
    if crop > 0:
        side = x.shape[1]
        cut = rng.randint(0, int(side * crop))
        if cut:
            top, left = rng.randint(0, cut), rng.randint(0, cut)
            x = x[:, top : top + side - cut, left : left + side - cut]
            x = torch.nn.functional.interpolate(x[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    return x
