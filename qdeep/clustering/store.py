"""The feature store: one descriptor per image, kept on disk between DeepCluster's stages.

A store is a directory of Parquet shards and a manifest written last:

    part-00000.parquet ...  image (string, relative to the image root),
                            features (fixed_size_list<float32>[dim]), optional label columns
    manifest.json           format_version, model {arch, weights, weights_sha256}, dim, dtype,
                            columns, shards [{file, rows, bytes, sha256}], total_rows, created, extra

Everything is written into a hidden sibling directory that is renamed to the store's path only
once the manifest is in it, so a crash never leaves a half store that looks complete; readers
check every shard's row count and sha256 as they open it, so a truncated or rewritten shard is
reported by name instead of being read silently.

Parquet options (measured with scripts/bench_store.py): features uncompressed (float descriptors
compress by ~2%, so any codec is CPU for nothing), no dictionary, no statistics; image and label
columns zstd with statistics (labels also dictionary-encoded); one row group per shard; fields
declared non-null (fewer definition levels to encode and decode). Shards are read through
pyarrow's memory map, hashed in a second thread while Arrow decodes them in ~1 MB batches, each
batch viewed zero-copy as numpy and copied once into the caller's array.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qdeep.errors import QdeepError
from qdeep.io import atomic_dir, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPE = "float32"
MODEL_KEYS = ("arch", "weights", "weights_sha256")
DEFAULT_ROWS_PER_SHARD = 50_000

_RESERVED = ("image", "features")
_WRITE_THREADS = 2  # shards encoded in parallel by StoreWriter (pyarrow releases the GIL)
_HASH_CHUNK = 8 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def features_type(dim: int) -> pa.DataType:
    return pa.list_(pa.field("element", pa.float32(), nullable=False), dim)


def features_to_numpy(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """(n, dim) float32 from a fixed_size_list column: a zero-copy (read-only) view when the
    column is one chunk, one copy into a fresh array otherwise."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if len(chunks) == 1:
        return _chunk_to_numpy(chunks[0], dim)
    out = np.empty((len(column), dim), dtype=np.float32)
    pos = 0
    for chunk in chunks:
        out[pos : pos + len(chunk)] = _chunk_to_numpy(chunk, dim)
        pos += len(chunk)
    return out


def _chunk_to_numpy(chunk: pa.Array, dim: int) -> np.ndarray:
    if not pa.types.is_fixed_size_list(chunk.type) or chunk.type.list_size != dim:
        raise QdeepError(f"features column is {chunk.type}, expected fixed_size_list<float>[{dim}]")
    if chunk.null_count:
        raise QdeepError("features column has missing rows")
    # flatten() honours the slice offset (.values would not); float32 without nulls is zero-copy.
    values = chunk.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(len(chunk), dim)


# ---------------------------------------------------------------------------------------------
# Validation shared by both writers


def _check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise QdeepError(f"feature store dim must be a positive integer, got {dim!r}")
    return int(dim)


def _check_rows_per_shard(rows: Any) -> int:
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows <= 0:
        raise QdeepError(f"rows_per_shard must be a positive integer, got {rows!r}")
    return int(rows)


def _check_json(what: str, obj: Any) -> Any:
    """Fail before hours of inference, not when the manifest is written at the very end."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as exc:
        raise QdeepError(f"feature store {what} must be JSON-serializable: {exc}") from exc


def _check_model(model: Any) -> dict:
    if not isinstance(model, dict):
        raise QdeepError(f"feature store model must be a dict with {', '.join(MODEL_KEYS)}, "
                         f"got {type(model).__name__}")
    missing = [k for k in MODEL_KEYS if k not in model]
    if missing:
        raise QdeepError(f"feature store model identity lacks {', '.join(missing)} (needs {', '.join(MODEL_KEYS)})")
    return _check_json("model", model)


def _check_replaceable(path: Path) -> None:
    """Replacing a store is fine; wiping a directory of someone's images is not."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir())):
        return
    raise QdeepError(f"{path} exists and is not a feature store; refusing to replace it")


