"""The whole DeepCluster loop inside one Ray Train run (what each worker runs, and where k-means goes).

Each iteration, every worker embeds its share of the images with the current network into the
iteration's feature store (one shard file per worker), rank 0 clusters the store (PCA-whitening +
faiss k-means, from random rows and from the previous iteration's groups, on its own GPU or CPUs
while the others wait: a Ray task could not get the resources the worker group holds) and
broadcasts the pseudo-labels, then the workers train a fresh
head and the network on them with DDP, the body's optimizer kept from the iteration before, as
the reference keeps it across epochs. One worker group, one model load and one set of loader
processes serve every iteration: starting them per iteration cost about a third of it.

The final over-clustering, after the run, places its k-means with `cluster_placed`.
Rank 0 writes OUT/iterations/iter_XX/ (model.pt, optimizer.pt, labels.npy, then metrics.json,
which marks it finished); a restarted worker group, like a rerun of the command, carries on after
the last finished iteration.
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import numpy as np
import torch

from qdeep import io
from qdeep.clustering.deepcluster import Clustering, cluster_store, sample_rows
from qdeep.clustering.kmeans import choose_pca_dim, ground_truth_scores, nmi
from qdeep.clustering.store import DEFAULT_ROWS_PER_SHARD, FeatureStore, finish_store, write_rank_shards
from qdeep.data.inputs import InputBands, model_input
from qdeep.data.loader import ImageDataset, make_loader, uniform_class_sample
from qdeep.distributed.comm import barrier, broadcast_from_rank0, gather_to_rank0, sum_across_workers
from qdeep.distributed.ingest import collection_from
from qdeep.distributed.tasks import require_visible
from qdeep.distributed.worker import (load_optimizer_state, lr_factor, optimizer_state, start_stage, train_one_epoch,
                                      use_threads, validate, worker_batch)
from qdeep.models import build_model, embed, reset_head, weights_sha256
from qdeep.parts import TARGETS, VALIDATIONS, load_plugins
from qdeep.parts.callbacks import callbacks
from qdeep.parts.fit import kept_bn_stats

OPTIMIZER_FILE = "optimizer.pt"
KMEANS_BASE_MEMORY = 2 << 30  # a k-means task's process: Python, torch, faiss
FIRST_WARMUP_STEPS = 10  # the first iteration only: a new network's first steps on a random head


def iteration_dir(out: str | Path, t: int) -> str:
    """OUT/iterations/iter_XX (OUT a local path every node sees, or a URI)."""
    return io.child(out, f"iterations/iter_{t:02d}")


def n_finished(out: str | Path) -> int:
    """Iterations 1, 2, ... whose metrics.json exists (stopping at the first gap)."""
    t = 0
    while io.exists(io.child(iteration_dir(out, t + 1), "metrics.json")):
        t += 1
    return t


def network(out: str | Path, weights: str, t: int) -> str:
    """The weights iteration t starts from: the configured ones, then the previous iteration's."""
    return weights if t == 1 else io.child(iteration_dir(out, t - 1), "model.pt")


def iteration_labels(out: str | Path, t: int) -> np.ndarray:
    """Iteration t's pseudo-labels (its labels.npy), in the collection's order."""
    return np.load(BytesIO(io.read_bytes(io.child(iteration_dir(out, t), "labels.npy"))))


# ---- k-means placement ----------------------------------------------------------------------------


def kmeans_options(n_rows: int, dim: int, k: int, pca: int | None, use_gpu: bool,
                   shard_rows: int = DEFAULT_ROWS_PER_SHARD) -> dict:
    """What the k-means stage asks Ray for on a cluster (`ray.remote(...).options(**these)`): a GPU
    when the run uses GPUs (faiss-gpu in the image runs it; an autoscaler starts a GPU node if none
    is up), else the CPUs of the largest node (faiss' threads; nothing else runs meanwhile); and on
    both, memory for the sample `cluster_store` draws (raw and whitened), one shard and the labels,
    so that at k=10,000 over 1280-d descriptors (13 GB of sample) it is placed on a node that has it,
    not on the head beside the GCS and MLflow."""
    from qdeep.distributed.storage import alive_nodes

    sample = sample_rows(n_rows, k)
    whitened = choose_pca_dim(sample, dim, pca) if sample >= 2 else dim
    need = 4 * sample * (dim + whitened) + 4 * min(n_rows, shard_rows) * dim + 16 * n_rows
    options = {"memory": int(need * 1.25) + KMEANS_BASE_MEMORY, "max_retries": 0}
    if use_gpu:
        return {**options, "num_cpus": 1, "num_gpus": 1}
    cpus = max((n["Resources"].get("CPU", 0) for n in alive_nodes()), default=1)
    return {**options, "num_cpus": max(1, int(cpus))}


