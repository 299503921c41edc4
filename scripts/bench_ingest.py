"""Ingest benchmark (issue 15): training-input images/s per core, decode + augment + normalize as a
training worker does it (`ImageDataset.__getitem__`: `data.transforms.train_input`, which was
to_unit -> augment(d4) -> normalize on floats when the figures below were measured, and now flips and
rotates uint8 pixels before one fused float conversion: 1.23x faster, see README), from a pack vs
from a folder of JPEGs, against the decode-only limit.

Sides, each over every image of one synthetic Planet data set (train + test), each run in turns
with the baseline in the same process (baseline, side / side, baseline, alternating); medians of
the per-turn ratios over the rounds that follow a warm-up round:

  decode-only tv    torchvision.io.decode_jpeg over the bytes, in memory, in a plain loop: THE
                    BASELINE, the decode-only limit (faster than PIL here)
  decode-only PIL   load_rgb(BytesIO(bytes)) over the same bytes
  worker, memory    decode + augment over the same bytes: the ceiling of the worker's transform
  worker, tv decode the same with decode_jpeg instead of load_rgb (not what qdeep does)
  tv decode+collate decode_jpeg, then torch.stack into a uint8 (B, 3, H, W) batch: no augment, no
                    float; what a worker would hand out if the device did the rest
  tv decode+coll.HWC the same stacked as (B, H, W, 3), the layout decode_jpeg's pixels are in
  folder, loop      path -> load_rgb(path) -> augment (what a DataLoader worker does today)
  pack, worker      read_parquet(pack.files(), filesystem=pack.fs).select_columns(["data"]) ->
                    iter_batches, decode + augment in the consuming (driver) process: "decode in
                    the worker" (1 core; the read tasks run beside it)
  pack, Ray Data    read_parquet -> map_batches(decode + augment -> float32) -> iter_torch_batches:
                    "decode in Ray Data" (--num-cpus cores)
  pack, Ray Data V2 the same through Ray 2.60's default Parquet reader (see below)
  folder, Ray Data  from_items(paths) -> map_batches(read + decode + augment) -> iter_torch_batches

Per core = images/s divided by the cores the side may use (a plain loop: 1; Ray Data: --num-cpus,
the driver's own work coming on top). Torch runs one thread in the driver, as in a DataLoader
worker. The files are in the page cache (just written): this measures CPU, not the disk. --shard-mb
is small so that the pack has several shards: Ray Data reads one Parquet file in one task
(`qdeep pack` writes one row group a shard), so a pack of fewer shards than cores decodes on fewer.

Usage: python scripts/bench_ingest.py [--n 4000] [--size 128] [--image-size 128] [--rounds 5]
                                      [--num-cpus 2] [--shard-mb 2] [--batch-size 64]

Besides images/s, each side's CPU time is counted (this process, and for the sides on Ray every
process of the Ray it started, from /proc): images per CPU-second is the per-core figure that the
other sessions' load on a shared machine disturbs least. Ray Data reads the pack with its V1 Parquet
reader (DataContext.use_datasource_v2 = False), except "pack, Ray Data V2", Ray 2.60's default.

Measured 2026-12 on the 2-core shared dev VM (other sessions' test suites running, load 7 -> 22
during the run: wall-clock figures are very noisy, CPU-second figures less so), default options:
5,000 JPEGs of 128 px (5.0 kB each), a pack of 12 shards, 128 px float32 tensors, Ray Data on 2
CPUs, 5 rounds after a warm-up, medians of per-turn ratios (min-max over the rounds); 4 min:

                  cores  img/s  /core ratio/core  (min-max) img/CPU-s  ratio  (min-max) 1st batch
decode-only tv        1   9738   9738      1.00x  1.00-1.00     10095  1.00x  1.00-1.00     0.01s
decode-only PIL       1   5074   5074      0.60x  0.39-0.78      5187  0.59x  0.46-0.79     0.01s
worker, memory        1   1867   1867      0.18x  0.14-0.42      2359  0.26x  0.21-0.28     0.02s
worker, tv decode     1   3087   3087      0.31x  0.27-0.34      3131  0.31x  0.27-0.33     0.02s
folder, loop          1   2146   2146      0.22x  0.15-0.27      2240  0.23x  0.20-0.27     0.03s
pack, worker          1   1454   1454      0.16x  0.13-0.29      1326  0.14x  0.12-0.17     0.18s
pack, Ray Data        2   1230    615      0.07x  0.06-0.09      1054  0.11x  0.10-0.13     0.74s
pack, Ray Data V2     2    705    352      0.04x  0.03-0.04       936  0.10x  0.09-0.10     4.85s
folder, Ray Data      2    922    461      0.05x  0.04-0.06       828  0.08x  0.07-0.10     0.53s

With the decode+collate sides (2026-12-07, 3 rounds, quiet machine, img/CPU-s): decode-only tv
11326, worker memory 0.26x, tv decode 0.32x, tv decode+collate 0.71x, tv decode+coll.HWC 0.88x,
pack worker 0.12x, pack Ray Data 0.13x.

One round at --n 16000 --shard-mb 8 (20,000 images, 12 shards), img/CPU-s: decode-only tv 10432,
PIL 6619, worker memory 2190, tv decode 2622, folder loop 2108, pack worker 1655, pack Ray Data
1056, V2 1283 (first batch after 8.2 s), folder Ray Data 1069.

- The goal (>= 0.8x the decode-only limit from a pack) is far off, and not because of the pack:
  the worker's own transform, on bytes already in memory, reaches 0.23-0.31x of decode_jpeg
  (0.4x of PIL's decode). Per image (one-off breakdown, same VM): PIL decode ~200 us, then
  to_unit's float conversion, the d4 augment and normalize ~100 us each on a 3x128x128 float
  tensor. torchvision's decoder is 1.7-1.9x faster than load_rgb but buys the worker only 1.2-1.3x.
- Decode in the worker beats decode in Ray Data per core: 1.3-1.6x per CPU-second (1326 vs 1054;
  1655 vs 1056 at 20,000 images) and 2.4x per nominal core (Ray Data's 2 CPUs share this VM's two
  cores with the driver). Decoding in Ray Data ships float32 tensors (196 kB an image, 40x the
  JPEG) through the object store and re-batches them, and an epoch starts 0.7-1.4 s later.
- Pack vs folder, on a local disk with the files in the page cache: in the worker, the folder is
  cheaper here (2240 vs 1326 img/CPU-s; 2108 vs 1655 at 20,000 images: the Ray Data read's fixed
  cost per epoch shrinks with the epoch); decoded in Ray Data they are about even (1054 vs 828,
  1056 vs 1069). What a pack is for (listing and opening many small objects in a bucket, any node
  reading) is not measured here.
- Ray 2.60's default Parquet reader (V2) bin-packs files into read tasks of up to 128 MiB
  (RAY_DATA_PARQUET_BIN_PACKING_BYTES): a pack smaller than that is read, and with map_batches
  fused into the read also decoded, by one task on one core, and its first batch comes after
  2.5-8 s against 0.2-1.4 s with V1. Shards above 128 MiB (`qdeep pack`'s 256 MB) get a task each.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from qdeep.data.images import load_rgb
from qdeep.data.transforms import augment_pixels, pixels_to_input, train_input as worker_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as the models use


def train_input(src, key: int, size: int) -> torch.Tensor:
    """One training image as a worker makes it (ImageDataset.__getitem__, train=True, crop 0, d4)."""
    return worker_transform(load_rgb(src), size, MEAN, STD, random.Random(key), 0.0, "d4")


def train_input_tv(key: int, data: torch.Tensor) -> torch.Tensor:
    """The same with torchvision's decoder (not what qdeep does: no resize, a JPEG-only decoder)."""
    pixels = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True).numpy()
    return pixels_to_input(augment_pixels(pixels, random.Random(key), "d4"), MEAN, STD)


