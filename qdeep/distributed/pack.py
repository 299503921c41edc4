"""`qdeep pack` on the Ray cluster: one task a shard, each reading its images' files, checking that
they decode and writing its Parquet shard straight to the pack's folder or bucket."""

from __future__ import annotations

import os
from typing import Sequence

from tqdm.auto import tqdm

from qdeep.data import BadInputPolicy
from qdeep.data.pack import Row, plan_shards, remove_shards, shard_bytes_for, shard_name, write_shard
from qdeep.data.rasters import BandLayout
from qdeep.distributed.tasks import check_visible_everywhere, not_visible, raise_user_error


def _shard_task(out: str, index: int, rows: Sequence[Row], bands: BandLayout | None = None):
    try:
        return write_shard(out, index, rows, bands)
    except FileNotFoundError as exc:
        raise not_visible([exc.filename], 1) from None


def pack_rows(rows: Sequence[Row], out: str, shard_bytes: int, policy: BadInputPolicy,
              bands: BandLayout | None = None) -> tuple[list[dict], list[bool]]:
    """Shards of at most about `shard_bytes` at `out` (in row order; smaller when that keeps every CPU of
    the cluster packing: `shard_bytes_for`) and which rows are in them; images that do not decode (with
    `bands`: as GeoTIFFs of that layout) go to `policy`. Nothing is left at `out` if this raises (a bad
    image under the error policy, Ctrl+C, a node that does not see the images)."""
    import ray

    check_visible_everywhere([r.path for r in rows])
    sizes = [os.path.getsize(r.path) for r in rows]
    groups = plan_shards(sizes, shard_bytes_for(sum(sizes), int(ray.cluster_resources().get("CPU", 1)), shard_bytes))
    task = ray.remote(num_cpus=1)(_shard_task)
    pending = {task.remote(out, i, [rows[j] for j in group], bands): i for i, group in enumerate(groups)}
    listings: dict[int, dict] = {}
    kept = [True] * len(rows)
    try:
        with tqdm(total=len(rows), desc="packing images", unit="img") as bar:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ref)
                try:
                    listing, failures = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise_user_error(exc)
                for i, reason in failures:
                    row = rows[groups[index][i]]
                    kept[groups[index][i]] = False
                    named = f", named on {row.origin}" if row.origin and row.origin != row.path else ""
                    policy.report(row.path, f"{reason}{named}")
                if listing:
                    listings[index] = listing
                bar.update(len(groups[index]))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.wait(list(pending), num_returns=len(pending), timeout=30)
        remove_shards(out, [{"file": shard_name(i)} for i in range(len(groups))])
        raise
    return [listings[i] for i in sorted(listings)], kept