def cluster_placed(store, k: int, pca: int | None, seed: int, use_gpu: bool | None,
                   previous: dict[str, int] | None = None) -> tuple[list[str], Clustering, str]:
    """`cluster_store` where it belongs: in this process on a plain local Ray (one machine: its GPU,
    if any, is this process's too), else as a Ray task with `kmeans_options`, on a GPU node or a
    node with the memory, rather than on the driver's CPU head. Also returns where it ran
    ("driver" for this process, or "task on IP"). `previous`: as `cluster_store`'s."""
    import ray

    from qdeep.distributed.driver import cluster_has_gpus
    from qdeep.distributed.session import is_local_ray
    from qdeep.distributed.storage import alive_nodes

    if is_local_ray(alive_nodes()):
        return *cluster_store(store, k, pca, seed=seed, previous=previous), "driver"
    gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    shard_rows = max((s.rows for s in store.shards), default=0)
    task = ray.remote(_cluster_task).options(**kmeans_options(store.total_rows, store.dim, k, pca, gpu, shard_rows))
    ids, clustering, node = ray.get(task.remote(str(store.path), k, pca, seed, previous))
    return ids, clustering, f"task on {node}"


def _cluster_task(store_path: str, k: int, pca: int | None, seed: int, previous: dict[str, int] | None = None):
    import ray

    ids, clustering = cluster_store(FeatureStore(store_path), k, pca, seed=seed, previous=previous)
    return ids, clustering, ray.util.get_node_ip_address()


def in_order(ids: list[str], clustering: Clustering, order_ids: list[str]) -> Clustering:
    """The clustering's rows (in store order, `ids`) put in the order of `order_ids`."""
    position = {image: i for i, image in enumerate(ids)}
    order = np.array([position[i] for i in order_ids])
    return Clustering(clustering.labels[order], clustering.centroids, clustering.distances[order])


# ---- what an iteration records --------------------------------------------------------------------


def cluster_stats(clustering: Clustering, is_ctrl: np.ndarray) -> dict:
    k = len(clustering.sizes)
    return {"k": k, "score": clustering.score, "sizes": np.bincount(clustering.labels[~is_ctrl], minlength=k).tolist(),
            "sizes_ctrl": np.bincount(clustering.labels[is_ctrl], minlength=k).tolist(),
            "imbalance": clustering.imbalance, "n_empty": clustering.n_empty}


def truth_scores(labels: np.ndarray, truth: list[str] | None) -> dict:
    if truth is None:
        return {}
    return {f"{k}_true": v for k, v in ground_truth_scores(labels, truth).items()}


# ---- the worker's loop ------------------------------------------------------------------------------


