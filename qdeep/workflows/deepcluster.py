"""`qdeep deepcluster`: the DeepCluster loop (Caron et al. 2018) over a folder of images.

Each iteration: descriptors of every image with the current network (feature store) ->
PCA-whitening + L2 + k-means -> pseudo-labels -> a fresh head trained on the train split's
pseudo-labels with Ray Train, scored on the ctrl split it never trains on. Then the last network
over-clusters the collection with `final_k` groups, drawn as image grids.

OUT/iterations/iter_XX/ holds each finished iteration (metrics.json is written last, so a
directory without it is redone); rerunning the same OUT resumes after the last finished one.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from qdeep import io, tracking
from qdeep.cluster.deepcluster import Clustering, cluster_store, sample_rows
from qdeep.cluster.features import embed_images
from qdeep.cluster.kmeans import choose_pca_dim, ground_truth_scores, nmi
from qdeep.cluster.store import DEFAULT_ROWS_PER_SHARD, FeatureStore
from qdeep.data import BadInputPolicy, ImageSet, scan_images
from qdeep.data.planet import load_class_folders, load_planet, read_labeled
from qdeep.errors import QdeepError
from qdeep.parts.targets import PseudoTargets
from qdeep.report import cluster_grid, deepcluster_curves, deepcluster_sizes
from qdeep.runtime import ray_session
from qdeep.storage import check_shared_storage, filesystem
from qdeep.train import driver
from qdeep.train.config import TrainConfig
from qdeep.workflows.common import check_images
from qdeep.workflows.train import TrainingData, check_model, loop_config

STATE_FILE = "deepcluster.json"
OPTIMIZER_FILE = "optimizer.pt"
GRID_SIZE = 16
KMEANS_BASE_MEMORY = 2 << 30  # a k-means task's process: Python, torch, faiss


@dataclass
class DeepClusterConfig:
    arch: str = "efficientnet_lite0"
    weights: str = "bundled"  # the starting network: none | imagenet | bundled | PATH
    k: int = 5  # clusters (pseudo-classes) per iteration
    iterations: int = 10
    epochs_per_iteration: int = 1
    final_k: int = 20  # the final over-clustering
    ctrl_fraction: float = 0.25  # images never trained on, to measure the pseudo-label task honestly
    balance: str = "weights"  # weights (balanced class weights) | uniform (uniform per-cluster sampler)
    pca: int | None = None  # whitened dims (default: from the number of images, see choose_pca_dim)
    freeze: str = "none"  # the reference trains the whole network
    lr: float = 0.001  # constant across iterations (after a warm-up in the first); 0.01 diverged with frozen BN
    optimizer: str = "sgd"  # momentum 0.9, as the reference; the body's state carries over between iterations
    augment: str = "flip"  # d4 | flip | strong (random-resized crops, flips, colour jitter) | none
    bn_stats: str = "auto"  # frozen | batch | auto: frozen from pretrained weights, batch from none
    batch_size: int = 64
    image_size: int | None = None
    loader_workers: int = 2
    seed: int = 0

    def fingerprint(self) -> dict:
        """What must not change when a run is resumed (more iterations may be asked for)."""
        return {k: v for k, v in asdict(self).items() if k not in ("iterations", "loader_workers")}

    def resolved_bn_stats(self) -> str:
        """Pseudo-label training on a pretrained network keeps its BatchNorm statistics: letting them follow
        augmented batches moved every descriptor (NMI on the digits 0.67 -> 0.46 in one iteration at lr 1e-3),
        whereas a network trained from scratch has no statistics worth keeping."""
        if self.bn_stats != "auto":
            return self.bn_stats
        return "batch" if str(self.weights).strip().lower() == "none" else "frozen"

    def train_config(self, weights: str, iteration: int, optimizer_from: str | None = None) -> TrainConfig:
        """Iteration `iteration`'s training: a new head (and its optimizer state) on the network, whose
        body keeps the optimizer state of the iteration before (`optimizer_from`), at a constant lr."""
        return TrainConfig(arch=self.arch, weights=weights, freeze=self.freeze, epochs=self.epochs_per_iteration,
                           batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer, schedule="constant",
                           augment=self.augment, bn_stats=self.resolved_bn_stats(), image_size=self.image_size,
                           task="pseudo", validation="accuracy",
                           balance=self.balance, warmup_steps=0 if optimizer_from else 10, seed=self.seed + iteration,
                           loader_workers=self.loader_workers, val_fraction=self.ctrl_fraction, reset_head=True,
                           optimizer_from=optimizer_from)


@dataclass
class Collection:
    """The checked images, in a fixed order every iteration and every output uses."""

    root: Path
    paths: list[str]
    ids: list[str]  # relative to root: the `image` column everywhere
    is_ctrl: np.ndarray
    truth: list[str] | None  # one ground-truth class per image, when labels were given
    policy: BadInputPolicy


def run_deepcluster(out: str | Path, images: str | Path, config: DeepClusterConfig, labels: str | Path | None = None,
                    data: str | Path | None = None, workers: int | str = 2, storage_path: str | None = None,
                    on_bad_image: str = "error", use_gpu: bool | None = None,
                    tracking_uri: str | None = None, address: str | None = None,
                    max_failures: int | None = None, progress=print) -> dict:
    """Run (or resume) the loop, then the final over-clustering; returns OUT/metrics.json's content."""
    started = time.time()
    out = Path(out).resolve()
    storage_path = storage_path or str(out / "ray_results")
    _check(config)
    from qdeep.workflows.train import resolve_weights

    config = resolve_weights(config)  # a relative --weights PATH is the driver's; workers and actors run elsewhere
    with ray_session(address):
        check_shared_storage(str(out))  # workers read each iteration's network, Ray Data writes the stores
        check_shared_storage(storage_path)
        tracking.check_shared_tracking(tracking_uri)  # rank 0 logs from whichever node it runs on
        coll = collect(images, config, labels, data, on_bad_image)
        check_model(config.train_config(config.weights, 0), config.k)
        parent_id = claim_out(out, config, len(coll.paths))
        history = finished_iterations(out)
        uri = tracking.tracking_uri(tracking_uri)
        runner = tracking.resume_run(parent_id, uri) if parent_id else tracking.mlflow_run(
            "deepcluster", {**asdict(config), "nb_clusters": config.k, "images": str(coll.root),
                            "data_dir": str(coll.root), "out": str(out), "models_dir": str(out / "iterations"),
                            "workers": workers, "n_images": len(coll.paths), "n_ctrl": int(coll.is_ctrl.sum()),
                            "labels": str(labels or data or "")}, uri=tracking_uri)
        with runner as run:
            _record(out, config, len(coll.paths), run.info.run_id)
            if history:
                progress(f"resuming after iteration {len(history)} of {config.iterations}")
            for t in range(len(history) + 1, config.iterations + 1):
                history.append(run_iteration(out, t, coll, config, workers, uri, storage_path, use_gpu, max_failures))
                progress(_summary(history[-1]))
            final, clustering = over_cluster(out, coll, config, history, use_gpu)
            metrics = {"iterations": history, "final": final, "n_images": len(coll.paths),
                       "n_skipped": coll.policy.n_skipped, "skipped": coll.policy.skipped,
                       "mlflow_run_id": run.info.run_id, "seconds": round(time.time() - started, 2)}
            write_outputs(out, coll, history, clustering, metrics)
            tracking.log_metrics({f"final_{k}": v for k, v in final.items() if isinstance(v, (int, float))})
            tracking.log_artifacts(out / "metrics.json", out / "assignments.parquet", out / "curves.png",
                                   out / "sizes.png", out / "grids")
    return metrics


