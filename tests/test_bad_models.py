"""Bad weights and model files (issue 18, item 4): a malicious pickle, random bytes, a truncated
file, another architecture's state_dict, a corrupt config, as `--weights` of train/features and
inside a CNN or baseline model directory for `predict`. Each is refused with exit code 2 and one
`qdeep: error:` line naming the file and the reason; a malicious file's payload never runs (it
would create a marker file). Real files and real commands; model directories are built by hand
with the code `qdeep baseline` / `qdeep train` save with, so only train/features need the
session's Ray (to decode the images before the weights are read), and no case runs Ray Train.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest
import skops.io
import torch
from qdeep.distributed.predict import CNN_KIND

from qdeep.baseline import MODEL_FILE, OLD_MODEL_FILE, HistogramForest
from qdeep.cli import main
from qdeep.data.synth import write_synthetic_planet
from qdeep.distributed.predict import load_exported
from qdeep.errors import QdeepError
from qdeep.models import build_model
from qdeep.parts.targets import MultiLabelTargets

LABELS = ["clear", "cloudy", "haze"]
ARCH = "resnet18"
OTHER_ARCH = "efficientnet_lite0"
PROGRESS = re.compile(r"^[\w ]+: +\d+%\|")  # a tqdm progress bar
TORCH_ADVICE = ("weights_only` set to `False`", "weights_only=False", "add_safe_globals", "Re-running `torch.load`")


# ---- payloads: what a malicious model file does when it is unpickled or constructed ----------

class Exec:
    """Unpickling this runs `code` (exec), as a malicious pickle would."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class SkopsPayload:
    """An object that creates `marker` when skops constructs it (if a loader were to trust it)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).touch()
        self.__dict__.update(state)


def _touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def write_bad(kind: str, path: Path, marker: Path, good: Path | None = None) -> None:
    """A bad weights/model file of `kind` at `path`; `good` is a valid file of the same format."""
    if kind == "pickle":  # protocol 2: the GLOBAL builtins.exec is the first thing a safe loader meets
        path.write_bytes(pickle.dumps(Exec(_touch(marker)), protocol=2))
    elif kind == "torch-pickle":  # a real torch.save zip whose data.pkl calls exec
        torch.save({"fc.weight": torch.zeros(3, 512), "payload": Exec(_touch(marker))}, path)
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(kind)


def test_the_payloads_are_live(tmp_path):
    """The malicious files do run code when loaded unsafely: the refusals below are meaningful."""
    marker = tmp_path / "marker_pickle"
    write_bad("pickle", tmp_path / "raw.pkl", marker)
    pickle.loads((tmp_path / "raw.pkl").read_bytes())
    assert marker.exists()
    marker = tmp_path / "marker_torch"
    write_bad("torch-pickle", tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)  # what qdeep must never do
    assert marker.exists()
    marker = tmp_path / "marker_joblib"
    joblib.dump(Exec(_touch(marker)), tmp_path / "old.joblib")
    joblib.load(tmp_path / "old.joblib")
    assert marker.exists()
    marker = tmp_path / "marker_skops"
    skops.io.dump([SkopsPayload(str(marker))], tmp_path / "p.skops")
    skops.io.load(tmp_path / "p.skops", trusted=[f"{SkopsPayload.__module__}.{SkopsPayload.__qualname__}"])
    assert marker.exists()


# ---- fixtures: tiny data, a valid CNN and baseline model directory ---------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Tiny images, and good model files: a CNN model dir, a baseline model dir, state_dicts."""
    root = tmp_path_factory.mktemp("bad_models")
    write_synthetic_planet(root / "planet", n=12, size=16, seed=0, n_test=3)

    cnn = root / "cnn"
    cnn.mkdir()
    torch.save(build_model(ARCH, len(LABELS), "none", "none").state_dict(), cnn / "model.pt")
    MultiLabelTargets(LABELS).save(cnn / "labels.json")
    (cnn / "config.json").write_text(json.dumps({"kind": CNN_KIND, "task": "multilabel", "arch": ARCH,
                                                 "image_size": 32, "num_labels": len(LABELS)}))
    torch.save(build_model(ARCH, None, "none", "none").state_dict(), root / "good.pt")
    torch.save(build_model(OTHER_ARCH, None, "none", "none").state_dict(), root / "other_arch.pt")

    baseline = root / "baseline"
    baseline.mkdir()
    rng = np.random.default_rng(0)
    x = rng.random((40, 78)).astype(np.float32)
    y = np.stack([x[:, 0] > 0.5, x[:, 1] > 0.5, np.zeros(40, bool)], axis=1).astype(np.uint8)
    HistogramForest(n_estimators=5, n_jobs=1).fit(x, y).save(baseline)  # what `qdeep baseline` writes
    MultiLabelTargets(LABELS).save(baseline / "labels.json")
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _refused(capsys, argv: list[str], *fragments: str, alone: bool = True) -> str:
    """`qdeep ARGV` exits 2 with one `qdeep: error:` line holding `fragments`, and nothing of
    torch's advice to turn weights_only off. `alone`: that line is all of stderr; else the other
    lines may only be progress bars (train and features decode the images before the weights)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "qdeep: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("qdeep: error: "), err
    others = [line for line in lines if line not in errors]
    assert not (others if alone else [line for line in others if not PROGRESS.match(line)]), err
    assert "Traceback" not in err, err
    for advice in TORCH_ADVICE:
        assert advice not in err, err
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def test_the_built_model_directories_load(built):
    """The hand-built directories are valid, so each refusal below is the bad file's doing."""
    assert load_exported(built / "cnn").fc.out_features == len(LABELS)
    model = HistogramForest.load(built / "baseline")
    assert sorted(p.name for p in (built / "baseline").iterdir()) == ["config.json", MODEL_FILE, "labels.json"]
    assert model.predict_proba(np.zeros((2, 78), np.float32)).shape == (2, 3)


