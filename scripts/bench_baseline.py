"""Benchmark of the baseline's hot paths, as ratios against a baseline measured in the same run.

1. Histogram-feature extraction vs decode-only, on the same JPEGs, same process (goal >= 0.8).
2. The same pair through qdeep's Ray path (all cores, the path `qdeep baseline` runs).
3. Threshold tuning for 40,000 x 17 (goal < 1 s).

Usage: python scripts/bench_baseline.py [--n 1500] [--size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from qdeep.baseline import color_histogram
from qdeep.data.images import load_rgb
from qdeep.data.synth import write_synthetic_planet
from qdeep.metrics import tune_thresholds


def _decode_only(image) -> np.ndarray:
    return np.zeros(1, dtype=np.float32)


def _rate(fn, paths, repeats=3) -> float:
    """Best-of-N images/s (the least disturbed run on a noisy machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--size", type=int, default=256, help="Planet chips are 256 px")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_planet(tmp, n=args.n, size=args.size, seed=0, n_test=1)
        paths = sorted(str(p) for p in (Path(tmp) / "train-jpg").glob("*.jpg"))
        decode = _rate(lambda p: load_rgb(p), paths)
        hist = _rate(lambda p: color_histogram(load_rgb(p)), paths)
        print(f"decode only:           {decode:8.0f} img/s")
        print(f"decode + histograms:   {hist:8.0f} img/s   ratio {hist / decode:.2f} (goal >= 0.80)")

        import ray

        from qdeep.distributed.session import start_local_ray
        from qdeep.distributed.tasks import map_images

        start_local_ray()
        try:
            map_images(color_histogram, paths[:256], desc="warm-up")
            rates = {}
            for name, fn in [("decode", _decode_only), ("histograms", color_histogram)]:
                start = time.perf_counter()
                map_images(fn, paths, desc=f"ray {name}")
                rates[name] = len(paths) / (time.perf_counter() - start)
        finally:
            ray.shutdown()
        print(f"ray decode only:       {rates['decode']:8.0f} img/s")
        print(f"ray decode + hist:     {rates['histograms']:8.0f} img/s   ratio {rates['histograms'] / rates['decode']:.2f}")

    rng = np.random.default_rng(0)
    y = rng.random((40_000, 17)) < 0.2
    proba = np.clip(0.4 * y + 0.6 * rng.random(y.shape), 0, 1)
    start = time.perf_counter()
    tune_thresholds(y, proba)
    seconds = time.perf_counter() - start
    print(f"tune_thresholds 40,000 x 17: {seconds:.3f} s (goal < 1 s)")


if __name__ == "__main__":
    main()
