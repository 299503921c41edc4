"""The feature store: one descriptor per image, kept on disk between DeepCluster's stages. A store
is a directory of Parquet shards (`part-00000.parquet` ...: image, a path relative to the image
root; features, fixed_size_list<float32>[dim], uncompressed; optional label columns, zstd) and
`manifest.json` (format_version, model {arch, weights, weights_sha256}, dim, dtype, columns,
shards [{file, rows, bytes, sha256}], total_rows, created, extra), written last: writers fill a
hidden sibling renamed into place once the manifest is in it, so a crash never leaves a half store
that looks complete, and readers check each shard's rows and sha256 as they read it, so a truncated
or rewritten shard is named, never read. Ray Data's side is in qdeep.distributed.features.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qdeep.config import FeaturesConfig
from qdeep.errors import QdeepError
from qdeep.io import atomic_dir, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPE = "float32"
MODEL_KEYS = ("arch", "weights", "weights_sha256")
DEFAULT_ROWS_PER_SHARD = FeaturesConfig.rows_per_shard  # 50,000 descriptors
RESERVED = ("image", "features")  # every shard's first columns; the rest are labels


def _features_type(dim: int) -> pa.DataType:
    return pa.list_(pa.field("element", pa.float32(), nullable=False), dim)


def features_to_numpy(column: pa.Array, dim: int) -> np.ndarray:
    """A fixed_size_list<float32>[dim] array as an (n, dim) float32 view (zero-copy, read-only)."""
    if column.null_count:
        raise QdeepError("features column has missing rows")
    return column.flatten().to_numpy().reshape(-1, dim)  # flatten() honours a slice's offset (.values not)


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
def staging_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling that replaces the store at `path` when the block succeeds. Replacing a
    store (or an empty directory) is fine; wiping a directory of someone's images is not."""
    path = Path(path)
    if os.path.lexists(path) and not (path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir()))):
        raise QdeepError(f"{path} exists and is not a feature store; refusing to replace it")
    with atomic_dir(path) as tmp:
        yield tmp


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
    ftype = _features_type(dim)
    schema = pa.schema([pa.field("image", pa.string(), nullable=False), pa.field("features", ftype, nullable=False),
                        *(pa.field(name, arr.type) for name, arr in labels.items())])
    feats = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), type=ftype)  # no copy
    return pa.Table.from_arrays([images, feats, *labels.values()], schema=schema)


def shard_table(dim: int, images: Sequence[str], features: Any, labels: dict[str, Sequence] | None = None) -> pa.Table:
    """One shard's rows, checked: image strings, (n, dim) finite features, labels strings or integers."""
    return _table(dim, *_checked(dim, images, features, labels or {}))


def write_shard(path: Path, table: pa.Table) -> dict:
    """`table` as one Parquet shard at `path`; returns its listing {file, rows, bytes, sha256}."""
    labels = table.schema.names[len(RESERVED):]
    pq.write_table(table, path, row_group_size=max(1, table.num_rows), use_dictionary=labels,
                   compression={"features": "none", **{name: "zstd" for name in ["image", *labels]}},
                   write_statistics=["image", *labels])
    with pa.memory_map(str(path)) as f:
        sha256 = hashlib.sha256(f.read_buffer()).hexdigest()
    return {"file": path.name, "rows": table.num_rows, "bytes": path.stat().st_size, "sha256": sha256}


def finish_store(directory: str | os.PathLike, shards: list[dict], model: dict, dim: int, extra: dict | None = None,
                 columns: dict[str, pa.DataType | str] | None = None) -> None:
    """Shard files that writers left in `directory` (listed in `shards`, in row order) get their
    final names and the manifest, written last; files not listed (a retried writer's) are removed."""
    check_store_args(dim, model, extra)
    directory = Path(directory)
    for stray in set(os.listdir(directory)) - {r["file"] for r in shards}:
        (directory / stray).unlink()
    final = []
    for index, r in enumerate(shards):
        if not (directory / r["file"]).is_file():
            raise QdeepError(f"shard {r['file']} written by a Ray worker is not visible at {directory}: "
                             "the store must be on a filesystem shared by all Ray nodes")
        final.append({"file": f"part-{index:05d}.parquet", "rows": int(r["rows"]), "bytes": int(r["bytes"]),
                      "sha256": r["sha256"]})
        os.replace(directory / r["file"], directory / final[-1]["file"])
    write_json(directory / MANIFEST, {
        "format_version": FORMAT_VERSION, "model": model, "dim": int(dim), "dtype": DTYPE,
        "columns": {name: str(type_) for name, type_ in (columns or {}).items()},
        "shards": final, "total_rows": sum(s["rows"] for s in final),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "extra": extra or {},
    })


