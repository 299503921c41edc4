"""A second task on the same pipeline: multiclass on a folder-per-class layout, the two-stage fit
strategy, every output format, and a part registered by a module outside the package."""

import csv
import json
import textwrap

import numpy as np
import pytest

from qdeep.cli import main
from qdeep.data.synth import SCENE_CLASSES, write_synthetic_classes
from qdeep.io import filesystem
from qdeep.models import apply_freeze, build_model

pytestmark = pytest.mark.ray  # Ray Train runs: `make test-fast` (the unit tier) leaves this module out

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--loader-workers", "0",
        "--warmup-steps", "2", "--workers", "2"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    write_synthetic_classes(out, n_per_class=40, size=32, seed=3)
    return out


@pytest.fixture(scope="module")
def multiclass_model(scenes, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("multiclass")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    # no --task: a folder of class folders means multiclass
    assert main(["train", "--images", str(scenes), "--out", str(out), "--tracking-uri", uri, "--epochs", "3",
                 "--lr", "3e-3", *TINY, "--arch", "efficientnet_lite0", "--weights", "bundled", "--freeze", "last:2",
                 "--image-size", "64"]) == 0
    return out


def test_multiclass_training_learns_the_classes(multiclass_model):
    m = json.loads((multiclass_model / "metrics.json").read_text())
    assert m["task"] == "multiclass" and m["score_metric"] == "val_accuracy"
    assert "val_f2" not in m and "thresholds" not in m
    assert m["val_accuracy"] > 0.6 and 0 < m["val_macro_f1"] <= 1  # chance is 1/5
    assert m["epochs_completed"] == 3 and m["restarts"] == 0 and len(m["history"]) == 3
    assert all("train_acc" in h and "val_accuracy" in h and "val_macro_f1" in h for h in m["history"])
    assert set(m["per_label_f1"]) == set(SCENE_CLASSES)
    assert m["n_train"] + m["n_val"] == 200 and m["n_val"] == 40
    labels = json.loads((multiclass_model / "model" / "labels.json").read_text())
    assert labels == {"kind": "multiclass", "labels": sorted(SCENE_CLASSES)}
    assert not (multiclass_model / "model" / "thresholds.json").exists()


def test_predict_writes_each_format(multiclass_model, scenes, tmp_path, s3_bucket):
    outputs = {}
    for fmt in ("csv", "jsonl", "kaggle-planet"):
        outputs[fmt] = tmp_path / f"pred.{fmt}"
        assert main(["predict", "--model", str(multiclass_model / "model"), "--images", str(scenes),
                     "--out", str(outputs[fmt]), "--format", fmt]) == 0
    rows = list(csv.DictReader(open(outputs["csv"])))
    assert len(rows) == 200 and list(rows[0]) == ["image", "label", *(f"p_{c}" for c in sorted(SCENE_CLASSES))]
    for row in rows:
        scores = np.array([float(row[f"p_{c}"]) for c in sorted(SCENE_CLASSES)])
        assert abs(scores.sum() - 1) < 1e-4 and row["label"] == sorted(SCENE_CLASSES)[scores.argmax()]
    correct = np.mean([r["label"] == r["image"].split("/")[0] for r in rows])
    assert correct > 0.6
    lines = [json.loads(line) for line in outputs["jsonl"].read_text().splitlines()]
    assert [x["label"] for x in lines] == [r["label"] for r in rows]
    kaggle = list(csv.reader(open(outputs["kaggle-planet"])))
    assert kaggle[0] == ["image_name", "tags"] and [k[1] for k in kaggle[1:]] == [r["label"] for r in rows]
    uri = f"{s3_bucket}/predictions/pred.csv"  # --out in a bucket: the same bytes
    assert main(["predict", "--model", str(multiclass_model / "model"), "--images", str(scenes), "--out", uri]) == 0
    fs, inner = filesystem(uri)
    with fs.open_input_file(inner) as f:
        assert f.read() == outputs["csv"].read_bytes()


def test_a_plugin_module_registers_a_format_used_by_name(multiclass_model, scenes, tmp_path, monkeypatch):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tsv_plugin.py").write_text(textwrap.dedent('''
        from qdeep.parts import FORMATTERS

        @FORMATTERS.register("tsv")
        class Tsv:
            def write(self, path, names, targets, proba, pred):
                with open(path, "w") as f:
                    for name, label in zip(names, targets.decode(pred)):
                        f.write(f"{name}\\t{label}\\n")
    '''))
    monkeypatch.syspath_prepend(str(plugins))
    out = tmp_path / "pred.tsv"
    assert main(["--plugin", "tsv_plugin", "predict", "--model", str(multiclass_model / "model"),
                 "--images", str(scenes), "--out", str(out), "--format", "tsv"]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert len(rows) == 200 and {r[1] for r in rows} <= set(SCENE_CLASSES)
    assert main(["predict", "--model", str(multiclass_model / "model"), "--images", str(scenes),
                 "--out", str(tmp_path / "x"), "--format", "nope"]) == 2


def test_two_stage_unfreezes_at_the_right_epoch_at_a_lower_rate(planet_dir, ray_cluster, tmp_path, sqlite_uri):
    """The head stage ends halfway through the second epoch: the blocks unfreeze (and DDP is
    re-wrapped) between two steps of an epoch."""
    out = tmp_path / "two"
    assert main(["--plugin", "qdeep_test_hooks", "train", "--data", str(planet_dir), "--out", str(out),
                 "--tracking-uri", sqlite_uri, "--epochs", "3", "--lr", "1e-2", "--fit-strategy", "two-stage",
                 "--head-epochs", "1.5",
                 "--freeze", "last:1", "--finetune-lr-factor", "0.1", *TINY]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]

    def trainable(freeze):
        model = build_model("resnet18", 17, "none", "none")
        apply_freeze(model, freeze)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    assert [h["trainable_params"] for h in history] == [trainable("head")] + [trainable("last:1")] * 2
    assert [h["stage"] for h in history] == [0, 1, 1]
    assert [h["base_lr"] for h in history] == pytest.approx([1e-2, 1e-3, 1e-3])
    assert all(h["lr"] <= h["base_lr"] + 1e-12 for h in history) and history[1]["lr"] < 1e-2 / 5
    assert all(h["ranks_in_sync"] == 1.0 for h in history)  # DDP re-wrapped after unfreezing stays in sync
