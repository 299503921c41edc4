"""The bad-input battery (issue 18): each case builds one bad input on tiny synthetic data, runs
`qdeep.cli.main`, and checks the exit code, that the error is one line naming the option, file or
CSV line, and that nothing was written where it should not be. Options and paths are refused before
Ray starts (a guard fails the case if it starts); the few cases that decode images use the session's Ray.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qdeep.cli import main
from qdeep.data.synth import write_synthetic_classes, write_synthetic_planet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """12 training and 3 test images of 16 px, Planet layout; cases copy what they change."""
    root = tmp_path_factory.mktemp("tiny")
    write_synthetic_planet(root / "planet", n=12, size=16, seed=0, n_test=3)
    write_synthetic_classes(root / "scenes", n_per_class=2, size=16, seed=0)
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _error_line(capsys, alone: bool = True) -> str:
    """The command's one error line, the only one saying `qdeep: error:`; `alone`: all of stderr
    (commands that ran Ray may also have shown progress bars and Ray's log lines)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "qdeep: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("qdeep: error: "), err
    if alone:
        assert lines == errors, err
    return errors[0]


def _refused(capsys, argv, *fragments, code=2, alone=True) -> str:
    assert main(argv) == code
    line = _error_line(capsys, alone)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


# ---- 1. options: refused by the parser, one line saying what is allowed, nothing written ----

def _commands(tmp: Path) -> dict[str, list[str]]:
    """A minimal, otherwise valid command line of each command (paths need not exist: options come first)."""
    data, out = str(tmp / "data"), str(tmp / "out")
    return {
        "synth": ["synth", "--out", out],
        "baseline": ["baseline", "--data", data, "--out", out],
        "train": ["train", "--data", data, "--out", out],
        "tune": ["tune", "--data", data, "--out", out],
        "ladder": ["ladder", "--data", data, "--out", out],
        "features": ["features", "--images", data, "--out", out],
        "deepcluster": ["deepcluster", "--images", data, "--out", out],
        "predict": ["predict", "--model", data, "--images", data, "--out", str(tmp / "out.csv")],
    }


BAD_OPTIONS = [
    ("baseline", "--folds", "0", "an integer >= 2"),
    ("baseline", "--folds", "-1", "an integer >= 2"),
    ("baseline", "--folds", "1", "an integer >= 2"),
    ("baseline", "--folds", "two", "an integer >= 2"),
    ("baseline", "--trees", "0", "an integer >= 1"),
    ("baseline", "--seed", "-1", "an integer from 0 to"),
    ("baseline", "--on-bad-image", "ignore", "invalid choice"),
    ("baseline", "--encoding", "klingon", "codec"),
    ("train", "--epochs", "0", "an integer >= 1"),
    ("train", "--image-size", "0", "an integer >= 1"),
    ("train", "--image-size", "-5", "an integer >= 1"),
    ("train", "--batch-size", "0", "an integer >= 1"),
    ("train", "--workers", "0", "1 <= MIN <= MAX"),
    ("train", "--workers", "3-1", "1 <= MIN <= MAX"),
    ("train", "--lr", "0", "a learning rate > 0"),
    ("train", "--lr", "-1e-3", "a learning rate > 0"),
    ("train", "--lr", "nan", "a learning rate > 0"),
    ("train", "--val-fraction", "0", "strictly between 0 and 1"),
    ("train", "--val-fraction", "1", "strictly between 0 and 1"),
    ("train", "--val-fraction", "1.5", "strictly between 0 and 1"),
    ("train", "--crop", "1", "a fraction from 0 up to"),
    ("train", "--min-lr-factor", "2", "a fraction from 0 to 1"),
    ("train", "--warmup-steps", "-1", "an integer >= 0"),
    ("train", "--loader-workers", "-1", "an integer >= 0"),
    ("train", "--head-epochs", "0", "a number > 0"),
    ("train", "--finetune-lr-factor", "0", "a number > 0"),
    ("train", "--discriminative-lr", "-1", "a number > 0"),
    ("train", "--max-failures", "-1", "an integer >= 0"),
    ("train", "--freeze", "last:0", "head, none or last:N"),
    ("train", "--freeze", "everything", "head, none or last:N"),
    ("train", "--name", "../elsewhere", "without '/'"),
    ("train", "--optimizer", "adam", "invalid choice"),
    ("train", "--gpu", "maybe", "invalid choice"),
    ("tune", "--lr", "1e-3,0", "a learning rate > 0"),
    ("tune", "--lr", ",", "a comma-separated list"),
    ("tune", "--freeze", "head,last:x", "head, none or last:N"),
    ("tune", "--num-samples", "0", "an integer >= 1"),
    ("tune", "--reduction-factor", "1", "an integer >= 2"),
    ("tune", "--grace-period", "0", "an integer >= 1"),
    ("tune", "--workers-per-trial", "0", "an integer >= 1"),
    ("tune", "--gpus-per-trial", "-1", "a number >= 0"),
    ("ladder", "--workers", "0", "an integer >= 1"),
    ("ladder", "--trees", "0", "an integer >= 1"),
    ("features", "--image-size", "-5", "an integer >= 1"),
    ("features", "--batch-size", "0", "an integer >= 1"),
    ("features", "--rows-per-shard", "0", "an integer >= 1"),
    ("deepcluster", "--k", "1", "an integer >= 2"),
    ("deepcluster", "--final-k", "1", "an integer >= 2"),
    ("deepcluster", "--iterations", "-1", "an integer >= 0"),
    ("deepcluster", "--epochs-per-iteration", "0", "an integer >= 1"),
    ("deepcluster", "--ctrl-fraction", "0", "strictly between 0 and 1"),
    ("deepcluster", "--pca", "0", "an integer >= 1"),
    ("deepcluster", "--workers", "a", "N or MIN-MAX"),
    ("deepcluster", "--lr", "0", "a learning rate > 0"),
    ("synth", "--n", "0", "an integer >= 1"),
    ("synth", "--size", "4", "an integer >= 8"),
    ("predict", "--on-bad-image", "maybe", "invalid choice"),
]


@pytest.mark.parametrize("command, option, value, allowed", BAD_OPTIONS,
                         ids=[f"{c}{o}={v}" for c, o, v, _ in BAD_OPTIONS])
def test_a_bad_option_is_refused_by_the_parser(tmp_path, capsys, monkeypatch, no_ray, command, option, value,
                                               allowed):
    monkeypatch.chdir(tmp_path)
    argv = [*_commands(tmp_path)[command], f"{option}={value}"]
    line = _refused(capsys, argv, option, allowed, f"qdeep {command} --help")
    if allowed != "invalid choice":  # the value (or the bad item of a list) is quoted after the option
        assert re.search(rf"error: {option} '[^']*': (expected|need) ", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no --out, no mlflow.db


def test_a_missing_required_option_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["baseline", "--data", "d"], "required", "--out")
    _refused(capsys, ["baseline", "--data", "d", "--out", "o", "--no-such-option"], "unrecognized", "--no-such-option")
    assert list(tmp_path.iterdir()) == []


def test_more_folds_than_images_is_refused_once_the_rows_are_known(tiny, tmp_path, capsys, no_ray):
    out = tmp_path / "out"
    _refused(capsys, ["baseline", "--data", str(tiny / "planet"), "--out", str(out), "--folds", "1000"],
             "--folds 1000", "more folds than the 12")
    assert not out.exists()


# ---- 2. paths: checked before Ray starts, one line naming the option and the path ----

def _file(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


PATH_CASES = {
    # name: (build(tiny, tmp) -> (argv, fragments), what must stay untouched: a path relative to tmp)
    "baseline-out-under-a-file": lambda t, d: (
        ["baseline", "--data", str(t / "planet"), "--out", str(_file(d / "f") / "out")], ["--out", "is a file"]),
    "baseline-out-is-a-file": lambda t, d: (
        ["baseline", "--data", str(t / "planet"), "--out", str(_file(d / "f"))], ["--out", "not a directory"]),
    "train-out-under-a-file": lambda t, d: (
        ["train", "--data", str(t / "planet"), "--out", str(_file(d / "f") / "o")], ["--out", "is a file"]),
    "train-out-is-a-file": lambda t, d: (
        ["train", "--data", str(t / "planet"), "--out", str(_file(d / "f"))], ["--out", "not a directory"]),
    "train-storage-path-under-a-file": lambda t, d: (
        ["train", "--data", str(t / "planet"), "--out", str(d / "o"), "--storage-path", str(_file(d / "f") / "r")],
        ["--storage-path", "is a file"]),
    "features-out-under-a-file": lambda t, d: (
        ["features", "--images", str(t / "scenes"), "--out", str(_file(d / "f") / "s")], ["--out", "is a file"]),
    "features-out-is-a-file": lambda t, d: (
        ["features", "--images", str(t / "scenes"), "--out", str(_file(d / "f"))], ["--out", "not a directory"]),
    "predict-out-under-a-file": lambda t, d: (
        ["predict", "--model", str(_model(d)), "--images", str(t / "scenes"), "--out", str(_file(d / "f") / "p.csv")],
        ["--out", "is a file"]),
    "predict-out-is-a-directory": lambda t, d: (
        ["predict", "--model", str(_model(d)), "--images", str(t / "scenes"), "--out", str(d)],
        ["--out", "is a directory"]),
    "synth-out-is-a-file": lambda t, d: (["synth", "--out", str(_file(d / "f")), "--n", "2"], ["--out"]),
    "train-out-is-the-images": lambda t, d: (
        ["train", "--images", str(_copy(t / "scenes", d / "scenes")), "--out", str(d / "scenes")],
        ["--out", "inside the input data", "--images"]),
    "train-out-inside-the-images": lambda t, d: (
        ["train", "--images", str(_copy(t / "scenes", d / "scenes")), "--out", str(d / "scenes" / "results")],
        ["--out", "inside the input data"]),
    "baseline-out-inside-the-data": lambda t, d: (
        ["baseline", "--data", str(_copy(t / "planet", d / "planet")), "--out", str(d / "planet" / "train-jpg" / "o")],
        ["--out", "inside the input data", "--data"]),
    "features-out-inside-the-images": lambda t, d: (
        ["features", "--images", str(_copy(t / "scenes", d / "scenes")), "--out", str(d / "scenes" / "store")],
        ["--out", "inside the input data"]),
    "deepcluster-out-inside-the-images": lambda t, d: (
        ["deepcluster", "--images", str(_copy(t / "scenes", d / "scenes")), "--out", str(d / "scenes")],
        ["--out", "inside the input data"]),
    "predict-out-inside-the-images": lambda t, d: (
        ["predict", "--model", str(_model(d)), "--images", str(_copy(t / "scenes", d / "scenes")),
         "--out", str(d / "scenes" / "p.csv")], ["--out", "inside the input data"]),
    "features-empty-folder": lambda t, d: (
        ["features", "--images", str(_mkdir(d / "empty")), "--out", str(d / "s")], ["--images", "empty directory"]),
    "features-folder-without-images": lambda t, d: (
        ["features", "--images", str(_file(d / "docs" / "a.txt").parent), "--out", str(d / "s")],
        ["--images", "no images"]),
    "features-missing-folder": lambda t, d: (
        ["features", "--images", str(d / "nope"), "--out", str(d / "s")], ["--images", "no such directory"]),
    "features-images-is-a-file": lambda t, d: (
        ["features", "--images", str(_file(d / "a.jpg")), "--out", str(d / "s")], ["--images", "not a directory"]),
    "deepcluster-empty-folder": lambda t, d: (
        ["deepcluster", "--images", str(_mkdir(d / "empty")), "--out", str(d / "o")], ["--images", "empty directory"]),
    "baseline-missing-data": lambda t, d: (
        ["baseline", "--data", str(d / "nope"), "--out", str(d / "o")], ["--data", "no such directory"]),
    "train-data-without-csv": lambda t, d: (
        ["train", "--data", str(_file(d / "planet" / "x.txt").parent), "--out", str(d / "o")],
        ["--data", "no train_v2.csv"]),
    "train-labels-missing": lambda t, d: (
        ["train", "--labels", str(d / "l.csv"), "--images", str(t / "scenes"), "--out", str(d / "o")],
        ["--labels", "no such file"]),
    "train-labels-is-a-folder": lambda t, d: (
        ["train", "--labels", str(t / "scenes"), "--images", str(t / "scenes"), "--out", str(d / "o")],
        ["--labels", "is a directory"]),
    "train-labels-empty-file": lambda t, d: (
        ["train", "--labels", str(_file(d / "l.csv", "")), "--images", str(t / "scenes"), "--out", str(d / "o")],
        ["--labels", "empty file"]),
    "train-weights-missing": lambda t, d: (
        ["train", "--data", str(t / "planet"), "--weights", str(d / "w.pt"), "--out", str(d / "o")],
        ["--weights", "no such file"]),
    "features-weights-empty": lambda t, d: (
        ["features", "--images", str(t / "scenes"), "--weights", str(_file(d / "w.pt", "")), "--out", str(d / "s")],
        ["--weights", "empty file"]),
    "deepcluster-weights-is-a-folder": lambda t, d: (
        ["deepcluster", "--images", str(t / "scenes"), "--weights", str(_mkdir(d / "w")), "--out", str(d / "o")],
        ["--weights", "is a directory"]),
    "tune-space-missing": lambda t, d: (
        ["tune", "--data", str(t / "planet"), "--space", str(d / "s.yaml"), "--out", str(d / "o")],
        ["--space", "no such file"]),
    "predict-model-missing": lambda t, d: (
        ["predict", "--model", str(d / "m"), "--images", str(t / "scenes"), "--out", str(d / "p.csv")],
        ["--model", "no such directory"]),
    "predict-model-not-a-model": lambda t, d: (
        ["predict", "--model", str(_mkdir(d / "m")), "--images", str(t / "scenes"), "--out", str(d / "p.csv")],
        ["--model", "not a qdeep model directory"]),
    "predict-data-without-test-images": lambda t, d: (
        ["predict", "--model", str(_model(d)), "--data", str(_file(d / "planet" / "train_v2.csv").parent),
         "--out", str(d / "p.csv")], ["--data", "test-jpg"]),
}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _model(tmp: Path) -> Path:
    """A folder that passes the up-front model check (config.json); never loaded by these cases."""
    model = tmp / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"kind": "histogram_rf"}))
    return model


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_a_bad_path_is_refused_before_ray_starts(tiny, tmp_path, capsys, monkeypatch, no_ray, case):
    work = _mkdir(tmp_path / "work")
    argv, fragments = PATH_CASES[case](tiny, work)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(work)
    _refused(capsys, [*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"] if _tracks(argv) else argv,
             *fragments)
    assert _snapshot(work) == before, "the refused command wrote something"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no mlflow.db, no mlartifacts


def _tracks(argv: list[str]) -> bool:
    return argv[0] in ("baseline", "train", "tune", "ladder", "deepcluster")


# ---- 3. CSVs and images ----

def _planet_copy(tiny: Path, tmp: Path) -> Path:
    return _copy(tiny / "planet", tmp / "planet")


def test_a_latin1_csv_names_the_file_and_line(tiny, tmp_path, capsys, no_ray):
    data = _planet_copy(tiny, tmp_path)
    csv = data / "train_v2.csv"
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].replace(",", ",clear_\u00e9t\u00e9 ", 1)  # line 4 gets a Latin-1 tag
    csv.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    _refused(capsys, ["baseline", "--data", str(data), "--out", str(tmp_path / "o")],
             f"{csv}:4: not utf-8 text", "byte 0xe9", "--encoding")
    assert not (tmp_path / "o").exists()
    # --encoding latin-1 reads it: the command gets past the CSV (and stops at --folds, before Ray)
    _refused(capsys, ["baseline", "--data", str(data), "--out", str(tmp_path / "o"), "--encoding", "latin-1",
                      "--folds", "99"], "--folds 99: more folds than the 12")