def write_rank_shards(directory: str | os.PathLike, images: Sequence[str], features: np.ndarray, rank: int,
                      rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> list[dict]:
    """One writer's rows (a Ray Train worker's share) as shard files for `finish_store`: their listing."""
    _check_count("rows_per_shard", rows_per_shard)
    dim, step = np.shape(features)[1], rows_per_shard
    return [write_shard(Path(directory) / f".rank-{rank:05d}-{j:05d}.parquet",
                        shard_table(dim, images[start : start + step], features[start : start + step]))
            for j, start in enumerate(range(0, len(images), step))]


class StoreWriter:
    """Streams (image, descriptor) batches into a store that appears at `path` only when complete.

    Each shard is written as soon as its rows are in (two writer threads did not pay: see
    scripts/bench_store.py); memory holds the rows not yet in a shard, copied.
    """

    def __init__(self, path: str | os.PathLike, dim: int, model: dict,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, extra: dict | None = None):
        check_store_args(dim, model, extra, rows_per_shard)
        self.path, self.dim, self.rows_per_shard = Path(path), int(dim), int(rows_per_shard)
        self.model, self.extra = model, extra or {}
        self._tmp: Path | None = None

    def __enter__(self) -> StoreWriter:
        self._staging = staging_dir(self.path)
        self._tmp = self._staging.__enter__()
        self._shards, self._pending, self._buffered = [], [], 0  # written shards; rows of the next one
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
            end = min(len(img), start + self.rows_per_shard - self._buffered)
            self._buffered += end - start
            rows = feats[start:end] if self._buffered == self.rows_per_shard else feats[start:end].copy()
            self._pending.append(_table(self.dim, img[start:end], rows, {c: a[start:end] for c, a in labels.items()}))
            if self._buffered == self.rows_per_shard:
                self._flush()
            start = end

    def _flush(self) -> None:
        if self._pending:
            table = pa.concat_tables(self._pending)  # chunked columns: no copy before Parquet encodes
            self._shards.append(write_shard(self._tmp / f".shard-{len(self._shards):05d}.parquet", table))
            self._pending, self._buffered = [], 0

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._flush()
                finish_store(self._tmp, self._shards, self.model, self.dim, self.extra, self._columns)
        except BaseException as failure:
            self._staging.__exit__(type(failure), failure, failure.__traceback__)  # removes tmp
            raise
        finally:
            self._tmp = None
        return self._staging.__exit__(exc_type, exc, tb)  # renames the store into place, or removes tmp


class Shard(NamedTuple):
    file: str
    rows: int
    sha256: str
    bytes: int | None = None


def _checked_shards(m: Any, where: Path) -> tuple[Shard, ...]:
    if not isinstance(m, dict):
        raise QdeepError(f"{where} is not a feature store manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise QdeepError(f"{where} has format_version {m.get('format_version')!r}; this qdeep reads {FORMAT_VERSION}")
    for key in ("model", "dim", "dtype", "shards", "total_rows"):
        if key not in m:
            raise QdeepError(f"{where} lacks {key!r}")
    if m["dtype"] != DTYPE:
        raise QdeepError(f"{where} has dtype {m['dtype']!r}; only {DTYPE} is supported")
    _check_count(f"{where}: dim", m["dim"])
    shards = []
    for entry in m["shards"] if isinstance(m["shards"], list) else [None]:
        try:
            shard = Shard(entry["file"], entry["rows"], entry["sha256"], entry.get("bytes"))
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
    """Read side of a store; every shard is checked against the manifest before its rows are used."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = self.path / MANIFEST
        if not where.is_file():
            raise QdeepError(f"{self.path} is not a complete feature store (no {MANIFEST})" if self.path.exists()
                             else f"{self.path} does not exist (no feature store there)")
        try:
            self.manifest = json.loads(where.read_text())
        except (OSError, ValueError) as exc:
            raise QdeepError(f"{where} is unreadable: {exc}") from exc
        self.shards = _checked_shards(self.manifest, where)
        self.dim: int = self.manifest["dim"]
        self.total_rows: int = self.manifest["total_rows"]
        self.model: dict = self.manifest["model"]
        self.extra: dict = self.manifest.get("extra") or {}
        self.columns: list[str] = list(self.manifest.get("columns") or {})  # the label columns

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, rows={self.total_rows}, dim={self.dim}, shards={len(self.shards)})"

    def _batches(self, shard: Shard, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first row, batch) of `columns` in ~1 MB batches, after checking the shard's row count
        and schema. The sha256 of the very bytes decoded (hashed in a second thread meanwhile) is
        checked after the last batch, so a caller keeps what it read only if its loop ends.
        Batches: Arrow's one-shot decode of a fixed_size_list column peaks at ~5x the shard."""
        where, file = f"feature store {self.path}: shard {shard.file}", self.path / shard.file
        try:
            mapped = pa.memory_map(str(file))
        except OSError as exc:
            raise QdeepError(f"{where} cannot be opened: {exc}" if file.exists() else f"{where} is missing") from exc
        with mapped, ThreadPoolExecutor(1, thread_name_prefix="qdeep-sha256") as pool:
            buf = mapped.read_buffer()
            digest = pool.submit(lambda: hashlib.sha256(buf).hexdigest())
            try:
                parquet = pq.ParquetFile(pa.BufferReader(buf))
            except (pa.ArrowException, OSError) as exc:
                size = f"{buf.size} bytes" + (f", manifest says {shard.bytes}" if shard.bytes is not None else "")
                raise QdeepError(f"{where} is not a readable Parquet file ({size}): truncated or corrupt") from exc
            if parquet.metadata.num_rows != shard.rows:
                raise QdeepError(f"{where} has {parquet.metadata.num_rows} rows, the manifest says {shard.rows}")
            schema = parquet.schema_arrow
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise QdeepError(f"{where} lacks column {', '.join(missing)}")
            if "features" in columns and schema.field("features").type != _features_type(self.dim):
                raise QdeepError(f"{where} has features of type {schema.field('features').type}, "
                                 f"expected {_features_type(self.dim)}")
            try:
                first, batch_rows = 0, max(16, (1 << 20) // (4 * self.dim))
                for batch in parquet.iter_batches(batch_rows, columns=columns, use_threads=False) if columns else ():
                    yield first, batch
                    first += batch.num_rows
            except (pa.ArrowException, OSError) as exc:
                if digest.result() == shard.sha256:
                    raise QdeepError(f"{where} cannot be decoded: {exc}") from exc
            if digest.result() != shard.sha256:
                raise QdeepError(f"{where} does not match its sha256 in the manifest: corrupted or rewritten")

    def verify(self) -> None:
        """Every shard against the manifest (rows and sha256) without decoding: one read of the store."""
        for shard in self.shards:
            list(self._batches(shard, []))

    def _read(self, shard: Shard, labels: list[str], out: np.ndarray | None = None, picks: np.ndarray | None = None):
        """images, features (into `out` if given), {label: values} of a checked shard; only rows `picks` if given."""
        images, values, pos = [], {c: [] for c in labels}, 0
        feats = np.empty((shard.rows, self.dim), dtype=np.float32) if out is None else out
        for first, batch in self._batches(shard, [*RESERVED, *labels]):
            if picks is not None:  # sample(): the picked rows of this batch
                lo, hi = np.searchsorted(picks, [first, first + batch.num_rows])
                batch = batch.take(pa.array(picks[lo:hi] - first))
            feats[pos : pos + batch.num_rows] = features_to_numpy(batch.column("features"), self.dim)
            images += batch.column("image").to_pylist()
            for c in labels:
                values[c] += batch.column(c).to_pylist()
            pos += batch.num_rows
        return images, feats, values

    def iter_shards(self, columns: Sequence[str] | None = None) -> Iterator[tuple]:
        """(images, features) per shard, features a fresh (rows, dim) float32 array; with `columns`
        (label names), (images, features, {name: values}). Memory: one shard plus ~1 MB while
        decoding, plus what the caller still holds of the previous shard (a `for` loop's variables)."""
        unknown = [c for c in columns or [] if c not in self.columns]
        if unknown:
            raise QdeepError(f"feature store {self.path} has no column {', '.join(map(repr, unknown))} "
                             f"(labels: {', '.join(self.columns) or 'none'})")
        for shard in self.shards:
            images, feats, values = self._read(shard, list(columns or []))
            yield (images, feats) if columns is None else (images, feats, values)
            del images, feats, values

    def to_numpy(self) -> tuple[list[str], np.ndarray]:
        """The whole store in memory (small stores), decoded straight into one array."""
        images, pos = [], 0
        out = np.empty((self.total_rows, self.dim), dtype=np.float32)
        for shard in self.shards:
            images += self._read(shard, [], out[pos : pos + shard.rows])[0]
            pos += shard.rows
        return images, out

    def read_column(self, name: str) -> list | np.ndarray:
        """One column over all shards: `features` as a (total_rows, dim) array, others as a list."""
        if name in RESERVED:
            return self.to_numpy()[RESERVED.index(name)]
        return [v for _, _, labels in self.iter_shards([name]) for v in labels[name]]

    def sample(self, n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
        """A uniform sample without replacement over all rows (all of them if n >= total_rows):
        a multivariate hypergeometric split of n over the shards, then a uniform choice inside
        each, picked batch by batch. Deterministic for a seed and a store; memory ~ the sample."""
        _check_count("sample size", n, least=0)
        n = min(int(n), self.total_rows)
        images, pos, out = [], 0, np.empty((n, self.dim), dtype=np.float32)
        rng = np.random.default_rng(seed)
        counts = rng.multivariate_hypergeometric([s.rows for s in self.shards], n, method="marginals")
        for shard, k in zip(self.shards, counts):
            if k:
                picks = np.sort(rng.choice(shard.rows, size=int(k), replace=False))
                images += self._read(shard, [], out[pos : pos + k], picks)[0]
                pos += k
        return images, out
