"""Start-up and config-size benchmark (issue 15): the time from `qdeep train`'s start to its first
training step, from a folder of small JPEGs vs from a pack of them, and the bytes of the run's
`train_loop_config` before (every image path and target in it, as until 2026-12) and now.

A synthetic Planet set of --n images is written and packed once (the pack's time is printed: it is
paid once, not per run). Then `qdeep train` runs from the folder and from the pack in turns
(folder, pack, pack, folder, ...), each in its own local Ray started by the command, as a user runs
it; the bench's worker callback (scripts/qdeep_bench_hooks.py) notes the time of the first step
and stops the run there. Each side's time counts from the `main()` call; the median of the per-turn
ratios is quoted.

Usage: python scripts/bench_startup.py [--n 100000] [--size 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def first_step_seconds(data: str, out: Path, marker: Path) -> float:
    from qdeep.cli import main

    marker.unlink(missing_ok=True)
    started = time.time()
    main(["--plugin", "qdeep_bench_hooks", "train", "--data", data, "--out", str(out), "--arch", "resnet18",
          "--weights", "none", "--image-size", "16", "--batch-size", "64", "--epochs", "1", "--workers", "1",
          "--tracking-uri", f"sqlite:///{out.parent / 'mlflow.db'}", "--on-bad-image", "skip"])
    if not marker.exists():
        raise SystemExit(f"the run from {data} never reached its first step (see {out})")
    return float(marker.read_text()) - started


def config_bytes(n: int) -> tuple[int, int]:
    """(before, now): the loop config of a run over n Planet-like images, JSON-encoded."""
    from qdeep.config import TrainConfig
    from qdeep.data import BadInputPolicy
    from qdeep.distributed.prepare import TrainingData, loop_config
    from qdeep.parts.targets import MultiLabelTargets

    rng = np.random.default_rng(0)
    targets = MultiLabelTargets([f"tag_{i}" for i in range(17)])
    paths = [f"/home/ray/data/train-jpg/train_{i}.jpg" for i in range(n)]
    y = (rng.random((n, 17)) < 0.2).astype(np.float32)
    is_val = rng.random(n) < 0.2
    data = TrainingData(targets, paths, y, is_val, BadInputPolicy(), "bench", "f2")
    now = loop_config(TrainConfig(), data, None, None)
    p = np.asarray(paths)
    before = {**now, "train_paths": p[~is_val].tolist(), "y_train": y[~is_val].tolist(),
              "val_paths": p[is_val].tolist(), "y_val": y[is_val].tolist()}
    return len(json.dumps(before)), len(json.dumps(now))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    for n in (1_000, 100_000, 1_000_000):
        before, now = config_bytes(n)
        print(f"train_loop_config for {n:>9,} images: before {before / 1e6:8.2f} MB, now {now:,} bytes")

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(HERE))
    from qdeep.cli import main as qdeep
    from qdeep.data.synth import write_synthetic_planet

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.time()
        write_synthetic_planet(tmp / "data", n=args.n, size=args.size, seed=0, n_test=1)
        print(f"wrote {args.n} images of {args.size} px in {time.time() - started:.0f} s")
        started = time.time()
        assert qdeep(["pack", "--data", str(tmp / "data"), "--out", str(tmp / "pack")]) == 0
        print(f"qdeep pack: {time.time() - started:.1f} s (once)")
        marker = tmp / "first_step"
        os.environ["QDEEP_BENCH_FIRST_STEP"] = str(marker)
        times = {"folder": [], "pack": []}
        order = [("folder", "pack"), ("pack", "folder")]
        for r in range(args.rounds):
            for side in order[r % 2]:
                source = str(tmp / ("data" if side == "folder" else "pack"))
                times[side].append(first_step_seconds(source, tmp / f"out-{side}-{r}", marker))
                print(f"round {r} {side:6s}: first step after {times[side][-1]:6.1f} s", flush=True)
        ratios = [p / f for f, p in zip(times["folder"], times["pack"])]
        print(f"first step, folder: median {statistics.median(times['folder']):.1f} s; "
              f"pack: {statistics.median(times['pack']):.1f} s; pack / folder {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