def deepcluster_func(config: dict) -> None:
    """Ray Train's `train_loop_per_worker` for iterations n_finished(out) + 1 ... config["iterations"]."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.backends.cudnn.benchmark = device.type == "cuda"
    use_threads(config)
    out, k = config["out"], config["k"]
    collection = collection_from("images")  # the index, through Ray Data; never in the config
    refs, ids, is_ctrl, truth = collection["ref"], collection["id"], collection["ctrl"], collection["truth"]
    train_rows, ctrl_rows = np.flatnonzero(~is_ctrl), np.flatnonzero(is_ctrl)
    if isinstance(refs, list):  # paths (a pack's rows carry their bytes)
        require_visible(refs)  # a node that joined after the driver's check
    load_plugins(config.get("plugins"))
    hooks = callbacks()
    first = n_finished(out) + 1
    if first > config["iterations"]:
        return
    torch.manual_seed(config["seed"] + first)

    targets = TARGETS.get("pseudo")([str(i) for i in range(k)])
    validation = VALIDATIONS.get("accuracy")()
    bands = InputBands.from_dict(config["input_bands"], "run config") if config.get("input_bands") else None
    bare = build_model(config["arch"], k, network(out, config["weights"], first), config["freeze"],
                       bands and bands.names, config["band_init"], config["frozen_stem"]).to(device)
    spec = bare.qdeep_arch
    read = model_input(spec, config["image_size"], bands)
    body_state = None
    if first > 1:  # the body's optimizer state (momentum) of the iteration before
        state = io.read_bytes(io.child(iteration_dir(out, first - 1), OPTIMIZER_FILE))
        body_state = torch.load(BytesIO(state), map_location="cpu", weights_only=True)

    # One set of loaders for the whole run: they yield row indices, and targets are looked up in
    # this process, so the loader processes live across iterations while the labels change. Before
    # each clustering `labels` holds the partition before, which k-means also starts from (on a
    # resume, the last finished iteration's).
    labels = iteration_labels(out, first - 1) if first > 1 else np.zeros(len(ids), dtype=np.int64)
    batch = worker_batch(config["batch_size"], world)
    loader_args = dict(workers=config["loader_workers"], world_size=world, rank=rank, seed=config["seed"])
    every = make_loader(ImageDataset(refs, None, read), batch, shuffle=False, **loader_args)
    plan = (lambda epoch: train_rows[uniform_class_sample(labels[train_rows], seed=config["seed"] + epoch)]) \
        if config["balance"] == "uniform" else (lambda epoch: train_rows)
    augmented = ImageDataset(refs, None, read, train=True, crop=config["crop"], seed=config["seed"],
                             augment=config["augment"])
    train_loader = make_loader(augmented, batch, shuffle=True, plan=plan, **loader_args)
    ctrl_loader = make_loader(ImageDataset(refs, None, read), batch, shuffle=False,
                              plan=lambda epoch: ctrl_rows, **loader_args)

    def with_labels(loader, rows=None):
        """(index, x, pseudo-label) batches; with `rows` the index is the row's position in them."""
        for i, x, _ in loader:
            at = i.numpy()
            index = i if rows is None else torch.from_numpy(np.searchsorted(rows, at))
            yield index, x, torch.from_numpy(labels[at])

    for t in range(first, config["iterations"] + 1):
        started = time.time()
        folder = iteration_dir(out, t)
        if rank == 0:
            io.remove_dir(folder)  # an unfinished attempt is redone from its start
        barrier()
        for callback in hooks:
            callback.on_iteration_start(rank, t)
        store = embed_into_store(bare, every, ids, io.child(folder, "features"), rank, device,
                                 {"arch": config["arch"], "weights": network(out, config["weights"], t),
                                  "weights_sha256": weights_sha256(bare), "image_size": read.size})
        embedded = time.time()
        clustering, where = None, None
        if rank == 0:
            previous = dict(zip(ids, labels.tolist())) if t > 1 else None
            store_ids, clustering = cluster_store(store, k, config["pca"], seed=config["seed"] + t, previous=previous)
            clustering, where = in_order(store_ids, clustering, ids), f"rank 0 on {ray.util.get_node_ip_address()}"
            io.remove_dir(io.child(folder, "features"))  # descriptors change every iteration; labels are kept
        labels[:] = broadcast_from_rank0(None if clustering is None else clustering.labels)
        clustered = time.time()

        # a fresh head with fresh optimizer state; the body keeps its own
        reset_head(bare)
        model, optimizer, scaler = start_stage(bare, config["freeze"], config["lr"], config, device)
        if body_state is not None:
            load_optimizer_state(optimizer, bare, body_state, skip=spec.head_path)
        weights = targets.loss_weights(labels[train_rows]) if config["balance"] == "weights" else None
        loss_fn = targets.loss(weights).to(device)
        warmup = FIRST_WARMUP_STEPS if t == 1 else 0
        schedule = lr_factor({"schedule": "constant", "warmup_steps": warmup}, config["epochs"] * len(train_loader))
        epochs = []
        for e in range(config["epochs"]):
            epoch_started = time.time()
            global_epoch = (t - 1) * config["epochs"] + e
            train_loader.sampler.set_epoch(global_epoch)
            loss_sum, correct, seen = train_one_epoch(
                model, with_labels(train_loader), optimizer, scaler, loss_fn, device,
                lambda i: schedule(e * len(train_loader) + i), kept_bn_stats(config))
            loss_sum, correct, seen = sum_across_workers([loss_sum, correct, seen], device)
            val = validate(model, with_labels(ctrl_loader, ctrl_rows), loss_fn, device, len(ctrl_rows), targets,
                           validation)
            epochs.append({"epoch": global_epoch, "train_loss": loss_sum / max(seen, 1),
                           "train_acc": correct / max(seen, 1), "val_loss": val["loss"],
                           "val_accuracy": val["score"].metrics["accuracy"],
                           "epoch_seconds": round(time.time() - epoch_started, 2)})
        trained = time.time()
        body_state = optimizer_state(optimizer, bare)
        if rank == 0:
            at = {"started": started, "embedded": embedded, "clustered": clustered, "trained": trained}
            record_iteration(out, t, bare, body_state, clustering, is_ctrl, truth, config, epochs, where, at)
        ray.train.report({"iteration": t, "ctrl_acc": epochs[-1]["val_accuracy"]})
        del model