def _check(config: DeepClusterConfig) -> None:
    if config.k < 2 or config.final_k < 2:
        raise QdeepError(f"--k and --final-k must be at least 2, got {config.k} and {config.final_k}")
    if config.iterations < 0 or config.epochs_per_iteration < 1:
        raise QdeepError("--iterations must be >= 0 and --epochs-per-iteration >= 1")
    if not 0 < config.ctrl_fraction < 1:
        raise QdeepError(f"--ctrl-fraction must be between 0 and 1, got {config.ctrl_fraction}")
    if config.balance not in ("weights", "uniform"):
        raise QdeepError(f"--balance must be weights or uniform, got {config.balance!r}")


def collect(images, config: DeepClusterConfig, labels=None, data=None, on_bad_image: str = "error") -> Collection:
    """Every decodable image under `images`, the ctrl split, and ground truth when given."""
    root = Path(images).resolve()
    policy = BadInputPolicy(on_bad_image)
    found = scan_images(root, policy)
    checked = check_images(ImageSet(names=[str(p) for p in found], paths=found), policy)
    n = len(checked.paths)
    if n < max(config.k, config.final_k) * 2:
        raise QdeepError(f"{root}: {n} images are too few for k={config.k} / final-k={config.final_k}")
    rng = np.random.default_rng(config.seed)
    is_ctrl = np.zeros(n, dtype=bool)
    is_ctrl[rng.choice(n, max(1, round(n * config.ctrl_fraction)), replace=False)] = True
    paths = [str(p) for p in checked.paths]
    truth = ground_truth(paths, root, labels, data, policy) if (labels or data) else None
    return Collection(root, paths, [p.relative_to(root).as_posix() for p in checked.paths], is_ctrl, truth, policy)


