"""A worker callback for scripts/bench_startup.py (`qdeep --plugin qdeep_bench_hooks`): as epoch 0
starts, rank 0 takes the first batch of its training share from Ray Data (what its first step waits
for), notes the time in the file $QDEEP_BENCH_FIRST_STEP, then stops the run there."""

from __future__ import annotations

import os
import time

from qdeep.parts.callbacks import CALLBACKS, Callback


@CALLBACKS.register("bench_first_step")
class FirstStep(Callback):
    def on_epoch_start(self, rank: int, epoch: int) -> None:
        if rank == 0 and epoch == 0:
            import ray.train

            next(iter(ray.train.get_dataset_shard("train").iter_batches(batch_size=64)))
            with open(os.environ["QDEEP_BENCH_FIRST_STEP"], "w") as f:
                f.write(repr(time.time()))
            raise RuntimeError("bench: first step reached; stopping here")