def _image_array(images: Sequence[str]) -> pa.Array:
    try:
        arr = pa.array(images, type=pa.string())
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise QdeepError(f"feature store images must be strings (paths relative to the image root): {exc}") from exc
    if arr.null_count:
        raise QdeepError("feature store images must not be missing (None)")
    return arr


def _as_features(features: Any, images: pa.Array, dim: int, copy: bool) -> np.ndarray:
    arr = np.asarray(features)
    if arr.dtype == object:  # rows of lists/arrays, e.g. a Ray Data list column
        arr = np.stack([np.asarray(row, dtype=np.float32) for row in arr]) if len(arr) else arr.reshape(0, dim)
    n = len(images)
    if arr.shape != (n, dim):
        raise QdeepError(f"features must have shape ({n}, {dim}) for {n} images, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise QdeepError(f"features must be float32, got {arr.dtype}")
    arr = np.array(arr, dtype=np.float32, order="C", copy=True if copy else None)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():  # a NaN descriptor would silently poison k-means
        bad = int(np.flatnonzero(~finite)[0])
        raise QdeepError(f"features of {images[bad].as_py()} contain NaN or inf")
    return arr


def _label_array(name: str, values: Any, n: int, type_: pa.DataType | None = None) -> pa.Array:
    if name in _RESERVED:
        raise QdeepError(f"feature store column name {name!r} is reserved")
    if isinstance(values, np.ndarray):  # pa.array would alias it, and the writer keeps labels
        values = values.copy()
    try:
        arr = pa.array(values, type=type_)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        want = f" ({type_})" if type_ is not None else ""
        raise QdeepError(f"feature store column {name!r}: cannot store these values{want}: {exc}") from exc
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    if not (pa.types.is_string(arr.type) or pa.types.is_integer(arr.type)):
        raise QdeepError(f"feature store column {name!r} must hold strings or integers, got {arr.type}")
    if len(arr) != n:
        raise QdeepError(f"feature store column {name!r} has {len(arr)} values for {n} images")
    return arr


def _schema(dim: int, columns: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema([
        pa.field("image", pa.string(), nullable=False),
        pa.field("features", features_type(dim), nullable=False),
        *(pa.field(name, type_) for name, type_ in columns.items()),
    ])


def _shard_table(schema: pa.Schema, parts: list[tuple[pa.Array, np.ndarray, dict[str, pa.Array]]]) -> pa.Table:
    """Chunked columns over the buffered pieces: no concatenation copy before Parquet encodes."""
    ftype = schema.field("features").type
    feats = [pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), type=ftype) for _, f, _ in parts]
    arrays = [pa.chunked_array([p[0] for p in parts], pa.string()), pa.chunked_array(feats, ftype)]
    labels = [name for name in schema.names if name not in _RESERVED]
    arrays += [pa.chunked_array([p[2][name] for p in parts], schema.field(name).type) for name in labels]
    return pa.Table.from_arrays(arrays, schema=schema)