def ground_truth(paths: list[str], root: Path, labels=None, data=None, policy=None) -> list[str]:
    """One class per image: its folder in a folder-per-class `--data DIR`, or its tag combination
    in a Planet CSV (`--labels CSV` over the images folder, or `--data DIR` in the Planet layout)."""
    if labels:
        known = read_labeled(Path(labels).resolve(), root, policy, recursive=True)
    elif (Path(data) / "train_v2.csv").is_file() or (Path(data) / "train.csv").is_file():
        known = load_planet(data, policy).train
    else:
        known = load_class_folders(data, policy).train
    by_path = {str(p): " ".join(sorted(tags)) for p, tags in zip(known.paths, known.tags)}
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise QdeepError(f"{labels or data}: no ground-truth label for {len(missing)} of {len(paths)} images "
                         f"(first: {missing[0]})")
    return [by_path[p] for p in paths]


def claim_out(out: Path, config: DeepClusterConfig, n_images: int) -> str | None:
    """A rerun of OUT must be the same run: returns its MLflow run id to resume, or None."""
    path = out / STATE_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    now = {**config.fingerprint(), "n_images": n_images}
    changed = sorted(k for k in set(recorded["settings"]) | set(now) if recorded["settings"].get(k) != now.get(k))
    if changed:
        raise QdeepError(f"{out} holds a DeepCluster run with other settings ({', '.join(changed)}); "
                         "rerun with those settings to resume, or use another --out")
    return recorded["mlflow_run_id"]


def _record(out: Path, config: DeepClusterConfig, n_images: int, run_id: str) -> None:
    io.write_json(out / STATE_FILE, {"settings": {**config.fingerprint(), "n_images": n_images},
                                     "mlflow_run_id": run_id})


def iteration_dir(out: Path, t: int) -> Path:
    return out / "iterations" / f"iter_{t:02d}"


def finished_iterations(out: Path) -> list[dict]:
    """Metrics of iterations 1, 2, ... that finished (in order, stopping at the first gap)."""
    history = []
    while (iteration_dir(out, len(history) + 1) / "metrics.json").is_file():
        history.append(json.loads((iteration_dir(out, len(history) + 1) / "metrics.json").read_text()))
    return history


def network(out: Path, config: DeepClusterConfig, t: int) -> str:
    """The weights iteration t starts from: the configured ones, then the previous iteration's."""
    return config.weights if t == 1 else str(iteration_dir(out, t - 1) / "model.pt")


def kmeans_options(n_rows: int, dim: int, k: int, pca: int | None, use_gpu: bool,
                   shard_rows: int = DEFAULT_ROWS_PER_SHARD) -> dict:
    """What the k-means stage asks Ray for on a cluster (`ray.remote(...).options(**these)`): a GPU
    when the run uses GPUs (faiss-gpu in the image runs it; an autoscaler starts a GPU node if none
    is up), else the CPUs of the largest node (faiss' threads; nothing else runs meanwhile); and on
    both, memory for the sample `cluster_store` draws (raw and whitened), one shard and the labels,
    so that at k=10,000 over 1280-d descriptors (13 GB of sample) it is placed on a node that has it,
    not on the head beside the GCS and MLflow."""
    from qdeep.storage import alive_nodes

    sample = sample_rows(n_rows, k)
    whitened = choose_pca_dim(sample, dim, pca) if sample >= 2 else dim
    need = 4 * sample * (dim + whitened) + 4 * min(n_rows, shard_rows) * dim + 16 * n_rows
    options = {"memory": int(need * 1.25) + KMEANS_BASE_MEMORY, "max_retries": 0}
    if use_gpu:
        return {**options, "num_cpus": 1, "num_gpus": 1}
    cpus = max((n["Resources"].get("CPU", 0) for n in alive_nodes()), default=1)
    return {**options, "num_cpus": max(1, int(cpus))}


