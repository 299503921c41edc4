"""`qdeep deepcluster`: the DeepCluster loop (Caron et al. 2018) over a folder of images or a pack.

Each iteration: descriptors of every image with the current network (feature store) ->
PCA-whitening + L2 + k-means -> pseudo-labels -> a fresh head trained on the train split's
pseudo-labels, scored on the ctrl split it never trains on; every iteration inside one Ray Train
run (`qdeep.distributed.deepcluster`). Then the last network over-clusters the collection with `final_k`
groups (its descriptors through Ray Data), each profiled and drawn in OUT/report.html
(`workflows.profile`).

OUT/iterations/iter_XX/ holds each finished iteration (metrics.json is written last, so a
directory without it is redone); rerunning the same OUT resumes after the last finished one. OUT
is a local path every node sees, or a URI (s3://...): the iterations, the feature stores and the
final outputs go there, and a pack in a bucket as `--images` lets any node read the images.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qdeep import io, tracking
from qdeep.clustering.deepcluster import Clustering
from qdeep.clustering.kmeans import nmi
from qdeep.config import DeepClusterConfig
from qdeep.data import BadInputPolicy, ImageSet, load_rgb, scan_images
from qdeep.data.inputs import InputBands, input_bands
from qdeep.data.pack import Pack, is_pack
from qdeep.data.planet import load_class_folders, load_planet, read_labeled
from qdeep.distributed import driver
from qdeep.distributed.deepcluster import (cluster_placed, cluster_stats, deepcluster_func, in_order, iteration_dir,
                                           iteration_labels, n_finished, network, truth_scores)
from qdeep.distributed.features import embed_images, folder_rows, pack_images
from qdeep.distributed.ingest import collection_dataset
from qdeep.distributed.prepare import check_model, settle
from qdeep.distributed.session import log_in, ray_session
from qdeep.distributed.storage import check_shared_storage, check_shared_tracking
from qdeep.distributed.tasks import check_images
from qdeep.errors import QdeepError
from qdeep.io import atomic_path, child, filesystem, write_json
from qdeep.parts import load_plugins
from qdeep.workflows.profile import report_files, write_report

STATE_FILE = "deepcluster.json"


@dataclass
class Collection:
    """The checked images, in a fixed order every iteration and every output uses."""

    source: str  # the images' folder, or the pack (a local path or a URI)
    ids: list[str]  # below the folder, or the name in the pack: the `image` column everywhere
    paths: list[str] | None  # each image's path; None for a pack (its rows carry their bytes)
    is_ctrl: np.ndarray
    truth: list[str] | None  # one ground-truth class per image, when labels were given
    policy: BadInputPolicy
    bands: InputBands | None = None  # multiband images (`--image-format tif`): what the network takes

    @property
    def pack(self) -> Pack | None:
        return Pack(self.source) if self.paths is None else None


def run_deepcluster(out: str | Path, images: str | Path, config: DeepClusterConfig, labels: str | Path | None = None,
                    data: str | Path | None = None, workers: int | str = 2, storage_path: str | None = None,
                    on_bad_image: str = "error", use_gpu: bool | None = None,
                    tracking_uri: str | None = None, address: str | None = None,
                    max_failures: int | None = None, plugins: list[str] | None = None, progress=print) -> dict:
    """Run (or resume) the loop, then the final over-clustering; returns OUT/metrics.json's content."""
    started = time.time()
    load_plugins(plugins)
    out = io.resolved(out)
    storage_path = storage_path or child(out, "ray_results")
    _check(config)
    if (labels or data) and is_pack(images):
        raise QdeepError(f"--images {images} is a pack: its labels are in it (leave out --labels and --data)")
    config = replace(config, train=settle(config.train))  # its --weights PATH absolute, its parts checked
    with ray_session(address, log=log_in(out)):
        check_shared_storage(str(out))  # workers read each iteration's network, Ray Data writes the stores
        check_shared_storage(storage_path)
        check_shared_tracking(tracking_uri)  # rank 0 logs from whichever node it runs on
        coll = collect(images, config, labels, data, on_bad_image)
        check_model(config.train_config(config.train.weights), config.k, coll.bands)
        settings = {**config.fingerprint(), "n_images": len(coll.ids)}
        parent_id = io.claim_run(child(out, STATE_FILE), settings, f"{out} holds a DeepCluster run with other settings",
                                 "--out").get("mlflow_run_id")
        history = finished_iterations(out)
        uri = tracking.tracking_uri(tracking_uri)
        params = {**config.as_dict(), "nb_clusters": config.k, "images": coll.source, "data_dir": coll.source,
                  "out": str(out), "models_dir": child(out, "iterations"), "workers": workers,
                  "n_images": len(coll.ids), "n_ctrl": int(coll.is_ctrl.sum()), "labels": str(labels or data or "")}
        with tracking.parent_run(parent_id, "deepcluster", params, uri) as run:
            io.record_run(child(out, STATE_FILE), settings, mlflow_run_id=run.info.run_id)
            if history:
                progress(f"resuming after iteration {len(history)} of {config.iterations}")
            loop = {}
            if len(history) < config.iterations:
                before, launched = len(history), time.time()
                try:
                    run_loop(out, coll, config, workers, storage_path, use_gpu, max_failures, plugins)
                finally:  # what finished is logged, also when Ctrl+C stopped the rest
                    for m in finished_iterations(out)[len(history):]:
                        log_iteration(m, config, uri)
                        progress(summary(m))
                        history.append(m)
                # this launch's Ray Train run, and what it spent outside its iterations (starting workers)
                loop_s = time.time() - launched
                loop = {"iterations": len(history) - before, "seconds": round(loop_s, 2),
                        "startup_s": round(loop_s - sum(m["seconds"] for m in history[before:]), 2)}
            final, clustering = over_cluster(out, coll, config, history, use_gpu)
            metrics = {"iterations": history, "loop": loop, "final": final, "n_images": len(coll.ids),
                       "images": coll.source, "bands": coll.bands.to_dict() if coll.bands else None,
                       "config": config.as_dict(),
                       "n_skipped": coll.policy.n_skipped, "skipped": coll.policy.skipped,
                       "mlflow_run_id": run.info.run_id, "seconds": round(time.time() - started, 2)}
            with io.outputs(out) as folder:  # OUT itself, or a local folder uploaded into OUT
                write_outputs(folder, out, coll, history, clustering, metrics, progress)
                tracking.log_metrics({f"final_{k}": v for k, v in final.items() if isinstance(v, (int, float))})
                tracking.log_artifacts(folder / "metrics.json", folder / "assignments.parquet", *report_files(folder))
            progress(f"report: {child(out, 'report.html')}")
    return metrics


