"""Procedural stand-in for the Kaggle "Planet: Understanding the Amazon from Space" data.

The real data set is 40k+ satellite chips behind a Kaggle login, which neither the
test suite nor the demo can fetch.  This module draws a small, deterministic data set
with the same on-disk layout (``train-jpg/``, ``train_v2.csv``, ``test-jpg/``,
``sample_submission_v2.csv``) and the same 17 tags, so every pipeline stage can run
end to end offline. With ``bands=4`` it also writes Planet's ``train-tif-v2/`` and
``test-tif-v2/``: 4-band (blue, green, red, near-infrared) 16-bit GeoTIFFs of the same tiles,
whose near-infrared band carries what RGB lacks (see ``tiles``).

Each tag leaves a visible trace in the pixels.  Colour tags (forest, fields, water,
clouds, haze, ...) shift the colour histogram, so a histogram + Random Forest baseline
can learn them; shape tags (roads, buildings, logging tracks, mines) occupy few pixels
of ambiguous colour, so they reward a model that looks at spatial structure.
Frequencies imitate Planet's long tail, with a floor so small sets still contain
every tag.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from qdeep.data.rasters import write_geotiff
from qdeep.data.tiles import PLANET_TAGS, draw_tile  # draw_tile: part of this API too
from qdeep.io import write_csv

ATMOSPHERIC_TAGS = ("clear", "cloudy", "haze", "partly_cloudy")

# Planet-like marginals. Order matters: it fixes how many random draws each image uses.
_ATMOS_PROBS = (("clear", 0.70), ("partly_cloudy", 0.18), ("haze", 0.07), ("cloudy", 0.05))
_LAND_PROBS = (
    ("primary", 0.93),
    ("agriculture", 0.30),
    ("water", 0.18),
    ("cultivation", 0.11),
    ("habitation", 0.09),
    ("bare_ground", 0.04),
    ("selective_logging", 0.03),
    ("artisinal_mine", 0.03),
    ("blooming", 0.03),
    ("slash_burn", 0.03),
    ("conventional_mine", 0.025),
    ("blow_down", 0.025),
)
# Roads mostly come with settlements and farms; the base rate is set so that the
# overall road frequency lands near Planet's ~0.2.
_ROAD_BASE, _ROAD_IF_HABITATION, _ROAD_IF_AGRICULTURE = 0.09, 0.60, 0.30
_WATER_IF_MINE = 0.60

_SPLIT_IDS = {"train": 0, "test": 1}
TIF_SCALE = 40  # a 0-255 tile value -> 16-bit counts (0-10,200, the range of Planet's analytic chips)


def sample_tags(rng: np.random.Generator) -> list[str]:
    """One image's tags, sorted; always exactly one atmospheric tag."""
    names, probs = zip(*_ATMOS_PROBS)
    atmos = names[int(rng.choice(len(names), p=np.asarray(probs)))]
    u = rng.random(len(_LAND_PROBS) + 2)  # fixed draw count keeps the stream simple
    if atmos == "cloudy":
        return ["cloudy"]  # as on Planet: nothing else is visible, so nothing else is tagged
    tags = {name for (name, p), x in zip(_LAND_PROBS, u) if x < p}
    if "primary" not in tags and not tags & {"agriculture", "bare_ground", "habitation"}:
        tags.add("agriculture")  # open land has to be *something* visible
    if tags & {"artisinal_mine", "conventional_mine"} and u[-2] < _WATER_IF_MINE:
        tags.add("water")
    keep_road = 1.0 - _ROAD_BASE
    if "habitation" in tags:
        keep_road *= 1.0 - _ROAD_IF_HABITATION
    if "agriculture" in tags:
        keep_road *= 1.0 - _ROAD_IF_AGRICULTURE
    if u[-1] < 1.0 - keep_road:
        tags.add("road")
    tags.add(atmos)
    return sorted(tags)


def _progress(jobs: list, show: bool, desc: str):
    """`jobs`, counted on a progress bar if `show`."""
    if not show:
        return jobs
    from tqdm import tqdm

    return tqdm(jobs, desc=desc, unit="img")


