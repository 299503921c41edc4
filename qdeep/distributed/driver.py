"""How a training run is laid out on the cluster: workers, GPUs, storage, checkpoints, restarts.

The per-worker loop is `worker.train_func`; this module only configures Ray Train around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qdeep import io
from qdeep.distributed.ingest import DATA_CPUS, DATA_RESERVE, data_config
from qdeep.distributed.tasks import raise_user_error
from qdeep.distributed.worker import CHECKPOINT_FILE, train_func
from qdeep.options import worker_range


@dataclass
class TrainOutcome:
    best: dict  # the best checkpoint's state (by the task's score, e.g. val_f2)
    latest: dict  # the last checkpoint's state (full history, restarts)
    path: str  # where Ray Train keeps the run: a local path or a URI


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def cpus_per_worker(workers: int, use_gpu: bool, loader_workers: int = 0) -> float:
    """CPU-only clusters: share the CPUs out, less the few that Ray Data's input tasks need
    (`ingest.DATA_RESERVE`); each worker's torch gets as many threads as its share rounds to
    (`torch_threads`). GPU workers compute on the GPU and decode JPEGs in their `loader_workers`
    threads: they reserve a CPU for each of those (at least one), so Ray does not put more workers on
    a node than its CPUs can feed (gpu.4x: 4 workers x 2 of its 48 vCPUs)."""
    import ray

    if use_gpu:
        return max(1, loader_workers)
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(DATA_CPUS, round((cpus - DATA_RESERVE) / max(workers, 1), 2))


def torch_threads(cpus: float) -> int:
    return max(1, round(cpus))


def make_trainer(loop_config: dict, workers: int | str | tuple[int, int], name: str, storage_path: str,
                 max_failures: int = 0, use_gpu: bool | None = None, cpus: float | None = None, gpus: float = 1,
                 callbacks: list | None = None, train_loop=None, datasets: dict | None = None):
    """A TorchTrainer for `train_func` (or `train_loop`): `workers` data-parallel workers fed by
    `datasets` (`ingest.training_datasets`), checkpoints kept by the task's score
    (`loop_config["score_metric"]`), restarts after worker failures. Same (storage_path, name) -> resume."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    use_gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    lo, hi = worker_range(workers)
    resources = {"CPU": cpus or cpus_per_worker(hi, use_gpu, loop_config.get("loader_workers", 0))}
    if use_gpu:
        resources["GPU"] = gpus
    else:
        loop_config = {**loop_config, "torch_threads": torch_threads(resources["CPU"])}
    return _trainer_class()(
        train_loop or train_func,
        train_loop_config=loop_config,
        datasets=datasets,
        dataset_config=data_config() if datasets else None,
        scaling_config=ScalingConfig(num_workers=(lo, hi) if lo < hi else hi, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=loop_config["score_metric"],
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
        ),
    )


ELASTIC_MAX_FAILURES = 3  # an elastic run (MIN < MAX workers) restarts this often by default: spot nodes go


def default_max_failures(workers: int | str | tuple[int, int], max_failures: int | None) -> int:
    """`max_failures` as given; by default 0 for a fixed worker count (a failure ends the run, with its
    error) and ELASTIC_MAX_FAILURES for an elastic one, which carries on with the workers left."""
    if max_failures is not None:
        return max_failures
    lo, hi = worker_range(workers)
    return ELASTIC_MAX_FAILURES if lo < hi else 0


def fit(loop_config: dict, datasets: dict, workers: int | str | tuple[int, int], name: str, storage_path: str,
        max_failures: int | None = None, use_gpu: bool | None = None) -> TrainOutcome:
    """Run training to the end (or resume it) and load its best and latest checkpoints."""
    trainer = make_trainer(loop_config, workers, name, storage_path, default_max_failures(workers, max_failures),
                           use_gpu, datasets=datasets)
    result = fit_keeping_ctrl_c(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint ({result.error})")
    latest = _load(result.checkpoint)
    if latest["epoch"] + 1 < loop_config["epochs"]:  # Ray Train ends a run early only on Ctrl+C
        raise KeyboardInterrupt(f"training run {name!r} was aborted after epoch {latest['epoch']}")
    metric = loop_config["score_metric"]
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get(metric, -1))[0] if result.best_checkpoints \
        else result.checkpoint
    # Ray's result.path is inside its filesystem: a bucket's run without its s3:// scheme.
    path = io.child(storage_path, name) if io.is_uri(storage_path) else result.path
    return TrainOutcome(best=_load(best), latest=latest, path=path)


def _trainer_class():
    """TorchTrainer that remembers a Ctrl+C. Ray Train's own SIGINT handler aborts the run
    gracefully, after which fit() returns a result that may look finished (the abort came after the
    last report) or the handler calls sys.exit(0); `interrupted` tells the caller it was the user."""
    import signal

    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        interrupted = False

        def _register_sigint_handler(self, controller):
            super()._register_sigint_handler(controller)
            ray_handler = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                self.interrupted = True
                ray_handler(signum, frame)

            signal.signal(signal.SIGINT, handler)

    return Trainer


def fit_keeping_ctrl_c(trainer):
    """`trainer.fit()` of a `make_trainer` trainer, then the caller's Ctrl+C handler back: Ray Train
    installs its own (which aborts the run gracefully) and leaves it in place, so a later Ctrl+C would
    do nothing. A Ctrl+C during the run raises KeyboardInterrupt here, whatever Ray Train made of it;
    a worker's `QdeepError` (images not visible from its node, ...) comes out as itself, for the
    CLI's one-line message, not inside Ray Train's `TrainingFailedError`."""
    import signal
    import threading

    from ray.train import TrainingFailedError

    main = threading.current_thread() is threading.main_thread()  # Ray Train's handler goes there only
    previous = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except BaseException as exc:  # SystemExit from Ray Train's handler, or an error of the aborted run
        if trainer.interrupted:
            raise KeyboardInterrupt("training aborted by Ctrl+C") from None
        if isinstance(exc, TrainingFailedError):
            raise_user_error(exc)
        raise
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if trainer.interrupted:
        raise KeyboardInterrupt("training aborted by Ctrl+C")
    return result


RUN_FILE = "qdeep_run.json"  # beside Ray Train's files: the settings of a named run


def claim_run(storage_path: str, name: str, settings: dict) -> None:
    """Rerunning a name resumes it, so the same name must mean the same training (`io.claim_run`)."""
    path = io.child(io.child(storage_path, name), RUN_FILE)
    io.claim_run(path, settings, f"run {name!r} in {storage_path} was started with different settings", "--name")
    io.record_run(path, settings)


def _load(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