def _check(config: DeepClusterConfig) -> None:
    if config.k < 2 or config.final_k < 2:
        raise QdeepError(f"--k and --final-k must be at least 2, got {config.k} and {config.final_k}")
    if config.iterations < 0 or config.train.epochs < 1:
        raise QdeepError("--iterations must be >= 0 and --epochs-per-iteration >= 1")
    if not 0 < config.train.val_fraction < 1:
        raise QdeepError(f"--ctrl-fraction must be between 0 and 1, got {config.train.val_fraction}")
    if config.train.balance not in ("weights", "uniform"):
        raise QdeepError(f"--balance must be weights or uniform, got {config.train.balance!r}")


def collect(images, config: DeepClusterConfig, labels=None, data=None, on_bad_image: str = "error") -> Collection:
    """Every decodable image under `images` (or every image of the pack `images`: its training and
    test rows), the ctrl split, and ground truth when given (a pack's labels, when every image has some)."""
    policy = BadInputPolicy(on_bad_image)
    image_format, bands = config.train.image_format, None
    if is_pack(images):
        source, paths = str(io.resolved(images)), None
        pack = Pack(source)
        pack.check_format(image_format, f"--images {images}")
        meta = pack.read(("image", "split", "tags"))
        ids, tags = meta["image"].to_pylist(), meta["tags"].to_pylist()
        if image_format == "tif":  # statistics from its training images, as a folder's from all
            train = [i for i, split in zip(ids, meta["split"].to_pylist()) if split == "train"]
            bands = input_bands(image_format, train or ids, config.train.bands, pack)
        if len(set(ids)) != len(ids):
            raise QdeepError(f"pack {source}: its image names are not unique (a test image named like a training one)")
        truth = None if None in tags else [" ".join(sorted(t)) for t in tags]
    else:
        root = Path(images).resolve()
        source = str(root)
        found = scan_images(root, policy)
        bands = input_bands(image_format, found, config.train.bands)
        checked = check_images(ImageSet(names=[str(p) for p in found], paths=found), policy,
                               decode=bands.read if bands else load_rgb)
        paths = [str(p) for p in checked.paths]
        ids = [p.relative_to(root).as_posix() for p in checked.paths]
        truth = ground_truth(paths, root, labels, data, policy, image_format) if (labels or data) else None
    n = len(ids)
    if n < max(config.k, config.final_k) * 2:
        raise QdeepError(f"{source}: {n} images are too few for k={config.k} / final-k={config.final_k}")
    rng = np.random.default_rng(config.train.seed)
    is_ctrl = np.zeros(n, dtype=bool)
    is_ctrl[rng.choice(n, max(1, round(n * config.train.val_fraction)), replace=False)] = True
    return Collection(source, ids, paths, is_ctrl, truth, policy, bands)


