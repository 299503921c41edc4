"""The feature store: one descriptor per image, kept between DeepCluster's stages, at a local path
or a URI (s3://..., any pyarrow filesystem). A store is a directory of uncompressed Arrow IPC files
(`part-*.arrow`: image, a path relative to the image root; features, fixed_size_list<float32>[dim];
optional label columns) and `manifest.json` (format_version, model {arch, weights, weights_sha256},
dim, dtype, columns, shards [{file, rows, bytes, xxh3_64}] in row order, total_rows, created,
extra), written last. Locally writers fill a hidden sibling renamed into place once the manifest
is in it; on an object store (no rename) the old manifest goes first and the new one last. Either
way a crash never leaves a store that looks complete, and readers check each shard's rows and
checksum before using it, so a truncated or rewritten shard is named, never read. Arrow IPC and
xxh3 were chosen by measurement (scripts/bench_store.py: Parquet's list encoding held the store at
0.1-0.2x np.save/np.load, sha256 runs at 1.8 GB/s). Ray Data's side is in qdeep.distributed.features.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
from pyarrow.fs import FileSelector, FileType

from qdeep.clustering.shards import Shard, ShardFile, features_to_numpy, features_type, read_batches, write_shard
from qdeep.config import FeaturesConfig
from qdeep.errors import QdeepError
from qdeep.io import atomic_dir, child, filesystem, is_uri, read_json, write_json

FORMAT_VERSION = 2  # 1: Parquet shards with sha256
MANIFEST = "manifest.json"
SUFFIX = ".arrow"
DTYPE = "float32"
MODEL_KEYS = ("arch", "weights", "weights_sha256")
DEFAULT_ROWS_PER_SHARD = FeaturesConfig.rows_per_shard  # 50,000 descriptors
RESERVED = ("image", "features")  # every shard's first columns; the rest are labels


def _check_count(what: str, value: Any, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise QdeepError(f"{what} must be a {'positive' if least else 'non-negative'} integer, got {value!r}")


def check_store_args(dim: Any, model: Any, extra: Any = None, rows_per_shard: Any = 1) -> None:
    """A writer's arguments, checked before hours of inference rather than at the manifest."""
    _check_count("feature store dim", dim)
    _check_count("rows_per_shard", rows_per_shard)
    missing = [k for k in MODEL_KEYS if k not in model] if isinstance(model, dict) else MODEL_KEYS
    if missing:
        raise QdeepError(f"feature store model identity lacks {', '.join(missing)} "
                         f"(a dict with {', '.join(MODEL_KEYS)})")
    for what, obj in (("model", model), ("extra", extra)):
        try:
            json.dumps(obj)
        except (TypeError, ValueError) as exc:
            raise QdeepError(f"feature store {what} must be JSON-serializable: {exc}") from exc


