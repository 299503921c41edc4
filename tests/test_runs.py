"""MLflow runs whose command died (SIGKILL: no `finally` ran) are closed at the next start, not left
RUNNING for ever (issue 18, item 5); runs of live processes stay as they are."""

from __future__ import annotations

import subprocess
import sys

from qdeep import tracking

OPEN_RUN = """
import os, signal, sys
from qdeep import tracking
with tracking.mlflow_run("victim", {"a": 1}, uri=sys.argv[1]) as run:
    with tracking.mlflow_run("child", uri=sys.argv[1], nested=True):
        print(run.info.run_id, flush=True)
        if sys.argv[2] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.readline()  # stays alive, its run RUNNING, until the test closes stdin
"""


def _status(uri: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id).info.status


def _children(uri: str, run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(run_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")


def test_a_killed_commands_run_is_closed_at_the_next_start_and_a_live_ones_is_not(sqlite_uri):
    dead = subprocess.run([sys.executable, "-c", OPEN_RUN, sqlite_uri, "die"], capture_output=True, text=True,
                          timeout=120)
    assert dead.returncode == -9, dead.stderr[-2000:]
    dead_id = dead.stdout.split()[0]
    assert _status(sqlite_uri, dead_id) == "RUNNING"  # what MLflow shows until someone closes it
    assert [c.info.status for c in _children(sqlite_uri, dead_id)] == ["RUNNING"]
    live = subprocess.Popen([sys.executable, "-c", OPEN_RUN, sqlite_uri, "live"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        live_id = live.stdout.readline().split()[0]  # its start closed the dead run
        assert _status(sqlite_uri, dead_id) == "KILLED"
        assert [c.info.status for c in _children(sqlite_uri, dead_id)] == ["KILLED"]
        from mlflow.tracking import MlflowClient

        assert MlflowClient(sqlite_uri).get_run(dead_id).data.tags["qdeep_status"] == "died"
        with tracking.mlflow_run("next", uri=sqlite_uri) as run:
            pass
        assert _status(sqlite_uri, run.info.run_id) == "FINISHED"
        assert _status(sqlite_uri, live_id) == "RUNNING"  # its process is alive
        assert [c.info.status for c in _children(sqlite_uri, live_id)] == ["RUNNING"]
    finally:
        live.communicate("\n", timeout=60)
    assert live.returncode == 0 and _status(sqlite_uri, live_id) == "FINISHED"


def test_a_reused_pid_does_not_keep_a_dead_run_open():
    """The owner is the pid and its start time: another process with the same pid is not the owner."""
    import os

    me = tracking._owner_tags()
    assert tracking._alive(me["qdeep.pid"], me["qdeep.pid_started"])
    assert not tracking._alive(me["qdeep.pid"], "1")  # same pid, another start
    assert not tracking._alive("999999999", "?") and not tracking._alive("", "")
    assert me["qdeep.pid"] == str(os.getpid())


HOLD_OUTPUTS = """
import os, signal, sys
from qdeep import io
with io.outputs(sys.argv[1]) as out:
    (out / "metrics.json").write_text("{}")  # an old run's, say
    os.kill(os.getpid(), signal.SIGKILL)  # killed between the model and the new metrics.json
"""


def test_outputs_a_killed_command_was_writing_are_refused_by_compare_and_predict(ray_cluster, planet_dir, tmp_path,
                                                                                   capsys, sqlite_uri):
    from qdeep.cli import main

    out = tmp_path / "base"
    assert main(["baseline", "--data", str(planet_dir), "--folds", "2", "--trees", "5", "--out", str(out),
                 "--tracking-uri", sqlite_uri]) == 0
    assert not (out / ".qdeep-unfinished").exists()  # a finished command leaves no marker
    assert main(["compare", str(out)]) == 0
    capsys.readouterr()

    killed = subprocess.run([sys.executable, "-c", HOLD_OUTPUTS, str(out)], capture_output=True, timeout=60)
    assert killed.returncode == -9
    for argv in (["compare", str(out)],
                 ["predict", "--model", str(out / "model"), "--data", str(planet_dir), "--out", str(tmp_path / "s.csv")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out} holds the outputs of a command that did not finish" in err[0], err
    assert not (tmp_path / "s.csv").exists()


def test_a_baseline_in_a_bucket_is_compared_and_predicts_from_there(ray_cluster, planet_dir, s3_bucket, capsys,
                                                                     sqlite_uri):
    from qdeep import io
    from qdeep.cli import main

    out = f"{s3_bucket}/base"
    assert main(["baseline", "--data", str(planet_dir), "--folds", "2", "--trees", "5", "--out", out,
                 "--tracking-uri", sqlite_uri]) == 0
    capsys.readouterr()
    assert main(["compare", out]) == 0 and capsys.readouterr().out.split()[0] == "base"
    assert main(["predict", "--model", f"{out}/model", "--data", str(planet_dir), "--out", f"{s3_bucket}/s.csv"]) == 0
    assert io.read_json(f"{out}/metrics.json")["n_test"] == len(_csv_rows(s3_bucket)) - 1
    capsys.readouterr()
    io.write_json(f"{out}/.qdeep-unfinished", {"pid": 1})  # an upload that a kill cut short
    assert main(["predict", "--model", f"{out}/model/", "--data", str(planet_dir), "--out", "s.csv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out} holds the outputs of a command that did not finish" in err[0], err
    assert main(["predict", "--model", f"{s3_bucket}/none", "--data", str(planet_dir), "--out", "s.csv"]) == 2
    assert f"--model {s3_bucket}/none: not a qdeep model directory (no config.json)" in capsys.readouterr().err


def _csv_rows(bucket: str) -> list[str]:
    from qdeep.io import filesystem

    fs, inner = filesystem(f"{bucket}/s.csv")
    with fs.open_input_stream(inner) as f:
        return f.read().decode().splitlines()
