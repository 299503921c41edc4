"""The installed `qdeep` entry point: help everywhere, one-line errors, tracebacks only with --debug.
None of these starts Ray: the whole module is the unit tier."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

QDEEP = str(Path(sys.executable).with_name("qdeep"))

pytestmark = pytest.mark.unit


def _run(*args, cwd=None):
    return subprocess.run([QDEEP, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


COMMANDS = ["synth", "pack", "baseline", "train", "tune", "ladder", "features", "deepcluster", "profile", "predict",
            "compare"]


def test_the_help_tests_cover_every_command():
    from qdeep.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert sorted(sub.choices) == sorted(COMMANDS), "a command without a --help test below"


def test_help_lists_every_command():
    r = _run("--help")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("usage: qdeep ") and "COMMAND ..." in r.stdout.splitlines()[0]
    for command in COMMANDS:
        assert re.search(rf"^ {{4}}{command} ", r.stdout, flags=re.MULTILINE), f"{command} missing from qdeep --help"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command(command):
    r = _run(command, "--help")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"usage: qdeep {command} [-h]"), r.stdout[:200]
    assert option_help(r.stdout, "-h") == "-h, --help show this help message and exit"


def option_help(text: str, flag: str) -> str:
    """One option's entry in argparse's help, its lines joined and spaces collapsed: the line that
    starts with `flag`, then the deeper-indented lines under it (long invocations put the help there)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\s{{2,4}}{re.escape(flag)}[ ,]|\s{{2,4}}{re.escape(flag)}$",
                                                                line))
    entry = [lines[start]]
    for line in lines[start + 1:]:
        if not line.strip() or len(line) - len(line.lstrip()) <= 4:
            break
        entry.append(line)
    return " ".join(" ".join(entry).split())


# Options generated from the run configurations' fields (qdeep/options.py add_fields): each shows the
# configuration's default; DeepCluster's training has defaults of its own (sgd, 1 epoch per iteration).
GENERATED = {
    "train": [("--epochs", "5"), ("--lr", "0.001"), ("--optimizer", "adamw"), ("--batch-size", "64")],
    "tune": [("--epochs", "5"), ("--num-samples", "1"), ("--scheduler", "asha"), ("--optimizer", "adamw")],
    "ladder": [("--lr", "0.001"), ("--epochs", "5"), ("--optimizer", "adamw")],
    "deepcluster": [("--lr", "0.001"), ("--epochs-per-iteration", "1"), ("--optimizer", "sgd"), ("--k", "5"),
                    ("--final-k", "20")],
}


@pytest.mark.parametrize("command", sorted(GENERATED))
def test_help_shows_the_defaults_of_the_generated_options(command):
    r = _run(command, "--help")
    assert r.returncode == 0, r.stderr
    for flag, default in GENERATED[command]:
        entry = option_help(r.stdout, flag)
        assert entry.endswith(f"(default {default})"), (flag, entry)


def test_synth_writes_a_planet_layout(tmp_path):
    r = _run("synth", "--out", str(tmp_path / "s"), "--n", "20", "--size", "32", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s" / "train-jpg").glob("*.jpg"))) == 20
    assert (tmp_path / "s" / "train_v2.csv").read_text().startswith("image_name,tags\n")
    r = _run("synth", "--out", str(tmp_path / "s4"), "--n", "3", "--n-test", "1", "--size", "16", "--bands", "4")
    assert r.returncode == 0 and "(JPEGs and 4-band GeoTIFFs)" in r.stdout, r.stderr
    assert len(list((tmp_path / "s4" / "train-tif-v2").glob("*.tif"))) == 3
    r = _run("synth", "--out", str(tmp_path / "m"), "--multiclass", "--bands", "4")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "qdeep: error: --bands 4 writes the Planet layout's GeoTIFFs; leave out --multiclass"]
    assert not (tmp_path / "m").exists()


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


def test_profile_needs_a_finished_deepcluster_run(tmp_path):
    r = _run("profile", "--out", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"qdeep: error: {tmp_path} holds no finished DeepCluster run (no metrics.json): run qdeep deepcluster first"]
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_predict_rejects_a_folder_that_is_not_a_model(tmp_path):
    r = _run("predict", "--model", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "s.csv"))
    assert r.returncode == 2 and "not a qdeep model directory" in r.stderr


def test_one_line_finds_the_cause_inside_a_ray_worker_report():
    from qdeep.cli import one_line

    report = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent"
                          " call last):\n  File \"w.py\", line 3\nqdeep.errors.QdeepError: weights file not found: x.pt\n")
    assert one_line(report) == "qdeep.errors.QdeepError: weights file not found: x.pt"
    assert one_line(ValueError("plain message\nmore")) == "ValueError: plain message"
