"""`qdeep pack`: a data set (Planet layout, labels CSV over a folder, or a folder per class) into a
pack of Parquet shards of image bytes at a local path or a URI (`qdeep.data.pack`)."""

from __future__ import annotations

import numpy as np

from qdeep.data import BadInputPolicy, load_dataset
from qdeep.data.pack import DEFAULT_SHARD_MB, Row, make_room, remove_shards, write_manifest
from qdeep.data.rasters import sample_rasters
from qdeep.distributed.pack import pack_rows
from qdeep.distributed.session import log_beside, ray_session
from qdeep.errors import QdeepError


def run_pack(out: str, data=None, labels=None, images=None, shard_mb: float = DEFAULT_SHARD_MB,
             on_bad_image: str = "error", address: str | None = None, image_format: str = "jpg") -> dict:
    """Pack the data set at `out` (replacing a pack there); returns the manifest. `image_format` tif:
    multiband GeoTIFFs (Planet's train-tif-v2/), each checked to have the bands of the first that decodes."""
    policy = BadInputPolicy(on_bad_image)
    dataset = load_dataset(policy, data=data, labels=labels, images=images, image_format=image_format)
    bands = sample_rasters(dataset.train.paths)[1] if image_format == "tif" else None
    layout = "planet" if data else "labels-csv" if labels else "class-folders"
    train, test = dataset.train, dataset.test
    rows = [Row(name, str(path), "train", tags, origin)
            for name, path, tags, origin in zip(train.names, train.paths, train.tags, train.origins)]
    # Training images in a random (seeded) order: a folder lists its classes one after another, and a
    # training epoch streams shard by shard. The test images keep their order (a submission's).
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    rows += [Row(name, str(path), "test", None, None) for name, path in zip(test.names, test.paths)]
    out = str(out)
    make_room(out)
    with ray_session(address, log=log_beside(out)):
        shards, kept = pack_rows(rows, out, int(shard_mb * 2**20), policy, bands)
    if not any(k and r.split == "train" for r, k in zip(rows, kept)):
        remove_shards(out, shards)
        raise QdeepError(f"{dataset.source}: none of its {len(train)} training images could be decoded "
                         f"({policy.n_skipped} skipped)")
    vocabulary = {t for r, k in zip(rows, kept) if k for t in r.tags or []}
    return write_manifest(out, shards, dataset.source, layout, vocabulary, policy.skipped, bands)
