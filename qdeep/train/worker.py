"""What one Ray Train worker runs: the model, its data shard, the epoch loop, checkpoints.

Everything the driver decides (how many workers, where results go, how many restarts) lives in
driver.py; this module only sees `config` and `ray.train`'s worker API.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qdeep.metrics import binarize, f2_score, per_label_f2, tune_thresholds
from qdeep.models import build_model, set_train_mode, weights_sha256
from qdeep.parts.validation import score_holdout
from qdeep.train.data import ImageDataset, make_loader

CHECKPOINT_FILE = "checkpoint.pt"
CRASH_ENV = "QDEEP_TEST_CRASH"  # tests only: "RANK:EPOCH:MARKER_FILE" makes that rank exit hard once


def train_func(config: dict) -> None:
    """Per-worker training loop (Ray Train's `train_loop_per_worker`)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"])

    model = build_model(config["arch"], len(config["labels"]), config["weights"], config["freeze"])
    spec = model.qdeep_arch
    size = config["image_size"] or spec.input_size
    y_train, y_val = np.asarray(config["y_train"], np.uint8), np.asarray(config["y_val"], np.uint8)
    train_set = ImageDataset(config["train_paths"], y_train, size, spec.mean, spec.std, train=True,
                             crop=config["crop"], seed=config["seed"])
    val_set = ImageDataset(config["val_paths"], y_val, size, spec.mean, spec.std)
    loader_args = dict(workers=config["loader_workers"], world_size=world, rank=rank, seed=config["seed"])
    train_loader = make_loader(train_set, config["batch_size"], shuffle=True, **loader_args)
    val_loader = make_loader(val_set, config["batch_size"], shuffle=False, **loader_args)

    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params)
    steps = config["epochs"] * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    pos_weight = torch.tensor(config["pos_weight"], device=device) if config.get("pos_weight") else None
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    start_epoch, history, restarts = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        # Same launch: Ray restarted us after a failure. Another launch: the user reran the name.
        restarts = state["restarts"] + (1 if state["launch_id"] == config["launch_id"] else 0)

    for epoch in range(start_epoch, config["epochs"]):
        _maybe_crash(config.get("crash"), rank, epoch, config.get("run_dir"))
        started = time.time()
        train_set.epoch = epoch
        train_loader.sampler.set_epoch(epoch)
        loss_sum, seen = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, loss_fn, device)
        loss_total, seen_total, images_per_s = _sum_across_workers([loss_sum, seen, seen / (time.time() - started)], device)
        val = validate(model, val_loader, loss_fn, device, y_val)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_total / max(seen_total, 1),
            "val_loss": val["loss"],
            "val_f2": val["f2"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": images_per_s,
            "epoch_seconds": time.time() - started,
            "restarts": restarts,
            "ranks_in_sync": float(len(set(_gather(weights_sha256(bare)))) == 1),
            **{f"f2_{tag}": float(v) for tag, v in zip(config["labels"], val["per_label_f2"])},
        }
        history.append(metrics)
        state = {
            "model": bare.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "history": history,
            "restarts": restarts,
            "launch_id": config["launch_id"],
            "labels": list(config["labels"]),
            "thresholds": val["thresholds"].tolist(),
            "per_label_f2": val["per_label_f2"].tolist(),
        }
        _log_mlflow(config, rank, metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save(state, Path(d) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, device) -> tuple[float, int]:
    """One pass over this worker's shard; returns (summed loss, images seen). AMP on CUDA."""
    set_train_mode(model)
    use_amp = device.type == "cuda"
    loss_sum, seen = 0.0, 0
    for _, x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=use_amp):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.item() * len(x)
        seen += len(x)
    return loss_sum, seen


def make_optimizer(config: dict, params) -> torch.optim.Optimizer:
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"])
    return torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])


def lr_factor(config: dict, total_steps: int):
    """Linear warm-up, then cosine decay or step decay (x0.1 at 1/2 and 3/4 of training)."""
    warmup = min(config["warmup_steps"], max(total_steps // 4, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total_steps - warmup, 1)
        if config["schedule"] == "step":
            return 0.1 ** (int(progress >= 0.5) + int(progress >= 0.75))
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@torch.no_grad()
def validate(model, loader, loss_fn, device, y_val: np.ndarray) -> dict:
    """Scores the whole validation set: every worker's shard is gathered before thresholds."""
    model.eval()
    use_amp = device.type == "cuda"
    indices, probas, loss_sum = [], [], 0.0
    for idx, x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=use_amp):
            logits = model(x)
        loss_sum += loss_fn(logits.float(), y).item() * len(x)
        indices.append(idx.numpy())
        probas.append(torch.sigmoid(logits.float()).cpu().numpy())
    local = (np.concatenate(indices), np.concatenate(probas), loss_sum)
    shards = _gather(local)
    proba = np.zeros(y_val.shape, dtype=np.float64)
    for idx, p, _ in shards:  # DistributedSampler pads with repeats; rows land on their own index
        proba[idx] = p
    n_seen = sum(len(idx) for idx, _, _ in shards)
    scored = score_holdout(y_val, proba)
    return {"f2": scored.f2, "per_label_f2": scored.per_label_f2, "thresholds": scored.thresholds,
            "loss": sum(s[2] for s in shards) / max(n_seen, 1)}


def _gather(obj) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _sum_across_workers(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _log_mlflow(config: dict, rank: int, metrics: dict) -> None:
    """Rank 0 only, into the run the driver opened: one run per training, whatever the restarts."""
    if rank != 0 or not config.get("mlflow_run_id"):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config["mlflow_uri"])
    step = int(metrics["epoch"])
    for key, value in metrics.items():
        if key != "epoch":
            client.log_metric(config["mlflow_run_id"], key, float(value), step=step)


def _maybe_crash(spec: str | None, rank: int, epoch: int, run_dir: str | None) -> None:
    """Fault injection for tests: the named rank dies hard (no cleanup) once, in the named epoch."""
    if not spec:
        return
    crash_rank, crash_epoch, marker = spec.split(":", 2)
    if rank == int(crash_rank) and epoch == int(crash_epoch) and not os.path.exists(marker):
        if run_dir:
            _wait_until_checkpoint_registered(Path(run_dir))
        Path(marker).write_text(f"rank {rank} crashed in epoch {epoch}\n")
        os._exit(1)


def _wait_until_checkpoint_registered(run_dir: Path, timeout: float = 120.0) -> None:
    """Ray's controller registers reports asynchronously (it polls workers); a worker that dies
    first takes its unpolled reports with it. The fault test waits for the newest checkpoint on
    storage to appear in Ray's checkpoint-manager snapshot, so it tests our resume, not the poll."""
    newest = max((p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()), default=None)
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while newest and time.time() < deadline:
        if snapshot.exists() and newest in snapshot.read_text():
            return
        time.sleep(0.05)
    if newest:
        raise RuntimeError(f"fault test: checkpoint {newest} was not registered within {timeout:.0f} s")
