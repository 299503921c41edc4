"""How a training run is laid out on the cluster: workers, GPUs, storage, checkpoints, restarts.

The per-worker loop is `worker.train_func`; this module only configures Ray Train around it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qdeep.train.worker import CHECKPOINT_FILE, CRASH_ENV, train_func


@dataclass
class TrainOutcome:
    best: dict  # the best checkpoint's state (by val_f2)
    latest: dict  # the last checkpoint's state (full history, restarts)
    path: str  # where Ray Train keeps the run


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def fit(loop_config: dict, workers: int, name: str, storage_path: str, max_failures: int = 0,
        use_gpu: bool | None = None, keep_checkpoints: int = 2) -> TrainOutcome:
    """Run `train_func` data-parallel on `workers` Ray workers; rerunning the same (storage_path,
    name) resumes from the last checkpoint instead of starting over."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if os.environ.get(CRASH_ENV):  # fault-injection tests only
        loop_config = {**loop_config, "crash": os.environ[CRASH_ENV], "run_dir": str(Path(storage_path) / name)}
    use_gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=keep_checkpoints,
                checkpoint_score_attribute="val_f2",
                checkpoint_score_order="max",
            ),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint ({result.error})")
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_f2", -1))[0] if result.best_checkpoints \
        else result.checkpoint
    return TrainOutcome(best=_load(best), latest=_load(result.checkpoint), path=result.path)


def _load(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
