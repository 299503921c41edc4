"""What one GPU does with qdeep's own code: the figures `make gpu-check` prints after `pytest -m gpu`.

1. faiss k-means: 1,000,000 x 256 float32 rows into 20,000 centroids, 25 iterations. faiss.Kmeans
   on the GPU is the workload of faiss' wiki ("Low level benchmarks": 55 s on one P100, float32;
   its centroid update runs on the CPU); qdeep's KMeans runs faiss' torch Lloyd loop on a CUDA
   tensor (search, sums and centroids on the GPU).
2. ResNet-50 at 224 px with AMP on one GPU, through qdeep's training step (worker.train_one_epoch,
   cudnn.benchmark on as in the training worker): images/s on synthetic tensors already on the
   GPU (what the model alone allows; also in channels_last, which qdeep does not use), and through
   the real input pipeline (ImageDataset + make_loader: JPEG decode and d4 augmentation in loader
   processes) with qdeep's default 2 loader processes and with one per core, side by side, so the
   input pipeline's share shows. NVIDIA's reference (DeepLearningExamples, ResNet-50 v1.5, AMP,
   batch 256): 2,470 img/s on one A100 80GB.

About 3 minutes on one recent GPU; on a machine without CUDA it says so and exits at once.

Usage: python scripts/gpu_check.py [--batch-size 256] [--images 4096] [--steps 40] [--skip-kmeans]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

NVIDIA_A100_IMG_S = 2470  # ResNet-50 v1.5, PyTorch AMP, batch 256, one A100 80GB (NVIDIA DeepLearningExamples)
FAISS_P100_S = 55  # 1M x 256 -> 20k centroids, 25 iterations, one P100, float32 (faiss wiki)


def kmeans_figures(n: int, d: int, k: int, niter: int) -> bool:
    import faiss

    from qdeep.clustering.kmeans import KMeans, gpu_available

    print(f"\nfaiss k-means, {n:,} x {d} float32 rows -> {k:,} centroids, {niter} iterations "
          f"(faiss {faiss.__version__}, {faiss.get_num_gpus()} GPU(s) seen by faiss)")
    if not gpu_available():
        print("  faiss has no GPU support here (faiss-cpu installed?): `make gpu-check` installs the gpu extra")
        return False
    x = np.random.default_rng(0).random((n, d), dtype=np.float32)
    started = time.perf_counter()
    faiss_km = faiss.Kmeans(d, k, niter=niter, gpu=True, seed=1, max_points_per_centroid=-(-n // k))
    faiss_km.train(x)
    t_faiss = time.perf_counter() - started
    print(f"  faiss.Kmeans(gpu=True):            {t_faiss:7.1f} s   objective {faiss_km.obj[-1]:.4g}   "
          f"(faiss wiki: {FAISS_P100_S} s on one P100)")
    started = time.perf_counter()
    ours = KMeans(k, niter=niter, use_gpu=True).fit(x)
    t_ours = time.perf_counter() - started
    print(f"  qdeep KMeans(use_gpu=True):        {t_ours:7.1f} s   objective {ours.obj_[-1]:.4g}   "
          f"(faiss' torch loop, then every row labelled)")
    return True


def _write_part(args) -> list[str]:
    from qdeep.data.synth import write_synthetic_planet

    out, n, seed = args
    write_synthetic_planet(out, n=n, size=256, seed=seed, n_test=0)
    return sorted(str(p) for p in (Path(out) / "train-jpg").glob("*.jpg"))


def synthetic_jpegs(root: Path, n: int, procs: int) -> list[str]:
    """`n` synthetic Planet tiles, 256 px JPEGs, written by `procs` processes (spawned: this
    process holds CUDA and faiss GPU contexts, which a fork must not inherit)."""
    per = -(-n // procs)
    jobs = [(str(root / f"part{j}"), min(per, n - j * per), j) for j in range(procs) if n - j * per > 0]
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        return [p for part in pool.map(_write_part, jobs) for p in part]


def resnet_figures(batch: int, n_images: int, steps: int) -> None:
    import torch

    from qdeep.config import TrainConfig
    from qdeep.data.inputs import model_input
    from qdeep.data.loader import ImageDataset, make_loader
    from qdeep.distributed.worker import make_optimizer, train_one_epoch
    from qdeep.models import build_model

    device, n_labels, size = torch.device("cuda"), 17, 224
    torch.backends.cudnn.benchmark = True  # as train_func sets it on CUDA
    config = TrainConfig(optimizer="sgd", lr=0.1).as_dict()  # NVIDIA's recipe is SGD with momentum
    loss_fn = torch.nn.BCEWithLogitsLoss()
    cores = len(os.sched_getaffinity(0))

    def rate(model, loader, epochs: int) -> float:
        """images/s of the last of `epochs` passes (the first ones warm up cuDNN and the loaders)."""
        optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
        scaler = torch.amp.GradScaler("cuda")
        for epoch in range(epochs):
            if hasattr(loader, "sampler"):
                loader.sampler.set_epoch(epoch)
            torch.cuda.synchronize()
            started = time.perf_counter()
            _, _, seen = train_one_epoch(model, loader, optimizer, scaler, loss_fn, device)
            torch.cuda.synchronize()
            result = seen / (time.perf_counter() - started)
        return result

    def synthetic(channels_last: bool) -> float:
        model = build_model("resnet50", n_labels, "none", "none").to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        y = (torch.rand(batch, n_labels, device=device) < 0.3).float()
        idx = torch.arange(batch)
        rate(model, [(idx, x, y)] * 10, 1)  # warm-up: cuDNN's autotuner, the allocator
        return rate(model, [(idx, x, y)] * steps, 1)

    while True:
        try:
            plain = synthetic(channels_last=False)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch <= 16:
                raise
            batch //= 2
            print(f"  (out of GPU memory: batch {batch} instead)")
    nhwc = synthetic(channels_last=True)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        paths = synthetic_jpegs(Path(tmp), n_images, min(cores, 16))
        written = time.perf_counter() - started
        y = (np.random.default_rng(0).random((len(paths), n_labels)) < 0.3).astype(np.float32)
        model = build_model("resnet50", n_labels, "none", "none").to(device)
        spec = model.qdeep_arch
        data = ImageDataset(paths, y, model_input(spec, size, None), train=True, augment="d4")
        piped = {}
        for workers in sorted({TrainConfig().loader_workers, cores}):
            loader = make_loader(data, batch, shuffle=True, workers=workers, world_size=1, rank=0, seed=0)
            piped[workers] = rate(model, loader, 2)
            del loader

    default = TrainConfig().loader_workers
    print(f"\nResNet-50, {size} px, AMP, batch {batch}, one {torch.cuda.get_device_name(0)}: training images/s "
          f"through qdeep's train_one_epoch")
    rows = [("synthetic tensors on the GPU", plain, ""),
            ("synthetic tensors, channels_last", nhwc, "  (qdeep does not use channels_last)")]
    rows += [(f"JPEG decode + d4 augment, {w} loader processes", v,
              f"  {v / plain:.0%} of synthetic" + (" (qdeep's default --loader-workers)" if w == default else ""))
             for w, v in piped.items()]
    rows += [("NVIDIA's reference, one A100 80GB, AMP", NVIDIA_A100_IMG_S, "")]
    for label, value, note in rows:
        print(f"  {label + ':':<48} {value:7.0f}{note}")
    print(f"  ({len(paths)} synthetic 256 px JPEGs, written in {written:.0f} s; {cores} cores here)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096, help="synthetic JPEGs for the input-pipeline figure")
    parser.add_argument("--steps", type=int, default=40, help="timed steps on synthetic tensors")
    parser.add_argument("--kmeans-rows", type=int, default=1_000_000)
    parser.add_argument("--skip-kmeans", action="store_true")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to measure here; "
              "run `make gpu-check` on a machine with an NVIDIA GPU")
        return 0
    started = time.perf_counter()
    print(f"gpu_check on {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    ok = True
    if not args.skip_kmeans:
        ok = kmeans_figures(args.kmeans_rows, 256, 20_000, 25)
    resnet_figures(args.batch_size, args.images, args.steps)
    print(f"\ngpu_check took {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
