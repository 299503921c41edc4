"""One shard of the feature store (qdeep.clustering.store): an uncompressed Arrow IPC file (image
strings, features as fixed_size_list<float32>[dim], optional label columns), written with its
xxh3_64 checksum computed on the way out, read back as zero-copy views once its rows, schema and
checksum match what the manifest lists. The store's directory, manifest and writers are in store.py.
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import xxhash
from pyarrow.fs import LocalFileSystem

from qdeep.errors import QdeepError
from qdeep.io import filesystem


class Shard(NamedTuple):
    """A shard as the manifest lists it."""
    file: str
    rows: int
    xxh3_64: str
    bytes: int | None = None


def features_type(dim: int) -> pa.DataType:
    return pa.list_(pa.field("element", pa.float32(), nullable=False), dim)


def features_to_numpy(column: pa.Array, dim: int) -> np.ndarray:
    """A fixed_size_list<float32>[dim] array as an (n, dim) float32 view (zero-copy, read-only)."""
    if column.null_count:
        raise QdeepError("features column has missing rows")
    return column.flatten().to_numpy().reshape(-1, dim)  # flatten() honours a slice's offset (.values not)


_fallocate = getattr(ctypes.CDLL(None), "fallocate", None)  # Linux's; elsewhere nothing is reserved


class ShardFile:
    """The file Arrow's IPC writer writes one shard through (a local file, or an object-store
    upload): each byte goes into the shard's checksum on its way. xxh3_64 hashes at ~30 GB/s here,
    sha256 at 1.8. A local file's blocks are reserved before each large write, as np.save does
    (fallocate, keeping the size): ext4 then takes the bytes ~1.4x faster (scripts/bench_store.py)."""

    closed = False

    def __init__(self, path: str):
        fs, inner = filesystem(path)
        self.file, self.bytes, self._hash = inner.rsplit("/", 1)[-1], 0, xxhash.xxh3_64()
        self._raw = open(inner, "wb") if isinstance(fs, LocalFileSystem) else fs.open_output_stream(inner)
        self._fd = self._raw.fileno() if isinstance(fs, LocalFileSystem) and _fallocate else None

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self._hash.update(data)
        if self._fd is not None and size >= 1 << 20:
            _fallocate(self._fd, 1, ctypes.c_int64(self.bytes), ctypes.c_int64(size))  # 1: FALLOC_FL_KEEP_SIZE
        self._raw.write(data)
        self.bytes += size
        return size

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        pass

    def close(self, rows: int = 0) -> dict:
        """Its listing in the manifest: {file, rows, bytes, xxh3_64}."""
        if not self.closed:
            self._raw.close()
            self.closed = True
        return {"file": self.file, "rows": rows, "bytes": self.bytes, "xxh3_64": self._hash.hexdigest()}


def write_shard(path: str | os.PathLike, table: pa.Table) -> dict:
    """`table` as one shard at `path` (local or URI); returns its listing {file, rows, bytes, xxh3_64}."""
    sink = ShardFile(str(path))
    try:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    finally:
        listing = sink.close(table.num_rows)
    return listing


def read_batches(path: str, shard: Shard, dim: int, columns: list[str], where: str) -> list[pa.RecordBatch]:
    """The record batches (their `columns`) of the shard file at `path`, zero-copy views of the
    whole file (memory-mapped locally, one read of the object from an object store), once its rows,
    schema and checksum match `shard`; errors start with `where`. Nothing of a shard is decoded
    before its checksum passes."""
    fs, inner = filesystem(path)
    try:
        with (LocalFileSystem(use_mmap=True) if isinstance(fs, LocalFileSystem) else fs).open_input_file(inner) as f:
            buf = f.read_buffer()
    except FileNotFoundError as exc:
        raise QdeepError(f"{where} is missing") from exc
    except OSError as exc:
        raise QdeepError(f"{where} cannot be opened: {exc}") from exc
    try:
        reader = pa.ipc.open_file(buf)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowException, OSError) as exc:
        size = f"{buf.size} bytes" + (f", the manifest says {shard.bytes}" if shard.bytes is not None else "")
        raise QdeepError(f"{where} is not a readable Arrow IPC file ({size}): truncated or corrupt") from exc
    rows = sum(b.num_rows for b in batches)
    if rows != shard.rows:
        raise QdeepError(f"{where} has {rows} rows, the manifest says {shard.rows}")
    missing = [c for c in columns if c not in reader.schema.names]
    if missing:
        raise QdeepError(f"{where} lacks column {', '.join(missing)}")
    if "features" in columns and reader.schema.field("features").type != features_type(dim):
        raise QdeepError(f"{where} has features of type {reader.schema.field('features').type}, "
                         f"expected {features_type(dim)}")
    if xxhash.xxh3_64(buf).hexdigest() != shard.xxh3_64:
        raise QdeepError(f"{where} does not match its checksum (xxh3_64) in the manifest: corrupted or rewritten")
    return [b.select(columns) for b in batches]
