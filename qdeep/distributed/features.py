"""Descriptors of every image (penultimate, globally pooled CNN features) into a feature store.

A Ray Data pipeline: decode and resize in CPU tasks (multiband images: their bands normalised
there, as float32), then embed in an actor pool (`tasks.model_stage`:
GPU actors when the cluster has GPUs, else one actor per CPU, into which Ray Data fuses the
decoding), then Arrow shards written as the rows arrive (`write_store_from_dataset`, one shard per
batch), at a local path or a URI. `store_dataset` reads a store back as a Ray Data dataset.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from qdeep.clustering.shards import features_to_numpy, write_shard
from qdeep.clustering.store import (DEFAULT_ROWS_PER_SHARD, RESERVED, SUFFIX, FeatureStore, check_store_args,
                                    finish_store, shard_table, staging_dir)
from qdeep.config import DEFAULT_BAND_INIT
from qdeep.data.images import rgb_pixels
from qdeep.data.inputs import InputBands, RasterInput
from qdeep.data.pack import Pack
from qdeep.data.transforms import to_uint8
from qdeep.distributed.prepare import try_input_size
from qdeep.distributed.tasks import (check_visible_everywhere, model_stage, not_visible, raise_user_error,
                                     raising_udf_errors)
from qdeep.errors import QdeepError
from qdeep.models import build_model, embed, weights_sha256


def load_backbone(arch: str, weights: str, bands: InputBands | None = None, band_init: str = DEFAULT_BAND_INIT
                  ) -> torch.nn.Module:
    """The network whose penultimate layer describes images (its ImageNet head is not used), its
    first convolution adapted to `bands` (None: RGB) by `band_init`."""
    return build_model(arch, None, weights, "none", bands and bands.names, band_init).eval()


def decode(batch: dict, size: int, bands: InputBands | None = None) -> dict:
    """CPU stage: paths, or a pack's image bytes (`data`), -> resized uint8 pixels (N, 3, size, size),
    a quarter of float32's bytes through the object store; multiband images (`bands`) -> their
    normalised float32 input. A function, so that Ray Data runs it in tasks on the free CPUs beside
    GPU actors, or fuses it into each CPU actor. The actor normalises RGB pixels on its device."""
    sources = batch["path"] if "path" in batch else batch["data"]
    read = (lambda source, name: RasterInput(size, bands)(source, name=name).numpy()) if bands else \
        (lambda source, name: to_uint8(rgb_pixels(source, name), size))
    try:
        pixels = np.stack([read(source, name) for source, name in zip(sources, batch["image"])])
    except FileNotFoundError as exc:
        raise not_visible([exc.filename], len(sources)) from None
    return {"image": batch["image"], "pixels": pixels}


def folder_rows(root: Path, paths):
    """The images under `root` as a Ray Data dataset of (image: its path below root, path)."""
    import ray

    check_visible_everywhere(paths)
    return ray.data.from_items([{"image": Path(p).relative_to(root).as_posix(), "path": str(p)} for p in paths])


def pack_images(pack: Pack):
    """A pack's images as a Ray Data dataset of (image: its name, data: its bytes), each shard read in
    the stage that decodes it, from wherever the pack is (a bucket: any node). Not read_parquet: its
    read tasks ask for a CPU of their own, which the model stage's actors may all hold (a hang)."""
    import ray

    shards = [{"shard": path} for path in pack.files()]
    return ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
        _read_pack_shards, fn_kwargs={"pack": pack}, batch_size=1)


def _read_pack_shards(batch: dict, pack: Pack):
    return pa.concat_tables([pack.read_shard(path, ("image", "data")) for path in batch["shard"]])


class Embedder:
    """Actor stage: one backbone per actor, pixels -> descriptors (float32)."""

    def __init__(self, arch: str, weights: str, bands: InputBands | None = None, band_init: str = DEFAULT_BAND_INIT):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_backbone(arch, weights, bands, band_init).to(self.device)
        spec = self.model.qdeep_arch
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        x = torch.from_numpy(np.require(batch["pixels"], requirements="W")).to(self.device)
        if x.dtype == torch.uint8:  # RGB pixels; multiband input comes normalised
            x = (x.float() / 255 - self.mean) / self.std
        with torch.autocast(self.device, enabled=self.device == "cuda"):
            features = embed(self.model, x).float().cpu().numpy()
        return {"image": batch["image"], "features": features}


