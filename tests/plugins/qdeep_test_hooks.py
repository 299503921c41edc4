"""A plugin module only the tests load (`qdeep --plugin qdeep_test_hooks`): worker callbacks that
inject a fault and check that the ranks agree, kept out of the product's path.

The fault to inject is read from the file named by QDEEP_TEST_FAULTS (tests/conftest.py sets it
before Ray starts, so every Ray worker inherits it; the `crash_once` fixture writes it):
{"rank": R, "at": N, "marker": PATH} makes rank R exit hard, once (the marker file records that
it happened), at the start of training epoch N or DeepCluster iteration N. QDEEP_TEST_GATE holds
a run at an epoch until the test lets it go (`Gate`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from qdeep.parts.callbacks import CALLBACKS, Callback

FAULTS_ENV = "QDEEP_TEST_FAULTS"


def _fault() -> dict | None:
    path = os.environ.get(FAULTS_ENV)
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


@CALLBACKS.register("test-crash")
class CrashOnce(Callback):
    def on_epoch_start(self, rank: int, epoch: int) -> None:
        self._maybe_crash(rank, epoch, wait_for_checkpoint=True)

    def on_iteration_start(self, rank: int, iteration: int) -> None:
        self._maybe_crash(rank, iteration, wait_for_checkpoint=False)

    @staticmethod
    def _maybe_crash(rank: int, at: int, wait_for_checkpoint: bool) -> None:
        fault = _fault()
        if not fault or rank != fault["rank"] or at != fault["at"] or Path(fault["marker"]).exists():
            return
        if wait_for_checkpoint:
            _wait_until_checkpoint_registered()
        Path(fault["marker"]).write_text(f"rank {rank} crashed at {at}\n")
        os._exit(1)


def _wait_until_checkpoint_registered(timeout: float = 120.0) -> None:
    """Ray's controller registers reports asynchronously (it polls workers); a worker that dies
    first takes its unpolled reports with it. The fault waits for the newest checkpoint on storage
    (a local path or a bucket) to appear in Ray's checkpoint-manager snapshot, so the test tests
    qdeep's resume, not the poll."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    listed = fs.get_file_info(pyarrow.fs.FileSelector(storage.experiment_fs_path, allow_not_found=True))
    newest = max((f.base_name for f in listed if f.type == pyarrow.fs.FileType.Directory
                  and f.base_name.startswith("checkpoint_")), default=None)
    snapshot = storage.checkpoint_manager_snapshot_path
    deadline = time.time() + timeout
    while newest and time.time() < deadline:
        if fs.get_file_info(snapshot).type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(snapshot) as f:
                if newest in f.read().decode():
                    return
        time.sleep(0.05)
    if newest:
        raise RuntimeError(f"fault test: checkpoint {newest} was not registered within {timeout:.0f} s")


GATE_ENV = "QDEEP_TEST_GATE"


@CALLBACKS.register("test-gate")
class Gate(Callback):
    """With QDEEP_TEST_GATE=HELD:OPEN:N (two file paths and an epoch), rank 0 holds the run at the start
    of training epoch N once the last checkpoint is registered: it writes HELD, then waits (at most
    300 s) until OPEN exists. A test then acts on a run in a known place (tests/test_multinode.py
    kills a node there); after a restart, OPEN exists and the epoch goes on."""

    def on_epoch_start(self, rank: int, epoch: int) -> None:
        spec = os.environ.get(GATE_ENV)
        if not spec or rank != 0:
            return
        held, opened, at = spec.split(":")
        if epoch != int(at) or Path(opened).exists():
            return
        _wait_until_checkpoint_registered()
        Path(held).write_text(f"rank 0 held at the start of epoch {epoch}\n")
        deadline = time.time() + 300
        while not Path(opened).exists() and time.time() < deadline:
            time.sleep(0.1)


@CALLBACKS.register("test-ranks-in-sync")
class RanksInSync(Callback):
    """metrics["ranks_in_sync"]: 1.0 when every rank holds the same weights after the epoch."""

    def on_epoch_end(self, rank: int, epoch: int, model, metrics: dict) -> None:
        from qdeep.distributed.comm import gather

        digest = hashlib.sha256()
        for name, t in model.state_dict().items():
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        metrics["ranks_in_sync"] = float(len(set(gather(digest.hexdigest()))) == 1)
