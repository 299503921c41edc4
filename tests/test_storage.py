"""Shared-storage checks and elastic worker counts on the session's one-node Ray.

The refusal of node-local storage on a real two-node cluster is in test_multinode.py; here the
probe and the refusal decision run on this cluster's real node records.
"""

import json

import pytest

from qdeep.distributed import storage
from qdeep.cli import main
from qdeep.io import is_uri
from qdeep.options import worker_range
from qdeep.distributed import driver
from qdeep.errors import QdeepError


def test_a_local_path_passes_on_a_one_node_cluster(ray_cluster, tmp_path):
    assert len(storage.alive_nodes()) == 1
    storage.check_shared_storage(str(tmp_path / "runs"))
    storage.check_shared_storage(f"file://{tmp_path / 'runs'}")
    assert list(tmp_path.iterdir()) == []  # nothing to prove on one node: no marker, no directory


@pytest.mark.parametrize("uri", ["s3://qdeep-no-such-bucket/runs", "gs://qdeep-no-such-bucket/runs"])
def test_object_store_uris_are_shared_without_probing(ray_cluster, uri):
    assert is_uri(uri)
    storage.check_shared_storage(uri)  # offline: touching the bucket would fail


JOINED = """
import sys, ray
from qdeep.distributed import session as runtime, storage
ray.init(address=sys.argv[1])
assert runtime.is_local_ray(storage.alive_nodes())
storage.check_shared_storage(sys.argv[2])
storage.check_shared_tracking("sqlite:///" + sys.argv[2] + "/mlflow.db")
print("accepted")
"""


