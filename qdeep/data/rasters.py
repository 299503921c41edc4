"""Multiband rasters: GeoTIFFs with any number of bands and 8/16-bit or float samples, which Pillow
cannot hold (it stops at 8 bits per channel for more than one band). Written and read with
tifffile, the maintained TIFF codec that scikit-image and TorchGeo's readers build on.

Planet's analytic chips (`train-tif-v2/`) are 4-band 16-bit GeoTIFFs, bands in the order blue,
green, red, near-infrared (PLANET_BANDS)."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from qdeep.data.folders import spread
from qdeep.data.images import ImageDecodeError
from qdeep.errors import QdeepError

if TYPE_CHECKING:
    import torch

PLANET_BANDS = ("b", "g", "r", "nir")
_GDAL_NODATA = 42113  # GDAL's TIFF tag for the no-data value, an ASCII number
_KINDS = "uif"  # unsigned and signed integers, floats: what a band may hold

# GeoTIFF tags (OGC GeoTIFF 1.1): pixel size, the tie point of pixel (0, 0), and the key directory
_MODEL_PIXEL_SCALE, _MODEL_TIEPOINT, _GEO_KEY_DIRECTORY = 33550, 33922, 34735
_UTM_21S = 32721  # EPSG code of WGS 84 / UTM zone 21S, over the Amazon basin


def write_geotiff(path: str | os.PathLike, bands: np.ndarray, origin: tuple[float, float] = (500_000.0, 9_000_000.0),
                  pixel_m: float = 3.0, epsg: int = _UTM_21S) -> None:
    """`bands` (count, height, width; uint8, uint16 or float32) as an uncompressed GeoTIFF, one
    plane per band, georeferenced north-up at `origin` (the upper-left corner, metres in `epsg`)
    with square pixels of `pixel_m` metres (Planet's are 3 m)."""
    if bands.ndim != 3:
        raise ValueError(f"bands must be (count, height, width), got shape {bands.shape}")
    keys = [1, 1, 0, 3,  # version 1.1.0, 3 keys: projected, pixel-is-area, the CRS
            1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg]
    tifffile.imwrite(path, bands, photometric="minisblack", planarconfig="separate", metadata=None, extratags=[
        (_MODEL_PIXEL_SCALE, "d", 3, (pixel_m, pixel_m, 0.0), True),
        (_MODEL_TIEPOINT, "d", 6, (0.0, 0.0, 0.0, origin[0], origin[1], 0.0), True),
        (_GEO_KEY_DIRECTORY, "H", len(keys), keys, True),
    ])


@dataclass(frozen=True)
class Raster:
    """One image's bands (count, height, width) as stored, and its no-data value (None: none)."""
    bands: np.ndarray
    nodata: float | None = None

    def as_float(self) -> np.ndarray:
        """float32 bands with NaN where a sample is the no-data value."""
        out = self.bands.astype(np.float32)
        if self.nodata is not None:
            out[self.bands == self.nodata] = np.nan
        return out


def read_raster(src: str | Path | bytes, name: str = "image bytes") -> Raster:
    """A TIFF/GeoTIFF's first image, any number of bands, 8/16/32-bit integer or float samples, as
    (count, height, width) whether its samples are interleaved or in planes; `src` is a path or the
    file's bytes (`name` in errors). Corrupt, truncated or unreadable files raise ImageDecodeError."""
    where = name if isinstance(src, (bytes, bytearray, memoryview)) else src
    try:
        with tifffile.TiffFile(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src) as tif:
            page = tif.pages.first
            bands, axes = page.asarray(), page.axes
            nodata = page.tags.valueof(_GDAL_NODATA)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for bad files; all mean "unreadable"
        raise ImageDecodeError(where, f"cannot decode TIFF ({type(exc).__name__}: {exc})") from None
    if bands.dtype.kind not in _KINDS or bands.ndim not in (2, 3):
        raise ImageDecodeError(where, f"unreadable samples: {bands.dtype} of shape {bands.shape} (axes {axes})")
    if bands.ndim == 2:
        bands = bands[None]
    elif axes.endswith("S"):  # interleaved: height, width, samples
        bands = np.moveaxis(bands, -1, 0)
    try:
        nodata = None if nodata is None else float(str(nodata).strip("\x00 "))
    except ValueError:
        raise ImageDecodeError(where, f"unreadable no-data value {nodata!r} (GDAL_NODATA)") from None
    return Raster(np.ascontiguousarray(bands), nodata)


@dataclass(frozen=True)
class BandLayout:
    """What every image of a data set must have: as many bands, of one sample type, as its first."""
    count: int
    dtype: str
    first: str  # that first image, named in errors
    of_set: str = "data set"  # whose first image it is, in errors ("training set" for a saved model's)

    @classmethod
    def of(cls, raster: Raster, where: str | Path) -> BandLayout:
        return cls(raster.bands.shape[0], str(raster.bands.dtype), str(where))

    def check(self, raster: Raster, where: str | Path) -> None:
        count, dtype = raster.bands.shape[0], str(raster.bands.dtype)
        if (count, dtype) != (self.count, self.dtype):
            raise ImageDecodeError(where, f"has {count} band(s) of {dtype}; the {self.of_set}'s first image "
                                          f"{self.first} has {self.count} of {self.dtype}")


SAMPLE = 64  # training images whose bands give a data set's statistics and ranges


def training_sample(paths: Sequence, pack=None) -> tuple[list, list[str]]:
    """Up to SAMPLE of a data set's training images spread over `paths`: (their paths, or with
    `pack`, a `data.pack.Pack` whose names `paths` are, their bytes; and what to call them)."""
    picked = spread(paths, SAMPLE)
    if pack is None:
        return picked, [str(p) for p in picked]
    found = pack.images(picked)
    return [found[name] for name in picked], [f"{pack.uri}:{name}" for name in picked]


def sample_rasters(sources: Sequence, n: int = SAMPLE, names: Sequence[str] | None = None
                   ) -> tuple[list[Raster], BandLayout]:
    """Up to `n` of the images `sources` (paths, or files' bytes called `names`), spread over the
    list, and the layout of the first that decodes. Images that do not decode, or whose bands differ
    from that first one's, are left out here (the pass over every image reports them as bad input)."""
    picked = spread(range(len(sources)), n)
    rasters, layout = [], None
    for i in picked:
        source, name = sources[i], names[i] if names is not None else str(sources[i])
        try:
            raster = read_raster(source, name)
            layout = layout or BandLayout.of(raster, name)
            layout.check(raster, name)
        except ImageDecodeError:
            continue
        rasters.append(raster)
    if layout is None:
        raise QdeepError(f"none of {len(picked)} training images sampled decodes as a TIFF (--image-format tif)")
    return rasters, layout


def band_names(count: int) -> tuple[str, ...]:
    """What the bands of images with `count` bands are called: Planet's for 4, else nothing known."""
    return PLANET_BANDS if count == len(PLANET_BANDS) else ()


def band_indices(spec: str | None, count: int, names: Sequence[str] = ()) -> list[int]:
    """The 0-based bands that `--bands` selects, in its order: comma-separated names (of `names`,
    e.g. PLANET_BANDS) or 1-based numbers, as GDAL and rasterio number bands; None: every band."""
    if spec is None:
        return list(range(count))
    picked = []
    for item in (part.strip() for part in spec.split(",")):
        if item.isdigit() and 1 <= int(item) <= count:
            picked.append(int(item) - 1)
        elif item.lower() in names and names.index(item.lower()) < count:
            picked.append(list(names).index(item.lower()))
        else:
            known = f"names {', '.join(names[:count])} or " if names else ""
            raise QdeepError(f"--bands {spec}: no band {item!r} in images of {count} band(s) "
                             f"(use {known}numbers 1 to {count})")
    if len(set(picked)) != len(picked):
        raise QdeepError(f"--bands {spec}: a band is named twice")
    return picked


@dataclass(frozen=True)
class BandStats:
    """Per-band normalisation and value range from a sample of a data set's images (saved with a
    model, so that predict normalises as training did)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    low: tuple[float, ...]  # the sample's smallest and largest valid value, per band: histogram ranges
    high: tuple[float, ...]


def band_statistics(rasters: Sequence[Raster]) -> BandStats:
    """Mean, standard deviation and range of each band over every valid (not no-data) sample of
    `rasters` (all of one BandLayout), accumulated in float64. A band with no valid sample, or a
    constant one, gets std 1 (normalising then only centres it)."""
    if not rasters:
        raise QdeepError("band statistics need at least one image")
    count = rasters[0].bands.shape[0]
    n, total, squares = np.zeros(count), np.zeros(count), np.zeros(count)
    low, high = np.full(count, np.inf), np.full(count, -np.inf)
    for raster in rasters:
        values = raster.as_float().reshape(count, -1).astype(np.float64)
        valid = ~np.isnan(values)
        n += valid.sum(axis=1)
        total += np.where(valid, values, 0).sum(axis=1)
        squares += np.where(valid, values * values, 0).sum(axis=1)
        low = np.minimum(low, np.where(valid, values, np.inf).min(axis=1))
        high = np.maximum(high, np.where(valid, values, -np.inf).max(axis=1))
    mean = np.divide(total, n, out=np.zeros(count), where=n > 0)
    var = np.divide(squares, n, out=np.zeros(count), where=n > 0) - mean * mean
    std = np.sqrt(np.maximum(var, 0))
    std[std == 0] = 1.0
    empty = n == 0
    low[empty], high[empty] = 0.0, 1.0
    return BandStats(*(tuple(float(v) for v in a) for a in (mean, std, low, high)))


# Spectral indices of two named bands, (a - b) / (a + b): NDVI (vegetation: near-infrared against
# red) and NDWI (McFeeters' open water: green against near-infrared), in [-1, 1].
INDICES = {"ndvi": ("nir", "r"), "ndwi": ("g", "nir")}


def spectral_index(bands: np.ndarray, names: Sequence[str], index: str) -> np.ndarray:
    """`index` (a key of INDICES) of float `bands` (count, height, width) whose bands are `names`:
    (height, width) in [-1, 1], NaN where either band is NaN (no data) or both are 0."""
    if index not in INDICES:
        raise QdeepError(f"--indices: unknown index {index!r} (known: {', '.join(INDICES)})")
    a_name, b_name = INDICES[index]
    missing = [b for b in (a_name, b_name) if b not in names]
    if missing:
        raise QdeepError(f"--indices {index} needs the {' and '.join(missing)} band(s); the images' bands are "
                         f"{', '.join(names)}")
    a, b = (bands[list(names).index(x)].astype(np.float64) for x in (a_name, b_name))
    total = a + b
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total != 0, (a - b) / total, np.nan)


RASTER_AUGMENTS = ("d4", "flip", "none")  # colour jitter and crops (`strong`) are RGB's


def raster_input(raster: Raster, bands: Sequence[int], size: int, stats: BandStats,
                 rng: random.Random | None = None, kind: str = "d4", crop: float = 0.0) -> torch.Tensor:
    """The network's input from an image's `bands` (0-based, in that order): each band normalised by
    its `stats` (those of the data set's bands, indexed as the file's), no-data set to 0 (the
    band's mean), resized to (size, size) (bilinear, antialiased) and, with `rng`, flipped and
    rotated as `transforms.augment_pixels` does (with `crop`, randomly cropped as `transforms.augment`
    does): a (len(bands), size, size) float32 tensor."""
    import torch  # here: `qdeep synth`, which writes GeoTIFFs, does not need torch

    from qdeep.data.transforms import augment, augment_pixels

    if kind not in RASTER_AUGMENTS:
        raise QdeepError(f"--augment {kind} is for RGB images; multiband images take {', '.join(RASTER_AUGMENTS)}")
    index = list(bands)
    mean = np.asarray(stats.mean, dtype=np.float32)[index, None, None]
    std = np.asarray(stats.std, dtype=np.float32)[index, None, None]
    x = torch.from_numpy(np.nan_to_num((raster.as_float()[index] - mean) / std, nan=0.0))
    if tuple(x.shape[1:]) != (size, size):
        x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)[0]
    if rng is not None and crop:
        x = augment(x, rng, crop, kind)
    elif rng is not None and kind != "none":
        x = torch.from_numpy(np.ascontiguousarray(augment_pixels(x.numpy(), rng, kind)))
    return x
