"""Bands benchmark (issue 16), first part: what the near-infrared band adds to the histogram forest.

On a 4-band Planet-layout set (`qdeep synth --bands 4`, or --data DIR with train-tif-v2/ and
test_solution_v2.csv), one Random Forest per label (200 trees, thresholds tuned on the forests'
out-of-bag probabilities) over 26-bin histograms of each band, on each band's range in the training
images (qdeep.data.rasters.band_statistics), then scored on the test images:

  rgb                 the red, green and blue bands of the GeoTIFFs
  rgb+nir             and the near-infrared band
  rgb+nir+ndvi,ndwi   and histograms of NDVI and NDWI on [-1, 1]

It prints test F2 over every tag, and F2 on blow_down, the tag the synthetic NIR band shows and RGB
barely does. Still to come (with `qdeep train --bands`): the fine-tuned CNN under each --band-init,
through the commands, and the decode speed of 16-bit TIFFs against 8-bit JPEGs.

Usage: python scripts/bench_bands.py [--data DIR] [--n 1500] [--n-test 500] [--size 64]

Measured 2026-12-07 (2 cores; synthetic set, seed 1, 1,500 training and 500 test tiles of 64 px; 7
test tiles carry blow_down):
    rgb                  test F2 0.9407  blow_down F2 0.000
    rgb+nir              test F2 0.9592  blow_down F2 1.000
    rgb+nir+ndvi,ndwi    test F2 0.9650  blow_down F2 1.000
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.ensemble import RandomForestClassifier

from qdeep.data.rasters import PLANET_BANDS, band_statistics, read_raster, spectral_index
from qdeep.data.synth import write_synthetic_planet
from qdeep.metrics import f2_score, per_label_f2, tune_thresholds

SIDES = (("rgb", ("r", "g", "b"), ()), ("rgb+nir", ("r", "g", "b", "nir"), ()),
         ("rgb+nir+ndvi,ndwi", ("r", "g", "b", "nir"), ("ndvi", "ndwi")))


def _rows(path: Path) -> list[tuple[str, list[str]]]:
    with open(path, newline="") as f:
        return [(name, tags.split()) for name, tags in list(csv.reader(f))[1:]]


def _features(raster, stats, bands, indices) -> np.ndarray:
    values, out = raster.as_float(), []
    for name in bands:
        i = PLANET_BANDS.index(name)
        counts, _ = np.histogram(values[i], bins=26, range=(stats.low[i], stats.high[i]))
        out.append(counts / max(counts.sum(), 1))
    for index in indices:
        v = spectral_index(values, PLANET_BANDS, index)
        counts, _ = np.histogram(v[~np.isnan(v)], bins=26, range=(-1, 1))
        out.append(counts / max(counts.sum(), 1))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a 4-band Planet layout (default: a synthetic one)")
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = Path(tmp) / "planet4"
            write_synthetic_planet(root, n=args.n, n_test=args.n_test, size=args.size, seed=1, bands=4)
        train, test = _rows(root / "train_v2.csv"), _rows(root / "test_solution_v2.csv")
        vocab = sorted({t for _, tags in train for t in tags})
        y_train, y_test = (np.array([[t in tags for t in vocab] for _, tags in rows], dtype=int) for rows in (train, test))
        start = time.perf_counter()
        rasters = {split: [read_raster(root / f"{split}-tif-v2" / f"{name}.tif") for name, _ in rows]
                   for split, rows in (("train", train), ("test", test))}
        print(f"read {len(train) + len(test)} GeoTIFFs in {time.perf_counter() - start:.1f} s")
        stats = band_statistics(rasters["train"])
        for label, bands, indices in SIDES:
            x_train, x_test = (np.stack([_features(r, stats, bands, indices) for r in rasters[s]]) for s in ("train", "test"))
            oob, proba = np.zeros(y_train.shape), np.zeros(y_test.shape)
            for j in range(len(vocab)):
                forest = RandomForestClassifier(200, n_jobs=-1, random_state=j, oob_score=True).fit(x_train, y_train[:, j])
                oob[:, j], proba[:, j] = forest.oob_decision_function_[:, 1], forest.predict_proba(x_test)[:, 1]
            predicted = (proba >= tune_thresholds(y_train, np.nan_to_num(oob))).astype(int)
            per_label = per_label_f2(y_test, predicted)
            print(f"{label:20s} test F2 {f2_score(y_test, predicted):.4f}  blow_down F2 "
                  f"{per_label[vocab.index('blow_down')]:.3f} ({y_test[:, vocab.index('blow_down')].sum()} test tiles)")


if __name__ == "__main__":
    main()