def test_a_tag_holding_the_delimiter_names_the_line(tiny, tmp_path, capsys, no_ray):
    data = _planet_copy(tiny, tmp_path)
    csv = data / "train_v2.csv"
    lines = csv.read_text().splitlines()
    name = lines[2].split(",")[0]
    lines[2] = f'{name},"clear,primary"'
    csv.write_text("\n".join(lines) + "\n")
    _refused(capsys, ["baseline", "--data", str(data), "--out", str(tmp_path / "o")],
             f"{csv}:3: tag 'clear,primary' contains the delimiter ','")
    assert not (tmp_path / "o").exists()


def test_a_missing_image_named_in_the_csv(tiny, tmp_path, capsys, no_ray):
    data = _planet_copy(tiny, tmp_path)
    (data / "train-jpg" / "train_4.jpg").unlink()
    line = _refused(capsys, ["baseline", "--data", str(data), "--out", str(tmp_path / "o")],
                    "train_v2.csv:", "image 'train_4' not found")
    assert "--on-bad-image skip" in line and not (tmp_path / "o").exists()


def test_a_duplicate_row_and_an_image_without_row(tiny, tmp_path, capsys, no_ray):
    data = _planet_copy(tiny, tmp_path)
    csv = data / "train_v2.csv"
    csv.write_text(csv.read_text() + "train_0,water\n")
    _refused(capsys, ["baseline", "--data", str(data), "--out", str(tmp_path / "o")],
             "train_v2.csv:14: duplicate image_name 'train_0'")
    csv.write_text("\n".join(csv.read_text().splitlines()[:-1]) + "\n")
    Image.new("RGB", (16, 16)).save(data / "train-jpg" / "stray.jpg")
    _refused(capsys, ["baseline", "--data", str(data), "--out", str(tmp_path / "o")], "stray.jpg: image has no row")


