"""Validation across workers: the shards meet on rank 0 alone, which scores once and sends the
others only the loss and the score. Two real gloo processes run the worker's `validate`."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qdeep.data.loader import make_loader
from qdeep.distributed.worker import validate
from qdeep.parts.targets import MultiLabelTargets
from qdeep.parts.validation import F2Validation

N, D, LABELS = 23, 6, ["a", "b", "c", "d"]  # 23 rows: the sampler pads the last shard with a repeat


class Rows(torch.utils.data.Dataset):
    """ImageDataset's item contract, (index, x, y) by (epoch, index) key, on fixed tensors."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        _, i = key
        return i, self.x[i], torch.as_tensor(self.y[i])


class CountingF2(F2Validation):
    """The f2 part, recording each call to score and the dtype of what it was given."""

    def __init__(self):
        self.calls = []

    def score(self, y, proba):
        self.calls.append(str(proba.dtype))
        return super().score(y, proba)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = (torch.rand(N, len(LABELS), generator=g) < 0.4).numpy().astype(np.float32)
    model = torch.nn.Linear(D, len(LABELS))
    with torch.no_grad():
        model.weight.copy_(torch.randn(len(LABELS), D, generator=g))
        model.bias.zero_()
    return x, y, model


def _run(rank: int, world: int, store: str, out: str) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x, y, model = _data()
        targets, validation = MultiLabelTargets(LABELS), CountingF2()
        loader = make_loader(Rows(x, y), 4, shuffle=False, workers=0, world_size=world, rank=rank, seed=0)
        val = validate(model, loader, targets.loss(), torch.device("cpu"), len(y), targets, validation)
        score = val["score"]
        result = {"calls": validation.calls, "loss": val["loss"], "metrics": score.metrics,
                  "per_label": np.asarray(score.per_label).tolist(),
                  "thresholds": np.asarray(score.thresholds).tolist()}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_only_rank_0_gathers_and_scores_and_every_rank_gets_its_result(tmp_path):
    mp.spawn(_run, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1["calls"] == []  # rank 1 never builds nor scores the dense array
    assert rank0["calls"] == ["float32"]  # one dense float32 (n_val x k) array, scored once
    for key in ("loss", "metrics", "per_label", "thresholds"):
        assert rank1[key] == rank0[key]

    # The same numbers as one worker scoring the whole set itself.
    (tmp_path / "single").mkdir()
    _run(0, 1, "", str(tmp_path / "single"))
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert single["calls"] == ["float32"]
    assert rank0["metrics"] == single["metrics"]
    assert rank0["per_label"] == single["per_label"] and rank0["thresholds"] == single["thresholds"]
    x, y, model = _data()  # the loss counts the sampler's padding (row 0 twice), as it always has
    with torch.no_grad():
        rows = torch.nn.functional.binary_cross_entropy_with_logits(model(x), torch.as_tensor(y), reduction="none")
    assert abs(rank0["loss"] - float(rows.mean(1)[list(range(N)) + [0]].mean())) < 1e-5
    assert abs(single["loss"] - float(rows.mean())) < 1e-5
