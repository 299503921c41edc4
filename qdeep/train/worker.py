"""What one Ray Train worker runs: the model, its data shard, the epoch loop, checkpoints.

Everything the driver decides (how many workers, where results go, how many restarts) lives in
driver.py; this module only sees `config` and `ray.train`'s worker API. What is learnt (targets),
how it is scored (validation) and in which stages (fit strategy) are parts named in `config`.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qdeep.models import apply_freeze, build_model, reset_head, set_train_mode, weights_sha256
from qdeep.parts import FIT_STRATEGIES, TARGETS, VALIDATIONS, load_plugins
from qdeep.parts.fit import param_groups, stage_of
from qdeep.train.data import ImageDataset, make_loader, uniform_class_sample

CHECKPOINT_FILE = "checkpoint.pt"
CRASH_ENV = "QDEEP_TEST_CRASH"  # tests only: "RANK:EPOCH:MARKER_FILE" makes that rank exit hard once


def train_func(config: dict) -> None:
    """Per-worker training loop (Ray Train's `train_loop_per_worker`)."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"])
    n_nodes = len(set(_gather(ray.get_runtime_context().get_node_id())))
    load_plugins(config.get("plugins"))
    targets = TARGETS.get(config["task"])(config["labels"])
    validation = VALIDATIONS.get(config["validation"])()
    stages = FIT_STRATEGIES.get(config["fit_strategy"])().stages(config)

    bare = build_model(config["arch"], len(targets), config["weights"], stages[0].freeze)
    if config.get("reset_head"):
        reset_head(bare)
    spec = bare.qdeep_arch
    size = config["image_size"] or spec.input_size
    y_train, y_val = np.asarray(config["y_train"], targets.dtype), np.asarray(config["y_val"], targets.dtype)
    train_set = ImageDataset(config["train_paths"], y_train, size, spec.mean, spec.std, train=True,
                             crop=config["crop"], seed=config["seed"])
    val_set = ImageDataset(config["val_paths"], y_val, size, spec.mean, spec.std)
    loader_args = dict(workers=config["loader_workers"], world_size=world, rank=rank, seed=config["seed"])
    plan = (lambda epoch: uniform_class_sample(y_train, seed=config["seed"] + epoch)) \
        if config.get("balance") == "uniform" else None
    train_loader = make_loader(train_set, config["batch_size"], shuffle=True, plan=plan, **loader_args)
    val_loader = make_loader(val_set, config["batch_size"], shuffle=False, **loader_args)
    weights = targets.loss_weights(y_train) if config.get("balance") == "weights" else None
    loss_fn = targets.loss(weights).to(device)

    start_epoch, history, restarts, resumed = 0, [], 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resumed = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        bare.load_state_dict(resumed["model"])
        start_epoch, history = resumed["epoch"] + 1, resumed["history"]
        # Same launch: Ray restarted us after a failure. Another launch: the user reran the name.
        restarts = resumed["restarts"] + (1 if resumed["launch_id"] == config["launch_id"] else 0)

    stage_index, model = None, None
    for epoch in range(start_epoch, config["epochs"]):
        if stage_of(stages, epoch) != stage_index:  # a new stage: what trains, and at which rate
            stage_index = stage_of(stages, epoch)
            stage = stages[stage_index]
            model, optimizer, scheduler, scaler = _start_stage(bare, stage, config, len(train_loader), device)
            if resumed and resumed.get("stage") == stage_index and epoch == start_epoch:
                optimizer.load_state_dict(resumed["optimizer"])
                scheduler.load_state_dict(resumed["scheduler"])
                scaler.load_state_dict(resumed["scaler"])
        _maybe_crash(config.get("crash"), rank, epoch, config.get("run_dir"))
        started = time.time()
        train_loader.sampler.set_epoch(epoch)
        loss_sum, correct, seen = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, loss_fn, device)
        loss_total, correct_total, seen_total, images_per_s = _sum_across_workers(
            [loss_sum, correct, seen, seen / (time.time() - started)], device)
        val = validate(model, val_loader, loss_fn, device, y_val, targets, validation)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_total / max(seen_total, 1),
            **({"train_acc": correct_total / max(seen_total, 1)} if targets.dtype == np.int64 else {}),
            "val_loss": val["loss"],
            **{f"val_{k}": v for k, v in val["score"].metrics.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "base_lr": stage.lr,
            "stage": stage_index,
            "trainable_params": sum(p.numel() for p in bare.parameters() if p.requires_grad),
            "images_per_s": images_per_s,
            "epoch_seconds": time.time() - started,
            "restarts": restarts,
            "ranks_in_sync": float(len(set(_gather(weights_sha256(bare)))) == 1),
            "workers": world,
            "nodes": n_nodes,
            **{f"{validation.per_label_metric}_{label}": float(v)
               for label, v in zip(targets.vocabulary, val["score"].per_label)},
        }
        history.append(metrics)
        thresholds = val["score"].thresholds
        state = {
            "model": bare.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "stage": stage_index,
            "history": history,
            "restarts": restarts,
            "launch_id": config["launch_id"],
            "labels": list(targets.vocabulary),
            "thresholds": None if thresholds is None else thresholds.tolist(),
            "per_label": val["score"].per_label.tolist(),
        }
        _log_mlflow(config, rank, metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save(state, Path(d) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def _start_stage(bare, stage, config: dict, steps_per_epoch: int, device):
    """Freeze to the stage's depth, (re)wrap for DDP (which only syncs what trains when it is
    built), and a fresh optimizer and schedule over the stage's steps."""
    import ray.train.torch

    apply_freeze(bare, stage.freeze)
    model = ray.train.torch.prepare_model(bare)
    optimizer = make_optimizer(config, param_groups(bare, stage.lr, config.get("discriminative_lr", 1.0)))
    steps = (stage.end - stage.start) * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    return model, optimizer, scheduler, scaler


def train_one_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, device) -> tuple[float, int, int]:
    """One pass over this worker's shard: (summed loss, correct class predictions, images). AMP on CUDA."""
    set_train_mode(model)
    use_amp = device.type == "cuda"
    loss_sum, correct, seen = 0.0, 0, 0
    for _, x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=use_amp):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.item() * len(x)
        if not y.is_floating_point():
            correct += int((logits.argmax(1) == y).sum())
        seen += len(x)
    return loss_sum, correct, seen


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
def validate(model, loader, loss_fn, device, y_val: np.ndarray, targets, validation) -> dict:
    """Scores the whole validation set: every worker's shard is gathered before scoring."""
    model.eval()
    use_amp = device.type == "cuda"
    indices, probas, loss_sum = [], [], 0.0
    for idx, x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=use_amp):
            logits = model(x)
        loss_sum += loss_fn(logits.float(), y).item() * len(x)
        indices.append(idx.numpy())
        probas.append(targets.activation(logits.float()).cpu().numpy())
    local = (np.concatenate(indices), np.concatenate(probas), loss_sum)
    shards = _gather(local)
    proba = np.zeros((len(y_val), len(targets)), dtype=np.float64)
    for idx, p, _ in shards:  # the sampler pads with repeats; rows land on their own index
        proba[idx] = p
    n_seen = sum(len(idx) for idx, _, _ in shards)
    return {"score": validation.score(y_val, proba), "loss": sum(s[2] for s in shards) / max(n_seen, 1)}


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