def _save_tile(tags, size: int, rng: np.random.Generator, path: Path, tif: Path | None = None, place: int = 0) -> None:
    """The tile as a JPEG at `path`; with `tif`, also its 4 bands as a 16-bit GeoTIFF there
    (Planet's band order: blue, green, red, near-infrared; the tile `place` tiles east of the
    others' origin), the JPEG holding its RGB bands."""
    tile = draw_tile(tags, size, rng, nir=tif is not None)
    Image.fromarray(tile[..., :3].astype(np.uint8)).save(path, format="JPEG", quality=90)
    if tif is not None:
        counts = np.round(tile * TIF_SCALE).astype(np.uint16)
        write_geotiff(tif, np.stack([counts[..., 2], counts[..., 1], counts[..., 0], counts[..., 3]]),
                      origin=(500_000.0 + 3.0 * size * place, 9_000_000.0))


def write_synthetic_planet(out: str | os.PathLike, n: int = 2000, size: int = 128, seed: int = 0,
                           n_test: int | None = None, progress: bool = False, bands: int = 3) -> dict:
    """Write a Planet-layout data set to ``out`` and return a summary; with ``bands=4`` the
    GeoTIFFs too (``{split}-tif-v2/{name}.tif``).

    Each image draws from its own ``default_rng([seed, split_id, i])``, so the files
    are byte-identical across runs and the first k images do not depend on ``n``.
    """
    if n < 0 or size < 8:
        raise ValueError("need n >= 0 and size >= 8")
    if bands not in (3, 4):
        raise ValueError(f"bands must be 3 (RGB JPEGs) or 4 (and blue, green, red, NIR GeoTIFFs), got {bands}")
    n_test = max(1, n // 4) if n_test is None else int(n_test)
    out = Path(out)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for split in rows:
        (out / f"{split}-jpg").mkdir(parents=True, exist_ok=True)
        if bands == 4:
            (out / f"{split}-tif-v2").mkdir(parents=True, exist_ok=True)
    jobs = [("train", i) for i in range(n)] + [("test", i) for i in range(n_test)]
    for split, i in _progress(jobs, progress, "synthetic planet"):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
        tags = sample_tags(rng)
        name = f"{split}_{i}"
        tif = out / f"{split}-tif-v2" / f"{name}.tif" if bands == 4 else None
        _save_tile(tags, size, rng, out / f"{split}-jpg" / f"{name}.jpg", tif, place=len(rows["train"]) + len(rows["test"]))
        rows[split].append((name, " ".join(tags)))

    header = ("image_name", "tags")  # the csv module's default line ends, as before
    write_csv(out / "train_v2.csv", header, rows["train"], end="\r\n")
    write_csv(out / "test_solution_v2.csv", header, rows["test"], end="\r\n")
    write_csv(out / "sample_submission_v2.csv", header, [(n, "primary clear") for n, _ in rows["test"]], end="\r\n")

    seen = Counter(tag for _, tags in rows["train"] for tag in tags.split())
    counts = {tag: seen[tag] for tag in PLANET_TAGS}
    return {"n_train": n, "n_test": n_test, "size": size, "seed": seed, "bands": bands, "tag_counts": counts}


# One scene type per image, drawn with the Planet tags that make it: a folder-per-class data set
# for one-class-per-image tasks (`qdeep synth --multiclass`).
SCENE_CLASSES = {
    "forest": ("clear", "primary"),
    "farmland": ("clear", "agriculture", "cultivation"),
    "river": ("clear", "primary", "water"),
    "town": ("clear", "habitation", "road"),
    "clouds": ("cloudy",),
}
_CLASS_SPLIT_ID = 2


def write_synthetic_classes(out: str | os.PathLike, n_per_class: int = 100, size: int = 64, seed: int = 0,
                            progress: bool = False) -> dict:
    """`out/<class>/<class>_<i>.jpg` for every scene class; deterministic for a seed."""
    if n_per_class < 1 or size < 8:
        raise ValueError("need n_per_class >= 1 and size >= 8")
    out = Path(out)
    jobs = [(name, c, i) for c, name in enumerate(SCENE_CLASSES) for i in range(n_per_class)]
    for name, c, i in _progress(jobs, progress, "synthetic scenes"):
        rng = np.random.default_rng([seed, _CLASS_SPLIT_ID, c, i])
        (out / name).mkdir(parents=True, exist_ok=True)
        _save_tile(SCENE_CLASSES[name], size, rng, out / name / f"{name}_{i}.jpg")
    return {"classes": list(SCENE_CLASSES), "n_per_class": n_per_class, "size": size, "seed": seed}