def decode_batch(batch: dict, size: int) -> dict:
    """map_batches: encoded bytes ("data") or file paths ("path") -> float32 (B, 3, size, size)."""
    srcs = [io.BytesIO(b) for b in batch["data"]] if "data" in batch else list(batch["path"])
    return {"x": np.stack([train_input(s, i, size).numpy() for i, s in enumerate(srcs)])}


def collated(tensors, batch_size: int, hwc: bool):
    """decode_jpeg, then the batch stacked, nothing else: the ceiling of any worker that hands out
    uint8 batches and leaves augmentation and normalisation to the device. decode_jpeg returns a
    (3, H, W) view of (H, W, 3) pixels, so a (B, 3, H, W) batch pays a strided copy; with `hwc` the
    batch stays (B, H, W, 3), a plain copy (channels-last, which the device would permute as a view)."""
    for start in range(0, len(tensors), batch_size):
        images = [decode_jpeg(t) for t in tensors[start : start + batch_size]]
        yield len(torch.stack([i.permute(1, 2, 0) for i in images] if hwc else images))


def chunks(make, items, batch_size: int):
    """A plain loop, yielding how many it made every batch_size items."""
    for start in range(0, len(items), batch_size):
        yield len([make(start + i, item) for i, item in enumerate(items[start : start + batch_size])])