def cluster_placed(store, k: int, pca: int | None, seed: int,
                   use_gpu: bool | None) -> tuple[list[str], Clustering, str]:
    """`cluster_store` where it belongs: in this process on a plain local Ray (one machine: its GPU,
    if any, is this process's too), else as a Ray task with `kmeans_options`, on a GPU node or a
    node with the memory, rather than on the driver's CPU head. Also returns where it ran
    ("driver", or "task on IP")."""
    import ray

    from qdeep.runtime import is_local_ray
    from qdeep.storage import alive_nodes

    if is_local_ray(alive_nodes()):
        return *cluster_store(store, k, pca, seed=seed), "driver"
    gpu = driver.cluster_has_gpus() if use_gpu is None else use_gpu
    shard_rows = max((s.rows for s in store.shards), default=0)
    task = ray.remote(_cluster_task).options(**kmeans_options(store.total_rows, store.dim, k, pca, gpu, shard_rows))
    ids, clustering, node = ray.get(task.remote(str(store.path), k, pca, seed))
    return ids, clustering, f"task on {node}"


def _cluster_task(store_path: str, k: int, pca: int | None, seed: int):
    import ray

    return *cluster_store(FeatureStore(store_path), k, pca, seed=seed), ray.util.get_node_ip_address()


def cluster_with(coll: Collection, config: DeepClusterConfig, weights: str, store_dir: Path, k: int, seed: int,
                 use_gpu: bool | None = None, phases: dict | None = None, max_gpus: int = 1) -> Clustering:
    """Descriptors of every image with `weights` into a feature store (on up to `max_gpus` GPU
    actors when GPUs are used), clustered shard by shard into k groups; rows put in the collection's
    order. `phases` gets the seconds of each step."""
    started = time.time()
    store = embed_images(coll.root, coll.paths, config.arch, weights, store_dir, batch_size=64,
                         image_size=config.image_size, use_gpu=use_gpu, max_gpu_actors=max_gpus)
    embedded = time.time()
    ids, clustering, where = cluster_placed(store, k, config.pca, seed, use_gpu)
    if phases is not None:
        phases.update(embed_s=round(embedded - started, 2), cluster_s=round(time.time() - embedded, 2),
                      kmeans_on=where)
    position = {image: i for i, image in enumerate(ids)}
    order = np.array([position[i] for i in coll.ids])
    clustering.labels, clustering.distances = clustering.labels[order], clustering.distances[order]
    return clustering