def embed_images(rows, n_images: int, root: Path | str, arch: str, weights: str, out: str | Path, batch_size: int = 64,
                 image_size: int | None = None, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, extra: dict | None = None,
                 use_gpu: bool | None = None, max_gpu_actors: int = 1, bands: InputBands | None = None,
                 band_init: str = DEFAULT_BAND_INIT):
    """Descriptors of `n_images` already-checked images under `root` (`rows`: `folder_rows` or
    `pack_images`) into the store at `out` (call inside a Ray session), on `tasks.model_stage`'s
    actors: GPU ones when the cluster has GPUs (use_gpu None) or when asked. Multiband images: the
    `bands` a network adapted by `band_init` takes."""
    model = load_backbone(arch, weights, bands, band_init)
    size = image_size or model.qdeep_arch.input_size
    dim = try_input_size(lambda x: embed(model, x), arch, size, len(bands.index) if bands else 3).shape[1]
    identity = {"arch": arch, "weights": weights, "weights_sha256": weights_sha256(model), "image_size": size,
                **({"bands": list(bands.names), "band_init": band_init} if bands else {})}
    ds = (rows.map_batches(decode, fn_kwargs={"size": size, "bands": bands}, batch_size=batch_size)
          .map_batches(Embedder, fn_constructor_kwargs={"arch": arch, "weights": weights, "bands": bands,
                                                        "band_init": band_init},
                       **model_stage(n_images, batch_size, use_gpu, max_gpu_actors)))
    return write_store_from_dataset(ds, out, dim, identity, rows_per_shard=rows_per_shard,
                                    extra={"image_root": str(root), **(extra or {})})


def _write_batch_shard(batch: dict, directory: str, dim: int) -> dict:
    """Ray Data UDF: one batch becomes one shard, checksummed where it was written."""
    missing = [c for c in RESERVED if c not in batch]
    if missing:
        raise QdeepError(f"the dataset needs 'image' and 'features' columns; it lacks {', '.join(missing)} "
                         f"(has {', '.join(sorted(batch))})")
    labels = {name: values for name, values in batch.items() if name not in RESERVED}
    table = shard_table(dim, list(batch["image"]), batch["features"], labels)
    listing = {**write_shard(f"{directory}/part-{uuid.uuid4().hex}{SUFFIX}", table),
               "first": table["image"][0].as_py() if table.num_rows else "",
               "columns": json.dumps({f.name: str(f.type) for f in table.schema if f.name not in RESERVED})}
    return {key: [value] for key, value in listing.items()}


def write_store_from_dataset(ds, path: str | Path, dim: int, model: dict, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                             extra: dict | None = None) -> FeatureStore:
    """Shards written in parallel by Ray Data workers, then listed in the manifest (`staging_dir`).

    `path` is a URI (s3://...) or a path on a filesystem every Ray node sees (locally the workers
    write into its temp sibling).
    Rows need `image` (str) and `features` (float32 array or list of dim); other columns are
    stored as labels (strings or integers). A QdeepError of any stage (a bad batch, images a node
    cannot see) stops the run as itself.
    """
    check_store_args(dim, model, extra, rows_per_shard)
    with staging_dir(path) as tmp:
        # No CPU reserved: when an upstream actor pool holds every CPU, a writer that asked for one
        # (even a fraction) waited for the whole pool to finish, and the rows piled up in the
        # object store instead of streaming to disk (measured: every shard written in the last
        # second of a 39 s run, against a pair every ~4 s without the reservation).
        written = raising_udf_errors(ds.map_batches(_write_batch_shard, fn_kwargs={"directory": str(tmp), "dim": dim},
                                                    batch_size=rows_per_shard, batch_format="numpy", num_cpus=0))
        try:
            results = [row for row in written.iter_rows() if row["rows"] > 0]
        except Exception as exc:  # a stage's QdeepError comes out as itself, in one line
            raise_user_error(exc)
        results.sort(key=lambda r: (r["first"], r["file"]))
        kinds = {r["columns"] for r in results}
        if len(kinds) > 1:
            raise QdeepError(f"label columns differ between batches: {' vs '.join(sorted(kinds))}")
        finish_store(tmp, results, model, dim, extra, json.loads(kinds.pop()) if kinds else {})
    return FeatureStore(path)


def store_dataset(store: FeatureStore):
    """The store as a Ray Data dataset (row order not guaranteed), each shard read and checked in a
    task, features as a tensor column: numpy batches carry them as one (n, dim) float32 array."""
    import ray

    if not store.shards:
        raise QdeepError(f"feature store {store.path} is empty")
    ds = ray.data.from_items([{"shard": i} for i in range(len(store.shards))], override_num_blocks=len(store.shards))
    return ds.map_batches(_read_shards, fn_kwargs={"path": store.path}, batch_size=1, batch_format="numpy")


def _read_shards(batch: dict, path: str):
    """Ray Data UDF: the shards numbered in `batch`, read and checked, features as a tensor column."""
    from ray.data.extensions import ArrowTensorArray

    store, tables = FeatureStore(path), []
    for i in batch["shard"]:
        table = store.read_shard(int(i))
        tensor = ArrowTensorArray.from_numpy(features_to_numpy(table.column("features").combine_chunks(), store.dim))
        tables.append(table.set_column(table.schema.get_field_index("features"), "features", tensor))
    return pa.concat_tables(tables)
