"""A pack: a data set as Parquet shards of encoded image bytes, on a local path or any URI pyarrow
opens (s3://, gs://, ...), so that a cluster reads a few large objects instead of listing and
opening every small image (ray-project/ray#37499, #40686), and any node reads them from the bucket.

A pack is a folder (or prefix) of `part-00000.parquet` ... and `pack.json`, written last. Each row
is one image: `image` (its name: the CSV's image_name, or its path below a class folder), `split`
(train or test), `tags` (its labels; null for test images), `origin` (where its labels came from:
"file.csv:12", or its path) and `data`, the file's bytes as they were (never re-encoded: GeoTIFFs
keep every band and sample). The manifest holds the format, the source and its layout, the images'
format (`image_format`: jpg, any image Pillow decodes to RGB; tif, multiband GeoTIFFs of one band
layout, `bands`), counts, the label vocabulary, each shard's file, rows, bytes and sha256, and the
inputs skipped under `--on-bad-image skip`.

The manifest is written last and removed first when a pack is replaced, so an interrupted `qdeep
pack` never leaves a pack that passes `Pack`'s check; `Pack` checks every shard's size against the
manifest when it opens one, so a missing or truncated shard is named before anything is read.
Building a pack over a cluster is `qdeep.distributed.pack`; this module has no Ray.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq

from qdeep.data.images import ImageDecodeError, load_rgb
from qdeep.data.rasters import BandLayout, read_raster
from qdeep.data.planet import Dataset, ImageSet
from qdeep.errors import QdeepError
from qdeep.io import basename, child, filesystem, read_json, write_json

FORMAT, FORMAT_VERSION = "qdeep-pack", 1
MANIFEST = "pack.json"
DEFAULT_SHARD_MB = 256
SCHEMA = pa.schema([pa.field("image", pa.string(), nullable=False), pa.field("split", pa.string(), nullable=False),
                    pa.field("tags", pa.list_(pa.string())), pa.field("origin", pa.string()),
                    pa.field("data", pa.binary(), nullable=False)])
META = ("image", "split", "tags", "origin")  # every column but the bytes


@dataclass(frozen=True)
class Row:
    """One image to pack: where its file is now, and what goes beside its bytes."""

    image: str
    path: str
    split: str
    tags: list[str] | None
    origin: str | None


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


MIN_SHARD_BYTES = 16 << 20  # below this, shards are not split further to keep every CPU busy


def shard_bytes_for(total: int, cpus: int, most: int) -> int:
    """Shard size: at most `most`, and small enough that `cpus` tasks share the `total` bytes (packing
    and every later read go a shard a task), but no smaller than MIN_SHARD_BYTES (or `most`)."""
    return min(most, max(MIN_SHARD_BYTES, -(-total // max(cpus, 1))))


def plan_shards(sizes: Sequence[int], shard_bytes: int) -> list[range]:
    """Consecutive rows in groups of about `shard_bytes` (at least one row each)."""
    groups, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > shard_bytes:
            groups.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups


def write_shard(out: str, index: int, rows: Sequence[Row], bands: BandLayout | None = None
                ) -> tuple[dict | None, list[tuple[int, str]]]:
    """The rows whose files decode as shard `index` of the pack at `out` (as RGB images, or with
    `bands` as GeoTIFFs of that layout): (its listing {file, rows, bytes, sha256, splits: {train: n,
    test: n}}, or None if no row decoded; [(position in `rows`, reason)] of those that did not).
    A file that does not exist raises FileNotFoundError: the caller listed it, so it is not bad input."""
    kept, failures = [], []
    for i, row in enumerate(rows):
        data = Path(row.path).read_bytes()
        try:
            if bands:
                bands.check(read_raster(data, row.path), row.path)
            else:
                load_rgb(io.BytesIO(data))
        except ImageDecodeError as exc:
            failures.append((i, exc.reason))
            continue
        kept.append((row, data))
    if not kept:
        return None, failures
    table = pa.Table.from_pydict({"image": [r.image for r, _ in kept], "split": [r.split for r, _ in kept],
                                  "tags": [r.tags for r, _ in kept], "origin": [r.origin for r, _ in kept],
                                  "data": [d for _, d in kept]}, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none", use_dictionary=["split"], row_group_size=max(1, len(kept)))
    buf = sink.getvalue()  # whole, to hash the very bytes written
    fs, inner = filesystem(child(out, shard_name(index)))
    with fs.open_output_stream(inner) as f:
        f.write(buf)
    splits = {split: sum(r.split == split for r, _ in kept) for split in ("train", "test")}
    return {"file": shard_name(index), "rows": len(kept), "bytes": buf.size,
            "sha256": hashlib.sha256(buf).hexdigest(), "splits": splits}, failures


def make_room(out: str) -> None:
    """An empty folder at `out` for a pack: made, or emptied of a pack (complete or interrupted),
    whose manifest goes first. Anything else there is refused: it may be someone's data."""
    fs, inner = filesystem(out)
    info = fs.get_file_info(inner)
    if info.type == pyarrow.fs.FileType.NotFound:
        fs.create_dir(inner, recursive=True)
        return
    if info.type != pyarrow.fs.FileType.Directory:
        raise QdeepError(f"--out {out}: exists and is not a folder")
    files = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
    names = {f.path[len(inner.rstrip('/')) + 1:] for f in files if f.type == pyarrow.fs.FileType.File}
    strangers = sorted(n for n in names if n != MANIFEST and not (n.startswith("part-") and n.endswith(".parquet")))
    if strangers:
        raise QdeepError(f"--out {out}: holds {strangers[0]}, which is not part of a pack; refusing to replace it")
    if MANIFEST in names:
        fs.delete_file(child(inner, MANIFEST))
    for name in sorted(names - {MANIFEST}):
        fs.delete_file(child(inner, name))