def sides(blobs, paths, pack, args) -> dict:
    """name -> (cores, on Ray, a generator function yielding the size of each batch of training inputs)."""
    import ray.data

    s, bs, cpus = args.image_size, args.batch_size, args.num_cpus
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    context = ray.data.DataContext.get_current()

    def read_pack(v2: bool = False):
        """The pack's bytes; through Ray 2.60's default Parquet reader (V2) only with v2 (see above)."""
        context.use_datasource_v2 = v2  # a dataset keeps a copy of the context it was made under
        return ray.data.read_parquet(pack.files(), filesystem=pack.fs).select_columns(["data"])

    def decoded(ds):  # "decode in Ray Data": the worker gets float32 tensors
        ds = ds.map_batches(decode_batch, batch_size=bs, batch_format="numpy", fn_kwargs={"size": s})
        return (len(batch["x"]) for batch in ds.iter_torch_batches(batch_size=bs))

    def pack_worker():  # "decode in the worker": the worker gets the bytes
        n = 0
        for batch in read_pack().iter_batches(batch_size=bs, batch_format="numpy"):
            yield len([train_input(io.BytesIO(b), n + i, s) for i, b in enumerate(batch["data"])])
            n += len(batch["data"])

    return {
        "decode-only tv": (1, False, lambda: chunks(lambda i, t: decode_jpeg(t), tensors, bs)),
        "decode-only PIL": (1, False, lambda: chunks(lambda i, b: load_rgb(io.BytesIO(b)), blobs, bs)),
        "worker, memory": (1, False, lambda: chunks(lambda i, b: train_input(io.BytesIO(b), i, s), blobs, bs)),
        "worker, tv decode": (1, False, lambda: chunks(train_input_tv, tensors, bs)),
        "tv decode+collate": (1, False, lambda: collated(tensors, bs, hwc=False)),
        "tv decode+coll.HWC": (1, False, lambda: collated(tensors, bs, hwc=True)),
        "folder, loop": (1, False, lambda: chunks(lambda i, p: train_input(p, i, s), paths, bs)),
        "pack, worker": (1, True, pack_worker),
        "pack, Ray Data": (cpus, True, lambda: decoded(read_pack())),
        "pack, Ray Data V2": (cpus, True, lambda: decoded(read_pack(v2=True))),
        "folder, Ray Data": (cpus, True, lambda: decoded(ray.data.from_items([{"path": p} for p in paths]))),
    }


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(tree: bool) -> float:
    """CPU time used so far by this process, and with `tree` by all its descendants too (the Ray it
    started: raylet, Ray's workers, GCS, dashboard), from /proc; finished processes are not counted."""
    if not tree:
        return time.process_time()
    parent, used = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)], used[int(pid)] = int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK
    tree_pids, new = {os.getpid()}, {os.getpid()}
    while new:
        new = {p for p, pp in parent.items() if pp in new}
        tree_pids |= new
    return time.process_time() + sum(used.get(p, 0) for p in tree_pids - {os.getpid()})


