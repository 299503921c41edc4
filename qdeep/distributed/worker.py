"""What one Ray Train worker runs: the model, its data shard, the epoch loop, checkpoints.

Everything the driver decides (how many workers, where results go, how many restarts) lives in
driver.py; this module only sees `config` and `ray.train`'s worker API. What is learnt (targets),
how it is scored (validation) and in which stages (fit strategy) are parts named in `config`.
"""

from __future__ import annotations

import math
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from qdeep.config import DEFAULT_BAND_INIT
from qdeep.data.inputs import InputBands, model_input
from qdeep.data.loader import Decoder
from qdeep.distributed.comm import broadcast_buffers, broadcast_from_rank0, gather, gather_to_rank0, sum_across_workers
from qdeep.distributed.ingest import shard_batches
from qdeep.distributed.tasks import not_visible
from qdeep.models import apply_freeze, build_model, set_train_mode
from qdeep.parts import FIT_STRATEGIES, TARGETS, VALIDATIONS, load_plugins
from qdeep.parts.callbacks import callbacks
from qdeep.parts.fit import epoch_pieces, param_groups
from qdeep.parts.validation import Score

CHECKPOINT_FILE = "checkpoint.pt"


def train_func(config: dict) -> None:
    """Per-worker training loop (Ray Train's `train_loop_per_worker`)."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: let cuDNN pick its fastest kernels
    use_threads(config)
    torch.manual_seed(config["seed"])
    n_nodes = len(set(gather(ray.get_runtime_context().get_node_id())))
    load_plugins(config.get("plugins"))
    hooks = callbacks()
    targets = TARGETS.get(config["task"])(config["labels"])
    validation = VALIDATIONS.get(config["validation"])()
    stages = FIT_STRATEGIES.get(config["fit_strategy"])().stages(config)

    bands = InputBands.from_dict(config["input_bands"], "run config") if config.get("input_bands") else None
    bare = build_model(config["arch"], len(targets), config["weights"], stages[0].freeze, bands and bands.names,
                       config.get("band_init", DEFAULT_BAND_INIT), config.get("frozen_stem", False))
    read = model_input(bare.qdeep_arch, config["image_size"], bands)
    threads = config["loader_workers"]
    augmented = Decoder(read, train=True, crop=config["crop"], seed=config["seed"],
                        augment=config.get("augment", "d4"), threads=threads, y_dtype=targets.dtype)
    plain = Decoder(read, threads=threads, y_dtype=targets.dtype)
    batch = worker_batch(config["batch_size"], world)
    steps = -(-(config["n_train"] // world) // batch)  # equal shares; about that with --balance uniform
    schedule = lr_factor(config, config["epochs"] * steps)
    loss_fn = targets.loss(config.get("loss_weights")).to(device)  # --balance weights: the driver's, from all rows

    start_epoch, history, restarts, resumed = 0, [], 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resumed = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        bare.load_state_dict(resumed["model"])
        start_epoch, history = resumed["epoch"] + 1, resumed["history"]
        # Same launch: Ray restarted us after a failure. Another launch: the user reran the name.
        restarts = resumed["restarts"] + (1 if resumed["launch_id"] == config["launch_id"] else 0)

    stage_index = None
    for epoch in range(start_epoch, config["epochs"]):
        for callback in hooks:
            callback.on_epoch_start(rank, epoch)
        started = time.time()
        batches = visible(augmented(shard_batches("train", batch, True), epoch))
        loss_sum, correct, seen, done = 0.0, 0, 0, 0
        for index, n_steps in epoch_pieces(stages, epoch, steps):
            if index != stage_index:  # a new stage: what trains, and at which rate
                stage_index, stage = index, stages[index]
                model, optimizer, scaler = start_stage(bare, stage.freeze, stage.lr, config, device)
                if resumed and resumed.get("stage") == stage_index and epoch == start_epoch and done == 0:
                    load_optimizer_state(optimizer, bare, resumed["optimizer"])
                    if resumed["scaler"]:  # a CPU run's scaler is disabled and saves nothing
                        scaler.load_state_dict(resumed["scaler"])
            piece = train_one_epoch(model, batches if n_steps is None else islice(batches, n_steps), optimizer,
                                    scaler, loss_fn, device, lambda i, at=epoch * steps + done: schedule(at + i),
                                    stage.bn_stats)
            loss_sum, correct, seen = loss_sum + piece[0], correct + piece[1], seen + piece[2]
            done += n_steps or 0
        loss_total, correct_total, seen_total, images_per_s = sum_across_workers(
            [loss_sum, correct, seen, seen / (time.time() - started)], device)
        val = validate(model, visible(plain(shard_batches("val", batch, False))), loss_fn, device, config["n_val"],
                       targets, validation)
        score = val["score"]
        metrics = {
            "epoch": epoch,
            "train_loss": loss_total / max(seen_total, 1),
            **({"train_acc": correct_total / max(seen_total, 1)} if targets.dtype == np.int64 else {}),
            "val_loss": val["loss"],
            **{f"val_{k}": v for k, v in score.metrics.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "base_lr": stage.lr,
            "stage": stage_index,
            "trainable_params": sum(p.numel() for p in bare.parameters() if p.requires_grad),
            "images_per_s": images_per_s,
            "epoch_seconds": time.time() - started,
            "restarts": restarts,
            "workers": world,
            "nodes": n_nodes,
            **{f"{validation.per_label_metric}_{label}": float(v)
               for label, v in zip(targets.vocabulary, score.per_label)},
        }
        for callback in hooks:
            callback.on_epoch_end(rank, epoch, bare, metrics)
        history.append(metrics)
        _log_mlflow(config, rank, metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({
                    "model": bare.state_dict(),
                    "optimizer": optimizer_state(optimizer, bare),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "stage": stage_index,
                    "history": history,
                    "restarts": restarts,
                    "launch_id": config["launch_id"],
                    "labels": list(targets.vocabulary),
                    "thresholds": None if score.thresholds is None else score.thresholds.tolist(),
                    "per_label": score.per_label.tolist(),
                }, Path(d) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def use_threads(config: dict) -> None:
    """A CPU worker's torch threads: its share of the CPUs (`driver.torch_threads`), which Ray's
    OMP_NUM_THREADS (1 for a fractional share) would not give it."""
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])


def worker_batch(global_batch: int, world: int) -> int:
    """`--batch-size` is the global batch: each of `world` workers takes its share, so the number
    of optimizer steps (and what the learning rate means) does not depend on the worker count."""
    return max(1, global_batch // world)


def start_stage(bare, freeze: str, lr: float, config: dict, device):
    """Freeze to `freeze`, (re)wrap for DDP (which only syncs what trains when it is built), and a
    fresh optimizer over what trains, at `lr` (less down the blocks with `discriminative_lr`), with
    its AMP scaler: a fit strategy's stage, or a DeepCluster iteration's new head."""
    import ray.train.torch

    apply_freeze(bare, freeze)
    model = ray.train.torch.prepare_model(bare)
    optimizer = make_optimizer(config, param_groups(bare, lr, config.get("discriminative_lr", 1.0)))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    return model, optimizer, scaler


def train_one_epoch(model, loader, optimizer, scaler, loss_fn, device, lr_at=None,
                    bn_stats: str | None = None) -> tuple[float, int, int]:
    """One pass over this worker's shard: (summed loss, correct class predictions, images). AMP on
    CUDA. `lr_at(i)` is the learning-rate factor for the epoch's i-th step (of the whole run's schedule),
    applied to each group's `base_lr`. A batch's `x` is a float tensor or a `transforms.PixelBatch`,
    whose `.to(device)` converts, normalises and augments it there."""
    set_train_mode(model, bn_stats)
    loss_sum, correct, seen = 0.0, 0, 0
    for i, (_, x, y) in enumerate(loader):
        if lr_at is not None:
            factor = lr_at(i)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.item() * len(x)
        if not y.is_floating_point():
            correct += int((logits.argmax(1) == y).sum())
        seen += len(x)
    return loss_sum, correct, seen


def optimizer_state(optimizer: torch.optim.Optimizer, model) -> dict[str, dict]:
    """The optimizer's per-parameter state (Adam moments, momentum buffers) by parameter name, so
    it loads into an optimizer over other groups: a resumed stage, or a network with a new head."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: dict(state) for p, state in optimizer.state.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model, by_name: dict[str, dict],
                         skip: str | None = None) -> int:
    """Load `optimizer_state`'s output into the optimizer's parameters of the same name and shape
    (except those under the module `skip`); returns how many parameters got their state."""
    params = dict(model.named_parameters())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    loaded = 0
    for name, state in by_name.items():
        p = params.get(name)
        if p is None or id(p) not in optimized or (skip and name.startswith(skip + ".")):
            continue
        if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape for v in state.values()):
            continue
        optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and v.dim() else v for k, v in state.items()}
        loaded += 1
    return loaded


