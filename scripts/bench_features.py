"""Throughput of `qdeep features` (Ray Data: decode, embed in an actor pool, write the store)
against a plain single-process loop (decode, embed with torch on all cores, np.save), in one run.

Both use the same backbone, input size, batch size and JPEGs; each is run twice and the second run
is measured (the first pays for model loading, Ray workers and the page cache). Prints images/s of
each and their ratio.

Usage: python scripts/bench_features.py [--arch efficientnet_lite0] [--n-per-class 100] [--batch-size 64]

Measured 2026-11 on the 2-core dev VM (efficientnet_lite0 at 224 px, 500 synthetic 64 px scenes,
batch 64; plain loop 23.7-24.5 img/s):

    one CPU actor (decoding in its own actor, as before)         13.3 img/s   0.54x
    one actor per CPU, store writer on 1 CPU                     18.5 img/s   0.78x
    one actor per CPU, store writer on 1/4 CPU                   19.3 img/s   0.81x
    one actor per CPU, store writer reserving no CPU (qdeep now) 18.2-20.1 img/s  0.71-0.86x

The writer reserves no CPU so that shards stream to disk while the pool holds every CPU (see
`write_store_from_dataset`); it then competes a little with the actors, within the noise here.

A CPU actor runs torch on one thread (Ray sets OMP_NUM_THREADS to its CPU count), so one actor
used one core whatever the machine; the rest of the gap is Ray Data's scheduling and the copies
between stages.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qdeep.data.synth import write_synthetic_classes
from qdeep.data.transforms import normalize
from qdeep.distributed.features import decode, embed_images, folder_rows, load_backbone
from qdeep.distributed.session import ray_session
from qdeep.models import embed


def plain_loop(paths, arch: str, weights: str, batch_size: int, out: Path) -> None:
    """The reference: one process, torch's own threads on every core, no Ray; the same decoding."""
    model = load_backbone(arch, weights)
    spec = model.qdeep_arch
    parts = []
    with torch.no_grad():
        for s in range(0, len(paths), batch_size):
            batch = decode({"image": None, "path": paths[s : s + batch_size]}, spec.input_size)
            x = normalize(torch.from_numpy(batch["pixels"]).float() / 255, spec.mean, spec.std)
            parts.append(embed(model, x).float().numpy())
    np.save(out, np.concatenate(parts))


def timed(fn) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_classes(tmp / "images", n_per_class=args.n_per_class)
        root = (tmp / "images").resolve()
        paths = sorted(root.rglob("*.jpg"))
        t_plain = timed(lambda: plain_loop(paths, args.arch, args.weights, args.batch_size, tmp / "x.npy"))
        with ray_session(num_cpus=os.cpu_count()):
            t_ray = timed(lambda: embed_images(folder_rows(root, paths), len(paths), root, args.arch, args.weights,
                                               tmp / "store", batch_size=args.batch_size, use_gpu=False))
    n = len(paths)
    print(f"{n} images, {args.arch}, batch {args.batch_size}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}")
    print(f"plain loop      {n / t_plain:7.1f} img/s")
    print(f"qdeep features  {n / t_ray:7.1f} img/s   ratio {t_plain / t_ray:.2f}x")


if __name__ == "__main__":
    main()