def ground_truth(paths: list[str], root: Path, labels=None, data=None, policy=None, image_format: str = "jpg"
                 ) -> list[str]:
    """One class per image: its folder in a folder-per-class `--data DIR`, or its tag combination
    in a Planet CSV (`--labels CSV` over the images folder, or `--data DIR` in the Planet layout,
    whose `image_format` folder the images are in)."""
    if labels:
        known = read_labeled(Path(labels).resolve(), root, policy, recursive=True)
    elif (Path(data) / "train_v2.csv").is_file() or (Path(data) / "train.csv").is_file():
        known = load_planet(data, policy, image_format).train
    else:
        known = load_class_folders(data, policy).train
    by_path = {str(p): " ".join(sorted(tags)) for p, tags in zip(known.paths, known.tags)}
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise QdeepError(f"{labels or data}: no ground-truth label for {len(missing)} of {len(paths)} images "
                         f"(first: {missing[0]})")
    return [by_path[p] for p in paths]


def finished_iterations(out: str | Path) -> list[dict]:
    """Metrics of iterations 1, 2, ... that finished (in order, stopping at the first gap)."""
    return [json.loads(io.read_text(child(iteration_dir(out, t), "metrics.json")))
            for t in range(1, n_finished(out) + 1)]


def cluster_with(coll: Collection, config: DeepClusterConfig, weights: str, store_dir: str, k: int, seed: int,
                 use_gpu: bool | None = None, max_gpus: int = 1,
                 previous: np.ndarray | None = None) -> tuple[Clustering, str]:
    """Descriptors of every image with `weights` into a feature store (Ray Data; on up to `max_gpus`
    GPU actors when GPUs are used), clustered shard by shard into k groups, in the collection's order;
    and where k-means ran (`cluster_placed`). `previous`: k labels in the collection's order that
    k-means also starts from."""
    pack = coll.pack
    rows = pack_images(pack) if pack else folder_rows(Path(coll.source), coll.paths)
    store = embed_images(rows, len(coll.ids), coll.source, config.train.arch, weights, store_dir, batch_size=64,
                         image_size=config.train.image_size, use_gpu=use_gpu, max_gpu_actors=max_gpus,
                         bands=coll.bands, band_init=config.train.band_init)
    previous = None if previous is None else dict(zip(coll.ids, previous.tolist()))
    ids, clustering, where = cluster_placed(store, k, config.pca, seed, use_gpu, previous)
    return in_order(ids, clustering, coll.ids), where


def run_loop(out: str | Path, coll: Collection, config: DeepClusterConfig, workers, storage_path: str,
             use_gpu: bool | None = None, max_failures: int | None = None, plugins: list[str] | None = None) -> None:
    """Iterations n_finished(out) + 1 ... config.iterations, all in one Ray Train run
    (`train.deepcluster.deepcluster_func`); each writes OUT/iterations/iter_XX/ as it finishes."""
    name = f"{io.basename(out)}-deepcluster"
    _remove_run(storage_path, name)  # its reports belong to an earlier launch; the iterations are in OUT
    loop = {**config.train_config(config.train.weights).as_dict(), "out": str(out), "k": config.k,
            "iterations": config.iterations, "pca": config.pca, "use_gpu": use_gpu, "score_metric": "ctrl_acc",
            "plugins": list(plugins or []), "launch_id": uuid.uuid4().hex,
            "input_bands": coll.bands.to_dict() if coll.bands else None}
    images = collection_dataset(coll.ids, coll.is_ctrl, coll.truth, paths=coll.paths,
                                pack=coll.source if coll.paths is None else None)
    trainer = driver.make_trainer(loop, workers, name, storage_path, driver.default_max_failures(workers, max_failures),
                                  use_gpu, train_loop=deepcluster_func, datasets={"images": images})
    driver.fit_keeping_ctrl_c(trainer)
    if n_finished(out) < config.iterations:  # Ray Train ends a run early only on Ctrl+C
        raise KeyboardInterrupt(f"DeepCluster stopped after iteration {n_finished(out)}")


