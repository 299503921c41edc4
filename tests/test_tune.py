"""Ray Tune sweeps and the experiment ladder on a real local Ray, with a real MLflow store."""

import csv

import mlflow
import pytest
from conftest import interrupt_when

from qdeep import io
from qdeep.cli import main

SMALL = ["--image-size", "32", "--batch-size", "16", "--loader-workers", "0", "--warmup-steps", "2"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _children(uri, parent_id):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["qdeep"], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def _parents(uri):
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["qdeep"], output_format="list")
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_sweep_of_two_archs_by_two_freeze_depths(planet_dir, ray_cluster, s3_bucket, sqlite_uri):
    """Into a bucket: the report there, and the trials' checkpoints in OUT/ray_results there."""
    uri = f"{s3_bucket}/out"
    assert main(["tune", "--data", str(planet_dir), "--archs", "resnet18,efficientnet_lite0", "--freeze", "head,none",
                 "--lr", "3e-3", "--epochs", "1", "--scheduler", "none", "--out", uri,
                 "--tracking-uri", sqlite_uri, *SMALL]) == 0
    with io.local_copy(uri) as out:
        _check_sweep(out, sqlite_uri)


def _open_report(out, screenshot: str, plots: list[str]) -> dict:
    """OUT/report.html in Chromium: its plots, all loaded, nothing fetched."""
    from browser import open_report

    page = open_report(out / "report.html", screenshot)
    assert [i["alt"] for i in page["images"]] == plots and all(i["loaded"] for i in page["images"])
    assert page["requests"] == []
    return page


def _check_sweep(out, sqlite_uri):
    assert len({p.parent for p in (out / "ray_results").glob("sweep-*/checkpoint_*")}) == 4  # each trial's
    rows = _rows(out / "results.csv")
    assert len(rows) == 4
    archs = ("resnet18", "efficientnet_lite0")
    assert {(r["arch"], r["freeze"]) for r in rows} == {(a, f) for a in archs for f in ("head", "none")}
    assert all(r["status"] == "completed" and 0 < float(r["val_f2"]) <= 1 and r["epochs"] == "1" for r in rows)
    assert [float(r["val_f2"]) for r in rows] == sorted((float(r["val_f2"]) for r in rows), reverse=True)
    assert "Best:" in (out / "report.md").read_text()
    page = _open_report(out, "tune_report.png", ["best score per arch and freeze depth", "per-label scores of every trial"])
    assert page["headings"] == ["Trials", "Settings"] and all(r["trial_id"] in page["text"] for r in rows)
    assert (out / "ladder.png").stat().st_size > 0 and (out / "per_label.png").stat().st_size > 0
    parents = _parents(sqlite_uri)
    assert len(parents) == 1
    assert "report.html" in {a.path for a in mlflow.MlflowClient().list_artifacts(parents[0].info.run_id)}
    children = _children(sqlite_uri, parents[0].info.run_id)
    assert len(children) == 4  # exactly one per trial, none from workers
    assert all(c.info.status == "FINISHED" and "val_f2" in c.data.metrics for c in children)
    assert {c.data.params["arch"] for c in children} == set(archs)


def test_asha_stops_clearly_worse_trials_early(planet_dir, ray_cluster, tmp_path, sqlite_uri):
    out = tmp_path / "out"
    # lr 1e-9 cannot learn (an lr of 0 is refused): over the bundled backbone, frozen, that trial keeps
    # its initial F2 (0.678 in every epoch of a probe: about every tag guessed). The good trial's head,
    # trained at 3e-2 (run first), measured 0.752, 0.780, 0.816 in that probe. The rung after epoch 2
    # leaves a margin of 0.1 (a sweep from scratch left 0.08 at best and once none in CI), and the sweep's
    # 3rd epoch is what the bad trial never trains.
    assert main(["tune", "--data", str(planet_dir), "--archs", "efficientnet_lite0", "--weights", "bundled",
                 "--freeze", "head", "--lr", "3e-2,1e-9", "--epochs", "3", "--grace-period", "2",
                 "--reduction-factor", "2", "--max-concurrent", "1", "--out", str(out),
                 "--tracking-uri", sqlite_uri, *SMALL]) == 0
    rows = _rows(out / "results.csv")
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert len(rows) == 2 and [float(r["lr"]) for r in stopped] == [1e-9] and int(stopped[0]["epochs"]) < 3
    statuses = {c.data.tags["qdeep_status"]: c.info.status for c in _children(sqlite_uri, _parents(sqlite_uri)[0].info.run_id)}
    assert statuses["stopped"] == "KILLED"