def embed_into_store(bare, loader, ids: list[str], path: str | Path, rank: int, device,
                     identity: dict) -> FeatureStore | None:
    """Every worker writes the descriptors of its share of the images as shard files into `path`
    (a local path every node sees, or a URI; emptied beforehand), and rank 0 writes the manifest
    last, which makes it a store: it returns the store (None on the other ranks)."""
    bare.eval()
    seen: dict[int, np.ndarray] = {}  # the sampler pads with repeats: each row once
    use_amp = device.type == "cuda"
    with torch.no_grad():
        for i, x, _ in loader:
            with torch.autocast(device.type, enabled=use_amp):
                features = embed(bare, x.to(device, non_blocking=True)).float().cpu().numpy()
            seen.update(zip(i.tolist(), features))
    rows = sorted(seen)
    dim = len(next(iter(seen.values())))
    shards = write_rank_shards(path, [ids[r] for r in rows], np.stack([seen[r] for r in rows]), rank)
    listed = gather_to_rank0(shards)
    if rank != 0:
        return None
    finish_store(path, [s for part in listed for s in part], identity, dim)
    return FeatureStore(path)


def record_iteration(out: str | Path, t: int, bare, body_state: dict, clustering: Clustering, is_ctrl: np.ndarray,
                     truth: list[str] | None, config: dict, epochs: list[dict], where: str, at: dict) -> dict:
    """OUT/iterations/iter_XX/: the network (head included), the body's optimizer state, the
    pseudo-labels, and metrics.json last (it marks the iteration finished)."""
    folder = iteration_dir(out, t)
    with io.atomic_path(io.child(folder, "model.pt")) as tmp:
        torch.save(bare.state_dict(), tmp)
    with io.atomic_path(io.child(folder, OPTIMIZER_FILE)) as tmp:
        torch.save(body_state, tmp)
    with io.atomic_path(io.child(folder, "labels.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, clustering.labels)
    seconds = time.time() - at["started"]
    train_epochs = sum(e["epoch_seconds"] for e in epochs)
    phases = {"embed_s": round(at["embedded"] - at["started"], 2),
              "cluster_s": round(at["clustered"] - at["embedded"], 2),
              "train_s": round(at["trained"] - at["clustered"], 2), "train_epochs_s": round(train_epochs, 2),
              "kmeans_on": where}
    # the rest: a new head and its DDP wrapper, the files (the worker group and its loaders start once per run)
    phases["overhead_s"] = round(max(0.0, seconds - phases["embed_s"] - phases["cluster_s"] - train_epochs), 2)
    previous = iteration_labels(out, t - 1) if t > 1 else None
    last = epochs[-1]
    metrics = {
        "iteration": t,
        "weights": network(out, config["weights"], t),
        **cluster_stats(clustering, is_ctrl),
        "nmi_prev": nmi(clustering.labels, previous) if previous is not None else None,
        "train_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        "ctrl_loss": last["val_loss"],
        "ctrl_acc": last["val_accuracy"],
        **truth_scores(clustering.labels, truth),
        "epochs": [{k: e[k] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_accuracy")} for e in epochs],
        "seconds": round(seconds, 2),
        "phases": phases,
    }
    io.write_json(io.child(folder, "metrics.json"), metrics)
    return metrics
