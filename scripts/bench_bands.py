"""Bands benchmark (issue 16), first part: what the near-infrared band adds to the histogram forest.

On a 4-band Planet-layout set (`qdeep synth --bands 4`, or --data DIR with train-jpg/, train-tif-v2/,
test-jpg/, test-tif-v2/ and test_solution_v2.csv), `qdeep baseline` (5 folds, 200 trees, its own
thresholds) runs once per side, each in its own process, and its submission is scored against the
test solution:

  jpg                 the JPEGs: 26-bin RGB colour histograms (the default path)
  tif r,g,b           the GeoTIFFs' red, green and blue bands (--image-format tif --bands r,g,b)
  tif r,g,b,nir       and the near-infrared band
  tif +ndvi,ndwi      and histograms of NDVI and NDWI (--indices ndvi,ndwi)

It prints test F2 over every tag, F2 on blow_down (the tag the synthetic NIR band shows and RGB
barely does) and each run's seconds. Still to come, with `qdeep train --bands`: the fine-tuned CNN
under each --band-init, and the decode speed of 16-bit TIFFs against 8-bit JPEGs.

Usage: python scripts/bench_bands.py [--data DIR] [--n 1500] [--n-test 500] [--size 64]

Measured 2026-12-07 (2 cores; synthetic set, seed 1, 1,500 training and 500 test tiles of 64 px):
    500 test tiles, 7 with blow_down
    jpg              test F2 0.9410  blow_down F2 0.000  (68 s)
    tif r,g,b        test F2 0.9422  blow_down F2 0.000  (71 s)
    tif r,g,b,nir    test F2 0.9566  blow_down F2 1.000  (84 s)
    tif +ndvi,ndwi   test F2 0.9657  blow_down F2 0.972  (72 s)
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qdeep.data.synth import write_synthetic_planet
from qdeep.metrics import f2_score, per_label_f2

QDEEP = str(Path(sys.executable).with_name("qdeep"))
SIDES = (("jpg", []), ("tif r,g,b", ["--image-format", "tif", "--bands", "r,g,b"]),
         ("tif r,g,b,nir", ["--image-format", "tif", "--bands", "r,g,b,nir"]),
         ("tif +ndvi,ndwi", ["--image-format", "tif", "--bands", "r,g,b,nir", "--indices", "ndvi,ndwi"]))


def _tags(path: Path) -> dict[str, set[str]]:
    with open(path, newline="") as f:
        return {name: set(tags.split()) for name, tags in list(csv.reader(f))[1:]}


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
        truth = _tags(root / "test_solution_v2.csv")
        vocab = sorted({t for tags in _tags(root / "train_v2.csv").values() for t in tags})
        names = sorted(truth)
        y_true = np.array([[t in truth[n] for t in vocab] for n in names], dtype=int)
        blow_down = vocab.index("blow_down")
        print(f"{len(names)} test tiles, {y_true[:, blow_down].sum()} with blow_down")
        for label, options in SIDES:
            out = Path(tmp) / label.replace(" ", "_").replace(",", "-")
            start = time.perf_counter()
            subprocess.run([QDEEP, "baseline", "--data", str(root), "--out", str(out), *options,
                            "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"], check=True, capture_output=True, cwd=tmp)
            seconds = time.perf_counter() - start
            submitted = _tags(out / "submission.csv")
            y_pred = np.array([[t in submitted[n] for t in vocab] for n in names], dtype=int)
            print(f"{label:16s} test F2 {f2_score(y_true, y_pred):.4f}  blow_down F2 "
                  f"{per_label_f2(y_true, y_pred)[blow_down]:.3f}  ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
