"""What a command prints: qdeep's own lines, with Ray's driver, controller and worker output in
OUT/ray.log (named at the end), unless --verbose. Real commands in subprocesses, each with its own
local Ray: the session's Ray (the `ray_cluster` fixture) keeps its output where it is."""

import subprocess
import sys
from pathlib import Path

import pytest

from qdeep.data.synth import write_synthetic_planet

pytestmark = pytest.mark.ray

QDEEP = str(Path(sys.executable).with_name("qdeep"))
PLUGINS = str(Path(__file__).parent / "plugins")


def _run(*argv, cwd):
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PLUGINS, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([QDEEP, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_train_prints_its_own_lines_and_logs_rays_output(tmp_path):
    write_synthetic_planet(tmp_path / "data", n=40, size=32, seed=0, n_test=4)
    r = _run("--plugin", "qdeep_test_shout", "train", "--data", "data", "--out", "out", "--arch", "resnet18",
             "--image-size", "32", "--epochs", "1", "--workers", "2", "--loader-workers", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == [r.stdout.splitlines()[0], "best " + r.stdout.split("best ", 1)[1].splitlines()[0],
                                     "Ray's output: out/ray.log"]
    assert r.stdout.startswith("epoch 0: train_loss ")
    terminal = r.stdout + r.stderr
    for noise in ("qdeep-test: a line from rank", "RayTrainWorker", "TrainController", "Token authentication",
                  "MLflow database"):
        assert noise not in terminal
    bars = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert bars and all(line.startswith("checking images") for line in bars), r.stderr[-3000:]  # qdeep's own
    log = (tmp_path / "out" / "ray.log").read_text()
    assert "qdeep-test: a line from rank 0, epoch 0" in log and "qdeep-test: a line from rank 1, epoch 0" in log
    assert "TrainController" in log and "autoscaler" not in log


def test_verbose_leaves_rays_output_on_the_terminal(tmp_path):
    write_synthetic_planet(tmp_path / "data", n=12, size=32, seed=0, n_test=4)
    images = str(tmp_path / "data" / "train-jpg")
    quiet = _run("features", "--images", images, "--arch", "resnet18", "--weights", "none", "--image-size", "32",
                 "--out", "store", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.splitlines() == ["wrote 12 descriptors of dim 512 in 1 shard(s) to store",
                                         "Ray's output: store.ray.log"]
    # On the terminal only qdeep's own progress bar (tqdm redraws its line with \r): Ray's loggers (Ray Data
    # logs every execution), its C++ core worker and its services write to the log whatever they say.
    bars = [line for line in quiet.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert bars and all(line.startswith("checking images") for line in bars), quiet.stderr[-3000:]
    assert "Starting execution of Dataset" in (tmp_path / "store.ray.log").read_text()
    loud = _run("--verbose", "features", "--images", images, "--arch", "resnet18", "--weights", "none",
                "--image-size", "32", "--out", "store2", cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Starting execution of Dataset" in loud.stderr and not (tmp_path / "store2.ray.log").exists()
    assert "Ray's output" not in loud.stdout