def test_a_process_that_joins_qdeeps_local_ray_keeps_local_paths(ray_cluster, tmp_path):
    """A job or a test's subprocess joins by address, yet the Ray it joins never gains a node."""
    import subprocess
    import sys

    runs = tmp_path / "runs"
    done = subprocess.run([sys.executable, "-c", JOINED, ray_cluster.get_runtime_context().gcs_address, str(runs)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "accepted" in done.stdout, done.stderr[-3000:]


def test_a_local_mlflow_store_passes_on_qdeeps_local_ray(ray_cluster, tmp_path, monkeypatch):
    from qdeep import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    storage.check_shared_tracking(None)  # the default: sqlite:///CWD/mlflow.db
    storage.check_shared_tracking(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")
    storage.check_shared_tracking("http://10.0.0.1:5000")  # a server: nothing to probe, nothing touched
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri, directory", [
    ("sqlite:////srv/x/mlflow.db", "/srv/x"), ("sqlite:////srv/x/mlflow.db?timeout=5", "/srv/x"),
    ("sqlite:///rel/mlflow.db", "{cwd}/rel"), ("file:///srv/mlruns", "/srv/mlruns"), ("mlruns", "{cwd}/mlruns"),
    ("http://head:5000", None), ("https://mlflow.example.com", None), ("databricks", None),
    ("databricks://profile", None), ("postgresql://user@db/mlflow", None)])
def test_which_mlflow_stores_live_in_a_directory(uri, directory, tmp_path, monkeypatch):
    from qdeep.tracking import store_directory

    monkeypatch.chdir(tmp_path)
    assert store_directory(uri) == (directory and directory.format(cwd=tmp_path))


def test_file_uris_and_paths_are_local():
    assert not is_uri("/mnt/nfs/runs")
    assert not is_uri("file:///mnt/nfs/runs")
    assert not is_uri("relative/runs")


def test_the_probe_reads_the_marker_on_every_node(ray_cluster, tmp_path):
    nodes = [n["NodeID"] for n in storage.alive_nodes()]
    marker = tmp_path / "marker"
    marker.write_text("token-1")
    assert storage.nodes_seeing(str(marker), "token-1", nodes) == {nodes[0]: True}
    assert storage.nodes_seeing(str(marker), "token-2", nodes) == {nodes[0]: False}  # another run's marker
    assert storage.nodes_seeing(str(tmp_path / "missing"), "token-1", nodes) == {nodes[0]: False}


def test_the_refusal_names_the_path_and_the_blind_nodes(ray_cluster):
    nodes = storage.alive_nodes()
    node = nodes[0]["NodeID"]
    storage.refuse_unless_shared("/data/runs", nodes, {node: True})  # every node sees it: no error
    with pytest.raises(QdeepError) as refused:
        storage.refuse_unless_shared("/data/runs", nodes, {node: False})
    message = str(refused.value)
    assert "\n" not in message and "storage path /data/runs is not shared" in message
    assert f"not visible on 127.0.0.1 (node {node[:8]})" in message and "NFS" in message and "s3://" in message
    with pytest.raises(QdeepError, match=r"no answer in 60 s"):
        storage.refuse_unless_shared("/data/runs", nodes, {node: None})


def test_run_records_go_through_pyarrow_for_uris(tmp_path, s3_bucket):
    from qdeep.io import claim_run, read_json, record_run

    for record in (str(tmp_path / "a" / "sweep.json"), f"file://{tmp_path / 'b' / 'sweep.json'}",
                   f"{s3_bucket}/runs/sweep.json"):
        assert claim_run(record, {"lr": 0.1}, "sweep 's'", "--name") == {}
        record_run(record, {"lr": 0.1}, mlflow_run_id="run-1")
        assert claim_run(record, {"lr": 0.1}, "sweep 's'", "--name")["mlflow_run_id"] == "run-1"
        with pytest.raises(QdeepError, match=r"^sweep 's' \(lr\); rerun with those settings to resume, or use "
                                             r"another --name$"):
            claim_run(record, {"lr": 0.2}, "sweep 's'", "--name")
    assert json.loads((tmp_path / "b" / "sweep.json").read_text()) == {"settings": {"lr": 0.1},
                                                                       "mlflow_run_id": "run-1"}
    assert read_json(f"{s3_bucket}/runs/sweep.json") == {"settings": {"lr": 0.1}, "mlflow_run_id": "run-1"}


def test_outputs_for_a_uri_are_uploaded_whole_and_marked_unfinished_until_done(s3_bucket):
    from qdeep import io

    out = f"{s3_bucket}/run"
    io.write_text(f"{out}/model/stale.txt", "an older run's")
    with io.outputs(out) as local:
        assert io.unfinished(out).startswith(f"{out} holds the outputs of a command that did not finish")
        (local / "model").mkdir()
        (local / "model" / "config.json").write_text("{}")
        (local / "metrics.json").write_text('{"f2": 1}')
    assert io.unfinished(out) is None and io.read_json(f"{out}/metrics.json") == {"f2": 1}
    assert not io.exists(f"{out}/model/stale.txt")  # the folder replaced, not merged
    with io.local_copy(f"{out}/model") as copy:
        assert [p.name for p in copy.iterdir()] == ["config.json"]
    assert not copy.exists()
    with pytest.raises(ZeroDivisionError), io.outputs(out) as local:
        (local / "metrics.json").write_text("{}")
        1 / 0
    assert "did not finish" in io.unfinished(out) and io.read_json(f"{out}/metrics.json") == {"f2": 1}


def test_bytes_and_folders_in_a_bucket_as_on_disk(s3_bucket, tmp_path):
    from qdeep import io

    for root in (f"{s3_bucket}/it", str(tmp_path / "it")):
        io.write_text(f"{root}/a/b.bin", "xy")
        io.write_text(f"{root}/a/c/d.bin", "z")
        assert io.read_bytes(f"{root}/a/b.bin") == b"xy" and io.read_bytes(f"{root}/a/c/d.bin") == b"z"
        io.remove_dir(f"{root}/a")
        assert not io.exists(f"{root}/a/b.bin") and not io.exists(f"{root}/a/c/d.bin")
        io.remove_dir(f"{root}/a")  # none there: nothing to do
        with pytest.raises(FileNotFoundError):
            io.read_bytes(f"{root}/a/b.bin")


@pytest.mark.parametrize("spec, expected", [("2", (2, 2)), (3, (3, 3)), ("1-4", (1, 4)), ((1, 2), (1, 2)),
                                            (" 2-2 ", (2, 2))])
def test_worker_counts(spec, expected):
    assert worker_range(spec) == expected


@pytest.mark.parametrize("spec", ["0", "3-1", "a", "1-", "-2", "1-2-3", "0-2"])
def test_bad_worker_counts_are_one_line_errors(spec, tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--workers", spec])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"qdeep: error: --workers {spec!r}: ")


def test_min_max_workers_make_an_elastic_trainer(ray_cluster, tmp_path):
    elastic = driver.make_trainer({"score_metric": "val_f2"}, "1-2", "e", str(tmp_path))
    assert elastic.scaling_config.num_workers == (1, 2) and elastic.scaling_config.elasticity_enabled
    # CPUs are shared out for the largest group: 2 CPUs, less the half CPU Ray Data's input tasks need,
    # over 2 workers; each worker's torch takes a thread.
    assert elastic.scaling_config.resources_per_worker == {"CPU": 0.75}
    assert elastic.train_loop_config["torch_threads"] == 1
    fixed = driver.make_trainer({"score_metric": "val_f2"}, "2-2", "f", str(tmp_path))
    assert fixed.scaling_config.num_workers == 2 and not fixed.scaling_config.elasticity_enabled


def test_gpu_workers_reserve_a_cpu_per_decoding_process(ray_cluster, tmp_path):
    """Issue 13, defect 12: a GPU worker with 3 loader processes asks for 3 CPUs, not 1 (Ray would
    otherwise pack more workers on a node than its CPUs can feed); CPU workers share the CPUs out."""
    gpu = driver.make_trainer({"score_metric": "val_f2", "loader_workers": 3}, 2, "g", str(tmp_path), use_gpu=True)
    assert gpu.scaling_config.resources_per_worker == {"CPU": 3, "GPU": 1}
    no_loaders = driver.make_trainer({"score_metric": "val_f2", "loader_workers": 0}, 2, "g0", str(tmp_path),
                                     use_gpu=True)
    assert no_loaders.scaling_config.resources_per_worker == {"CPU": 1, "GPU": 1}
    cpu = driver.make_trainer({"score_metric": "val_f2", "loader_workers": 3}, 2, "c", str(tmp_path), use_gpu=False)
    assert cpu.scaling_config.resources_per_worker == {"CPU": 0.75}
    one = driver.make_trainer({"score_metric": "val_f2"}, 1, "c1", str(tmp_path), use_gpu=False)
    assert one.scaling_config.resources_per_worker == {"CPU": 1.5} and one.train_loop_config["torch_threads"] == 2