def run_iteration(out: Path, t: int, coll: Collection, config: DeepClusterConfig, workers: int, uri: str,
                  storage_path: str, use_gpu: bool | None = None, max_failures: int | None = None) -> dict:
    """Cluster with the current network, train a fresh head (and the network) on the pseudo-labels."""
    import mlflow

    started = time.time()
    folder = iteration_dir(out, t)
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished attempt is redone from its start
    run_name = f"{out.name}-{folder.name}"
    _remove_run(storage_path, run_name)  # its checkpoints belong to pseudo-labels that are gone
    weights = network(out, config, t)
    optimizer_from = str(iteration_dir(out, t - 1) / OPTIMIZER_FILE) if t > 1 else None
    phases: dict = {}
    clustering = cluster_with(coll, config, weights, folder / "features", config.k, config.seed + t, use_gpu, phases,
                              driver.worker_range(workers)[1])
    shutil.rmtree(folder / "features")  # descriptors change every iteration; the labels are what is kept

    data = TrainingData(PseudoTargets.for_clusters(config.k), coll.paths, clustering.labels, coll.is_ctrl,
                        coll.policy, str(coll.root), "accuracy")
    train_config = config.train_config(weights, t, optimizer_from)
    with tracking.mlflow_run(f"iteration-{t}", {**train_config.as_dict(), "iteration": t}, uri=uri) as child:
        lc = loop_config(train_config, data, uri, child.info.run_id)
        fit_started = time.time()
        outcome = driver.fit(lc, workers, run_name, storage_path, max_failures=max_failures, use_gpu=use_gpu)
        phases["train_s"] = round(time.time() - fit_started, 2)
    epochs = outcome.latest["history"]
    with io.atomic_path(folder / "model.pt") as tmp:  # the last epoch's network, head included
        torch.save(outcome.latest["model"], tmp)
    with io.atomic_path(folder / OPTIMIZER_FILE) as tmp:  # the next iteration's body starts from it
        torch.save(outcome.latest["optimizer"], tmp)
    with io.atomic_path(folder / "labels.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, clustering.labels)

    last = epochs[-1]
    metrics = {
        "iteration": t,
        "weights": weights,
        **cluster_stats(clustering, coll),
        "nmi_prev": nmi(clustering.labels, previous_labels(out, t - 1)) if t > 1 else None,
        "train_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        "ctrl_loss": last["val_loss"],
        "ctrl_acc": last["val_accuracy"],
        **truth_scores(clustering.labels, coll),
        "epochs": [{k: e[k] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_accuracy")}
                   for e in epochs],
        "seconds": round(time.time() - started, 2),
    }
    # Where an iteration's time goes: train_s is the whole Ray Train run (worker start, model load, the
    # epochs); its epochs' own seconds are train_epochs_s, and the rest of the iteration is overhead.
    phases["train_epochs_s"] = round(sum(e["epoch_seconds"] for e in epochs), 2)
    phases["overhead_s"] = round(metrics["seconds"] - phases["embed_s"] - phases["cluster_s"] - phases["train_epochs_s"], 2)
    metrics["phases"] = phases
    first_step = (t - 1) * config.epochs_per_iteration
    for e in epochs:
        tracking.log_metrics({"train_loss": e["train_loss"], "train_acc": e["train_acc"], "ctrl_loss": e["val_loss"],
                              "ctrl_acc": e["val_accuracy"]}, step=first_step + int(e["epoch"]))
    tracking.log_metrics({k: metrics[k] for k in ("score", "imbalance", "n_empty", "nmi_prev", "nmi_true", "ari_true",
                                                  "purity_true") if metrics.get(k) is not None}, step=t)
    mlflow.log_dict({"train": metrics["sizes"], "ctrl": metrics["sizes_ctrl"]}, f"sizes/iter_{t:02d}.json")
    io.write_json(folder / "metrics.json", metrics)  # last: marks the iteration finished
    return metrics


def _remove_run(storage_path: str, name: str) -> None:
    import pyarrow.fs

    fs, root = filesystem(storage_path)
    if fs.get_file_info(f"{root}/{name}").type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(f"{root}/{name}")


def previous_labels(out: Path, t: int) -> np.ndarray:
    return np.load(iteration_dir(out, t) / "labels.npy")


def cluster_stats(clustering: Clustering, coll: Collection) -> dict:
    k = len(clustering.sizes)
    return {"k": k, "score": clustering.score, "sizes": np.bincount(clustering.labels[~coll.is_ctrl], minlength=k).tolist(),
            "sizes_ctrl": np.bincount(clustering.labels[coll.is_ctrl], minlength=k).tolist(),
            "imbalance": clustering.imbalance, "n_empty": clustering.n_empty}


def truth_scores(labels: np.ndarray, coll: Collection) -> dict:
    if coll.truth is None:
        return {}
    return {f"{k}_true": v for k, v in ground_truth_scores(labels, coll.truth).items()}


def over_cluster(out: Path, coll: Collection, config: DeepClusterConfig, history: list[dict],
                 use_gpu: bool | None = None) -> tuple[dict, Clustering]:
    """`final_k` groups from the last network's descriptors (kept in OUT/features)."""
    weights = network(out, config, len(history) + 1)
    clustering = cluster_with(coll, config, weights, out / "features", config.final_k, config.seed, use_gpu)
    final = {"weights": weights, **cluster_stats(clustering, coll), **truth_scores(clustering.labels, coll)}
    if history:
        final["nmi_last_iteration"] = nmi(clustering.labels, previous_labels(out, len(history)))
    return final, clustering


def write_outputs(out: Path, coll: Collection, history: list[dict], clustering: Clustering, metrics: dict) -> None:
    """assignments.parquet, metrics.json, grids/cluster_XX.png, curves.png, sizes.png."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"image": coll.ids, "cluster": clustering.labels.astype(np.int32)}
    for h in history:
        columns[f"iter_{h['iteration']}"] = previous_labels(out, h["iteration"]).astype(np.int32)
    with io.atomic_path(out / "assignments.parquet") as tmp:
        pq.write_table(pa.table(columns), tmp)
    io.write_json(out / "metrics.json", metrics)
    with io.atomic_dir(out / "grids") as grids:
        for c in range(len(clustering.sizes)):
            members = np.flatnonzero(clustering.labels == c)
            nearest = members[np.argsort(clustering.distances[members], kind="stable")][:GRID_SIZE]
            cluster_grid([coll.paths[i] for i in nearest], grids / f"cluster_{c:02d}.png",
                         f"cluster {c}: {len(members)} images")
    deepcluster_curves(history, out / "curves.png")
    deepcluster_sizes(history, metrics["final"]["sizes"], out / "sizes.png")


def _summary(m: dict) -> str:
    text = (f"iteration {m['iteration']}: score {m['score']:.4f}  train_acc {m['train_acc']:.3f}  "
            f"ctrl_acc {m['ctrl_acc']:.3f}  imbalance {m['imbalance']:.2f}")
    if m.get("nmi_prev") is not None:
        text += f"  nmi(t-1,t) {m['nmi_prev']:.3f}"
    if "nmi_true" in m:
        text += f"  nmi(truth) {m['nmi_true']:.3f}"
    return text
