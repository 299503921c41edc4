"""`qdeep deepcluster` end to end on real JPEGs and a real local Ray: two iterations, interrupted
after the first (Ctrl+C), resumed from the second, with every output and the MLflow history."""

import json
from io import BytesIO
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import torch
from conftest import interrupt_when
from PIL import Image

from qdeep.cli import main
from qdeep.data.synth import SCENE_CLASSES, write_synthetic_classes

pytestmark = pytest.mark.ray  # DeepCluster runs on a real local Ray


def test_two_iterations_interrupted_then_resumed(ray_cluster, tmp_path, sqlite_uri):
    scenes = tmp_path / "scenes"
    write_synthetic_classes(scenes, n_per_class=16, size=40, seed=5)
    out = tmp_path / "out"
    argv = ["deepcluster", "--images", str(scenes), "--data", str(scenes), "--arch", "efficientnet_lite0",
            "--weights", "bundled", "--freeze", "last:1", "--image-size", "64", "--k", "5", "--iterations", "2",
            "--final-k", "6", "--ctrl-fraction", "0.25", "--balance", "uniform", "--workers", "2",
            "--loader-workers", "0", "--out", str(out), "--tracking-uri", sqlite_uri]
    first = out / "iterations" / "iter_01" / "metrics.json"
    # Ctrl+C as soon as iteration 2 has started (after iteration 1 finished, in the same Ray Train run)
    interrupt_when([*argv, "--address", ray_cluster.get_runtime_context().gcs_address],
                   (out / "iterations" / "iter_02").exists)
    assert first.exists()
    # Ray Train's abort may come after this short iteration has finished; then the rerun has nothing left to do
    cut_off = not (out / "iterations" / "iter_02" / "metrics.json").exists()
    assert not (out / "metrics.json").exists()
    before = first.read_text()
    labels_1 = np.load(out / "iterations" / "iter_01" / "labels.npy")

    assert main(argv) == 0  # the same --out: resumes at iteration 2
    assert first.read_text() == before  # iteration 1 was not redone

    m = json.loads((out / "metrics.json").read_text())
    its = m["iterations"]
    assert [h["iteration"] for h in its] == [1, 2]
    for h in its:
        assert sum(h["sizes"]) + sum(h["sizes_ctrl"]) == 80 and sum(h["sizes_ctrl"]) == 20
        assert h["score"] < 0 and 0 <= h["train_acc"] <= 1 and 0 <= h["ctrl_acc"] <= 1 and h["ctrl_loss"] > 0
        assert 0 <= h["nmi_true"] <= 1 and -1 <= h["ari_true"] <= 1 and 0 < h["purity_true"] <= 1
    assert its[0]["nmi_prev"] is None and 0 <= its[1]["nmi_prev"] <= 1
    for h in its:  # where each iteration's time went
        phases = h["phases"]
        assert set(phases) == {"embed_s", "cluster_s", "train_s", "train_epochs_s", "overhead_s", "kmeans_on"}
        assert phases["kmeans_on"].startswith("rank 0 on ")  # inside the loop: the first worker
        assert 0 < phases["train_epochs_s"] <= phases["train_s"] and phases["embed_s"] > 0
        assert phases["overhead_s"] >= 0
    # what the second iteration's body starts from: the first one's optimizer state, by parameter name
    carried = torch.load(out / "iterations" / "iter_01" / "optimizer.pt", weights_only=True)
    assert carried["blocks.6.0.conv_pw.weight"]["momentum_buffer"].shape == (1152, 192, 1, 1)  # SGD, momentum 0.9
    assert not any(name.startswith("blocks.5.") for name in carried)  # --freeze last:1: frozen blocks have none
    assert its[1]["weights"].endswith("iter_01/model.pt")
    final = m["final"]
    assert final["kmeans_on"] == "driver"  # a local Ray: the driver's machine is the only one
    if cut_off:  # the resumed launch ran iteration 2, in a Ray Train run of its own
        assert m["loop"]["iterations"] == 1 and m["loop"]["startup_s"] > 0
    assert final["k"] == 6 and sum(final["sizes"]) + sum(final["sizes_ctrl"]) == 80
    assert final["purity_true"] > 0.5  # pretrained descriptors separate the scene classes

    table = pq.read_table(out / "assignments.parquet")
    assert table.column_names == ["image", "cluster", "distance", "iter_1", "iter_2"] and table.num_rows == 80
    images = table.column("image").to_pylist()
    assert set(images) == {f"{c}/{c}_{i}.jpg" for c in SCENE_CLASSES for i in range(16)}
    assert np.array_equal(table.column("iter_1").to_numpy(), labels_1)
    clusters = table.column("cluster").to_numpy()
    assert set(clusters) <= set(range(6))

    # one grid per final cluster, an empty one included: up to 16 of its members, 4 by row, 96 px each
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == [f"cluster_{c:02d}.png" for c in range(6)]
    for c in range(6):
        with Image.open(out / "grids" / f"cluster_{c:02d}.png") as grid:
            shown = min(int((clusters == c).sum()), 16)
            assert grid.size == (4 * 96, 18 + max(1, -(-shown // 4)) * 96), (c, shown, grid.size)
    assert (out / "curves.png").stat().st_size > 0 and (out / "sizes.png").stat().st_size > 0
    _check_report(out, clusters, table.column("iter_2").to_numpy())

    mlflow.set_tracking_uri(sqlite_uri)
    runs = mlflow.search_runs(experiment_names=["qdeep"], output_format="list")
    parents = [r for r in runs if r.info.run_name == "deepcluster"]
    assert len(parents) == 1 and "mlflow.parentRunId" not in parents[0].data.tags  # resumed, not duplicated
    client = mlflow.MlflowClient()
    parent = parents[0].info.run_id
    assert [x.step for x in client.get_metric_history(parent, "score")] == [1, 2]
    assert [x.step for x in client.get_metric_history(parent, "ctrl_acc")] == [0, 1]
    assert [x.step for x in client.get_metric_history(parent, "nmi_prev")] == [2]
    for key in ("train_loss", "train_acc", "ctrl_loss", "nmi_true", "ari_true", "purity_true", "final_score"):
        assert key in client.get_run(parent).data.metrics, key
    params = client.get_run(parent).data.params
    assert params["k"] == params["nb_clusters"] == "5" and params["models_dir"].endswith("iterations")
    assert params["iterations"] == "2" and Path(params["data_dir"]).is_dir()
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"metrics.json", "assignments.parquet", "curves.png", "sizes.png", "grids", "sizes", "report.html",
            "profiles"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent, "sizes")} == {"sizes/iter_01.json", "sizes/iter_02.json"}
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert {"iteration-1", "iteration-2"} <= children


def _check_report(out: Path, clusters: np.ndarray, last: np.ndarray) -> None:
    """OUT/profiles/ and OUT/report.html, as a person sees it in Chromium: every non-empty group with
    its grid, palette, descriptors, words and saliency, every picture loaded, nothing fetched."""
    from browser import open_report

    from qdeep.profiles import FEATURES

    profiles = json.loads((out / "profiles" / "profiles.json").read_text())
    present = sorted(set(clusters.tolist()))  # an empty group has no members to profile
    assert [g["group"] for g in profiles["groups"]] == present and profiles["features"] == list(FEATURES)
    for g in profiles["groups"]:
        assert g["size"] == int((clusters == g["group"]).sum()) and g["words"]
        assert abs(sum(c["share"] for c in g["palette"]) - 1) < 1e-6 and set(g["z"]) == set(FEATURES)
        # the saliency of the pseudo-class most of its members had in the last iteration
        assert g["target"] == np.bincount(last[clusters == g["group"]]).argmax()
        for name in (f"palette_{g['group']:02d}.png", f"saliency_{g['group']:02d}.png"):
            assert (out / "profiles" / name).stat().st_size > 0
    page = open_report(out / "report.html", "deepcluster_report.png")
    assert page["sections"] == [f"group-{c}" for c in present] and page["requests"] == []
    assert [i for i in page["images"] if not i["loaded"]] == []
    alts = {i["alt"] for i in page["images"]}
    assert {"per-iteration curves", "group sizes"} <= alts
    for c in present:
        assert {f"group {c} members", f"group {c} palette", f"group {c} saliency"} <= alts
    assert all(g["words"] in page["text"] for g in profiles["groups"])
    assert page["screenshot"].stat().st_size > 0


def test_from_a_pack_in_a_bucket_into_the_bucket_a_killed_worker_resumes_from_there(ray_cluster, tmp_path, s3_bucket,
                                                                                    sqlite_uri, crash_once, capsys):
    """Images, iterations, feature stores and outputs in a bucket (nothing a node must share but the
    bucket): rank 1 dies as iteration 2 starts, and the restarted worker group goes on from
    iteration 1's network, optimizer state and labels, read back from the bucket."""
    from qdeep import io

    marker = tmp_path / "crashed"
    crash_once(rank=1, at=2, marker=marker)  # rank 1 exits hard as iteration 2 starts, once
    scenes = tmp_path / "scenes"
    write_synthetic_classes(scenes, n_per_class=6, size=32, seed=3)
    pack, out = f"{s3_bucket}/pack", f"{s3_bucket}/dc"
    assert main(["pack", "--images", str(scenes), "--out", pack, "--shard-mb", "0.004"]) == 0  # a few shards
    assert len(io.read_json(f"{pack}/pack.json")["shards"]) > 1
    argv = ["--plugin", "qdeep_test_hooks", "deepcluster", "--images", pack, "--arch", "resnet18", "--weights", "none",
            "--image-size", "32", "--k", "3", "--iterations", "2", "--final-k", "3", "--workers", "2",
            "--loader-workers", "0", "--batch-size", "8", "--max-failures", "1", "--out", out,
            "--tracking-uri", sqlite_uri]
    assert main(argv) == 0
    assert marker.exists()
    m = io.read_json(f"{out}/metrics.json")
    assert [h["iteration"] for h in m["iterations"]] == [1, 2] and m["loop"]["iterations"] == 2
    assert m["iterations"][1]["weights"] == f"{out}/iterations/iter_01/model.pt"  # the restarted group went on from it
    assert m["n_images"] == 30 and m["final"]["k"] == 3
    assert m["final"]["weights"] == f"{out}/iterations/iter_02/model.pt"
    for h in m["iterations"]:  # the pack's labels are the ground truth
        assert 0 <= h["nmi_true"] <= 1 and sum(h["sizes"]) + sum(h["sizes_ctrl"]) == 30

    fs, root = io.filesystem(out)
    listed = {f.path.removeprefix(root + "/") for f in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
              if f.type == pyarrow.fs.FileType.File}
    for t in (1, 2):  # each iteration's descriptors were removed once clustered
        files = ("model.pt", "optimizer.pt", "labels.npy", "metrics.json")
        assert {f"iterations/iter_0{t}/{f}" for f in files} <= listed
        assert not any(p.startswith(f"iterations/iter_0{t}/features") for p in listed)
    assert {"deepcluster.json", "metrics.json", "assignments.parquet", "curves.png", "sizes.png",
            "features/manifest.json"} <= listed and ".qdeep-unfinished" not in listed
    assert sorted(p for p in listed if p.startswith("grids/")) == [f"grids/cluster_{c:02d}.png" for c in range(3)]
    table = pq.read_table(f"{root}/assignments.parquet", filesystem=fs)
    assert table.column_names == ["image", "cluster", "distance", "iter_1", "iter_2"]
    assert set(table.column("image").to_pylist()) == {f"{c}/{c}_{i}.jpg" for c in SCENE_CLASSES for i in range(6)}
    labels_2 = np.load(BytesIO(io.read_bytes(f"{out}/iterations/iter_02/labels.npy")))
    assert np.array_equal(table.column("iter_2").to_numpy(), labels_2)
    assert not (tmp_path / "dc").exists()  # nothing of OUT on local disk
    assert {"report.html", "profiles/profiles.json", "profiles/saliency_00.png"} <= listed

    # `qdeep profile` rebuilds the profiles and the report in the bucket, from the pack, the same way
    before = io.read_json(f"{out}/profiles/profiles.json")
    fs.delete_dir(f"{root}/profiles")
    fs.delete_file(f"{root}/report.html")
    assert main(["profile", "--out", out, "--tracking-uri", sqlite_uri]) == 0
    assert io.read_json(f"{out}/profiles/profiles.json") == before
    assert io.read_text(f"{out}/report.html").count('<section class="group"') == len(before["groups"])
    assert not io.exists(f"{out}/.qdeep-unfinished")

    capsys.readouterr()  # a rerun with another k is refused, from the record in the bucket
    assert main([*argv[2:argv.index("--k") + 1], "4", *argv[argv.index("--k") + 2:]]) == 2
    err = _errors(capsys.readouterr().err)
    assert err == [f"qdeep: error: {out} holds a DeepCluster run with other settings (k); rerun with those settings "
                   "to resume, or use another --out"], err
    assert main(["deepcluster", "--images", pack, "--data", str(scenes), "--out", f"{out}2"]) == 2
    err = _errors(capsys.readouterr().err)
    assert err == [f"qdeep: error: --images {pack} is a pack: its labels are in it (leave out --labels and --data)"]


def test_a_changed_setting_is_refused_on_resume(ray_cluster, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    state = json.dumps({"settings": {"k": 7}, "mlflow_run_id": "x"})
    (out / "deepcluster.json").write_text(state)
    scenes = tmp_path / "scenes"
    write_synthetic_classes(scenes, n_per_class=4, size=16, seed=0)
    code = main(["deepcluster", "--images", str(scenes), "--arch", "resnet18", "--weights", "none", "--k", "2",
                 "--final-k", "2", "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err, err
    prefix = f"qdeep: error: {out.resolve()} holds a DeepCluster run with other settings ("
    assert err[-1].startswith(prefix), err
    assert err[-1].endswith("; rerun with those settings to resume, or use another --out"), err
    changed = err[-1][len(prefix):].split(")", 1)[0].split(", ")
    assert {"k", "n_images"} <= set(changed), changed  # the recorded run had k=7 and nothing else
    assert (out / "deepcluster.json").read_text() == state  # the refused launch recorded nothing
    assert not (out / "metrics.json").exists() and not (out / "iterations").exists()


def test_a_relative_weights_path_is_resolved_where_the_command_runs(ray_cluster, tmp_path, sqlite_uri, monkeypatch):
    """The embedding actors and training workers run in Ray's directories, not the caller's."""
    import torch

    from qdeep.models import build_model

    write_synthetic_classes(tmp_path / "scenes", n_per_class=6, size=32, seed=5)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    torch.save(build_model("resnet18", 3, "none", "none").state_dict(), tmp_path / "w" / "r18.pt")
    out = tmp_path / "out"
    assert main(["deepcluster", "--images", "scenes", "--arch", "resnet18", "--weights", "w/r18.pt",
                 "--image-size", "32", "--k", "3", "--iterations", "0", "--final-k", "3", "--loader-workers", "0",
                 "--out", str(out), "--tracking-uri", sqlite_uri]) == 0
    assert json.loads((out / "metrics.json").read_text())["final"]["weights"] == str(tmp_path / "w" / "r18.pt")
    # no iteration, no pseudo-label head: the report has every group without saliency
    groups = json.loads((out / "profiles" / "profiles.json").read_text())["groups"]
    assert groups and not any("target" in g for g in groups) and not list((out / "profiles").glob("saliency_*"))
    report = (out / "report.html").read_text()
    assert report.count('<section class="group"') == len(groups) and "No iteration" in report


def _errors(stderr: str) -> list[str]:
    """qdeep's error lines (Ray's progress bars may share their terminal line)."""
    return [line[line.index("qdeep: error: "):] for line in stderr.splitlines() if "qdeep: error: " in line]
