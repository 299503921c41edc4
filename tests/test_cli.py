"""The installed `qdeep` entry point: help everywhere, one-line errors, tracebacks only with --debug."""

import subprocess
import sys
from pathlib import Path

import pytest

QDEEP = str(Path(sys.executable).with_name("qdeep"))


def _run(*args, cwd=None):
    return subprocess.run([QDEEP, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("command", [[], ["synth"], ["baseline"], ["predict"]])
def test_help(command):
    r = _run(*command, "--help")
    assert r.returncode == 0 and "usage: qdeep" in r.stdout


def test_synth_writes_a_planet_layout(tmp_path):
    r = _run("synth", "--out", str(tmp_path / "s"), "--n", "20", "--size", "32", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s" / "train-jpg").glob("*.jpg"))) == 20
    assert (tmp_path / "s" / "train_v2.csv").read_text().startswith("image_name,tags\n")


def test_bad_input_is_one_line_without_traceback(tmp_path):
    (tmp_path / "d" / "train-jpg").mkdir(parents=True)
    (tmp_path / "d" / "train_v2.csv").write_text("image_name,tags\ntrain_0,clear,primary\n")
    r = _run("baseline", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("qdeep: error: ") and "train_v2.csv:2: malformed row" in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "mlflow.db").exists()


def test_debug_shows_the_traceback(tmp_path):
    r = _run("--debug", "baseline", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" in r.stderr and "--data" in r.stderr and "no such directory" in r.stderr


def test_a_bad_option_is_one_line_before_anything_starts(tmp_path):
    r = _run("baseline", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--folds", "1", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["qdeep: error: --folds '1': expected an integer >= 2 (see 'qdeep baseline --help')"]
    assert list(tmp_path.iterdir()) == []


def test_predict_rejects_a_folder_that_is_not_a_model(tmp_path):
    r = _run("predict", "--model", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "s.csv"))
    assert r.returncode == 2 and "not a qdeep model directory" in r.stderr


def test_one_line_finds_the_cause_inside_a_ray_worker_report():
    from qdeep.cli import one_line

    report = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent"
                          " call last):\n  File \"w.py\", line 3\nqdeep.errors.QdeepError: weights file not found: x.pt\n")
    assert one_line(report) == "qdeep.errors.QdeepError: weights file not found: x.pt"
    assert one_line(ValueError("plain message\nmore")) == "ValueError: plain message"
