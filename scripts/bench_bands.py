"""Bands benchmark (issue 16): what the near-infrared band adds to the histogram forest and to a
fine-tuned CNN under each --band-init, and what reading 16-bit GeoTIFFs costs against 8-bit JPEGs.

Forest (--parts forest): on a 4-band Planet-layout set (`qdeep synth --bands 4`, or --data DIR with train-jpg/, train-tif-v2/,
test-jpg/, test-tif-v2/ and test_solution_v2.csv), `qdeep baseline` (5 folds, 200 trees, its own
thresholds) runs once per side, each in its own process, and its submission is scored against the
test solution:

  jpg                 the JPEGs: 26-bin RGB colour histograms (the default path)
  tif r,g,b           the GeoTIFFs' red, green and blue bands (--image-format tif --bands r,g,b)
  tif r,g,b,nir       and the near-infrared band
  tif +ndvi,ndwi      and histograms of NDVI and NDWI (--indices ndvi,ndwi)

It prints test F2 over every tag, F2 on blow_down (the tag the synthetic NIR band shows and RGB
barely does) and each run's seconds.

CNN (--parts cnn): `qdeep train` (EfficientNet-Lite0, bundled ImageNet weights, the image size,
2 workers, AdamW 1e-3; --freeze none and 5 epochs by default: with bench_quality's --freeze last:2 and
3 epochs the NIR band's new kernels, trained before frozen blocks, added nothing measurable) then
`qdeep predict` on the test images, once on the JPEGs, once on the GeoTIFFs' r,g,b bands, and once
on r,g,b,nir per --band-init, each for every --seeds. Same scores.

Decode (--parts decode): images per second in one thread of the same tiles as 8-bit JPEGs (Pillow,
`load_rgb`) and as 4-band 16-bit GeoTIFFs (tifffile, `read_raster`), alone and with the network's
input made (RGBInput, RasterInput over 4 bands), timed alternately (A B A B ...), the median of
ROUNDS ratios quoted.

Usage: python scripts/bench_bands.py [--parts forest,cnn,decode] [--data DIR] [--n 1500] [--n-test 500]
       [--size 64]

Measured 2026-12-07 (2 cores; synthetic set, seed 1, 1,500 training and 500 test tiles of 64 px):
    500 test tiles, 7 with blow_down
    jpg              test F2 0.9410  blow_down F2 0.000  (68 s)
    tif r,g,b        test F2 0.9422  blow_down F2 0.000  (71 s)
    tif r,g,b,nir    test F2 0.9566  blow_down F2 1.000  (84 s)
    tif +ndvi,ndwi   test F2 0.9657  blow_down F2 0.972  (72 s)
  CNN, --freeze none --epochs 5 --seeds 0,1 (117-158 s a run):
    jpg                       test F2 0.9437 / 0.9556  blow_down F2 0.122 / 0.172
    tif r,g,b                 test F2 0.9459 / 0.9547  blow_down F2 0.104 / 0.312
    tif r,g,b,nir rgb-copy    test F2 0.9528 / 0.9468  blow_down F2 0.238 / 0.000
    tif r,g,b,nir tile        test F2 0.9413 / 0.9419  blow_down F2 0.857 / 0.758
    tif r,g,b,nir mean        test F2 0.9470 / 0.9439  blow_down F2 0.417 / 0.469
    tif r,g,b,nir zero        test F2 0.9485 / 0.9480  blow_down F2 0.000 / 0.172
    tif r,g,b,nir parallel    test F2 0.9459 / 0.9444  blow_down F2 0.303 / 0.333
  CNN, --freeze last:2 --epochs 3, seed 0 (79-90 s a run): jpg 0.9411 (blow_down 0.128), tif r,g,b
  0.9302 (0.132), with nir: rgb-copy 0.9319 (0.000), tile 0.9078 (0.306), mean 0.9171 (0.000), zero
  0.9290 (0.366), parallel 0.9276 (0.147).
  Decode, one thread, 500 tiles (--parts decode; --size 256 for the second pair):
    64 px   decode: JPEG 11547 img/s, GeoTIFF 6547 (0.57x); decode + input: 6364, 3794 (0.60x)
    256 px  decode: JPEG 2349 img/s, GeoTIFF 4657 (1.82x); decode + input: 1656, 1626 (0.94x)
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
FOREST = (("jpg", []), ("tif r,g,b", ["--image-format", "tif", "--bands", "r,g,b"]),
         ("tif r,g,b,nir", ["--image-format", "tif", "--bands", "r,g,b,nir"]),
         ("tif +ndvi,ndwi", ["--image-format", "tif", "--bands", "r,g,b,nir", "--indices", "ndvi,ndwi"]))

RECIPE = ["--arch", "efficientnet_lite0", "--weights", "bundled", "--workers", "2"]
CNN = (("jpg", []), ("tif r,g,b", ["--image-format", "tif", "--bands", "r,g,b"]),
       *((f"tif r,g,b,nir {init}", ["--image-format", "tif", "--bands", "r,g,b,nir", "--band-init", init])
         for init in ("rgb-copy", "tile", "mean", "zero", "parallel")))
DECODE_IMAGES, ROUNDS = 500, 7


def _tags(path: Path) -> dict[str, set[str]]:
    with open(path, newline="") as f:
        return {name: set(tags.split()) for name, tags in list(csv.reader(f))[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="forest,cnn,decode")
    parser.add_argument("--data", type=Path, help="a 4-band Planet layout (default: a synthetic one)")
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--freeze", default="none", help="the CNN's trained blocks")
    parser.add_argument("--epochs", default="5", help="the CNN's epochs")
    parser.add_argument("--seeds", default="0", help="CNN runs per side, one per seed (comma-separated)")
    parser.add_argument("--cnn", help="only these CNN sides (comma-separated: jpg, rgb, or band inits)")
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
        def score(label: str, submission: Path, seconds: float) -> None:
            submitted = _tags(submission)
            y_pred = np.array([[t in submitted[n] for t in vocab] for n in names], dtype=int)
            print(f"{label:24s} test F2 {f2_score(y_true, y_pred):.4f}  blow_down F2 "
                  f"{per_label_f2(y_true, y_pred)[blow_down]:.3f}  ({seconds:.0f} s)", flush=True)

        def run(*command: str) -> None:
            subprocess.run([QDEEP, *command, "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"], check=True,
                           capture_output=True, cwd=tmp)

        parts = args.parts.split(",")
        if "forest" in parts:
            for label, options in FOREST:
                out = Path(tmp) / ("forest_" + label.replace(" ", "_").replace(",", "-"))
                start = time.perf_counter()
                run("baseline", "--data", str(root), "--out", str(out), *options)
                score(f"forest {label}", out / "submission.csv", time.perf_counter() - start)
        if "cnn" in parts:
            print(f"CNN: {' '.join(RECIPE)} --freeze {args.freeze} --epochs {args.epochs} --image-size {args.size}")
            wanted = args.cnn.split(",") if args.cnn else None
            for label, options in CNN:
                if wanted and label.split()[-1].replace("r,g,b", "rgb") not in wanted:
                    continue
                for seed in args.seeds.split(","):
                    out = Path(tmp) / ("cnn_" + label.replace(" ", "_").replace(",", "-") + f"_{seed}")
                    start = time.perf_counter()
                    run("train", "--data", str(root), "--out", str(out), *RECIPE, "--freeze", args.freeze, "--epochs",
                        args.epochs, "--image-size", str(args.size), "--seed", seed, *options)
                    subprocess.run([QDEEP, "predict", "--model", str(out / "model"), "--data", str(root), "--out",
                                    str(out / "submission.csv")], check=True, capture_output=True, cwd=tmp)
                    score(f"cnn {label} seed {seed}", out / "submission.csv", time.perf_counter() - start)
        if "decode" in parts:
            decode_speed(root)


def decode_speed(root: Path) -> None:
    """Images per second in this thread: JPEG vs 16-bit GeoTIFF, decoded alone and into inputs."""
    import torch

    from qdeep.data.images import load_rgb
    from qdeep.data.inputs import InputBands, RasterInput, RGBInput
    from qdeep.data.rasters import read_raster

    torch.set_num_threads(1)
    names = sorted(p.stem for p in (root / "train-jpg").glob("*.jpg"))[:DECODE_IMAGES]
    jpgs = [root / "train-jpg" / f"{n}.jpg" for n in names]
    tifs = [root / "train-tif-v2" / f"{n}.tif" for n in names]
    size = load_rgb(jpgs[0]).size[0]
    bands = InputBands.of(tifs)
    rgb_input, raster_input = RGBInput(size, (0.5,) * 3, (0.25,) * 3), RasterInput(size, bands)
    pairs = {"decode": (lambda p: load_rgb(p), lambda p: read_raster(p)),
             "decode + input": (rgb_input, raster_input)}
    print(f"decode speed, one thread, {len(names)} tiles of {size} px (JPEG {jpgs[0].stat().st_size} B, GeoTIFF "
          f"{tifs[0].stat().st_size} B each):")
    for what, (jpeg, tiff) in pairs.items():
        rates = {"jpeg": [], "tiff": []}
        for _ in range(ROUNDS):  # alternating sides: drift in the machine's speed hits both
            for side, fn, paths in (("jpeg", jpeg, jpgs), ("tiff", tiff, tifs)):
                start = time.perf_counter()
                for p in paths:
                    fn(p)
                rates[side].append(len(paths) / (time.perf_counter() - start))
        ratio = float(np.median(np.array(rates["tiff"]) / np.array(rates["jpeg"])))
        print(f"  {what:15s} JPEG {np.median(rates['jpeg']):6.0f} img/s  GeoTIFF {np.median(rates['tiff']):6.0f} img/s  "
              f"GeoTIFF/JPEG {ratio:.2f}x (median of {ROUNDS})")


if __name__ == "__main__":
    main()