# ---- --weights PATH: train and features -------------------------------------------------------

WEIGHT_CASES = [
    ("pickle", "refused by torch's safe loader"),
    ("torch-pickle", "it needs exec"),
    ("random", "not a PyTorch weights file"),
    ("truncated", "corrupt or truncated"),
    ("empty", "empty"),  # refused by the path checks before Ray, or by the loader
    ("other-arch", "does not fit this model"),
]


def _weights_argv(command: str, built: Path, weights: Path, out: Path, sqlite_uri: str) -> list[str]:
    if command == "train":
        return ["train", "--data", str(built / "planet"), "--arch", ARCH, "--weights", str(weights), "--epochs", "1",
                "--workers", "1", "--out", str(out), "--tracking-uri", sqlite_uri]
    return ["features", "--images", str(built / "planet" / "train-jpg"), "--arch", ARCH, "--weights", str(weights),
            "--out", str(out)]


@pytest.mark.parametrize("command", ["train", "features"])
@pytest.mark.parametrize("kind,reason", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weights_are_one_line_naming_the_file(ray_cluster, built, tmp_path, capsys, sqlite_uri, command, kind,
                                                   reason):
    marker = tmp_path / "marker"
    weights = tmp_path / "weights.pt"
    if kind == "other-arch":
        shutil.copy(built / "other_arch.pt", weights)
    else:
        write_bad(kind, weights, marker, good=built / "good.pt")
    out = tmp_path / "out"
    _refused(capsys, _weights_argv(command, built, weights, out, sqlite_uri), str(weights), reason, alone=False)
    assert not marker.exists()
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def test_weights_errors_as_functions(built, tmp_path):
    """The same through `build_model`, without Ray: one line, the file named, no torch advice."""
    for kind, reason in WEIGHT_CASES:
        marker, weights = tmp_path / f"marker_{kind}", tmp_path / f"{kind}.pt"
        if kind == "other-arch":
            shutil.copy(built / "other_arch.pt", weights)
        else:
            write_bad(kind, weights, marker, good=built / "good.pt")
        with pytest.raises(QdeepError) as err:
            build_model(ARCH, 3, weights=str(weights))
        message = str(err.value)
        assert "\n" not in message and str(weights) in message and reason in message, message
        assert not any(advice in message for advice in TORCH_ADVICE), message
        assert not marker.exists()
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(QdeepError, match="holds no state_dict .* but a list"):
        build_model(ARCH, 3, weights=str(tmp_path / "list.pt"))


def test_a_malicious_cached_imagenet_file_is_refused(tmp_path, monkeypatch):
    """torch.hub loads a cached ImageNet file with weights_only=False; qdeep's safe loader reads it first."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "marker"
    write_bad("torch-pickle", cached, marker)
    with pytest.raises(QdeepError) as err:
        build_model(ARCH, 3, weights="imagenet")
    message = str(err.value)
    assert "\n" not in message and str(cached) in message and "it needs exec" in message, message
    assert not marker.exists()


# ---- a CNN model directory for predict --------------------------------------------------------

CNN_CASES = [
    ("pickle", "model.pt", "refused by torch's safe loader"),
    ("torch-pickle", "model.pt", "it needs exec"),
    ("random", "model.pt", "not a PyTorch weights file"),
    ("truncated", "model.pt", "corrupt or truncated"),
    ("other-arch", "model.pt", "does not fit this model"),
    ("no-model", "", "no model.pt"),
    ("config-not-json", "config.json", "cannot read model config"),
    ("config-no-arch", "config.json", "names no arch"),
    ("config-unknown-arch", "config.json", "unknown arch"),
    ("no-config", "", "no config.json"),
    ("labels-not-json", "labels.json", "cannot read model labels"),
    ("labels-count", "labels.json", "4 labels, but the model predicts 3"),
]


def _predict(model_dir: Path, built: Path, tmp_path: Path) -> list[str]:
    return ["predict", "--model", str(model_dir), "--images", str(built / "planet" / "test-jpg"),
            "--out", str(tmp_path / "pred.csv")]


@pytest.mark.parametrize("kind,name,reason", CNN_CASES, ids=[c[0] for c in CNN_CASES])
def test_a_bad_cnn_model_directory_is_refused(built, tmp_path, capsys, no_ray, kind, name, reason):
    model_dir = _copy(built / "cnn", tmp_path / "model")
    marker = tmp_path / "marker"
    config = json.loads((model_dir / "config.json").read_text())
    if kind == "other-arch":
        torch.save(build_model(OTHER_ARCH, len(LABELS), "none", "none").state_dict(), model_dir / "model.pt")
    elif kind == "no-model":
        (model_dir / "model.pt").unlink()
    elif kind == "config-not-json":
        (model_dir / "config.json").write_text('{"kind": "cnn", "arch": ')
    elif kind == "config-no-arch":
        (model_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "arch"}))
    elif kind == "config-unknown-arch":
        (model_dir / "config.json").write_text(json.dumps({**config, "arch": "resnet19"}))
    elif kind == "no-config":
        (model_dir / "config.json").unlink()
    elif kind == "labels-not-json":
        (model_dir / "labels.json").write_bytes(b"\xff\xfe garbage")
    elif kind == "labels-count":
        MultiLabelTargets([*LABELS, "water"]).save(model_dir / "labels.json")
    else:
        write_bad(kind, model_dir / "model.pt", marker, good=built / "cnn" / "model.pt")
    _refused(capsys, _predict(model_dir, built, tmp_path), str(model_dir / name) if name else str(model_dir), reason)
    assert not marker.exists()
    assert not (tmp_path / "pred.csv").exists()


# ---- a baseline model directory for predict ---------------------------------------------------

def _out_of_bounds_tree(model_dir: Path) -> None:
    """A forest whose first tree's root points past its nodes (skops would load it; sklearn's
    predict would read outside the node array)."""
    model = HistogramForest.load(model_dir)
    tree = next(f for f in model.forests_ if not isinstance(f, float)).estimators_[0].tree_
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    nodes["left_child"][0] = 10**6
    tree.__setstate__({**state, "nodes": nodes})
    model.save(model_dir)


BASELINE_CASES = [
    ("pickle", MODEL_FILE, "not a skops file"),
    ("random", MODEL_FILE, "not a skops file"),
    ("truncated", MODEL_FILE, "not a skops file"),
    ("untrusted-type", MODEL_FILE, "types qdeep does not trust"),
    ("out-of-bounds-tree", MODEL_FILE, "out of bounds"),
    ("not-a-forest", MODEL_FILE, "not a RandomForestClassifier"),
    ("old-joblib", OLD_MODEL_FILE, "rerun `qdeep baseline`"),
    ("config-not-json", "config.json", "cannot read model config"),
    ("config-bad-params", "config.json", "`params` must hold"),
    ("thresholds-missing-label", "thresholds.json", "no number for haze"),
]


@pytest.mark.parametrize("kind,name,reason", BASELINE_CASES, ids=[c[0] for c in BASELINE_CASES])
def test_a_bad_baseline_model_directory_is_refused(built, tmp_path, capsys, no_ray, kind, name, reason):
    model_dir = _copy(built / "baseline", tmp_path / "model")
    marker = tmp_path / "marker"
    forests = model_dir / MODEL_FILE
    if kind == "untrusted-type":  # a skops file asking for a type whose construction runs code
        skops.io.dump([0.0, SkopsPayload(str(marker)), 1.0], forests)
    elif kind == "out-of-bounds-tree":
        _out_of_bounds_tree(model_dir)
    elif kind == "not-a-forest":
        skops.io.dump([0.0, {"n_estimators": 5}, 1.0], forests)
    elif kind == "old-joblib":  # a model dir of an earlier qdeep, its joblib file a malicious pickle
        forests.unlink()
        joblib.dump(Exec(_touch(marker)), model_dir / OLD_MODEL_FILE)
    elif kind == "config-not-json":
        (model_dir / "config.json").write_text("{")
    elif kind == "config-bad-params":
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, "params": {"n_estimators": "__import__"}}))
    elif kind == "thresholds-missing-label":
        (model_dir / "thresholds.json").write_text(json.dumps({"clear": 0.2, "cloudy": 0.3}))
    else:
        write_bad(kind, forests, marker, good=built / "baseline" / MODEL_FILE)
    line = _refused(capsys, _predict(model_dir, built, tmp_path), str(model_dir / name), reason)
    assert not marker.exists()
    assert not (tmp_path / "pred.csv").exists()
    if kind == "old-joblib":
        assert "safe format" in line


def test_a_good_baseline_model_directory_predicts(built, ray_cluster, tmp_path, capsys):
    """The control: the same hand-built directory, unchanged, predicts the 3 test images."""
    out = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(built / "baseline"), "--images", str(built / "planet" / "test-jpg"),
                 "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1 + 3
