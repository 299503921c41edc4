"""Per-image work over the Ray cluster: Ray tasks in chunks with a progress bar (`map_images`), the
actor pools of Ray Data's model stages (`model_stage`), and image visibility.

Decode failures come back as data, not exceptions, so the caller's bad-input policy decides. A file
the driver listed but a node cannot find is not bad input: the images are not on storage that node
shares, and that stops the run whatever the policy (`ImagesNotVisible`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from qdeep.data import BadInputPolicy, ImageSet
from qdeep.data.folders import spread
from qdeep.data.images import ImageDecodeError, load_rgb
from qdeep.distributed.storage import PROBE_TIMEOUT_S, alive_nodes, on_each_node
from qdeep.errors import QdeepError

VISIBILITY_SAMPLE = 64  # paths each node checks before a run reads images there


class ImagesNotVisible(QdeepError):
    """Images the driver's node listed are missing on another node: the data is not shared."""


def node_name() -> str:
    """This process's Ray node, as its IP and short id (the driver's, outside a task)."""
    import ray

    return f"{ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:8]})"


def not_visible(missing: Sequence[str], checked: int) -> ImagesNotVisible:
    """The error for `missing` paths (of `checked`) on this process's node."""
    return ImagesNotVisible(
        f"images not visible from node {node_name()}: {len(missing)} of {checked} checked paths do not exist there, "
        f"e.g. {missing[0]} (the driver's node lists them); put the images on storage every node mounts at the "
        "same path (NFS), or run where every node sees them")


def require_visible(paths: Sequence[str]) -> None:
    """Raise `ImagesNotVisible` naming this node if any of an evenly spread sample of `paths` is
    missing here. Run where the images will be read: a Ray Train worker, a task pinned to a node."""
    sample = spread([str(p) for p in paths], VISIBILITY_SAMPLE)
    missing = [p for p in sample if not Path(p).exists()]
    if missing:
        raise not_visible(missing, len(sample))


def check_visible_everywhere(paths: Sequence[str]) -> None:
    """On a cluster of more than one alive node, `require_visible` on each of them (a task pinned to
    every node), before any image is decoded. Nodes that join later check on their own: Ray Train
    workers call `require_visible` as they start, Ray Data stages as they read."""
    import ray

    nodes = alive_nodes()
    if len(nodes) < 2 or not paths:
        return
    done = on_each_node(require_visible, [n["NodeID"] for n in nodes], spread([str(p) for p in paths], VISIBILITY_SAMPLE))
    for ref in filter(None, done.values()):
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise_user_error(exc)
    pending = [node for node, ref in done.items() if ref is None]
    if pending:
        raise QdeepError(f"{len(pending)} of {len(nodes)} nodes did not answer within {PROBE_TIMEOUT_S:g} s whether "
                         "they see the images; is the cluster healthy?")