def test_path_traversal_in_image_name_is_not_followed(tiny, tmp_path, capsys, no_ray):
    data = _planet_copy(tiny, tmp_path)
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.jpg")
    csv = data / "train_v2.csv"
    csv.write_text(csv.read_text() + "../../outside,clear\n")
    _refused(capsys, ["baseline", "--data", str(data), "--out", str(tmp_path / "o")],
             "train_v2.csv:14: image '../../outside' not found")


def _truncate(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])


def test_a_truncated_jpeg_names_the_file_and_its_csv_line(ray_cluster, tiny, tmp_path, capsys):
    data = _planet_copy(tiny, tmp_path)
    _truncate(data / "train-jpg" / "train_2.jpg")
    out = tmp_path / "o"
    _refused(capsys, ["baseline", "--data", str(data), "--out", str(out), "--tracking-uri",
                      f"sqlite:///{tmp_path / 'm.db'}"],
             "train_2.jpg: cannot decode image", "named on ", "train_v2.csv:4", alone=False)
    assert not out.exists()


def test_a_truncated_jpeg_is_skipped_and_counted(ray_cluster, tiny, tmp_path, capsys):
    data = _planet_copy(tiny, tmp_path)
    _truncate(data / "train-jpg" / "train_2.jpg")
    out = tmp_path / "o"
    assert main(["baseline", "--data", str(data), "--out", str(out), "--folds", "2", "--trees", "3",
                 "--on-bad-image", "skip", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_skipped"] == 1 and metrics["n_images"] == 11
    assert metrics["skipped"][0]["file"].endswith("train_2.jpg") and "train_v2.csv:4" in metrics["skipped"][0]["reason"]


def test_an_unforeseen_filesystem_error_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    """Filesystem errors the up-front checks cannot foresee still come out as one line naming the path."""
    import qdeep.cli

    def fails(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "o" / "metrics.json"))

    monkeypatch.setattr(qdeep.cli.commands, "cmd_synth", fails)  # build_parser binds it when main calls it
    _refused(capsys, ["synth", "--out", str(tmp_path / "o")], f"{tmp_path / 'o' / 'metrics.json'}: Permission denied")
