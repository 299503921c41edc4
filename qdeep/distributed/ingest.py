"""A training run's input through Ray Data: its images as a `train` and a `val` dataset of rows
(row, ref, y), handed to `TorchTrainer(datasets=...)`; each worker streams its share with
`ray.train.get_dataset_shard` and decodes it itself (`data.loader.Decoder`). No image list travels
in the run's config, and a node that joins reads what it trains on from wherever the data is.

- A folder of images: `ref` is the image's path (every node must see it, as before), the rows
  held in the object store in blocks, shuffled block by block each epoch.
- A pack (`qdeep pack`, a local path or a bucket): `ref` is the image's bytes, each shard read by
  the task that joins it to its targets by image name, so any node trains from the bucket.
- DeepCluster's images (a folder or a pack): a `collection_dataset` of (row, id, ctrl, truth, ref)
  that every worker reads whole once, as the index its DataLoader processes decode from (a pack's
  bytes held in the worker's memory); the pseudo-labels are made in the workers each iteration and
  looked up there by row, never shipped.

Per epoch: blocks (of a folder's rows, permuted once; a pack's shards, their rows permuted anew, the
training rows shuffled once when packed) in a new order, then a local shuffle buffer in the worker; with
`--balance uniform`, each row drawn a Poisson number of times so that every class comes about
equally often (the DeepCluster reference's uniform sampler, done as the rows stream). The training
rows are split into equal shares (DDP steps in lockstep); the validation rows into shares of every
row once, gathered on rank 0 (`worker.validate`).

Decoding happens in the worker, not in Ray Data: measured here, it costs fewer CPU-seconds per image
than a Ray Data stage (no pixels through the object store), and on GPU nodes the worker's
`loader_workers` CPUs are the ones reserved for it. Ray Data's own tasks (reading a pack's shards,
resampling) ask for DATA_CPUS each; CPU-only workers leave DATA_RESERVE of the cluster's CPUs to them
(`driver.cpus_per_worker`): a worker group holding every CPU would starve them and hang the run.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qdeep.data.pack import Pack
from qdeep.errors import QdeepError

DATA_CPUS = 0.25  # each Ray Data task of a training input
DATA_RESERVE = 2 * DATA_CPUS  # the CPUs a CPU-only worker group leaves to them
SHUFFLE_BUFFER_BATCHES, MIN_SHUFFLE_BUFFER = 8, 512  # a worker's local shuffle buffer, in rows (refs, not pixels)


def rows_per_block(n: int) -> int:
    """A folder's rows per block, the unit that each epoch's reshuffle moves: small enough that a
    few hundred blocks shuffle (about a global shuffle once the worker's buffer mixes them), not so
    small that a million rows make a million blocks."""
    return int(min(1024, max(16, n // 256)))


def training_datasets(data, config: dict) -> dict:
    """{"train": ..., "val": ...} Ray Datasets of `data` (a `prepare.TrainingData`) for a run with
    `config` (its `train_on_all`, `balance` and `seed`)."""
    import ray.data

    val = data.is_val
    train = np.ones_like(val) if config.get("train_on_all") else ~val
    out = {}
    for name, mask in (("train", train), ("val", val)):
        rows = np.flatnonzero(mask)
        table = pa.table({"row": np.arange(len(rows)), "image": pa.array([data.paths[i] for i in rows], pa.string()),
                          "y": _column(data.y[rows])})
        if data.pack:
            ds = pack_join(Pack(data.pack), table)
        else:  # in a random order once (a folder lists its classes one after another), then in blocks
            table = table.rename_columns(["row", "ref", "y"])
            table = table.take(np.random.default_rng(config.get("seed", 0)).permutation(len(rows)))
            block = rows_per_block(len(rows))
            ds = ray.data.from_arrow([table.slice(i, block) for i in range(0, max(len(rows), 1), block)])
        if name == "train":
            if config.get("balance") == "uniform":
                ds = ds.map_batches(_resample, fn_kwargs={"rates": uniform_rates(data.y[rows])}, batch_format="numpy",
                                    num_cpus=DATA_CPUS)
            ds = ds.randomize_block_order()
        out[name] = ds
    return out


def collection_dataset(ids, is_ctrl: np.ndarray, truth, paths=None, pack: str | None = None):
    """DeepCluster's images as a Ray Dataset of (row, id, ctrl, ground truth or null, ref), which
    every worker reads whole once (`collection_from`): the index its DataLoader decodes from. `ref`
    is the image's path (`paths`), or for a pack its bytes, joined to the rows by image name in the
    tasks that read the shards (from wherever the pack is)."""
    import ray.data

    n = len(ids)
    table = pa.table({"row": np.arange(n), "id": pa.array(ids, pa.string()), "ctrl": pa.array(is_ctrl, pa.bool_()),
                      "truth": pa.array(truth if truth is not None else [None] * n, pa.string())})
    if pack:
        return pack_join(Pack(pack), table.append_column("image", table["id"]))
    table = table.append_column("ref", pa.array([str(p) for p in paths], pa.string()))
    return ray.data.from_arrow([table.slice(i, 4096) for i in range(0, max(n, 1), 4096)])


def collection_from(name: str) -> dict:
    """This worker's copy of a `collection_dataset`, every row in row order: "id", "ctrl" and
    "truth" (None when no ground truth was given) as lists and arrays, and "ref": the paths as a
    list, or a pack's image bytes as one Arrow array (one buffer: DataLoader processes forked from
    this one read it without copying it)."""
    import ray.train

    parts = list(ray.train.get_dataset_shard(name).iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(parts).sort_by("row")
    ref = table["ref"]
    out = {"ref": ref.combine_chunks() if pa.types.is_binary(ref.type) else ref.to_pylist(),
           "id": table["id"].to_pylist(), "ctrl": table["ctrl"].to_numpy(zero_copy_only=False).astype(bool),
           "truth": table["truth"].to_pylist()}
    if table["truth"].null_count == table.num_rows:
        out["truth"] = None
    return out


def _column(y: np.ndarray):
    from ray.data.extensions import ArrowTensorArray

    return pa.array(y) if y.ndim == 1 else ArrowTensorArray.from_numpy(np.ascontiguousarray(y))


def pack_join(pack: Pack, wanted: pa.Table):
    """The pack's images named in `wanted`'s `image` column, each with `wanted`'s other columns and
    its bytes as `ref`: a Ray Dataset of one block per shard, read by the task that joins it (from
    wherever the pack is: a bucket, for any node)."""
    import ray.data

    shards = [{"shard": path} for path in pack.files()]
    return ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
        _read_and_join, fn_kwargs={"pack": pack, "wanted": wanted}, batch_size=1, batch_format="numpy",
        num_cpus=DATA_CPUS)


def _read_and_join(batch: dict, pack: Pack, wanted: pa.Table) -> pa.Table:
    tables = []
    for path in batch["shard"]:
        shard = pack.read_shard(path, ("image", "data"))
        at = pc.index_in(shard["image"], value_set=wanted["image"])  # the shard's rows in `wanted`, or null
        keep = pc.is_valid(at)
        picked = wanted.take(pc.filter(at, keep)).drop_columns(["image"])
        tables.append(picked.append_column("ref", pc.filter(shard["data"], keep)))
    joined = pa.concat_tables(tables)
    return joined.take(np.random.default_rng().permutation(joined.num_rows))  # a new order at every epoch


def pack_features(fn, pack: Pack, names: list[str], decode=None) -> np.ndarray:
    """fn(decode(image bytes)) -> 1-D array for each image of the pack named in `names`, in that
    order, in Ray Data tasks that read the shards (decoding was checked when the pack was made);
    `decode`: to an RGB PIL image (default) or a raster (`rasters.read_raster`)."""
    if not names:
        return np.zeros((0, 0), dtype=np.float32)
    wanted = pa.table({"row": np.arange(len(names)), "image": pa.array(names, pa.string())})
    ds = pack_join(pack, wanted).map_batches(_featurize, fn_kwargs={"fn": fn, "decode": decode}, batch_format="numpy")
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    rows = np.concatenate([b["row"] for b in batches]) if batches else np.zeros(0, np.int64)
    if len(np.unique(rows)) != len(names):
        raise QdeepError(f"pack {pack.uri}: {len(names)} images asked for, {len(np.unique(rows))} found in its shards")
    x = np.empty((len(names), batches[0]["x"].shape[1]), dtype=np.float32)
    x[rows] = np.concatenate([b["x"] for b in batches])
    return x


def _featurize(batch: dict, fn, decode=None) -> dict:
    from qdeep.data.images import load_rgb

    decode = decode or load_rgb
    x = np.stack([np.asarray(fn(decode(ref)), dtype=np.float32) for ref in batch["ref"]])
    return {"row": batch["row"], "x": x}


def uniform_rates(y: np.ndarray) -> np.ndarray:
    """Per class, how often a row of it is drawn per epoch on average, so that each class present
    comes n / classes times (the reference's UnifLabelSampler: small classes repeat, large ones thin)."""
    counts = np.bincount(y, minlength=int(y.max()) + 1 if len(y) else 0)
    present = int((counts > 0).sum())
    return np.where(counts > 0, len(y) / max(present, 1) / np.maximum(counts, 1), 0.0)


def _resample(batch: dict, rates: np.ndarray) -> dict:
    """Each row a Poisson(rate of its class) number of times: fresh draws at every epoch's run."""
    times = np.random.default_rng().poisson(rates[batch["y"]])
    return {k: np.repeat(v, times, axis=0) for k, v in batch.items()}


def data_config():
    """Ray Train's DataConfig: `train` split into equal shares, `val` into shares of every row once
    (equal shares drop rows: each worker scores its share and rank 0 gathers them), any other
    dataset (DeepCluster's collection) whole to every worker."""
    from ray.train import DataConfig

    class SplitValidation(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != "val"}
            output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs) if rest \
                else [{} for _ in range(world_size)]
            if "val" in datasets:
                val = datasets["val"].copy(datasets["val"])
                val.context.execution_options = self._resolve_execution_options("val")
                for i, split in enumerate(val.streaming_split(world_size, equal=False,
                                                              locality_hints=worker_node_ids)):
                    output[i]["val"] = split
            return output

    return SplitValidation(datasets_to_split=["train"])


def shard_batches(name: str, batch_size: int, shuffle: bool):
    """This worker's share of dataset `name` for one epoch, in batches of numpy arrays."""
    import ray.train

    buffer = max(SHUFFLE_BUFFER_BATCHES * batch_size, MIN_SHUFFLE_BUFFER) if shuffle else None
    batches = ray.train.get_dataset_shard(name).iter_batches(batch_size=batch_size, batch_format="numpy",
                                                             local_shuffle_buffer_size=buffer)
    return without_a_lone_row(batches, batch_size) if shuffle else batches


def without_a_lone_row(batches, batch_size: int):
    """Training batches less a last batch of one row, which BatchNorm cannot normalise in training
    (`--balance uniform` makes an epoch's share a random length, so it happens); the training shares
    are equal, so every rank drops it together and DDP stays in step."""
    return (b for b in batches if batch_size == 1 or len(b["row"]) != 1)