def user_error(exc: BaseException) -> QdeepError | None:
    """The first `QdeepError` inside what Ray raised for a task, actor or Train worker (a
    `RayTaskError`'s cause, a `WorkerGroupError`'s worker failures, chained exceptions), or None."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError is also an instance of its cause's class: unwrap it
        if isinstance(cause, BaseException):
            todo.insert(0, cause)
            continue
        if isinstance(e, QdeepError):
            return e
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return None


def raise_user_error(exc: BaseException):
    """Raise the `QdeepError` inside `exc` on its own, in one line (the CLI prints it as is), else `exc`."""
    err = user_error(exc)
    if err is None:
        raise exc
    err.args = (str(err).split("\n", 1)[0],)  # Ray Data appends its retry report to a UDF's error
    raise err from None


def model_stage(n_images: int, batch_size: int, use_gpu: bool | None = None, max_gpu_actors: int = 1) -> dict:
    """`map_batches` arguments for a Ray Data stage that holds a model in each of its actors.

    GPU actors when the cluster has GPUs (use_gpu None), or when asked (an autoscaler adds them): as
    many as the GPUs up now (at least one), growing as GPUs join to `max_gpu_actors`. Else one actor
    per CPU, no more than there are batches: a CPU actor runs torch on one thread (Ray sets
    OMP_NUM_THREADS to its 1 CPU), and one per CPU embeds at 0.71-0.86x a plain all-cores loop on
    2 cores, against 0.54x for a single actor (scripts/bench_features.py).
    """
    import ray

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    use_gpu = bool(gpus) if use_gpu is None else use_gpu
    if use_gpu:
        now = max(1, int(gpus))
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(now, max_gpu_actors), initial_size=now)
    else:
        batches = -(-n_images // batch_size)
        pool = ray.data.ActorPoolStrategy(size=max(1, min(int(resources.get("CPU", 1)), batches)))
    return {"batch_size": batch_size, "compute": pool, "num_gpus": int(use_gpu)}  # not the deprecated concurrency=


def raising_udf_errors(ds):
    """`ds`, its UDFs' exceptions raised as themselves: by default Ray Data wraps them in a
    UserCodeException that reaches the driver without its cause, so `raise_user_error` would not find
    the `ImagesNotVisible` of a node that joined after `check_visible_everywhere`."""
    ds.context.raise_original_map_exception = True
    return ds


def _filled(n: int, blocks: dict[int, np.ndarray]) -> np.ndarray:
    """(n, dim) float32: each (rows, dim) block from its start row on, NaN rows elsewhere."""
    dim = max((b.shape[1] for b in blocks.values()), default=0)
    out = np.full((n, dim), np.nan, dtype=np.float32)
    for start, block in blocks.items():
        if block.shape[1]:  # a chunk of failures only has no columns
            out[start : start + len(block)] = block
    return out


def _featurize_chunk(fn: Callable, paths: Sequence[str], decode: Callable = load_rgb
                     ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    feats, errors = {}, []
    for i, path in enumerate(paths):
        try:
            feats[i] = np.asarray(fn(decode(path)), dtype=np.float32)[None]
        except FileNotFoundError:
            raise not_visible([path], 1) from None
        except ImageDecodeError as exc:
            errors.append((i, exc.reason))
    return _filled(len(paths), feats), errors


def map_images(
    fn: Callable, paths: Sequence[str | Path], desc: str = "images", chunk_size: int = 128, decode: Callable = load_rgb
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """fn(decode(path)) -> 1-D array, for every path, on Ray tasks (`decode`: to an RGB PIL image
    by default; `rasters.read_raster` for multiband images).

    Returns the (n, d) float32 features (NaN rows for failures) and (index, reason) failures.
    """
    import ray

    paths = [str(p) for p in paths]
    if not paths:
        return np.zeros((0, 0), dtype=np.float32), []
    remote = ray.remote(num_cpus=1)(_featurize_chunk)
    fn_ref = ray.put(fn)
    pending = {remote.remote(fn_ref, paths[s : s + chunk_size], decode): s for s in range(0, len(paths), chunk_size)}
    chunks, errors = {}, []
    with tqdm(total=len(paths), desc=desc, unit="img") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            start = pending.pop(done[0])
            try:
                feats, errs = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                raise_user_error(exc)
            chunks[start] = feats
            errors.extend((start + i, reason) for i, reason in errs)
            bar.update(len(feats))
    return _filled(len(paths), chunks), sorted(errors)


def image_features(fn: Callable, images: ImageSet, policy: BadInputPolicy, desc: str,
                   pack: str | None = None, decode: Callable = load_rgb) -> tuple[np.ndarray, ImageSet]:
    """Features fn(decode(path)) of every decodable image; undecodable ones go to the policy and are
    left out. Images some node cannot see stop the run (`ImagesNotVisible`), whatever the policy.
    With `pack`, the images are its images of those names (all decodable: checked when it was packed)."""
    if pack:
        from qdeep.data.pack import Pack
        from qdeep.distributed.ingest import pack_features

        return pack_features(fn, Pack(pack), images.names, decode), images
    check_visible_everywhere(images.paths)
    x, errors = map_images(fn, images.paths, desc=desc, decode=decode)
    keep = np.ones(len(images), dtype=bool)
    for i, reason in errors:
        origin = images.origins[i] if images.origins else None
        if origin and origin != str(images.paths[i]):  # the CSV line that names the image
            reason = f"{reason}, named on {origin}"
        policy.report(str(images.paths[i]), reason)
        keep[i] = False
    if keep.all():
        return x, images
    return x[keep], images.subset(keep.tolist())


def _decode_only(image) -> np.ndarray:
    return np.zeros(0, dtype=np.float32)


def check_images(images: ImageSet, policy: BadInputPolicy, desc: str = "checking images",
                 decode: Callable = load_rgb) -> ImageSet:
    """Decode every image once on Ray (with `decode`: RGB, or a multiband `InputBands.read`) so bad
    files meet the policy before training starts."""
    return image_features(_decode_only, images, policy, desc, decode=decode)[1]
