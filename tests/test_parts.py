"""The pipeline's parts as plain objects: targets, validation, fit strategies, formatters, registry."""

import csv
import json

import numpy as np
import pytest
import torch

from qdeep.errors import QdeepError
from qdeep.models import apply_freeze, build_model
from qdeep.parts import FIT_STRATEGIES, FORMATTERS, TARGETS, VALIDATIONS, infer_task
from qdeep.parts.fit import epoch_pieces, param_groups
from qdeep.parts.targets import load_targets

pytestmark = pytest.mark.unit  # no Ray


def test_multiclass_targets_encode_decode_and_name_the_bad_row(tmp_path):
    targets = TARGETS.get("multiclass").from_labels([["river"], ["forest"], ["town"]])
    assert targets.vocabulary == ["forest", "river", "town"]
    y = targets.encode([["town"], ["forest"]])
    assert y.dtype == np.int64 and y.tolist() == [2, 0]
    assert targets.decode(targets.decide(np.array([[0.1, 0.7, 0.2]]))) == ["river"]
    with pytest.raises(QdeepError, match=r"labels\.csv:7: 2 labels 'forest town'"):
        targets.encode([["forest"], ["forest", "town"]], ["labels.csv:3", "labels.csv:7"])
    loss = targets.loss(targets.loss_weights(np.array([0, 0, 0, 1])))
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.weight.tolist() == pytest.approx([2 / 3, 2, 0])
    targets.save(tmp_path / "labels.json")
    again = load_targets(tmp_path / "labels.json")
    assert again.kind == "multiclass" and again.vocabulary == targets.vocabulary


def test_multilabel_targets_keep_their_contract():
    targets = TARGETS.get("multilabel").from_labels([["clear", "water"], ["haze"]])
    y = targets.encode([["water"], ["clear", "haze"]])
    assert y.tolist() == [[0, 0, 1], [1, 1, 0]]
    assert targets.decode(targets.decide(np.array([[0.2, 0.6, 0.9]]), [0.5, 0.7, 0.5])) == ["water"]
    assert isinstance(targets.loss(), torch.nn.BCEWithLogitsLoss)
    assert targets.loss_weights(y) == [1.0, 1.0, 1.0]


def test_pseudo_targets_are_cluster_ids():
    targets = TARGETS.get("pseudo").for_clusters(4)
    assert targets.vocabulary == ["0", "1", "2", "3"] and targets.validation == "accuracy"
    assert torch.allclose(targets.activation(torch.zeros(1, 4)).sum(1), torch.ones(1))


def test_task_inference_from_the_data_arguments():
    assert infer_task(data="d") == infer_task(labels="l.csv", images="i") == "multilabel"
    assert infer_task(images="folders") == "multiclass"


def test_accuracy_validation_scores_and_splits_by_class():
    v = VALIDATIONS.get("accuracy")()
    y = np.array([0, 0, 1, 1, 2, 2] * 10)
    proba = np.eye(3)[y]
    proba[:6] = np.eye(3)[[1, 0, 1, 1, 2, 2]]  # one mistake
    score = v.score(y, proba)
    assert score.metrics["accuracy"] == pytest.approx(59 / 60) and 0.9 < score.metrics["macro_f1"] < 1
    assert score.per_label.shape == (3,) and score.thresholds is None
    held = v.holdout(y, 0.2, seed=0)
    assert held.sum() == 12 and np.bincount(y[held]).tolist() == [4, 4, 4]  # stratified
    assert (v.holdout(y, 0.2, seed=0) == held).all()


def test_two_stage_plan_and_refusal():
    config = {"epochs": 4, "freeze": "last:2", "lr": 1e-2, "head_epochs": 1, "finetune_lr_factor": 0.1}
    stages = FIT_STRATEGIES.get("two-stage")().stages(config)
    assert [(s.start, s.end, s.freeze) for s in stages] == [(0, 1, "head"), (1, 4, "last:2")]
    assert stages[1].lr == pytest.approx(1e-3)
    assert [epoch_pieces(stages, e, 10) for e in range(4)] == [[(0, None)], [(1, None)], [(1, None)], [(1, None)]]
    with pytest.raises(QdeepError, match="two-stage"):
        FIT_STRATEGIES.get("two-stage")().stages({**config, "freeze": "head"})
    assert len(FIT_STRATEGIES.get("single")().stages(config)) == 1


def test_a_head_stage_shorter_than_an_epoch_ends_within_the_first():
    stages = FIT_STRATEGIES.get("two-stage")().stages(
        {"epochs": 3, "freeze": "last:2", "lr": 1e-3, "head_epochs": 0.3, "finetune_lr_factor": 1.0})
    assert [(s.start, s.end, s.freeze) for s in stages] == [(0, 0.3, "head"), (0.3, 3, "last:2")]
    # 3 of the first epoch's 10 steps train the head; the rest of that epoch (however many
    # batches the shard has) and the later epochs train the blocks too
    assert [epoch_pieces(stages, e, 10) for e in range(3)] == [[(0, 3), (1, None)], [(1, None)], [(1, None)]]
    assert epoch_pieces(stages, 0, 1) == [(1, None)]  # too short to hold a step: no head stage
    assert epoch_pieces(stages, 0, 0) == [(1, None)]
    longer = FIT_STRATEGIES.get("two-stage")().stages(
        {"epochs": 2, "freeze": "none", "lr": 1e-3, "head_epochs": 1.5, "finetune_lr_factor": 1.0})
    assert [epoch_pieces(longer, e, 4) for e in range(2)] == [[(0, None)], [(0, 2), (1, None)]]


def test_discriminative_learning_rates_decay_down_the_blocks():
    model = build_model("resnet18", 3, "none", "none")
    apply_freeze(model, "last:2")
    groups = param_groups(model, 1.0, decay=0.5)
    assert [g["lr"] for g in groups] == [1.0, 0.5, 0.25]  # head, last block, the one below
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable
    assert len(param_groups(model, 1.0)) == 1


def test_formatters_write_every_format(tmp_path):
    targets = TARGETS.get("multiclass")(["forest", "town"])
    proba = np.array([[0.9, 0.1], [0.3, 0.7]])
    pred = targets.decide(proba)
    for name in ("kaggle-planet", "csv", "jsonl"):
        FORMATTERS.get(name)().write(tmp_path / name, ["a", "b"], targets, proba, pred)
    assert (tmp_path / "kaggle-planet").read_text() == "image_name,tags\na,forest\nb,town\n"
    rows = list(csv.DictReader(open(tmp_path / "csv")))
    assert rows[1] == {"image": "b", "label": "town", "p_forest": "0.300000", "p_town": "0.700000"}
    lines = [json.loads(line) for line in (tmp_path / "jsonl").read_text().splitlines()]
    assert lines[0] == {"image": "a", "label": "forest", "scores": {"forest": 0.9, "town": 0.1}}
    tags = TARGETS.get("multilabel")(["clear", "water"])
    FORMATTERS.get("jsonl")().write(tmp_path / "ml", ["x"], tags, np.array([[0.9, 0.8]]), np.array([[1, 1]]))
    assert json.loads((tmp_path / "ml").read_text())["labels"] == ["clear", "water"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_unknown_part_names_fail_in_one_line():
    with pytest.raises(QdeepError, match=r"unknown task 'regression' \(known: multiclass, multilabel, pseudo"):
        TARGETS.get("regression")
    with pytest.raises(QdeepError, match="unknown output format 'xml'"):
        FORMATTERS.get("xml")
