"""Throughput of qdeep's Ray Train path against a plain single-process PyTorch loop.

Both run the same model, batch size, data loader and epoch function (`worker.train_one_epoch`)
in the same run; the ratio of training images/s is printed (goal >= 0.90). The first epoch of
each is a warm-up; the second is measured. With GPUs, also images/s per GPU and the scaling
efficiency with all of them.

Usage: python scripts/bench_train.py [--arch resnet18] [--image-size 64] [--n 1024] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from qdeep.config import TrainConfig
from qdeep.data.inputs import model_input
from qdeep.data.loader import ImageDataset, make_loader
from qdeep.distributed.worker import lr_factor, make_optimizer, train_one_epoch
from qdeep.models import build_model
from qdeep.parts.targets import MultiLabelTargets


def plain_loop(config: dict, paths, y, epochs: int = 2) -> float:
    """The reference: one process, all cores, no Ray."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config["arch"], y.shape[1], config["weights"], config["freeze"]).to(device)
    spec = model.qdeep_arch
    data = ImageDataset(paths, y.astype(np.float32), model_input(spec, config["image_size"], None), train=True, seed=0)
    loader = make_loader(data, config["batch_size"], shuffle=True, workers=config["loader_workers"], world_size=1,
                         rank=0, seed=0)
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    schedule = lr_factor(config, epochs * len(loader))
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rate = 0.0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        start = time.time()
        _, _, seen = train_one_epoch(model, loader, optimizer, scaler, loss_fn, device,
                                     lambda i, e=epoch: schedule(e * len(loader) + i))
        rate = seen / (time.time() - start)
    return rate


def ray_path(config: dict, paths, y, targets, workers: int, storage: str, use_gpu: bool) -> float:
    """qdeep's path: the images through Ray Data (`ingest`), trained on all rows, the first 64 scored."""
    from qdeep.data import BadInputPolicy
    from qdeep.distributed import driver
    from qdeep.distributed.ingest import training_datasets
    from qdeep.distributed.prepare import TrainingData

    data = TrainingData(targets, paths, y.astype(np.float32), np.arange(len(paths)) < 64, BadInputPolicy(), "bench",
                        "f2")
    loop_config = {**config, "task": "multilabel", "labels": targets.vocabulary, "n_train": len(paths), "n_val": 64,
                   "train_on_all": True, "validation": "f2", "score_metric": "val_f2",
                   "launch_id": uuid.uuid4().hex, "mlflow_run_id": None}
    outcome = driver.fit(loop_config, training_datasets(data, loop_config), workers, f"bench-{uuid.uuid4().hex[:8]}",
                         storage, use_gpu=use_gpu)
    return outcome.latest["history"][-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loader-workers", type=int, default=0)
    args = parser.parse_args()

    from qdeep.data import BadInputPolicy, load_planet
    from qdeep.data.synth import write_synthetic_planet
    from qdeep.distributed.session import start_local_ray

    config = TrainConfig(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size, epochs=2,
                         loader_workers=args.loader_workers, warmup_steps=5).as_dict()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_planet(Path(tmp) / "data", n=args.n, size=args.image_size, seed=0, n_test=1)
        train = load_planet(Path(tmp) / "data", BadInputPolicy()).train
        targets = MultiLabelTargets.from_tags(train.tags)
        y = targets.encode(train.tags)
        paths = [str(p) for p in train.paths]

        plain = plain_loop(config, paths, y)
        print(f"plain PyTorch loop:        {plain:8.1f} img/s")
        start_local_ray()
        import ray

        try:
            one = ray_path(config, paths, y, targets, 1, str(Path(tmp) / "runs"), use_gpu=False
                           if not torch.cuda.is_available() else True)
            print(f"qdeep Ray Train, 1 worker: {one:8.1f} img/s   ratio {one / plain:.2f} (goal >= 0.90)")
            gpus = int(ray.cluster_resources().get("GPU", 0))
            if gpus > 1:
                many = ray_path(config, paths, y, targets, gpus, str(Path(tmp) / "runs"), use_gpu=True)
                print(f"qdeep Ray Train, {gpus} GPUs:  {many:8.1f} img/s   {many / gpus:.1f} img/s per GPU, "
                      f"scaling efficiency {many / (gpus * one):.2f}")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