def remove_shards(out: str, shards: Sequence[dict]) -> None:
    """Best effort: the shards of a pack that will not be finished."""
    fs, inner = filesystem(out)
    for shard in shards:
        try:
            fs.delete_file(child(inner, shard["file"]))
        except OSError:
            pass


def write_manifest(out: str, shards: Sequence[dict], source: str, layout: str, labels: Sequence[str],
                   skipped: Sequence[dict], bands: BandLayout | None = None) -> dict:
    """The manifest, last: the pack at `out` is complete from here on."""
    counts = {"train": 0, "test": 0}
    for shard in shards:
        for split, n in shard["splits"].items():
            counts[split] += n
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": source, "layout": layout,
                "image_format": "tif" if bands else "jpg",
                **({"bands": {"count": bands.count, "dtype": bands.dtype, "first": bands.first}} if bands else {}),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "counts": {**counts, "skipped": len(skipped)}, "labels": sorted(labels),
                "shards": [{k: s[k] for k in ("file", "rows", "bytes", "sha256")} for s in shards],
                "skipped": list(skipped)}
    write_json(child(out, MANIFEST), manifest)
    return manifest


class Pack:
    """A complete pack, checked as it opens: its manifest, and every shard there with its size."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        try:
            manifest = read_json(child(self.uri, MANIFEST))
        except (OSError, ValueError) as exc:
            raise QdeepError(f"pack {self.uri}: {MANIFEST} is unreadable: {exc}") from None
        if manifest is None:
            raise QdeepError(f"{self.uri} is not a complete pack (no {MANIFEST}; `qdeep pack` writes it last)")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise QdeepError(f"{child(self.uri, MANIFEST)} is not a {FORMAT} version {FORMAT_VERSION} manifest")
        self.manifest = manifest
        self.fs, inner = filesystem(self.uri)
        self.paths = [child(inner, s["file"]) for s in manifest["shards"]]
        for shard, info in zip(manifest["shards"], self.fs.get_file_info(self.paths)):
            where = f"pack {self.uri}: shard {shard['file']}"
            if info.type != pyarrow.fs.FileType.File:
                raise QdeepError(f"{where} is missing")
            if info.size != shard["bytes"]:
                raise QdeepError(f"{where} has {info.size} bytes, the manifest says {shard['bytes']}: "
                                 "truncated or rewritten")

    @property
    def total(self) -> int:
        """Images in the pack, training and test."""
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def layout(self) -> str:
        return self.manifest["layout"]

    @property
    def image_format(self) -> str:
        """jpg (images Pillow decodes to RGB) or tif (multiband GeoTIFFs); packs from before GeoTIFFs: jpg."""
        return self.manifest.get("image_format", "jpg")

    def check_format(self, image_format: str, what: str, hint: str | None = None) -> None:
        """A one-line error unless it holds `image_format` images (what the command was told to read;
        `hint`: what to do instead, by default the option that reads its images)."""
        if image_format != self.image_format:
            hint = hint or ("add --image-format tif" if self.image_format == "tif" else "leave out --image-format tif")
            raise QdeepError(f"{what}: a pack of {self.image_format} images, not {image_format} ({hint})")

    @property
    def task(self) -> str:
        """What its labels mean, as `parts.infer_task` reads the source it was packed from."""
        return "multiclass" if self.layout == "class-folders" else "multilabel"

    def files(self) -> list[str]:
        """Each shard as its filesystem names it (for `ray.data.read_parquet(files, filesystem=pack.fs)`)."""
        return list(self.paths)

    def read_shard(self, path: str, columns: Sequence[str]) -> pa.Table:
        """`columns` of one shard (`path` as `files()` names it), or a one-line error naming it."""
        try:
            return pq.read_table(path, filesystem=self.fs, columns=list(columns))
        except (pa.ArrowException, OSError) as exc:
            raise QdeepError(f"pack {self.uri}: shard {basename(path)} cannot be read: {exc}") from None

    def read(self, columns: Sequence[str] = META) -> pa.Table:
        """`columns` of every row, shard by shard (only those columns are fetched), each shard's row
        count checked against the manifest."""
        tables = []
        for shard, path in zip(self.manifest["shards"], self.paths):
            table = self.read_shard(path, columns)
            if table.num_rows != shard["rows"]:
                raise QdeepError(f"pack {self.uri}: shard {shard['file']} has {table.num_rows} rows, "
                                 f"the manifest says {shard['rows']}")
            tables.append(table)
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(list(columns))

    def rows(self, split: str, columns: Sequence[str]) -> pa.Table:
        """`columns` of its `split` ("train" or "test") rows, in the order they were packed."""
        meta = self.read(tuple(dict.fromkeys([*columns, "split"])))
        return meta.filter(pc.equal(meta["split"], split)).select(list(columns))

    def images(self, names: Sequence[str]) -> dict[str, bytes]:
        """The bytes of the images named, read shard by shard (one shard's bytes in memory at a time,
        beside those kept)."""
        wanted, found = pa.array(sorted(set(names)), pa.string()), {}
        for path in self.paths:
            shard = self.read_shard(path, ("image", "data"))
            shard = shard.filter(pc.is_in(shard["image"], value_set=wanted))
            found.update(zip(shard["image"].to_pylist(), shard["data"].to_pylist()))
        missing = [n for n in names if n not in found]
        if missing:
            raise QdeepError(f"pack {self.uri}: no image named {missing[0]} ({len(missing)} missing)")
        return found

    def dataset(self) -> Dataset:
        """Its images as `load_dataset` gives a folder's (decoding was checked when it was packed):
        each image's `paths` entry is its name in the pack. One read of the pack's metadata."""
        meta = self.read(META)
        train = meta.filter(pc.equal(meta["split"], "train"))
        names = train["image"].to_pylist()
        tests = meta.filter(pc.equal(meta["split"], "test"))["image"].to_pylist()
        return Dataset(train=ImageSet(names, list(names), train["tags"].to_pylist(), train["origin"].to_pylist()),
                       test=ImageSet(tests, list(tests)), source=self.uri, pack=self.uri)

    def verify(self) -> None:
        """Every shard's bytes against its sha256 in the manifest (one read of the pack)."""
        for shard, path in zip(self.manifest["shards"], self.paths):
            with self.fs.open_input_file(path) as f:
                if hashlib.sha256(f.read()).hexdigest() != shard["sha256"]:
                    raise QdeepError(f"pack {self.uri}: shard {shard['file']} does not match its sha256 "
                                     "in the manifest: corrupted or rewritten")


def is_pack(path) -> bool:
    """Whether `path` holds a pack's manifest (complete or not, it is a pack, not a folder of images)."""
    fs, inner = filesystem(path)
    return fs.get_file_info(child(inner, MANIFEST)).type == pyarrow.fs.FileType.File


def describe(manifest: dict) -> str:
    c = manifest["counts"]
    return (f"{c['train']} training and {c['test']} test images, {len(manifest['labels'])} labels, "
            f"{len(manifest['shards'])} shard(s), {c['skipped']} skipped")

