"""Where runs keep checkpoints and results, and whether every node of the cluster reaches it.

Ray Train workers write checkpoints to the storage path from whichever node they run on, and the
driver reads them back (and resumes from them). On a multi-node cluster the path must therefore be
shared: a directory on NFS mounted at the same path on every node, or an object-store URI
(`s3://`, `gs://`, anything pyarrow's filesystems open). `check_shared_storage` proves it before a
run starts instead of letting checkpoints scatter over the nodes' own disks.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from qdeep.distributed.session import is_local_ray
from qdeep.errors import QdeepError
from qdeep.io import is_uri

MARKER_PREFIX = ".qdeep-shared-check-"
PROBE_TIMEOUT_S = 60.0  # how long a task pinned to a node has to answer
STORAGE_REMEDY = ("a multi-node run needs --storage-path on shared storage: an NFS directory mounted at the same "
                  "path on every node, or an s3:// URI")


def check_shared_storage(storage_path: str, what: str = "storage path", remedy: str = STORAGE_REMEDY) -> None:
    """Refuse to start a run on a Ray cluster whose storage path some node cannot see, or may not see.

    Call it on the driver, inside a Ray session. On more than one alive node, every node must read
    back a marker file written here. On one alive node, a local path passes only on a plain local
    Ray (`session.is_local_ray`): any other cluster may gain nodes (an autoscaler's GPU nodes start
    once the run asks for them) that would write to their own disks, and with no second node up
    nothing shows the path is shared. Nodes that join after the probe must mount the same storage,
    as the nodes up at the start do. `what` and `remedy` name the path and the way out in the refusal.
    """
    if is_uri(storage_path):
        return
    nodes = alive_nodes()
    if len(nodes) < 2:
        if is_local_ray(nodes):
            return
        here = nodes[0].get("NodeManagerAddress", "?") if nodes else "?"
        raise QdeepError(f"{what} {storage_path} cannot be shown to be shared: this Ray cluster can gain nodes "
                         f"(it is not a local Ray started by qdeep) and only {here} is up, so no other node can "
                         f"check it (an NFS path is checked once worker nodes are up); {remedy}; or leave out "
                         "--address and RAY_ADDRESS to run on a local Ray")
    local = Path(storage_path.removeprefix("file://")).resolve()
    token = uuid.uuid4().hex
    marker = local / f"{MARKER_PREFIX}{token}"
    try:
        local.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError as exc:
        raise QdeepError(f"cannot write to {what} {storage_path}: {exc.strerror or exc}") from None
    try:
        seen = nodes_seeing(str(marker), token, [n["NodeID"] for n in nodes])
    finally:
        marker.unlink(missing_ok=True)
    refuse_unless_shared(storage_path, nodes, seen, what, remedy)


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def on_each_node(fn, node_ids: list[str], *args) -> dict:
    """`fn(*args)` as a task pinned to each node (no CPU reserved, no retry): {node id: the task's
    ref once it has finished, None if it did not finish within PROBE_TIMEOUT_S (then cancelled)}."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {node: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(*args)
            for node in node_ids}
    ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    for ref in pending:
        ray.cancel(ref, force=True)
    ready = set(ready)
    return {node: ref if ref in ready else None for node, ref in refs.items()}


def nodes_seeing(path: str, content: str, node_ids: list[str]) -> dict:
    """{node id: True if a task on that node reads `content` from `path`, False if it reads
    something else or nothing, None if it did not answer in time}."""
    import ray

    done = on_each_node(_read_text, node_ids, path)
    return {node: None if ref is None else ray.get(ref) == content for node, ref in done.items()}


def refuse_unless_shared(storage_path: str, nodes: list[dict], seen: dict, what: str = "storage path",
                         remedy: str = STORAGE_REMEDY) -> None:
    """Raise one line naming the path and every node that could not see the marker."""
    blind = [n for n in nodes if not seen.get(n["NodeID"])]
    if not blind:
        return
    names = []
    for n in blind:
        late = "" if seen.get(n["NodeID"]) is False else f", no answer in {PROBE_TIMEOUT_S:g} s"
        names.append(f"{n.get('NodeManagerAddress', '?')} (node {n['NodeID'][:8]}{late})")
    raise QdeepError(f"{what} {storage_path} is not shared by all {len(nodes)} nodes of this Ray cluster: "
                     f"a file written there on the driver's node is not visible on {', '.join(names)}; {remedy}")


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


TRACKING_REMEDY = ("rank 0 of a run logs from whichever node it is on: set MLFLOW_TRACKING_URI=http://HEAD:5000 "
                   "(an `mlflow server` on the head; cluster.yaml starts one) or --tracking-uri to one")


def check_shared_tracking(uri: str | None = None) -> None:
    """Refuse at the start a file-based MLflow store (the default SQLite file in the working
    directory) that rank 0 on another node could not open, which would otherwise fail only at the
    end of the training ("run not found"). A store reached over the network passes; a store's
    directory is probed as `check_shared_storage` probes a storage path, so a SQLite file on NFS,
    or any file on a laptop, still works. Call it on the driver, inside a Ray session."""
    from qdeep.tracking import store_directory, tracking_uri

    uri = tracking_uri(uri)
    directory = store_directory(uri)
    if directory is not None:
        check_shared_storage(directory, what=f"MLflow store {uri}: its directory", remedy=TRACKING_REMEDY)