def _parquet_options(schema: pa.Schema) -> dict:
    labels = [name for name in schema.names if name not in _RESERVED]
    return {
        "compression": {"features": "none", **{name: "zstd" for name in ["image", *labels]}},
        "use_dictionary": labels,
        "write_statistics": ["image", *labels],
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _write_shard(path: Path, table: pa.Table) -> dict:
    pq.write_table(table, path, row_group_size=max(1, table.num_rows), **_parquet_options(table.schema))
    return {"file": path.name, "rows": table.num_rows, "bytes": path.stat().st_size, "sha256": _file_sha256(path)}


def _manifest(model: dict, dim: int, shards: list[dict], columns: dict[str, pa.DataType], extra: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "dim": dim,
        "dtype": DTYPE,
        "columns": {name: str(type_) for name, type_ in columns.items()},
        "shards": shards,
        "total_rows": sum(s["rows"] for s in shards),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extra": extra,
    }


# ---------------------------------------------------------------------------------------------
# Writing from the driver


class StoreWriter:
    """Streams (image, descriptor) batches into a store that appears at `path` only when complete.

    Shards are encoded by two background threads while the caller computes the next batch.
    Memory: the rows not yet in a shard (copied, < rows_per_shard) plus the shards being
    encoded (at most two). A write() larger than a shard is encoded from the caller's array
    without a copy; write() then waits for those shards, so the caller may reuse its arrays.
    """

    def __init__(self, path: str | os.PathLike, dim: int, model: dict,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, extra: dict | None = None):
        self.path = Path(path)
        self.dim = _check_dim(dim)
        self.model = _check_model(model)
        self.rows_per_shard = _check_rows_per_shard(rows_per_shard)
        self.extra = _check_json("extra", extra or {})
        self._dir_cm = None
        self._tmp: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []
        self._inflight: deque[Future] = deque()
        self._pending: list[tuple[pa.Array, np.ndarray, dict[str, pa.Array]]] = []
        self._buffered = 0
        self._columns: dict[str, pa.DataType] | None = None
        self._used = False

    def __enter__(self) -> StoreWriter:
        if self._used:
            raise QdeepError("a StoreWriter writes one store; make a new one")
        self._used = True
        _check_replaceable(self.path)
        self._dir_cm = atomic_dir(self.path)
        self._tmp = self._dir_cm.__enter__()
        self._pool = ThreadPoolExecutor(_WRITE_THREADS, thread_name_prefix="qdeep-store")
        return self

    def write(self, images: Sequence[str], features: np.ndarray, columns: dict[str, Sequence] | None = None) -> None:
        if self._tmp is None:
            raise QdeepError("StoreWriter.write() must be called inside its `with` block")
        img = _image_array(images)
        feats = _as_features(features, img, self.dim, copy=False)  # may be the caller's memory
        labels = self._labels(columns or {}, len(img))
        borrowed = []
        start = 0
        while start < len(img):
            take = min(len(img) - start, self.rows_per_shard - self._buffered)
            piece = (img.slice(start, take), feats[start : start + take],
                     {c: a.slice(start, take) for c, a in labels.items()})
            if take == self.rows_per_shard:  # a whole shard straight from the caller's array
                borrowed.append(self._submit([piece]))
            else:
                self._pending.append((piece[0], piece[1].copy(), piece[2]))
                self._buffered += take
                if self._buffered == self.rows_per_shard:
                    self._submit(self._pending)
            start += take
        for future in borrowed:  # the caller may reuse its array once write() returns
            future.result()

    def _labels(self, columns: dict[str, Sequence], n: int) -> dict[str, pa.Array]:
        if self._columns is None:
            labels = {name: _label_array(name, values, n) for name, values in columns.items()}
            if n:
                self._columns = {name: arr.type for name, arr in labels.items()}
            return labels
        if set(columns) != set(self._columns):
            raise QdeepError(f"every write needs the same label columns: {sorted(self._columns)}, "
                             f"got {sorted(columns)}")
        return {name: _label_array(name, columns[name], n, type_) for name, type_ in self._columns.items()}

    def _submit(self, parts: list) -> Future:
        if parts is self._pending:
            self._pending, self._buffered = [], 0
        table = _shard_table(_schema(self.dim, self._columns or {}), parts)
        future = self._pool.submit(_write_shard, self._tmp / shard_name(len(self._futures)), table)
        self._futures.append(future)
        self._inflight.append(future)
        while self._inflight and (len(self._inflight) > _WRITE_THREADS or self._inflight[0].done()):
            self._inflight.popleft().result()  # bounds memory and surfaces a failed shard early
        return future

    def __exit__(self, exc_type, exc, tb) -> bool:
        dir_cm, self._dir_cm = self._dir_cm, None
        error = exc
        try:
            if exc_type is None:
                if self._pending:
                    self._submit(self._pending)
                shards = [f.result() for f in self._futures]
                manifest = _manifest(self.model, self.dim, shards, self._columns or {}, self.extra)
                write_json(self._tmp / MANIFEST, manifest)  # last: its presence means complete
        except BaseException as failure:
            error = failure
        finally:
            # No background thread may still write into the temp dir when it is removed.
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending, self._inflight, self._tmp = [], deque(), None
        if error is None:
            dir_cm.__exit__(None, None, None)  # renames the complete store into place
            return False
        dir_cm.__exit__(type(error), error, error.__traceback__)  # removes the temp dir; `path` untouched
        if error is exc:
            return False  # the block's own exception goes on
        raise error


# ---------------------------------------------------------------------------------------------
# Writing from a Ray Data pipeline


def _write_batch_shard(batch: dict, directory: str, dim: int) -> dict:
    """Ray Data UDF: one batch becomes one shard, checksummed where it was written."""
    missing = [c for c in _RESERVED if c not in batch]
    if missing:
        raise QdeepError(f"the dataset needs 'image' and 'features' columns; it lacks {', '.join(missing)} "
                         f"(has {', '.join(sorted(batch))})")
    img = _image_array(list(batch["image"]))
    feats = _as_features(batch["features"], img, dim, copy=False)
    labels = {name: _label_array(name, values, len(img)) for name, values in batch.items() if name not in _RESERVED}
    columns = {name: arr.type for name, arr in labels.items()}
    name = f".shard-{uuid.uuid4().hex}.parquet"
    info = _write_shard(Path(directory) / name, _shard_table(_schema(dim, columns), [(img, feats, labels)]))
    return {
        "file": [name],
        "rows": [info["rows"]],
        "bytes": [info["bytes"]],
        "sha256": [info["sha256"]],
        "first": [img[0].as_py() if len(img) else ""],
        "columns": [json.dumps({c: str(t) for c, t in columns.items()})],
    }


def _reraise_qdeep(exc: BaseException) -> None:
    """Ray wraps a worker's QdeepError in a long traceback; keep the one-line message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.findall(r"qdeep\.errors\.\w+: (.+)", text)
    if found:
        raise QdeepError(found[-1].strip()) from exc


def write_store_from_dataset(ds, path: str | os.PathLike, dim: int, model: dict,
                             rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, extra: dict | None = None) -> FeatureStore:
    """Shards written in parallel by Ray Data workers, then named, listed and swapped in at once.

    `path` must be on a filesystem every Ray node sees (the workers write into its temp sibling).
    Rows need `image` (str) and `features` (float32 array or list of dim); other columns are
    stored as labels (strings or integers).
    """
    path = Path(path)
    dim = _check_dim(dim)
    model = _check_model(model)
    rows_per_shard = _check_rows_per_shard(rows_per_shard)
    extra = _check_json("extra", extra or {})
    _check_replaceable(path)
    with atomic_dir(path) as tmp:
        # No CPU reserved: when an upstream actor pool holds every CPU, a writer that asked for one
        # (even a fraction) waited for the whole pool to finish, and the rows piled up in the
        # object store instead of streaming to disk (measured: every shard written in the last
        # second of a 39 s run, against a pair every ~4 s without the reservation).
        written = ds.map_batches(_write_batch_shard, fn_kwargs={"directory": str(tmp), "dim": dim},
                                 batch_size=rows_per_shard, batch_format="numpy", num_cpus=0)
        try:
            results = written.take_all()
        except Exception as exc:
            _reraise_qdeep(exc)
            raise
        results = sorted((r for r in results if r["rows"] > 0), key=lambda r: (r["first"], r["file"]))
        kinds = {r["columns"] for r in results}
        if len(kinds) > 1:
            raise QdeepError(f"label columns differ between batches: {' vs '.join(sorted(kinds))}")
        columns = {name: pa.type_for_alias(t) for name, t in json.loads(kinds.pop()).items()} if kinds else {}
        finish_store(tmp, results, model, dim, extra, columns)
    return FeatureStore(path)


def finish_store(directory: str | os.PathLike, shards: list[dict], model: dict, dim: int, extra: dict | None = None,
                 columns: dict[str, pa.DataType] | None = None) -> None:
    """Shard files that parallel writers left in `directory` (listed in `shards`, in row order) get
    their final names and a manifest; files not listed (a retried writer's) are removed."""
    directory = Path(directory)
    listed = {r["file"] for r in shards}
    for stray in directory.iterdir():
        if stray.name not in listed:
            stray.unlink()
    final = []
    for index, r in enumerate(shards):
        source = directory / r["file"]
        if not source.is_file():
            raise QdeepError(f"shard {r['file']} written by a Ray worker is not visible at {directory}: "
                             "the store must be on a filesystem shared by all Ray nodes")
        os.replace(source, directory / shard_name(index))
        final.append({"file": shard_name(index), "rows": int(r["rows"]), "bytes": int(r["bytes"]),
                      "sha256": r["sha256"]})
    write_json(directory / MANIFEST, _manifest(_check_model(model), _check_dim(dim), final, columns or {},
                                               _check_json("extra", extra or {})))


def write_rank_shards(directory: str | os.PathLike, images: Sequence[str], features: np.ndarray, rank: int,
                      rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> list[dict]:
    """One writer's rows (e.g. a Ray Train worker's share) as shard files in `directory`, for
    `finish_store`; returns their listing, in row order."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    dim = features.shape[1]
    rows_per_shard = _check_rows_per_shard(rows_per_shard)
    shards = []
    for j, start in enumerate(range(0, len(images), rows_per_shard)):
        img = _image_array(list(images[start : start + rows_per_shard]))
        feats = _as_features(features[start : start + rows_per_shard], img, dim, copy=False)
        path = Path(directory) / f".rank-{rank:05d}-{j:05d}.parquet"
        shards.append(_write_shard(path, _shard_table(_schema(dim, {}), [(img, feats, {})])))
    return shards


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Shard:
    file: str
    rows: int
    sha256: str
    bytes: int | None = None


def _features_as_tensor(table: pa.Table, dim: int) -> pa.Table:
    """Ray Data turns a fixed_size_list into an object array per row; a tensor column batches as (n, dim)."""
    from ray.data.extensions import ArrowTensorArray

    index = table.schema.get_field_index("features")
    tensor = ArrowTensorArray.from_numpy(features_to_numpy(table.column("features"), dim))
    return table.set_column(index, "features", tensor)


class FeatureStore:
    """Read side of a store; every shard is checked against the manifest before its rows are used."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            if not self.path.exists():
                raise QdeepError(f"{self.path} does not exist (no feature store there)")
            raise QdeepError(f"{self.path} is not a complete feature store (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise QdeepError(f"{manifest_path} is unreadable: {exc}") from exc
        self.manifest = manifest
        self._shards = self._validate(manifest)

    def _validate(self, m: Any) -> tuple[Shard, ...]:
        where = f"{self.path / MANIFEST}"
        if not isinstance(m, dict):
            raise QdeepError(f"{where} is not a feature store manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise QdeepError(f"{where} has format_version {m.get('format_version')!r}; "
                             f"this qdeep reads {FORMAT_VERSION}")
        for key in ("model", "dim", "dtype", "shards", "total_rows"):
            if key not in m:
                raise QdeepError(f"{where} lacks {key!r}")
        if m["dtype"] != DTYPE:
            raise QdeepError(f"{where} has dtype {m['dtype']!r}; only {DTYPE} is supported")
        if isinstance(m["dim"], bool) or not isinstance(m["dim"], int) or m["dim"] <= 0:
            raise QdeepError(f"{where} has an invalid dim {m['dim']!r}")
        shards = []
        for entry in m["shards"] if isinstance(m["shards"], list) else [None]:
            try:
                shard = Shard(entry["file"], entry["rows"], entry["sha256"], entry.get("bytes"))
                ok = (isinstance(shard.file, str) and Path(shard.file).name == shard.file
                      and not shard.file.startswith(".")  # nothing outside the store, no temp files
                      and isinstance(shard.rows, int) and shard.rows >= 0 and _SHA256.match(str(shard.sha256)))
            except (TypeError, KeyError):
                ok = False
            if not ok:
                raise QdeepError(f"{where} has an invalid shard entry: {entry!r}")
            shards.append(shard)
        if sum(s.rows for s in shards) != m["total_rows"]:
            raise QdeepError(f"{where}: total_rows {m['total_rows']} is not the sum of its shards' rows")
        return tuple(shards)

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def total_rows(self) -> int:
        return self.manifest["total_rows"]

    @property
    def model(self) -> dict:
        return dict(self.manifest["model"])

    @property
    def shards(self) -> tuple[Shard, ...]:
        return self._shards

    @property
    def extra(self) -> dict:
        return dict(self.manifest.get("extra") or {})

    @property
    def columns(self) -> list[str]:
        """The label columns stored next to image and features."""
        return list(self.manifest.get("columns") or {})

    def __len__(self) -> int:
        return self.total_rows

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, rows={self.total_rows}, dim={self.dim}, shards={len(self._shards)})"

    # -- checking -----------------------------------------------------------------------------

    def _where(self, shard: Shard) -> str:
        return f"feature store {self.path}: shard {shard.file}"

    def _scan(self, shard: Shard, columns: list[str], consume=None) -> None:
        """Decode `columns` of a shard in ~1 MB batches into consume(batch, first_row), after
        checking its row count (footer) and the sha256 of the very bytes decoded (hashed in a
        second thread meanwhile). Callers publish what they consumed only if this returns.

        Batches, not a whole-shard read: Arrow's one-shot decode of a fixed_size_list column
        peaks at ~5x the shard (levels, builder growth); batch by batch it is ~1 MB."""
        where, file = self._where(shard), self.path / shard.file
        try:
            mapped = pa.memory_map(str(file))
        except OSError as exc:
            if not file.exists():
                raise QdeepError(f"{where} is missing") from exc
            raise QdeepError(f"{where} cannot be opened: {exc}") from exc
        with mapped, ThreadPoolExecutor(1, thread_name_prefix="qdeep-sha256") as pool:
            buf = mapped.read_buffer()
            digest = pool.submit(lambda: hashlib.sha256(buf).hexdigest())
            try:
                parquet = pq.ParquetFile(pa.BufferReader(buf))
                rows, schema = parquet.metadata.num_rows, parquet.schema_arrow
            except (pa.ArrowException, OSError) as exc:
                size = f"{buf.size} bytes" + (f", manifest says {shard.bytes}" if shard.bytes is not None else "")
                raise QdeepError(f"{where} is not a readable Parquet file ({size}): truncated or corrupt") from exc
            if rows != shard.rows:
                raise QdeepError(f"{where} has {rows} rows, the manifest says {shard.rows}")
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise QdeepError(f"{where} lacks column {', '.join(missing)}")
            if "features" in columns:
                ftype = schema.field("features").type
                if not (pa.types.is_fixed_size_list(ftype) and ftype.list_size == self.dim
                        and ftype.value_type == pa.float32()):
                    raise QdeepError(f"{where} has features of type {ftype}, "
                                     f"expected fixed_size_list<float>[{self.dim}]")
            error = None
            if consume is not None and columns:
                try:
                    done = 0
                    batches = parquet.iter_batches(batch_size=self._batch_rows, columns=columns, use_threads=False)
                    for batch in batches:
                        consume(batch, done)
                        done += batch.num_rows
                    if done != shard.rows:
                        raise QdeepError(f"decoded {done} rows of {shard.rows}")
                except (pa.ArrowException, OSError, QdeepError) as exc:
                    error = exc
            if digest.result() != shard.sha256:
                raise QdeepError(f"{where} does not match its sha256 in the manifest: corrupted or rewritten")
            if error is not None:
                raise QdeepError(f"{where} cannot be decoded: {error}") from error

    @property
    def _batch_rows(self) -> int:
        return max(16, (1 << 20) // (4 * self.dim))

    def verify(self) -> None:
        """Every shard against the manifest (rows and sha256) without decoding: one read of the store."""
        for shard in self._shards:
            self._scan(shard, [])

    def _label_names(self, columns: Sequence[str] | None) -> list[str]:
        names = list(columns or [])
        unknown = [c for c in names if c not in self.columns]
        if unknown:
            raise QdeepError(f"feature store {self.path} has no column {', '.join(map(repr, unknown))} "
                             f"(labels: {', '.join(self.columns) or 'none'})")
        return names

    # -- reading ------------------------------------------------------------------------------

    def _read(self, shard: Shard, labels: list[str], out: np.ndarray | None = None):
        """images, features (into `out` when given), {label: values} of one checked shard."""
        images: list[str] = []
        feats = np.empty((shard.rows, self.dim), dtype=np.float32) if out is None else out
        values: dict[str, list] = {c: [] for c in labels}

        def consume(batch: pa.RecordBatch, first: int) -> None:
            feats[first : first + batch.num_rows] = features_to_numpy(batch.column("features"), self.dim)
            images.extend(batch.column("image").to_pylist())
            for c in labels:
                values[c].extend(batch.column(c).to_pylist())

        self._scan(shard, ["image", "features", *labels], consume)
        return images, feats, values

    def iter_shards(self, columns: Sequence[str] | None = None) -> Iterator[tuple]:
        """(images, features) per shard, features a fresh (rows, dim) float32 array.

        With `columns` (label names), yields (images, features, {name: values}) instead. Memory is
        one shard plus ~1 MB while decoding, plus whatever the caller still holds of the previous
        shard (a `for` loop's variables hold it until the next shard is ready).
        """
        labels = self._label_names(columns)
        for shard in self._shards:
            images, feats, values = self._read(shard, labels)
            yield (images, feats) if columns is None else (images, feats, values)
            del images, feats, values

    def to_numpy(self) -> tuple[list[str], np.ndarray]:
        """The whole store in memory (small stores), decoded straight into one array."""
        images: list[str] = []
        out = np.empty((self.total_rows, self.dim), dtype=np.float32)
        pos = 0
        for shard in self._shards:
            images.extend(self._read(shard, [], out[pos : pos + shard.rows])[0])
            pos += shard.rows
        return images, out

    def read_column(self, name: str) -> list | np.ndarray:
        """One column over all shards: `features` as a (total_rows, dim) array, others as a list."""
        if name == "features":
            return self.to_numpy()[1]
        if name != "image":
            self._label_names([name])
        values: list = []
        for shard in self._shards:
            self._scan(shard, [name], lambda batch, first: values.extend(batch.column(name).to_pylist()))
        return values

    def sample(self, n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
        """A uniform sample without replacement over all rows (all of them if n >= total_rows):
        a multivariate hypergeometric split of n over the shards, then a uniform choice inside
        each, picked batch by batch. Deterministic for a seed and a store; memory ~ the sample."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise QdeepError(f"sample size must be a non-negative integer, got {n!r}")
        n = min(int(n), self.total_rows)
        out = np.empty((n, self.dim), dtype=np.float32)
        images: list[str] = []
        if n == 0:
            return images, out
        rng = np.random.default_rng(seed)
        shard_rows = np.array([s.rows for s in self._shards], dtype=np.int64)
        counts = rng.multivariate_hypergeometric(shard_rows, n, method="marginals")
        pos = 0
        for shard, k in zip(self._shards, counts):
            if not k:
                continue
            picks = np.sort(rng.choice(shard.rows, size=int(k), replace=False))
            got = out[pos : pos + k]
            filled = 0

            def consume(batch: pa.RecordBatch, first: int) -> None:
                nonlocal filled
                lo, hi = np.searchsorted(picks, [first, first + batch.num_rows])
                if hi > lo:
                    local = picks[lo:hi] - first
                    got[filled : filled + len(local)] = features_to_numpy(batch.column("features"), self.dim)[local]
                    images.extend(batch.column("image").take(pa.array(local)).to_pylist())
                    filled += len(local)

            self._scan(shard, ["image", "features"], consume)  # raises before a bad shard is returned
            pos += k
        return images, out

    def to_ray_dataset(self, tensor_features: bool = True):
        """The verified shards as a Ray Data dataset (row order not guaranteed). The store must be
        on a filesystem every Ray node sees. With tensor_features, numpy batches carry features as
        one (n, dim) float32 array instead of an object array of rows."""
        import ray

        self.verify()
        if not self._shards:
            raise QdeepError(f"feature store {self.path} is empty")
        ds = ray.data.read_parquet([str(self.path / s.file) for s in self._shards])
        if tensor_features:
            ds = ds.map_batches(_features_as_tensor, fn_kwargs={"dim": self.dim}, batch_format="pyarrow")
        return ds
