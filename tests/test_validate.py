"""The worker's `validate` in one process, without a torch.distributed group (the identity
collectives of qdeep.distributed.comm): it scores the whole validation set, each row on its own
index whatever order and repeats the loader brings, with the loss averaged over what it saw. The
gather across real ranks is tests/test_validation_gather.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_validation_gather import Rows  # ImageDataset's item contract on fixed tensors

from qdeep.data.loader import ShardSampler, make_loader
from qdeep.distributed.worker import validate
from qdeep.parts.targets import MultiClassTargets, MultiLabelTargets
from qdeep.parts.validation import AccuracyValidation, F2Validation

pytestmark = pytest.mark.unit

N, D = 23, 6
LABELS, CLASSES = ["a", "b", "c", "d"], ["x", "y", "z"]




class Recording:
    """A validation part that records what it was asked to score, then scores it with `part`."""

    def __init__(self, part):
        self.part, self.seen = part, []

    def score(self, y, proba):
        self.seen.append((np.array(y, copy=True), np.array(proba, copy=True)))
        return self.part.score(y, proba)


def _model(outputs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    model = torch.nn.Linear(D, outputs)
    with torch.no_grad():
        model.weight.copy_(torch.randn(outputs, D, generator=g))
        model.bias.copy_(torch.randn(outputs, generator=g))
    return x, model


def multilabel():
    x, model = _model(len(LABELS))
    y = (torch.rand(N, len(LABELS), generator=torch.Generator().manual_seed(1)) < 0.4).numpy().astype(np.float32)
    y[0] = 1  # no label empty everywhere
    return x, y, model, MultiLabelTargets(LABELS), F2Validation()


def multiclass():
    x, model = _model(len(CLASSES), seed=2)
    y = np.arange(N, dtype=np.int64) % len(CLASSES)
    return x, y, model, MultiClassTargets(CLASSES), AccuracyValidation()


def rows_loss(targets, model, x, y) -> torch.Tensor:
    """Each row's own loss, as the targets' loss function computes it on a batch of one."""
    loss = targets.loss()
    with torch.no_grad():
        return torch.stack([loss(model(x[i:i + 1]), torch.as_tensor(y[i:i + 1])) for i in range(N)])


def loader_of(x, y, shuffle, world=1, rank=0, plan=None, batch=4):
    return make_loader(Rows(x, y), batch, shuffle=shuffle, workers=0, world_size=world, rank=rank, seed=3, plan=plan)


@pytest.mark.parametrize("task", [multilabel, multiclass], ids=["f2", "accuracy"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_scores_the_whole_set_with_each_row_on_its_own_index(task, shuffle):
    x, y, model, targets, part = task()
    recording = Recording(part)
    val = validate(model, loader_of(x, y, shuffle), targets.loss(), torch.device("cpu"), len(y), targets, recording)

    with torch.no_grad():
        expected = targets.activation(model(x)).numpy()
    ((scored_y, proba),) = recording.seen  # scored once, on the whole set
    assert np.array_equal(scored_y, y)
    assert proba.dtype == np.float32 and proba.shape == (N, len(targets))
    np.testing.assert_allclose(proba, expected, rtol=1e-6, atol=1e-7)  # row i is image i, in any loader order
    direct = part.score(y, expected)
    assert val["score"].metrics == pytest.approx(direct.metrics)
    np.testing.assert_allclose(val["score"].per_label, direct.per_label)
    if direct.thresholds is None:
        assert val["score"].thresholds is None
    else:
        np.testing.assert_allclose(val["score"].thresholds, direct.thresholds)
    assert val["loss"] == pytest.approx(float(rows_loss(targets, model, x, y).mean()), rel=1e-5)


def test_f2_and_accuracy_report_their_own_metrics():
    x, y, model, targets, part = multilabel()
    f2 = validate(model, loader_of(x, y, True), targets.loss(), torch.device("cpu"), len(y), targets, part)["score"]
    assert set(f2.metrics) == {"f2"} and 0 < f2.metrics["f2"] <= 1
    assert len(f2.per_label) == len(LABELS) and len(f2.thresholds) == len(LABELS)
    x, y, model, targets, part = multiclass()
    acc = validate(model, loader_of(x, y, True), targets.loss(), torch.device("cpu"), len(y), targets, part)["score"]
    assert set(acc.metrics) == {"accuracy", "macro_f1"} and acc.thresholds is None
    with torch.no_grad():
        assert acc.metrics["accuracy"] == pytest.approx(float((model(x).argmax(1).numpy() == y).mean()))
    assert len(acc.per_label) == len(CLASSES)


@pytest.mark.parametrize("task", [multilabel, multiclass], ids=["f2", "accuracy"])
def test_the_samplers_padding_repeats_rows_without_moving_them(task):
    """What rank 0 gathers from 4 ranks: each rank's shard in turn, 23 rows padded to 24 by a repeat.
    The repeat lands on its own row (the score is the unpadded one); the loss counts it, being the
    mean over every row the loader brought."""
    x, y, model, targets, part = task()
    world = 4
    loader = itertools.chain(*(loader_of(x, y, True, world, rank) for rank in range(world)))
    recording = Recording(part)
    val = validate(model, loader, targets.loss(), torch.device("cpu"), len(y), targets, recording)

    with torch.no_grad():
        expected = targets.activation(model(x)).numpy()
    ((_, proba),) = recording.seen
    np.testing.assert_allclose(proba, expected, rtol=1e-6, atol=1e-7)
    assert val["score"].metrics == pytest.approx(part.score(y, expected).metrics)
    seen = [i for rank in range(world) for _, i in ShardSampler(N, world, rank, True, 3)]
    assert len(seen) == 24 and sorted(set(seen)) == list(range(N))  # one row twice
    per_row = rows_loss(targets, model, x, y)
    assert val["loss"] == pytest.approx(float(per_row[seen].mean()), rel=1e-5)
    assert val["loss"] != pytest.approx(float(per_row.mean()), rel=1e-7)
