"""The GPU tier (`make gpu-check`): the same commands and library calls as on CPU, on one CUDA GPU.

Every test here is marked `gpu`; tests/conftest.py skips them, with a reason, where torch sees
no CUDA device. Nothing here forks the code: the tests drive `qdeep train`, `qdeep features` and
KMeans exactly as a user would, with `--gpu` or `use_gpu` choosing the device.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from qdeep.cli import main
from qdeep.distributed.worker import CHECKPOINT_FILE

pytestmark = pytest.mark.gpu

# As tests/test_train.py: a small model at a small input size, a few seconds per epoch.
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--loader-workers", "0",
        "--warmup-steps", "2", "--lr", "3e-3"]


def separated_blobs(n: int, k: int, d: int, sep: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, sep, size=(k, d))
    truth = rng.integers(k, size=n)
    return (centres[truth] + rng.normal(size=(n, d))).astype(np.float32), truth


def test_faiss_kmeans_on_the_gpu_finds_the_cpu_partition():
    """KMeans on the GPU runs faiss' torch Lloyd loop on a CUDA tensor: the same loop on CPU tensors,
    from the same random rows, finds the same partition."""
    import faiss

    from qdeep.clustering.kmeans import KMeans, nmi, torch_lloyd

    x, truth = separated_blobs(n=50_000, k=100, d=64, sep=10.0)
    cpu = KMeans(100, seed=0, use_gpu=False).fit(x)
    gpu = KMeans(100, seed=0, use_gpu=True).fit(x)  # raises if faiss or torch sees no GPU
    assert cpu.gpu_ is False and gpu.gpu_ is True and len(gpu.obj_) == 20
    centroids, obj, _ = torch_lloyd(torch.from_numpy(x), 100, 20, seed=0)
    index = faiss.IndexFlatL2(64)
    index.add(centroids)
    assert nmi(gpu.labels_, index.search(x, 1)[1][:, 0]) > 0.999  # the same partition
    assert gpu.obj_[-1] == pytest.approx(obj[-1], rel=1e-3)
    # random rows as initial centroids leave a few blobs shared, on either device
    assert nmi(gpu.labels_, truth) > 0.9 and nmi(cpu.labels_, truth) > 0.9
    # a start from the CPU partition's means (DeepCluster's warm start) stays on it on the GPU
    means = np.stack([x[cpu.labels_ == c].mean(axis=0) for c in range(100)])
    warm = KMeans(100, nredo=0, init=means, use_gpu=True).fit(x)
    assert warm.gpu_ is True and nmi(warm.labels_, cpu.labels_) > 0.99


def test_a_pixel_batch_finishes_on_the_gpu_as_on_the_cpu():
    """A worker's uint8 PixelBatch moved to a GPU is flipped, rotated and normalised there (the
    batched form): the CPU's batch, to float32 rounding of the two in-place steps."""
    from qdeep.data.transforms import PixelBatch

    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    batch = PixelBatch(pixels, torch.arange(64) % 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    on_gpu = batch.to(torch.device("cuda"), non_blocking=True)
    assert on_gpu.is_cuda and on_gpu.is_contiguous() and on_gpu.shape == (64, 3, 32, 32)
    torch.testing.assert_close(on_gpu.cpu(), batch.to("cpu"), rtol=0, atol=1e-6)


def _checkpoints(run_dir) -> list[dict]:
    return [torch.load(p / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
            for p in run_dir.glob("checkpoint_*") if (p / CHECKPOINT_FILE).exists()]


def test_train_with_amp_resumes_across_devices(planet_dir, ray_cluster, tmp_path, sqlite_uri, crash_once):
    """One GPU worker with AMP for 4 epochs under one --name, stopped after each of the first three
    (a worker dies, no retries) and rerun: on the GPU (the scaler's state loads), then on the CPU
    from the GPU checkpoint (a disabled scaler ignores it), then on the GPU from the CPU checkpoint
    (its empty scaler state is skipped). `--gpu` is not part of a run's settings, so every rerun
    resumes the same run."""
    out = tmp_path / "out"
    run_dir = out / "ray_results" / "devices"

    def launch(gpu: str, crash_epoch: int | None) -> int:
        if crash_epoch is None:
            crash_once(None)
        else:  # rank 0 exits hard at the start of that epoch, once its last checkpoint is registered
            crash_once(rank=0, at=crash_epoch, marker=tmp_path / f"crashed-{crash_epoch}")
        return main(["--plugin", "qdeep_test_hooks", "train", "--data", str(planet_dir), "--out", str(out), "--tracking-uri", sqlite_uri,
                     "--workers", "1", "--gpu", gpu, "--epochs", "4", "--name", "devices", *TINY])

    for gpu, crash_epoch in [("yes", 1), ("yes", 2), ("no", 3)]:
        assert launch(gpu, crash_epoch) != 0
        latest = max(_checkpoints(run_dir), key=lambda s: s["epoch"])
        assert latest["epoch"] == crash_epoch - 1  # this launch trained exactly one epoch
        assert bool(latest["scaler"]) == (gpu == "yes")  # AMP's scaler state on the GPU; none on the CPU
    assert launch("yes", None) == 0

    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2, 3] and m["restarts"] == 0
    assert all(np.isfinite(h["train_loss"]) for h in m["history"])
    assert max(_checkpoints(run_dir), key=lambda s: s["epoch"])["scaler"]  # the last epoch ran on the GPU
    mlflow.set_tracking_uri(sqlite_uri)
    steps = [s.step for s in mlflow.MlflowClient().get_metric_history(m["mlflow_run_id"], "val_f2")]
    assert steps == [3]  # the last launch trained only the epoch the others had not


def test_features_on_a_gpu_actor_equal_the_cpu_result(planet_dir, ray_cluster, tmp_path):
    from qdeep.clustering.store import FeatureStore
    from qdeep.data.images import load_rgb
    from qdeep.data.transforms import to_tensor
    from qdeep.distributed.features import load_backbone
    from qdeep.models import embed

    assert ray_cluster.cluster_resources().get("GPU", 0) >= 1  # so `qdeep features` runs GPU actors
    out, images = tmp_path / "store", planet_dir / "test-jpg"
    assert main(["features", "--images", str(images), "--arch", "efficientnet_lite0", "--weights", "bundled",
                 "--image-size", "64", "--batch-size", "16", "--out", str(out)]) == 0
    store = FeatureStore(out)
    store.verify()
    ids, feats = store.to_numpy()
    assert len(ids) == 40

    model = load_backbone("efficientnet_lite0", "bundled")  # float32, on the CPU
    spec = model.qdeep_arch
    x = torch.stack([to_tensor(load_rgb(images / name), 64, spec.mean, spec.std) for name in ids])
    with torch.no_grad():
        expected = embed(model, x).numpy()
    cosine = (feats * expected).sum(1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.999
    np.testing.assert_allclose(feats, expected, rtol=2e-2, atol=2e-2)


def test_multiband_training_and_prediction_on_the_gpu(planet4, ray_cluster, tmp_path, sqlite_uri):
    """4-band 16-bit GeoTIFFs through AMP on one GPU worker, the NIR band in a parallel stem; predict
    on the GPU too (its actor takes the GPU when one is free)."""
    out = tmp_path / "out"
    assert main(["train", "--data", str(planet4), "--image-format", "tif", "--bands", "r,g,b,nir", "--band-init",
                 "parallel", "--freeze", "last:1", "--gpu", "yes", "--workers", "1", "--epochs", "2", "--out", str(out),
                 "--tracking-uri", sqlite_uri, *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2 and 0 < metrics["val_f2"] <= 1
    state = torch.load(out / "model" / "model.pt", map_location="cpu", weights_only=True)
    assert state["conv1.extra.weight"].shape == (64, 1, 7, 7)
    assert main(["predict", "--model", str(out / "model"), "--data", str(planet4), "--out",
                 str(tmp_path / "sub.csv")]) == 0
    assert len((tmp_path / "sub.csv").read_text().splitlines()) == 1 + 8