@contextmanager
def staging_dir(path: str | os.PathLike) -> Iterator[str]:
    """Where a store's files go to appear at `path` only when complete. Locally, a temporary
    sibling that replaces `path` when the block succeeds. On an object store, `path` itself: an old
    store's manifest is deleted before anything else, then its shards, so that a crash never leaves
    a manifest over missing or mixed shards. Replacing a store (even one a crash left without its
    manifest) or an empty directory is fine; wiping a directory of someone's images is not."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    names = {i.base_name for i in fs.get_file_info(FileSelector(inner))} if info.type == FileType.Directory else set()
    if info.type == FileType.File or not (MANIFEST in names or all(n.endswith(SUFFIX) for n in names)):
        raise QdeepError(f"{path} exists and is not a feature store; refusing to replace it")
    if not is_uri(path):
        with atomic_dir(inner) as tmp:
            yield str(tmp)
        return
    if MANIFEST in names:
        fs.delete_file(child(inner, MANIFEST))
    fs.delete_dir_contents(inner, missing_dir_ok=True)
    try:
        yield str(path)
    except BaseException:
        fs.delete_dir_contents(inner, missing_dir_ok=True)
        raise


def _checked(dim: int, images: Sequence[str], features: Any, labels: dict[str, Any],
             types: dict[str, pa.DataType] | None = None) -> tuple[pa.Array, np.ndarray, dict[str, pa.Array]]:
    """Rows as Arrow image strings, (n, dim) finite float32 (the caller's own array when it is
    C-contiguous float32) and Arrow label columns of strings or integers (of `types` if given)."""
    try:
        img = pa.array(images, type=pa.string())
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise QdeepError(f"feature store images must be strings (paths relative to the image root): {exc}") from exc
    if img.null_count:
        raise QdeepError("feature store images must not be missing (None)")
    n, feats = len(img), np.asarray(features)
    if feats.dtype == object:  # rows of lists/arrays, e.g. a Ray Data list column
        feats = np.stack([np.asarray(row, dtype=np.float32) for row in feats]) if len(feats) else feats.reshape(0, dim)
    if feats.shape != (n, dim):
        raise QdeepError(f"features must have shape ({n}, {dim}) for {n} images, got {feats.shape}")
    if not (np.issubdtype(feats.dtype, np.floating) or np.issubdtype(feats.dtype, np.integer)):
        raise QdeepError(f"features must be float32, got {feats.dtype}")
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if not np.isfinite(feats.sum()):  # one fast pass; only then the exact one (a finite sum may overflow)
        finite = np.isfinite(feats).all(axis=1)
        if not finite.all():  # a NaN descriptor would silently poison k-means
            raise QdeepError(f"features of {img[int(np.flatnonzero(~finite)[0])].as_py()} contain NaN or inf")
    columns = {}
    for name, values in labels.items():
        type_ = (types or {}).get(name)
        if name in RESERVED:
            raise QdeepError(f"feature store column name {name!r} is reserved")
        try:  # an ndarray is copied: pa.array would alias it, and StoreWriter may keep labels
            col = pa.array(values.copy() if isinstance(values, np.ndarray) else values, type=type_)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            want = f" ({type_})" if type_ is not None else ""
            raise QdeepError(f"feature store column {name!r}: cannot store these values{want}: {exc}") from exc
        col = col.cast(pa.string()) if pa.types.is_large_string(col.type) else col
        if not (pa.types.is_string(col.type) or pa.types.is_integer(col.type)):
            raise QdeepError(f"feature store column {name!r} must hold strings or integers, got {col.type}")
        if len(col) != n:
            raise QdeepError(f"feature store column {name!r} has {len(col)} values for {n} images")
        columns[name] = col
    return img, feats, columns


def _table(dim: int, images: pa.Array, features: np.ndarray, labels: dict[str, pa.Array]) -> pa.Table:
    ftype = features_type(dim)
    schema = pa.schema([pa.field("image", pa.string(), nullable=False), pa.field("features", ftype, nullable=False),
                        *(pa.field(name, arr.type) for name, arr in labels.items())])
    feats = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), type=ftype)  # no copy
    return pa.Table.from_arrays([images, feats, *labels.values()], schema=schema)


def shard_table(dim: int, images: Sequence[str], features: Any, labels: dict[str, Sequence] | None = None) -> pa.Table:
    """One shard's rows, checked: image strings, (n, dim) finite features, labels strings or integers."""
    return _table(dim, *_checked(dim, images, features, labels or {}))


def finish_store(directory: str | os.PathLike, shards: list[dict], model: dict, dim: int, extra: dict | None = None,
                 columns: dict[str, pa.DataType | str] | None = None) -> None:
    """The manifest, written last, of the shard files that writers left in `directory` (listed in
    `shards`, in row order); files not listed (a retried writer's) are removed."""
    check_store_args(dim, model, extra)
    fs, inner = filesystem(directory)
    listed = {r["file"] for r in shards}
    present = set()
    for info in fs.get_file_info(FileSelector(inner, allow_not_found=True)):
        present.add(info.base_name)
        if info.base_name not in listed:
            fs.delete_file(info.path)
    for r in shards:
        if r["file"] not in present:
            raise QdeepError(f"shard {r['file']} written by a Ray worker is not visible at {directory}: the store "
                             "must be on a filesystem shared by all Ray nodes, or in a bucket (s3://...)")
    final = [{"file": r["file"], "rows": int(r["rows"]), "bytes": int(r["bytes"]), "xxh3_64": r["xxh3_64"]}
             for r in shards]
    write_json(child(directory, MANIFEST), {
        "format_version": FORMAT_VERSION, "model": model, "dim": int(dim), "dtype": DTYPE,
        "columns": {name: str(type_) for name, type_ in (columns or {}).items()},
        "shards": final, "total_rows": sum(s["rows"] for s in final),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "extra": extra or {},
    })