def log_iteration(m: dict, config: DeepClusterConfig, uri: str) -> None:
    """An iteration's MLflow record: a child run with its training, and its clustering in the parent."""
    import mlflow

    t = m["iteration"]
    per_epoch = [{"train_loss": e["train_loss"], "train_acc": e["train_acc"], "ctrl_loss": e["val_loss"],
                  "ctrl_acc": e["val_accuracy"]} for e in m["epochs"]]
    params = {**config.train_config(m["weights"]).as_dict(), "iteration": t}
    with tracking.mlflow_run(f"iteration-{t}", params, uri=uri):
        for i, values in enumerate(per_epoch):
            tracking.log_metrics(values, step=i)
    for e, values in zip(m["epochs"], per_epoch):
        tracking.log_metrics(values, step=int(e["epoch"]))
    tracking.log_metrics({k: m[k] for k in ("score", "imbalance", "n_empty", "nmi_prev", "nmi_true", "ari_true",
                                            "purity_true") if m.get(k) is not None}, step=t)
    mlflow.log_dict({"train": m["sizes"], "ctrl": m["sizes_ctrl"]}, f"sizes/iter_{t:02d}.json")


def _remove_run(storage_path: str, name: str) -> None:
    import pyarrow.fs

    fs, root = filesystem(storage_path)
    if fs.get_file_info(f"{root}/{name}").type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(f"{root}/{name}")


def over_cluster(out: str | Path, coll: Collection, config: DeepClusterConfig, history: list[dict],
                 use_gpu: bool | None = None) -> tuple[dict, Clustering]:
    """`final_k` groups from the last network's descriptors (kept in OUT/features); with
    final_k = k, k-means also starts from the last iteration's groups."""
    weights = network(out, config.train.weights, len(history) + 1)
    last = iteration_labels(out, len(history)) if history else None
    clustering, where = cluster_with(coll, config, weights, child(out, "features"), config.final_k,
                                     config.train.seed, use_gpu, previous=last if config.final_k == config.k else None)
    final = {"weights": weights, **cluster_stats(clustering, coll.is_ctrl),
             **truth_scores(clustering.labels, coll.truth), "kmeans_on": where}
    if last is not None:
        final["nmi_last_iteration"] = nmi(clustering.labels, last)
    return final, clustering


def write_outputs(folder: Path, out: str | Path, coll: Collection, history: list[dict], clustering: Clustering,
                  metrics: dict, progress=print) -> None:
    """assignments.parquet (each image's group, its distance to the group's centre, its pseudo-label
    of every iteration), the report (`workflows.profile`: grids/, profiles/, plots, report.html) and
    metrics.json, last, into `folder` (the iterations' labels read from `out`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"image": coll.ids, "cluster": clustering.labels.astype(np.int32),
               "distance": clustering.distances.astype(np.float32)}
    for h in history:
        columns[f"iter_{h['iteration']}"] = iteration_labels(out, h["iteration"]).astype(np.int32)
    with atomic_path(folder / "assignments.parquet") as tmp:
        pq.write_table(pa.table(columns), tmp)
    write_report(folder, metrics, folder / "assignments.parquet", progress=progress)
    write_json(folder / "metrics.json", metrics)


def summary(m: dict) -> str:
    text = (f"iteration {m['iteration']}: score {m['score']:.4f}  train_acc {m['train_acc']:.3f}  "
            f"ctrl_acc {m['ctrl_acc']:.3f}  imbalance {m['imbalance']:.2f}")
    if m.get("nmi_prev") is not None:
        text += f"  nmi(t-1,t) {m['nmi_prev']:.3f}"
    if "nmi_true" in m:
        text += f"  nmi(truth) {m['nmi_true']:.3f}"
    return text
