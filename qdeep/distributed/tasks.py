"""Per-image work fanned out over the Ray cluster in chunks, with a progress bar.

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
from qdeep.data.images import ImageDecodeError, load_rgb
from qdeep.errors import QdeepError

VISIBILITY_SAMPLE = 64  # paths each node checks before a run reads images there


class ImagesNotVisible(QdeepError):
    """Images the driver's node listed are missing on another node: the data is not shared."""


def node_name() -> str:
    """This process's Ray node, as its IP and short id (the driver's, outside a task)."""
    import ray

    return f"{ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:8]})"


def not_visible(missing: Sequence[str], checked: int, node: str) -> ImagesNotVisible:
    return ImagesNotVisible(
        f"images not visible from node {node}: {len(missing)} of {checked} checked paths do not exist there, "
        f"e.g. {missing[0]} (the driver's node lists them); put the images on storage every node mounts at the "
        "same path (NFS), or run where every node sees them")


def spread(paths: Sequence[str], n: int = VISIBILITY_SAMPLE) -> list[str]:
    """Up to n paths evenly spread over the list, first and last included."""
    if len(paths) <= n:
        return list(paths)
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, n).round()]


def require_visible(paths: Sequence[str]) -> None:
    """Raise `ImagesNotVisible` naming this node if any of an evenly spread sample of `paths` is
    missing here. Run where the images will be read: a Ray Train worker, a task pinned to a node."""
    sample = spread([str(p) for p in paths])
    missing = [p for p in sample if not Path(p).exists()]
    if missing:
        raise not_visible(missing, len(sample), node_name())


def check_visible_everywhere(paths: Sequence[str], timeout: float = 60.0) -> None:
    """On a cluster of more than one alive node, `require_visible` on each of them (a task pinned to
    every node), before any image is decoded. Nodes that join later check on their own: Ray Train
    workers call `require_visible` as they start."""
    import ray

    from qdeep.distributed.storage import alive_nodes, on_each_node

    nodes = alive_nodes()
    if len(nodes) < 2 or not paths:
        return
    done = on_each_node(require_visible, [n["NodeID"] for n in nodes], spread([str(p) for p in paths]),
                        timeout=timeout)
    for ref in filter(None, done.values()):
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise_user_error(exc)
    pending = [node for node, ref in done.items() if ref is None]
    if pending:
        raise QdeepError(f"{len(pending)} of {len(nodes)} nodes did not answer within {timeout:g} s whether they "
                         "see the images; is the cluster healthy?")


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
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__,
                 *getattr(e, "worker_failures", {}).values()]
    return None


def raise_user_error(exc: BaseException):
    """Raise the `QdeepError` inside `exc` on its own (the CLI prints it as one line), else `exc`."""
    err = user_error(exc)
    if err is None:
        raise exc
    raise err from None


def _featurize_chunk(fn: Callable, paths: Sequence[str]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    feats, errors = [], []
    for i, path in enumerate(paths):
        try:
            feats.append(fn(load_rgb(path)))
        except FileNotFoundError:
            raise not_visible([path], 1, node_name()) from None
        except ImageDecodeError as exc:
            errors.append((i, exc.reason))
            feats.append(None)
    dim = next((len(f) for f in feats if f is not None), 0)
    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    for i, f in enumerate(feats):
        if f is not None:
            out[i] = f
    return out, errors


def map_images(
    fn: Callable, paths: Sequence[str | Path], desc: str = "images", chunk_size: int = 128
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """fn(RGB PIL image) -> 1-D array, for every path, on Ray tasks.

    Returns the (n, d) float32 features (NaN rows for failures) and (index, reason) failures.
    """
    import ray

    paths = [str(p) for p in paths]
    if not paths:
        return np.zeros((0, 0), dtype=np.float32), []
    remote = ray.remote(num_cpus=1)(_featurize_chunk)
    fn_ref = ray.put(fn)
    pending = {remote.remote(fn_ref, paths[s : s + chunk_size]): s for s in range(0, len(paths), chunk_size)}
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
    dim = max(c.shape[1] for c in chunks.values())
    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    for start, feats in chunks.items():
        if feats.shape[1]:
            out[start : start + len(feats)] = feats
    return out, sorted(errors)


def image_features(fn: Callable, images: ImageSet, policy: BadInputPolicy, desc: str) -> tuple[np.ndarray, ImageSet]:
    """Features of every decodable image; undecodable ones go to the policy and are left out. Images
    some node cannot see stop the run (`ImagesNotVisible`), whatever the policy."""
    check_visible_everywhere(images.paths)
    x, errors = map_images(fn, images.paths, desc=desc)
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


def check_images(images: ImageSet, policy: BadInputPolicy, desc: str = "checking images") -> ImageSet:
    """Decode every image once on Ray so bad files meet the policy before training starts."""
    return image_features(_decode_only, images, policy, desc)[1]