def write_rank_shards(directory: str | os.PathLike, images: Sequence[str], features: np.ndarray, rank: int,
                      rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> list[dict]:
    """One writer's rows (a Ray Train worker's share) as shard files in `directory` (local or URI)
    for `finish_store`: their listing."""
    _check_count("rows_per_shard", rows_per_shard)
    fs, inner = filesystem(directory)
    fs.create_dir(inner, recursive=True)
    dim, step = np.shape(features)[1], rows_per_shard
    return [write_shard(child(directory, f"part-r{rank:05d}-{j:05d}{SUFFIX}"),
                        shard_table(dim, images[start : start + step], features[start : start + step]))
            for j, start in enumerate(range(0, len(images), step))]


class StoreWriter:
    """Streams (image, descriptor) batches into a store at `path` (local or URI) that appears only
    when complete. Each write() goes straight into the open shard as Arrow record batches (no copy
    of the caller's rows is kept); a shard is closed once it holds `rows_per_shard` rows.
    """

    def __init__(self, path: str | os.PathLike, dim: int, model: dict,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, extra: dict | None = None):
        check_store_args(dim, model, extra, rows_per_shard)
        self.path, self.dim, self.rows_per_shard = path, int(dim), int(rows_per_shard)
        self.model, self.extra = model, extra or {}
        self._tmp: str | None = None

    def __enter__(self) -> StoreWriter:
        self._staging = staging_dir(self.path)
        self._tmp = self._staging.__enter__()
        self._shards: list[dict] = []
        self._open: tuple[ShardFile, pa.ipc.RecordBatchFileWriter] | None = None  # the shard being written
        self._rows = 0  # in the open shard
        self._columns: dict[str, pa.DataType] | None = None  # label types, fixed by the first rows
        return self

    def write(self, images: Sequence[str], features: np.ndarray, columns: dict[str, Sequence] | None = None) -> None:
        """Rows with their label `columns` (the same names on every call); the caller may reuse
        its arrays once this returns."""
        if self._tmp is None:
            raise QdeepError("StoreWriter.write() must be called inside its `with` block")
        columns = columns or {}
        if self._columns is not None and set(columns) != set(self._columns):
            raise QdeepError(f"every write needs the same label columns: {sorted(self._columns)}, "
                             f"got {sorted(columns)}")
        img, feats, labels = _checked(self.dim, images, features, {c: columns[c] for c in self._columns or columns},
                                      self._columns)
        if self._columns is None and len(img):
            self._columns = {name: arr.type for name, arr in labels.items()}
        start = 0
        while start < len(img):
            end = min(len(img), start + self.rows_per_shard - self._rows)
            table = _table(self.dim, img[start:end], feats[start:end], {c: a[start:end] for c, a in labels.items()})
            if self._open is None:
                sink = ShardFile(child(self._tmp, f"part-{len(self._shards):05d}{SUFFIX}"))
                self._open = sink, pa.ipc.new_file(sink, table.schema)
            self._open[1].write_table(table)
            self._rows += end - start
            if self._rows == self.rows_per_shard:
                self._close_shard()
            start = end

    def _close_shard(self) -> None:
        if self._open is not None:
            sink, writer = self._open
            self._open = None
            try:
                writer.close()
            finally:
                self._shards.append(sink.close(self._rows))
            self._rows = 0

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._close_shard()
            if exc_type is None:
                finish_store(self._tmp, self._shards, self.model, self.dim, self.extra, self._columns)
        except BaseException as failure:
            self._staging.__exit__(type(failure), failure, failure.__traceback__)  # removes what was written
            raise
        finally:
            self._tmp = None
        return self._staging.__exit__(exc_type, exc, tb)  # puts the store in place, or removes what was written


def _checked_shards(m: Any, where: str) -> tuple[Shard, ...]:
    if not isinstance(m, dict):
        raise QdeepError(f"{where} is not a feature store manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise QdeepError(f"{where} has format_version {m.get('format_version')!r}; this qdeep reads {FORMAT_VERSION} "
                         "(Arrow shards): rebuild the store (rerun `qdeep features`)")
    for key in ("model", "dim", "dtype", "shards", "total_rows"):
        if key not in m:
            raise QdeepError(f"{where} lacks {key!r}")
    if m["dtype"] != DTYPE:
        raise QdeepError(f"{where} has dtype {m['dtype']!r}; only {DTYPE} is supported")
    _check_count(f"{where}: dim", m["dim"])
    shards = []
    for entry in m["shards"] if isinstance(m["shards"], list) else [None]:
        try:
            shard = Shard(entry["file"], entry["rows"], entry["xxh3_64"], entry.get("bytes"))
            ok = (isinstance(shard.file, str) and Path(shard.file).name == shard.file
                  and not shard.file.startswith(".")  # nothing outside the store, no temp files
                  and isinstance(shard.rows, int) and shard.rows >= 0)
        except (TypeError, KeyError, AttributeError):
            ok = False
        if not ok:
            raise QdeepError(f"{where} has an invalid shard entry: {entry!r}")
        shards.append(shard)
    if sum(s.rows for s in shards) != m["total_rows"]:
        raise QdeepError(f"{where}: total_rows {m['total_rows']} is not the sum of its shards' rows")
    return tuple(shards)


class FeatureStore:
    """Read side of a store (a local path or a URI); every shard is checked against the manifest
    before its rows are used."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        where = child(path, MANIFEST)
        try:
            self.manifest = read_json(where)
        except (OSError, ValueError) as exc:
            raise QdeepError(f"{where} is unreadable: {exc}") from exc
        if self.manifest is None:
            fs, inner = filesystem(path)
            raise QdeepError(f"{path} is not a complete feature store (no {MANIFEST})"
                             if fs.get_file_info(inner).type != FileType.NotFound
                             else f"{path} does not exist (no feature store there)")
        self.shards = _checked_shards(self.manifest, where)
        self.dim: int = self.manifest["dim"]
        self.total_rows: int = self.manifest["total_rows"]
        self.model: dict = self.manifest["model"]
        self.extra: dict = self.manifest.get("extra") or {}
        self.columns: list[str] = list(self.manifest.get("columns") or {})  # the label columns

    def __repr__(self) -> str:
        return f"FeatureStore({self.path!r}, rows={self.total_rows}, dim={self.dim}, shards={len(self.shards)})"

    def _batches(self, shard: Shard, columns: list[str]) -> list[pa.RecordBatch]:
        """The shard's record batches (their `columns`), views of its checked bytes."""
        return read_batches(child(self.path, shard.file), shard, self.dim, columns,
                            f"feature store {self.path}: shard {shard.file}")

    def read_shard(self, index: int) -> pa.Table:
        """Shard `index`, checked, as an Arrow table (every column) of views of its bytes."""
        return pa.Table.from_batches(self._batches(self.shards[index], [*RESERVED, *self.columns]))

    def verify(self) -> None:
        """Every shard against the manifest (rows, schema and checksum) without decoding: one read of the store."""
        for shard in self.shards:
            self._batches(shard, [])

    def iter_shards(self, columns: Sequence[str] | None = None) -> Iterator[tuple]:
        """(images, features) in store order, a shard's rows at a time, or a record batch of it at a
        time: one per shard where a shard was written whole (`qdeep features`, DeepCluster), one per
        write() for StoreWriter's. Features are a read-only (rows, dim) float32 view of the checked
        shard, no copy. With `columns` (label names), (images, features, {name: values}). Memory:
        the shard (page cache locally; downloaded from an object store) and what the caller holds."""
        unknown = [c for c in columns or [] if c not in self.columns]
        if unknown:
            raise QdeepError(f"feature store {self.path} has no column {', '.join(map(repr, unknown))} "
                             f"(labels: {', '.join(self.columns) or 'none'})")
        for shard in self.shards:
            for batch in self._batches(shard, [*RESERVED, *(columns or [])]):
                images, feats = batch.column("image").to_pylist(), features_to_numpy(batch.column("features"), self.dim)
                yield (images, feats) if columns is None else (images, feats, {c: batch.column(c).to_pylist()
                                                                               for c in columns})

    def to_numpy(self) -> tuple[list[str], np.ndarray]:
        """The whole store in memory (small stores), copied into one array."""
        images, out = [], np.empty((self.total_rows, self.dim), dtype=np.float32)
        for ids, feats in self.iter_shards():
            out[len(images) : len(images) + len(ids)] = feats
            images += ids
        return images, out

    def read_column(self, name: str) -> list | np.ndarray:
        """One column over all shards: `features` as a (total_rows, dim) array, others as a list."""
        if name in RESERVED:
            return self.to_numpy()[RESERVED.index(name)]
        return [v for _, _, labels in self.iter_shards([name]) for v in labels[name]]

    def sample(self, n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
        """A uniform sample without replacement over all rows (all of them if n >= total_rows):
        a multivariate hypergeometric split of n over the shards, then a uniform choice inside
        each. Deterministic for a seed and a store; memory ~ the sample and one shard."""
        _check_count("sample size", n, least=0)
        n = min(int(n), self.total_rows)
        images, out = [], np.empty((n, self.dim), dtype=np.float32)
        rng = np.random.default_rng(seed)
        counts = rng.multivariate_hypergeometric([s.rows for s in self.shards], n, method="marginals")
        for shard, k in zip(self.shards, counts):
            if not k:
                continue
            picks, first = np.sort(rng.choice(shard.rows, size=int(k), replace=False)), 0
            for batch in self._batches(shard, list(RESERVED)):
                take = picks[np.searchsorted(picks, first) : np.searchsorted(picks, first + batch.num_rows)] - first
                out[len(images) : len(images) + len(take)] = features_to_numpy(batch.column("features"), self.dim)[take]
                images += batch.column("image").take(pa.array(take)).to_pylist()
                first += batch.num_rows
        return images, out