def test_interrupted_sweep_resumes_without_redoing_finished_trials(planet_dir, ray_cluster, tmp_path, sqlite_uri,
                                                                   monkeypatch):
    """Also: a trial's driver asks for the head's own resource (never a spot GPU node's), Tune retries
    a failed trial, and a relative --weights PATH is the caller's, though a trial runs in a directory
    of its own."""
    import torch
    from ray.tune import ExperimentAnalysis

    from qdeep.distributed.tune import HEAD_RESOURCE, TRIAL_CPU
    from qdeep.models import build_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    torch.save(build_model("resnet18", 17, "none", "none").state_dict(), tmp_path / "w" / "r18.pt")
    out = tmp_path / "out"
    argv = ["tune", "--data", str(planet_dir), "--archs", "resnet18", "--weights", "w/r18.pt", "--freeze", "head,none",
            "--lr", "3e-3", "--epochs", "1", "--scheduler", "none", "--max-concurrent", "1", "--out", str(out),
            "--name", "again", "--tracking-uri", sqlite_uri, "--address", ray_cluster.get_runtime_context().gcs_address,
            *SMALL]
    runs = out / "ray_results"
    # Ctrl+C as soon as the first trial has its checkpoint, i.e. has finished
    interrupt_when(argv, lambda: bool(list(runs.glob("again-*/checkpoint_*"))))
    finished_before = {p.parent.name: sorted(c.name for c in p.parent.glob("checkpoint_*"))
                       for p in runs.glob("again-*/checkpoint_*")}
    assert len(finished_before) == 1 and not (out / "results.csv").exists()

    assert main(argv[:-len(SMALL) - 2] + SMALL) == 0  # same name, in-process this time
    rows = _rows(out / "results.csv")
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    assert {r["weights"] for r in rows} == {str(tmp_path / "w" / "r18.pt")}
    for trial_dir, checkpoints in finished_before.items():  # finished trials were not trained again
        assert sorted(c.name for c in (runs / trial_dir).glob("checkpoint_*")) == checkpoints
    parents = _parents(sqlite_uri)
    assert len(parents) == 1 and len(_children(sqlite_uri, parents[0].info.run_id)) == 2
    for trial in ExperimentAnalysis(str(runs / "again")).trials:
        (bundle,) = trial.placement_group_factory.bundles
        assert bundle[HEAD_RESOURCE] > 0 and bundle["CPU"] == TRIAL_CPU and trial.max_failures == 2
    assert HEAD_RESOURCE in ray_cluster.nodes()[0]["Resources"]  # the head has it: the trial could run


def test_ladder_writes_the_four_rungs(planet_dir, ray_cluster, s3_bucket, sqlite_uri, capsys):
    """From a pack in a bucket into the bucket: the rungs' outputs and checkpoints there, the
    fine-tuning rung starting from the frozen rung's model there."""
    pack, uri = f"{s3_bucket}/pack", f"{s3_bucket}/ladder"
    assert main(["pack", "--data", str(planet_dir), "--out", pack]) == 0
    assert main(["ladder", "--data", pack, "--out", uri, "--arch", "efficientnet_lite0",
                 "--scratch-arch", "resnet18", "--epochs", "1", "--trees", "20", "--lr", "3e-3",
                 "--tracking-uri", sqlite_uri, *SMALL]) == 0
    with io.local_copy(uri) as out:
        _check_ladder(out, sqlite_uri)
    assert "histogram_rf" in capsys.readouterr().out


def _check_ladder(out, sqlite_uri):
    rows = _rows(out / "ladder.csv")
    assert [r["name"] for r in rows] == ["histogram_rf", "scratch", "frozen", "finetune"]
    header = list(rows[0])
    assert header[:2] == ["name", "f2"] and len(header) == 2 + 17 and "cloudy" in header
    assert all(0 < float(r["f2"]) <= 1 for r in rows)
    md = (out / "ladder.md").read_text()
    assert "| winner |" in md and md.count("\n| ") >= 4 + 17
    assert (out / "ladder.png").stat().st_size > 0
    page = _open_report(out, "ladder_report.png", ["score per rung", "per-label scores"])
    assert page["headings"] == ["Rungs", "Per label", "Settings"]
    assert all(r["name"] in page["text"] for r in rows) and "cloudy" in page["text"]
    # The fine-tuning rung started from the frozen rung's model (two-stage), and MLflow has the tree.
    assert '"freeze": "last:2"' in (out / "finetune" / "model" / "config.json").read_text()
    parents = _parents(sqlite_uri)
    assert [p.info.run_name for p in parents] == ["ladder"]
    assert "report.html" in {a.path for a in mlflow.MlflowClient().list_artifacts(parents[0].info.run_id)}
    assert sorted(c.info.run_name for c in _children(sqlite_uri, parents[0].info.run_id)) == [
        "histogram_rf", "train-efficientnet_lite0", "train-efficientnet_lite0", "train-resnet18"]
    assert (out / "scratch" / "ray_results" / "scratch").is_dir()  # its checkpoints, in the bucket too


@pytest.mark.timeout(120)  # before the check, the trial waited forever for half a GPU
@pytest.mark.parametrize("workers, gpus", [(2, "1"), (1, "0.5"), (2, "3")])
def test_fractional_gpus_per_worker_are_refused_before_any_trial(planet_dir, tmp_path, capsys, workers, gpus):
    out = tmp_path / "out"
    assert main(["tune", "--data", str(planet_dir), "--archs", "resnet18", "--epochs", "1", "--out", str(out),
                 "--workers-per-trial", str(workers), "--gpus-per-trial", gpus,
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *SMALL]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("qdeep: error: --gpus-per-trial ")
    assert "--workers-per-trial" in errors[0] and "share a device" in errors[0]
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


def test_sweep_file_grids_samplers_and_fixed_settings(tmp_path):
    from ray import tune

    from qdeep.config import Sweep
    from qdeep.distributed.tune import param_space
    from qdeep.workflows.tune import expected_trials

    path = tmp_path / "sweep.yaml"
    path.write_text("arch: [resnet18, alexnet]\nfreeze: [head, 'last:1', none]\nlr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                    "epochs: 4\nimage_size: 64\nnum_samples: 2\nscheduler: none\n")
    sweep = Sweep.from_yaml(path, num_samples=1, scheduler="asha")
    assert sweep.base.epochs == 4 and sweep.base.image_size == 64
    assert sweep.num_samples == 2 and sweep.scheduler == "none"
    assert expected_trials(sweep) == 2 * 2 * 3
    space = param_space(sweep.space)
    assert space["arch"] == tune.grid_search(["resnet18", "alexnet"])
    assert 1e-4 <= space["lr"].sample() <= 1e-2
    assert space["weights"] == "none"  # a swept key the file leaves out: one value, the default
    path.write_text("arch: [resnet18]\nbogus: 1\n")
    with pytest.raises(Exception, match="unknown keys"):
        Sweep.from_yaml(path)
