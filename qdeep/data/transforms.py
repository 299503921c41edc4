"""Image -> tensor transforms for CNNs. Satellite tiles have no "up": flips and 90-degree
rotations are label-preserving, which makes them the augmentation of choice here."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

AUGMENTS = ("d4", "flip", "strong", "none")
JITTER = 0.4  # `strong`: brightness, contrast and saturation each scaled by a factor in [1 - 0.4, 1 + 0.4]
CROP_SCALE = (0.2, 1.0)  # `strong`: a random-resized crop covers this fraction of the image's area


def resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 pixels resized (Pillow's bilinear, antialiased when shrinking) to (size, size, 3)."""
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))


def to_uint8(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resize (any input size) to (3, size, size) uint8 pixels: what travels between processes.
    `image`: a PIL RGB image, or its (H, W, 3) uint8 pixels (`images.rgb_pixels`)."""
    pixels = np.asarray(image, dtype=np.uint8) if isinstance(image, Image.Image) else image
    return np.ascontiguousarray(resized(pixels, size).transpose(2, 0, 1))


def to_unit(image: Image.Image, size: int) -> torch.Tensor:
    """Resize (any input size) to a (3, size, size) float tensor in [0, 1]."""
    return torch.from_numpy(to_uint8(image, size)).float() / 255.0


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@functools.lru_cache(maxsize=8)
def _affine(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    std_ = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return 1 / (255 * std_), torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_


def pixels_to_input(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, H, W) uint8 pixels (any strides) -> the normalised float tensor, in one conversion and two
    in-place steps: what `normalize(to_unit(...))` computes, to float32 rounding."""
    scale, shift = _affine(tuple(mean), tuple(std))
    return torch.from_numpy(np.ascontiguousarray(pixels)).float().mul_(scale).sub_(shift)


def to_tensor(image: Image.Image | np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize (any input size) and normalise with the architecture's own statistics."""
    return pixels_to_input(to_uint8(image, size), mean, std)


def train_input(image: Image.Image | np.ndarray, size: int, mean: Sequence[float], std: Sequence[float],
                rng: random.Random | None = None, crop: float = 0.0, kind: str = "d4") -> torch.Tensor:
    """An image as a training worker feeds it to the network: resized, augmented with `rng` (none
    without one) and normalised. Flips and rotations (d4, flip) move uint8 pixels before the one
    float conversion, drawing from `rng` as `augment` does, so the result is `augment`'s; `strong`
    and crops work on floats. The float steps cost as much as the decode (scripts/bench_ingest.py)."""
    pixels = to_uint8(image, size)
    if rng is None or kind == "none" and not crop:
        return pixels_to_input(pixels, mean, std)
    if kind in ("d4", "flip") and not crop:
        return pixels_to_input(augment_pixels(pixels, rng, kind), mean, std)
    return normalize(augment(torch.from_numpy(pixels).float() / 255.0, rng, crop, kind), mean, std)


def symmetry(rng: random.Random, kind: str = "d4") -> int:
    """`augment`'s flips and rotations (`d4`, `flip`), drawn from `rng` as it draws them, as one code:
    bit 0 a left-right flip, bit 1 an upside-down flip, bits 2-3 the quarter turns after them."""
    code = int(rng.random() < 0.5)
    if kind == "d4":
        code |= int(rng.random() < 0.5) << 1
        code |= rng.randrange(4) << 2
    return code


def augment_pixels(pixels: np.ndarray, rng: random.Random, kind: str = "d4") -> np.ndarray:
    """`augment`'s flips and rotations (`d4`, `flip`) on (3, H, W) pixels of any dtype, as views."""
    return turned(pixels, symmetry(rng, kind))


def turned(pixels: np.ndarray, code: int) -> np.ndarray:
    """(C, H, W) pixels flipped and rotated as the `symmetry` code says, as a view."""
    pixels = pixels[:, :, ::-1] if code & 1 else pixels
    return np.rot90(pixels[:, ::-1] if code & 2 else pixels, code >> 2, axes=(1, 2))


def finish(pixels: torch.Tensor, codes: torch.Tensor | None, mean: Sequence[float], std: Sequence[float]
           ) -> torch.Tensor:
    """(B, H, W, 3) uint8 pixels (square) -> the (B, 3, H, W) float32 input batch on their device:
    each image flipped and rotated as its `symmetry` code says (None: as it is), then normalised
    with `mean` and `std`. On the CPU image by image, while it is in cache: one strided copy from
    numpy views and the two in-place steps (faster here than the batched form, or than the float
    path `train_input` took per image); elsewhere `finish_in_groups`."""
    if pixels.device.type != "cpu":
        return finish_in_groups(pixels, codes, mean, std)
    scale, shift = _affine(tuple(mean), tuple(std))
    views = pixels.numpy().transpose(0, 3, 1, 2)
    out = torch.empty(views.shape, dtype=torch.float32)
    for i, code in enumerate(codes.tolist() if codes is not None else [0] * len(views)):
        np.copyto(out[i].numpy(), turned(views[i], code))
        out[i].mul_(scale).sub_(shift)
    return out


def finish_in_groups(pixels: torch.Tensor, codes: torch.Tensor | None, mean: Sequence[float],
                     std: Sequence[float]) -> torch.Tensor:
    """`finish` as batched device ops (a GPU's): one flip and rotation of the uint8 pixels per code
    present (at most 16), each group written into the float batch, normalised once."""
    chw = pixels.permute(0, 3, 1, 2)
    out = torch.empty(chw.shape, dtype=torch.float32, device=pixels.device)
    codes = torch.zeros(len(chw), dtype=torch.int64) if codes is None else codes
    codes = codes.to(pixels.device)
    for code in torch.unique(codes).tolist():
        at = (codes == code).nonzero().flatten()
        part = chw.index_select(0, at)
        part = part.flip(3) if code & 1 else part
        part = part.flip(2) if code & 2 else part
        out.index_copy_(0, at, torch.rot90(part, code >> 2, dims=(2, 3)).float())
    scale, shift = (t.to(out.device) for t in _affine(tuple(mean), tuple(std)))
    return out.mul_(scale).sub_(shift)


@dataclass
class PixelBatch:
    """A batch as a training worker's CPU leaves it: (B, H, W, 3) uint8 pixels, as decoded, and each
    image's `symmetry` code (None: no augmentation). `to(device)` moves the pixels (a quarter of the
    float input's bytes) and `finish`es them there, as the network's first step: the flips and
    rotations, the float conversion, the normalisation with `mean` and `std`. The result equals
    `train_input`'s for each image, bit for bit (tests/test_loader.py)."""
    pixels: torch.Tensor
    codes: torch.Tensor | None
    mean: tuple
    std: tuple

    def __len__(self) -> int:
        return len(self.pixels)

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        return finish(self.pixels.to(device, non_blocking=non_blocking), self.codes, self.mean, self.std)


def augment(x: torch.Tensor, rng: random.Random, crop: float = 0.0, kind: str = "d4") -> torch.Tensor:
    """Augment a [0, 1] image tensor (before normalisation).

    `d4`: random flips and 90-degree rotations (the 8 symmetries of a square: tiles seen from
    above); `flip`: left-right flips only (photos, scans with an "up"); `strong`: DeepCluster's
    pretext-task augmentation, a random-resized crop (`CROP_SCALE` of the area, aspect 3/4 to 4/3),
    a left-right flip and colour jitter, so a network cannot learn its own clusters from pixels
    alone; `none`. With crop > 0, also a random crop of up to that fraction of the side, resized back.
    """
    from torchvision.transforms.v2 import functional as F

    if kind not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {kind!r}")
    side = x.shape[1]
    if kind == "strong":
        top, left, h, w = _resized_crop_box(side, rng)
        x = F.resized_crop(x, top, left, h, w, [side, side], antialias=True)
        for adjust in rng.sample([F.adjust_brightness, F.adjust_contrast, F.adjust_saturation], 3):
            x = adjust(x, rng.uniform(1 - JITTER, 1 + JITTER))
        x = x.clamp(0, 1)
    if kind != "none" and rng.random() < 0.5:
        x = x.flip(2)
    if kind == "d4":
        if rng.random() < 0.5:
            x = x.flip(1)
        x = torch.rot90(x, rng.randrange(4), dims=(1, 2))
    if crop > 0:
        cut = rng.randint(0, int(side * crop))
        if cut:
            top, left = rng.randint(0, cut), rng.randint(0, cut)
            x = x[:, top : top + side - cut, left : left + side - cut]
            x = torch.nn.functional.interpolate(x[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    return x


def _resized_crop_box(side: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) in a square image, as torchvision's RandomResizedCrop draws it, from `rng`."""
    for _ in range(10):
        target = side * side * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= side and 0 < h <= side:
            return rng.randint(0, side - h), rng.randint(0, side - w), h, w
    return 0, 0, side, side
