"""Per-image work fanned out over the Ray cluster in chunks, with a progress bar.

Decode failures come back as data, not exceptions, so the caller's bad-input policy decides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from qdeep.data.images import ImageDecodeError, load_rgb


def _featurize_chunk(fn: Callable, paths: Sequence[str]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    feats, errors = [], []
    for i, path in enumerate(paths):
        try:
            feats.append(fn(load_rgb(path)))
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
            feats, errs = ray.get(done[0])
            chunks[start] = feats
            errors.extend((start + i, reason) for i, reason in errs)
            bar.update(len(feats))
    dim = max(c.shape[1] for c in chunks.values())
    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    for start, feats in chunks.items():
        if feats.shape[1]:
            out[start : start + len(feats)] = feats
    return out, sorted(errors)