def timed(side, on_ray: bool, expect: int) -> tuple[float, float, float]:
    """(images/s, images per CPU-second, seconds to the first batch)."""
    cpu, start, n, first = cpu_seconds(on_ray), time.perf_counter(), 0, None
    for k in side():
        n += k
        first = first or time.perf_counter()
    wall, cpu = time.perf_counter() - start, cpu_seconds(on_ray) - cpu
    assert n == expect, f"made {n} training inputs, expected {expect}"
    return n / wall, n / cpu, first - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="training images (+ n/4 test images)")
    parser.add_argument("--size", type=int, default=128, help="side of the synthetic JPEGs")
    parser.add_argument("--image-size", type=int, default=128, help="side of the training tensors")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds, after one warm-up round")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--shard-mb", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import ray
    import ray.data

    from qdeep.data.pack import Pack
    from qdeep.data.synth import write_synthetic_planet
    from qdeep.distributed.session import start_local_ray
    from qdeep.workflows.pack import run_pack

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        data = Path(tmp) / "data"
        write_synthetic_planet(data, args.n, args.size, seed=0)
        paths = sorted(str(p) for p in data.glob("*-jpg/*.jpg"))
        start_local_ray(args.num_cpus)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            run_pack(str(Path(tmp) / "pack"), data=str(data), shard_mb=args.shard_mb)
            pack = Pack(str(Path(tmp) / "pack"))
            blobs = pack.read(["data"]).column("data").to_pylist()
            assert len(blobs) == len(paths), (len(blobs), len(paths))
            print(f"{len(paths)} JPEGs of {args.size}px, {sum(map(len, blobs)) / len(blobs) / 1e3:.1f} kB each; "
                  f"pack of {len(pack.files())} shards; training tensors {args.image_size}px; "
                  f"Ray Data on {args.num_cpus} CPUs; {args.rounds} rounds + warm-up; load {os.getloadavg()[0]:.1f}")
            table = sides(blobs, paths, pack, args)
            base_name = next(iter(table))
            base = table.pop(base_name)
            got = {name: [] for name in [base_name, *table]}  # (img/s, img/CPU-s, 1st batch s) per turn
            ratios = {name: ([], []) for name in table}  # to the baseline's turn beside it: per core, per CPU-s
            for r in range(args.rounds + 1):
                for k, (name, side) in enumerate(table.items()):
                    order = [base, side] if (r + k) % 2 == 0 else [side, base]
                    turns = [timed(fn, on_ray, len(paths)) for _, on_ray, fn in order]
                    b, x = turns if order[0] is base else turns[::-1]
                    if r > 0:  # round 0 warms up: Ray's workers start and import torch
                        got[base_name].append(b)
                        got[name].append(x)
                        ratios[name][0].append(x[0] / side[0] / b[0])
                        ratios[name][1].append(x[1] / b[1])
            print(f"load {os.getloadavg()[0]:.1f} at the end\n")
            med = statistics.median
            print(f"{'':18}{'cores':>5}{'img/s':>7}{'/core':>7}{'ratio/core':>11}{'(min-max)':>11}"
                  f"{'img/CPU-s':>10}{'ratio':>7}{'(min-max)':>11}{'1st batch':>10}")
            rows = [(base_name, 1, [t[0] for t in got[base_name]], [1], [t[1] for t in got[base_name]], [1])]
            rows += [(n, c, [t[0] for t in got[n]], ratios[n][0], [t[1] for t in got[n]], ratios[n][1])
                     for n, (c, _, _) in table.items()]
            for name, cores, rate, per_core, cpu_rate, per_cpu in rows:
                first = med([t[2] for t in got[name]])
                print(f"{name:18}{cores:>5}{med(rate):>7.0f}{med(rate) / cores:>7.0f}{med(per_core):>10.2f}x"
                      f"{min(per_core):>6.2f}-{max(per_core):<4.2f}{med(cpu_rate):>10.0f}{med(per_cpu):>6.2f}x"
                      f"{min(per_cpu):>6.2f}-{max(per_cpu):<4.2f}{first:>9.2f}s")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
