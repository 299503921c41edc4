"""CNN training on a real local Ray: 2 CPU DDP workers, checkpoints, a killed worker, resume."""

import csv
import json

import mlflow
import pytest

from qdeep.cli import main

pytestmark = pytest.mark.ray  # Ray Train runs: `make test-fast` (the unit tier) leaves this module out

# A small model at a small input size keeps each run to seconds on 2 cores.
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--loader-workers", "0",
        "--warmup-steps", "2", "--lr", "3e-3"]


def _train(planet_dir, out, sqlite_uri, *extra):
    """`qdeep train` with the tests' worker callbacks (tests/plugins/qdeep_test_hooks.py)."""
    return main(["--plugin", "qdeep_test_hooks", "train", "--data", str(planet_dir), "--out", str(out), "--tracking-uri", sqlite_uri,
                 "--workers", "2", *TINY, *extra])


def _metric_steps(sqlite_uri, run_id, key):
    mlflow.set_tracking_uri(sqlite_uri)
    return [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


def test_two_worker_ddp_run_then_predict(planet_dir, ray_cluster, tmp_path, sqlite_uri):
    out = tmp_path / "out"
    assert _train(planet_dir, out, sqlite_uri, "--epochs", "2") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_completed"] == 2 and m["restarts"] == 0
    assert [h["epoch"] for h in m["history"]] == [0, 1]
    assert all(h["ranks_in_sync"] == 1.0 for h in m["history"])  # both ranks hold identical weights
    assert 0 < m["val_f2"] <= 1 and len(m["per_label_f2"]) == len(m["thresholds"]) == 17
    assert m["n_train"] + m["n_val"] == 240
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "config.json", "labels.json", "model.pt", "thresholds.json"]

    mlflow.set_tracking_uri(sqlite_uri)
    runs = mlflow.search_runs(experiment_names=["qdeep"], output_format="list")
    assert [r.info.run_id for r in runs] == [m["mlflow_run_id"]]  # one run, none from other ranks
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["arch"] == "resnet18"
    assert _metric_steps(sqlite_uri, run.info.run_id, "val_f2") == [0, 1]
    for key in ("train_loss", "val_loss", "lr", "images_per_s"):
        assert key in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.json", "per_label_f2.png", "model"} <= artifacts

    submission = tmp_path / "sub.csv"
    assert main(["predict", "--model", str(out / "model"), "--data", str(planet_dir), "--out", str(submission),
                 "--tta"]) == 0
    rows = list(csv.reader(open(submission)))
    sample = list(csv.reader(open(planet_dir / "sample_submission_v2.csv")))
    assert rows[0] == ["image_name", "tags"] and [r[0] for r in rows[1:]] == [r[0] for r in sample[1:]]
    vocab = set(json.loads((out / "model" / "labels.json").read_text())["labels"])
    assert all(set(r[1].split()) <= vocab for r in rows[1:])


def test_killed_worker_restarts_from_the_last_checkpoint(planet_dir, ray_cluster, tmp_path, sqlite_uri, crash_once):
    marker = tmp_path / "crashed"
    crash_once(rank=1, at=2, marker=marker)  # rank 1 exits hard at the start of epoch 2, once
    out = tmp_path / "out"
    assert _train(planet_dir, out, sqlite_uri, "--epochs", "3", "--max-failures", "1") == 0
    assert marker.exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["restarts"] == 1 and m["epochs_completed"] == 3
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2]
    steps = _metric_steps(sqlite_uri, m["mlflow_run_id"], "epoch_seconds")
    assert sorted(set(steps)) == [0, 1, 2] and len(steps) <= 4  # at most one epoch ran twice


def test_rerun_with_the_same_name_resumes(planet_dir, ray_cluster, tmp_path, sqlite_uri, crash_once, capsys):
    crash_once(rank=0, at=1, marker=tmp_path / "crashed")  # the first launch dies in epoch 1, no retries
    out = tmp_path / "out"
    assert _train(planet_dir, out, sqlite_uri, "--epochs", "3", "--name", "resume-me") != 0
    assert not (out / "metrics.json").exists()
    capsys.readouterr()
    assert _train(planet_dir, out, sqlite_uri, "--epochs", "3", "--name", "resume-me") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2] and m["restarts"] == 0
    # The second launch trained only the epochs the first one had not finished.
    assert _metric_steps(sqlite_uri, m["mlflow_run_id"], "val_f2") == [1, 2]


def test_a_name_cannot_be_resumed_with_other_settings(planet_dir, ray_cluster, tmp_path, sqlite_uri, capsys):
    from qdeep.distributed.driver import claim_run

    claim_run(str(tmp_path / "runs"), "r", {"arch": "resnet18", "lr": 0.001})
    claim_run(str(tmp_path / "runs"), "r", {"arch": "resnet18", "lr": 0.001})  # same settings: resume
    out = tmp_path / "out"
    code = _train(planet_dir, out, sqlite_uri, "--epochs", "1", "--storage-path", str(tmp_path / "runs"),
                  "--name", "r")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "run 'r'" in err and "different settings (" in err
    assert "lr" in err and "arch" not in err  # names what changed, only that


def test_ctrl_c_during_training_says_interrupted_and_exits_130(planet_dir, ray_cluster, tmp_path, sqlite_uri):
    """Ray Train's own SIGINT handler aborts the run (and may exit the process itself); the command
    still prints `qdeep: interrupted` and exits 130, and a rerun of the name resumes."""
    from conftest import interrupt_when

    out = tmp_path / "out"
    argv = ["train", "--data", str(planet_dir), "--out", str(out), "--tracking-uri", sqlite_uri, "--workers", "2",
            *TINY, "--epochs", "5", "--name", "stop-me",
            "--address", ray_cluster.get_runtime_context().gcs_address]
    runs = out / "ray_results" / "stop-me"
    interrupt_when(argv, lambda: bool(list(runs.glob("checkpoint_*"))))  # Ctrl+C once epoch 0 is saved
    assert not (out / "metrics.json").exists()
