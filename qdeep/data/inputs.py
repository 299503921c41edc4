"""How an image becomes a network's input, the same in training, prediction, feature extraction and
DeepCluster: `RGBInput` (8-bit RGB through Pillow, normalised with the architecture's statistics) or
`RasterInput` (chosen bands of a multiband GeoTIFF, normalised with the training set's per-band
statistics). `InputBands` is what a multiband model keeps: it travels in run configs and is saved
with the model (config.json "bands"), so predict reads and normalises images as training did."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image

from qdeep.config import IMAGE_FORMATS
from qdeep.data.images import rgb_pixels
from qdeep.data.rasters import (BandLayout, BandStats, Raster, band_indices, band_names, band_statistics,
                                raster_input, read_raster, sample_rasters, training_sample)
from qdeep.data.transforms import resized, train_input
from qdeep.errors import QdeepError


@dataclass(frozen=True)
class InputBands:
    """A multiband data set as a network sees it: the files' bands it takes (0-based, in input
    order) and their names (what `models.bands.adapt_bands` keeps RGB kernels for), every file
    band's statistics (from a sample of the training images), and the layout every file must have."""
    index: tuple[int, ...]
    names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    count: int
    dtype: str
    first: str

    @classmethod
    def of(cls, sources: Sequence, spec: str | None = None, names: Sequence[str] | None = None) -> InputBands:
        """The bands that `spec` (`--bands`: names or 1-based numbers; None: all) selects of the
        training images `sources` (paths, or files' bytes called `names`), their statistics from a
        sample of them."""
        rasters, layout = sample_rasters(sources, names=names)
        known = band_names(layout.count)
        index = tuple(band_indices(spec, layout.count, known))
        stats = band_statistics(rasters)
        # unnamed bands are called by their 1-based number: none of them is taken for R, G or B
        names = tuple(known[i] if known else str(i + 1) for i in index)
        return cls(index, names, stats.mean, stats.std, layout.count, layout.dtype, layout.first)

    def preview(self, src, name: str = "image bytes") -> Image.Image:
        """An 8-bit RGB picture of the image at `src` for people (cluster grids): its red, green and
        blue bands (else its first three bands, or its first in grey), each stretched between its
        2nd and 98th percentile, no data black."""
        raster = self.read(src, name)
        known = band_names(self.count)
        shown = [known.index(c) for c in RGBInput.names] if set(RGBInput.names) <= set(known) else list(self.index[:3])
        shown = (shown * 3)[:3] if len(shown) < 3 else shown
        planes = []
        for band in raster.as_float()[shown]:
            valid = band[~np.isnan(band)]
            low, high = np.percentile(valid, (2, 98)) if valid.size else (0.0, 1.0)
            planes.append(np.nan_to_num(np.clip((band - low) / max(high - low, 1e-12), 0, 1) * 255, nan=0.0))
        return Image.fromarray(np.stack(planes, axis=-1).astype(np.uint8))

    def only(self, names: Sequence[str]) -> InputBands | None:
        """These of its bands (by name, in this order), or None where it lacks one."""
        if not set(names) <= set(self.names):
            return None
        return replace(self, index=tuple(self.index[self.names.index(n)] for n in names), names=tuple(names))

    @property
    def extra(self) -> tuple[str, ...]:
        """Its bands beyond the visible ones that pretrained kernels were learnt on."""
        return tuple(n for n in self.names if n not in RGBInput.names)

    def read(self, src, name: str = "image bytes") -> Raster:
        """The raster at `src` (a path, or its bytes, called `name` in errors), checked to have the
        training set's layout: a file of other bands is bad input naming it."""
        raster = read_raster(src, name)
        BandLayout(self.count, self.dtype, self.first, "training set").check(
            raster, name if isinstance(src, (bytes, bytearray, memoryview)) else src)
        return raster

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict, where: str) -> InputBands:
        """`to_dict`'s output read back (from a run config or a model's config.json, `where`)."""
        try:
            bands = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
            ok = (bands.index and len(bands.names) == len(bands.index) and all(0 <= i < bands.count for i in bands.index)
                  and len(bands.mean) == len(bands.std) == bands.count and np.dtype(bands.dtype).kind in "uif")
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise QdeepError(f"{where}: `bands` is not a multiband input of `qdeep train` ({str(saved)[:200]})")
        return bands


@dataclass(frozen=True)
class RGBInput:
    """8-bit RGB images, normalised with the architecture's `mean` and `std`, at `size` px."""
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    names = ("r", "g", "b")

    def __call__(self, ref, rng: random.Random | None = None, crop: float = 0.0, augment: str = "d4",
                 name: str = "image bytes") -> torch.Tensor:
        """The input tensor of the image at `ref` (a path, or its bytes, called `name` in errors),
        augmented with `rng` (none without one)."""
        return train_input(rgb_pixels(ref, name), self.size, self.mean, self.std, rng, crop, augment)

    def pixels(self, ref, name: str = "image bytes") -> np.ndarray:
        """The image at `ref` as (size, size, 3) uint8 pixels, for a `transforms.PixelBatch`."""
        return resized(rgb_pixels(ref, name), self.size)

    def finishes_on_device(self, augment: str, crop: float) -> bool:
        """Whether a batch can leave the CPU as pixels (`transforms.PixelBatch`) to be converted,
        normalised and augmented on the device: with flips and rotations only, no crop."""
        return augment in ("d4", "flip", "none") and not crop


@dataclass(frozen=True)
class RasterInput:
    """Multiband images: `bands` of each file (checked against the training set's layout), at `size` px."""
    size: int
    bands: InputBands

    @property
    def names(self) -> tuple[str, ...]:
        return self.bands.names

    def __call__(self, ref, rng: random.Random | None = None, crop: float = 0.0, augment: str = "d4",
                 name: str = "image bytes") -> torch.Tensor:
        raster = self.bands.read(ref, name)
        stats = BandStats(self.bands.mean, self.bands.std, (), ())
        return raster_input(raster, self.bands.index, self.size, stats, rng, augment, crop)

    def finishes_on_device(self, augment: str, crop: float) -> bool:
        return False  # bands of any dtype, normalised per band on the CPU


def model_input(arch_spec, size: int | None, bands: InputBands | None):
    """What the network `arch_spec` (a zoo ArchSpec) is fed at `size` px (None: its own): RGB with
    its statistics, or `bands`."""
    size = size or arch_spec.input_size
    return RasterInput(size, bands) if bands else RGBInput(size, tuple(arch_spec.mean), tuple(arch_spec.std))


def input_bands(image_format: str, paths: Sequence, spec: str | None = None, pack=None) -> InputBands | None:
    """A data set's InputBands for `--image-format tif` (None for jpg, which takes no `--bands`):
    from its training images at `paths`, or in `pack` (a `data.pack.Pack`; `paths` are then names in it)."""
    if image_format not in IMAGE_FORMATS:
        raise QdeepError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    if image_format == "jpg":
        if spec:
            raise QdeepError("--bands is for multiband images: add --image-format tif")
        return None
    sources, names = training_sample(paths, pack)
    return InputBands.of(sources, spec, names)


__all__ = ["IMAGE_FORMATS", "InputBands", "RGBInput", "RasterInput", "input_bands", "model_input"]