def make_optimizer(config: dict, params) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9); each group's `base_lr` is its starting lr, which `train_one_epoch`'s
    schedule multiplies."""
    if config["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(params, lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def lr_factor(config: dict, total_steps: int):
    """The whole run's learning-rate factor at a global step (all stages share one curve, so a new
    stage does not restart it): a linear warm-up, then cosine decay to `min_lr_factor`, step decay
    (x0.1 at 1/2 and 3/4 of training) or constant. Steps count global batches, the same whatever
    the number of workers, so the curve does not move when an elastic run resizes."""
    warmup = min(config["warmup_steps"], max(total_steps // 4, 0))
    floor = config.get("min_lr_factor", 0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        if config["schedule"] == "step":
            return 0.1 ** (int(progress >= 0.5) + int(progress >= 0.75))
        if config["schedule"] == "constant":
            return 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def validate(model, batches, loss_fn, device, n_rows: int, targets, validation) -> dict:
    """Scores the whole validation set on rank 0 alone: every worker's (row, x, y) batches of its
    share are scored, the rows' probabilities and targets gathered there, into one float32
    (n_rows x k) array, and scored once; the other ranks receive only the loss and the score's
    metrics, per-label values and thresholds (a few numbers per label), never the rows. Shares may
    differ in size (each row is scored once), so the network runs unwrapped, with no DDP collective
    per batch, after it takes rank 0's BatchNorm statistics as DDP's forward would have given it."""
    net = getattr(model, "module", model)
    broadcast_buffers(net)
    net.eval()
    k = len(targets)
    indices, probas, ys, loss_sum = [np.zeros(0, np.int64)], [np.zeros((0, k), np.float32)], [], 0.0
    for idx, x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = net(x)
        loss_sum += loss_fn(logits.float(), y).item() * len(x)
        indices.append(idx.numpy())
        probas.append(targets.activation(logits.float()).cpu().numpy())
        ys.append(y.cpu().numpy())
    local = (np.concatenate(indices), np.concatenate(probas), np.concatenate(ys) if ys else None, loss_sum)
    shards = gather_to_rank0(local)
    del local, indices, probas, ys  # this rank's copy has been sent
    summary = None
    if shards is not None:  # rank 0
        # float32: the activations are float32 already; the scorers promote where they compare.
        proba = np.zeros((n_rows, k), dtype=np.float32)
        y_all = np.zeros((n_rows, k) if targets.dtype != np.int64 else n_rows, dtype=targets.dtype)
        for idx, p, y, _ in shards:  # a row seen twice (a padded share) lands on its own index again
            proba[idx] = p
            if y is not None:
                y_all[idx] = y
        loss = sum(s[3] for s in shards) / max(sum(len(s[0]) for s in shards), 1)
        del shards
        score = validation.score(y_all, proba)
        del proba
        summary = (loss, score.metrics, score.per_label, score.thresholds)
    loss, *score = broadcast_from_rank0(summary)
    return {"score": Score(*score), "loss": loss}


def visible(batches):
    """`batches` as they come, but an image path missing on this node is the one-line error that
    says the data is not shared (a node that joined after the driver's check)."""
    try:
        yield from batches
    except FileNotFoundError as exc:
        raise not_visible([exc.filename or str(exc)], 1) from None


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
