"""The training recipe's pieces, without Ray: the learning-rate curve, the global batch, BatchNorm
statistics in a second stage, optimizer state carried past a new head, DeepCluster's augmentation
and its k-means sample."""

import random

import numpy as np
import pytest
import torch

from qdeep.data.transforms import augment
from qdeep.distributed.worker import load_optimizer_state, lr_factor, optimizer_state, worker_batch
from qdeep.models import apply_freeze, build_model, reset_head, set_train_mode
from qdeep.parts import FIT_STRATEGIES


def _curve(schedule: str, total: int, warmup: int = 0, floor: float = 0.0) -> list[float]:
    f = lr_factor({"schedule": schedule, "warmup_steps": warmup, "min_lr_factor": floor}, total)
    return [f(step) for step in range(total)]


def test_cosine_ends_at_its_floor_and_constant_stays_flat_after_warmup():
    cosine = _curve("cosine", 100, floor=0.1)
    assert cosine[0] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert min(_curve("cosine", 100)) < 1e-3  # no floor: down to 0
    constant = _curve("constant", 100, warmup=10)
    assert constant[0] < constant[9] < 1.0 and set(constant[10:]) == {1.0}
    assert _curve("step", 100)[-1] == pytest.approx(0.01)


def test_one_curve_spans_both_stages_of_a_two_stage_fit():
    """The worker indexes the run's curve by global step: the second stage continues it (no new
    warm-up, no restart at the top), at the stage's own base rate."""
    stages = FIT_STRATEGIES.get("two-stage")().stages(
        {"epochs": 3, "freeze": "last:2", "lr": 1e-3, "head_epochs": 1, "finetune_lr_factor": 0.5})
    steps_per_epoch = 10
    curve = _curve("cosine", 3 * steps_per_epoch, warmup=5)
    lr = [stages[0 if step < steps_per_epoch else 1].lr * curve[step] for step in range(30)]
    assert lr[steps_per_epoch] == pytest.approx(0.5 * lr[steps_per_epoch - 1], rel=0.05)
    assert stages[0].bn_stats is None and stages[1].bn_stats is None  # unfrozen blocks follow the batch
    kept = FIT_STRATEGIES.get("two-stage")().stages(
        {"epochs": 3, "freeze": "last:2", "lr": 1e-3, "head_epochs": 1, "finetune_lr_factor": 1.0,
         "bn_stats": "frozen", "weights": "bundled"})
    assert [s.bn_stats for s in kept] == ["head", "head"] and kept[1].lr == kept[0].lr


def test_the_batch_size_is_global():
    assert [worker_batch(64, w) for w in (1, 2, 4, 128)] == [64, 32, 16, 1]


def test_bn_stats_choose_which_batchnorm_layers_follow_the_batch():
    model = build_model("resnet18", 3, "none", "head")
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    set_train_mode(model)
    assert not any(m.training for m in bns.values())  # frozen weights: ImageNet statistics kept
    set_train_mode(model, "last:1")  # the BatchNorm of the last block follows the batch, weights frozen or not
    assert all(m.training == n.startswith("layer4") for n, m in bns.items())
    assert not any(p.requires_grad for m in bns.values() for p in m.parameters())  # weights still frozen
    before = bns["layer4.1.bn2"].running_mean.clone()
    frozen = bns["layer1.0.bn1"].running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert not torch.equal(before, bns["layer4.1.bn2"].running_mean)
    assert torch.equal(frozen, bns["layer1.0.bn1"].running_mean)
    set_train_mode(model, "none")
    assert all(m.training for m in bns.values())
    apply_freeze(model, "last:2")  # a two-stage fit's second stage: blocks train, statistics stay
    set_train_mode(model, "head")
    assert not any(m.training for m in bns.values()) and any(p.requires_grad for p in bns["layer4.1.bn2"].parameters())


def test_frozen_bn_stats_keep_every_batchnorm_statistic_while_the_whole_network_trains():
    from qdeep.distributed.worker import train_one_epoch
    from qdeep.errors import QdeepError
    from qdeep.config import DeepClusterConfig, TrainConfig

    single = FIT_STRATEGIES.get("single")()
    base = {"epochs": 2, "freeze": "none", "lr": 1e-3, "weights": "bundled"}
    assert single.stages(base)[0].bn_stats is None
    (stage,) = single.stages({**base, "bn_stats": "frozen"})
    assert stage.bn_stats == "head" and stage.freeze == "none"
    with pytest.raises(QdeepError, match="--bn-stats frozen"):
        single.stages({**base, "weights": "none", "bn_stats": "frozen"})

    model = build_model("resnet18", 3, "none", "none")
    bn = model.get_submodule("layer4.1.bn2")
    stats, scale = bn.running_mean.clone(), bn.weight.detach().clone()
    loader = [(None, torch.randn(4, 3, 32, 32) * 5 + 3, torch.tensor([0, 1, 2, 0]))]
    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False)
    train_one_epoch(model, loader, optimizer, scaler, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                    bn_stats=stage.bn_stats)
    assert torch.equal(stats, bn.running_mean) and not torch.equal(scale, bn.weight)  # statistics kept, scale trained

    def iteration_2(**train) -> str:  # auto follows the starting weights, not the previous iteration's file
        config = DeepClusterConfig(train=TrainConfig(**{"weights": "bundled", "bn_stats": "auto", **train}))
        return config.train_config("OUT/iter_01/model.pt").bn_stats

    assert iteration_2() == "frozen"  # from the bundled weights
    assert iteration_2(weights="none") == "batch"
    assert iteration_2(weights="none", bn_stats="frozen") == "frozen"
    assert DeepClusterConfig().train_config("OUT/iter_01/model.pt").bn_stats == "frozen"


def _step(model, optimizer):
    optimizer.zero_grad()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()


def test_a_new_head_gets_fresh_optimizer_state_and_the_body_keeps_its_own():
    model = build_model("resnet18", 5, "none", "none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, optimizer)
    saved = optimizer_state(optimizer, model)
    assert "fc.weight" in saved and "layer4.1.conv2.weight" in saved

    reset_head(model)  # the next DeepCluster iteration: same network, new head, new optimizer
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loaded = load_optimizer_state(fresh, model, saved, skip="fc")
    params = dict(model.named_parameters())
    assert loaded == len(params) - 2  # all but fc.weight and fc.bias
    assert torch.equal(fresh.state[params["layer4.1.conv2.weight"]]["exp_avg"], saved["layer4.1.conv2.weight"]["exp_avg"])
    assert params["fc.weight"] not in fresh.state
    _step(model, fresh)  # and the optimizer steps on with it


def test_optimizer_state_loads_only_into_parameters_it_optimizes():
    model = build_model("resnet18", 5, "none", "none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, optimizer)
    saved = optimizer_state(optimizer, model)
    apply_freeze(model, "head")
    head_only = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert load_optimizer_state(head_only, model, saved) == 2


def test_strong_augmentation_is_seeded_and_stays_an_image():
    x = torch.rand(3, 32, 32)
    a = augment(x, random.Random(1), kind="strong")
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, augment(x, random.Random(1), kind="strong"))
    assert not torch.equal(a, augment(x, random.Random(2), kind="strong"))
    assert torch.equal(augment(x, random.Random(1), kind="none"), x)
    flipped = {augment(x, random.Random(s), kind="flip").sum(0)[0, 0].item() for s in range(20)}
    assert flipped <= {x.sum(0)[0, 0].item(), x.sum(0)[0, -1].item()}  # only left-right flips
    with pytest.raises(ValueError, match="augment"):
        augment(x, random.Random(0), kind="mixup")


def test_cluster_store_trains_kmeans_on_every_sampled_row(tmp_path, monkeypatch):
    """DeepCluster's centroids come from the whole sample (the reference clusters every row; KMeans
    trains on every row it is given, tests/test_kmeans.py)."""
    from sklearn.datasets import make_blobs

    from qdeep.clustering import deepcluster
    from qdeep.clustering.store import FeatureStore, StoreWriter

    x, _ = make_blobs(n_samples=900, centers=3, n_features=16, random_state=0)
    with StoreWriter(tmp_path / "store", 16, {"arch": "test", "weights": "none", "weights_sha256": "0" * 64},
                     rows_per_shard=300) as writer:
        writer.write([f"img{i}" for i in range(900)], x.astype(np.float32))
    seen = []
    original = deepcluster.new_kmeans
    monkeypatch.setattr(deepcluster, "new_kmeans", lambda *args: seen.append(original(*args)) or seen[-1])
    deepcluster.cluster_store(FeatureStore(tmp_path / "store"), k=3, pca_dim=2)
    assert seen[0].labels_.shape == (900,)  # fitted on the whole sample: every row of this small store


def test_deepcluster_kmeans_restarts_only_while_cheap():
    from qdeep.clustering.deepcluster import MAX_RESTARTS, new_kmeans

    assert new_kmeans(10, 0, 1_800).nredo == MAX_RESTARTS  # a small collection: the best of 10
    assert new_kmeans(10_000, 0, 2_560_000).nredo == 1  # ImageNet-sized: one run, as the reference
    assert new_kmeans(10, 0, 1_800).niter == 50  # at most: faiss stops once the objective no longer falls


def test_elastic_runs_recover_from_failures_by_default():
    """The README's promise: an elastic run carries on when a (spot) node goes; a fixed one stops
    at its first failure unless --max-failures says otherwise."""
    from qdeep.cli import build_parser
    from qdeep.distributed.driver import ELASTIC_MAX_FAILURES, default_max_failures

    assert default_max_failures(2, None) == 0 and default_max_failures("1-4", None) == ELASTIC_MAX_FAILURES > 0
    assert default_max_failures("1-4", 0) == 0 and default_max_failures(2, 5) == 5
    for command in (["train", "--data", "d"], ["deepcluster", "--images", "d"]):
        assert build_parser().parse_args([*command, "--out", "o"]).max_failures is None
        assert build_parser().parse_args([*command, "--out", "o", "--max-failures", "2"]).max_failures == 2


def test_the_kmeans_task_asks_for_a_gpu_or_for_the_memory_of_its_sample():
    """Issue 13, defect 7: k-means leaves the CPU head. At k=10,000 over 5M 1280-d descriptors the
    sample is 2.56M rows: 13 GB raw plus 2.6 GB whitened, which the task must ask for."""
    from qdeep.distributed.deepcluster import KMEANS_BASE_MEMORY, kmeans_options

    gpu = kmeans_options(5_000_000, 1280, 10_000, None, use_gpu=True)
    assert gpu["num_gpus"] == 1 and gpu["num_cpus"] == 1
    sample = 2_560_000 * (1280 + 256) * 4
    assert sample + KMEANS_BASE_MEMORY < gpu["memory"] < 1.5 * sample + KMEANS_BASE_MEMORY
    small = kmeans_options(1_000, 64, 5, 8, use_gpu=True)
    assert KMEANS_BASE_MEMORY < small["memory"] < KMEANS_BASE_MEMORY + (1 << 20)


def test_the_kmeans_task_runs_on_the_cluster_like_the_driver(ray_cluster, tmp_path):
    """The task Ray places (CPU: every CPU of the largest node) gives the driver's clustering."""
    from sklearn.datasets import make_blobs

    from qdeep.clustering.deepcluster import cluster_store
    from qdeep.clustering.store import FeatureStore, StoreWriter
    from qdeep.distributed.deepcluster import _cluster_task, kmeans_options

    x, _ = make_blobs(n_samples=600, centers=4, n_features=16, random_state=3)
    with StoreWriter(tmp_path / "store", 16, {"arch": "test", "weights": "none", "weights_sha256": "0" * 64},
                     rows_per_shard=200) as writer:
        writer.write([f"img{i}" for i in range(600)], x.astype(np.float32))
    store = FeatureStore(tmp_path / "store")
    options = kmeans_options(store.total_rows, store.dim, 4, 4, use_gpu=False)
    assert options["num_cpus"] == 2 and "num_gpus" not in options  # the test Ray's one node has 2 CPUs
    task = ray_cluster.remote(_cluster_task).options(**options)
    ids, remote, node = ray_cluster.get(task.remote(str(store.path), 4, 4, 0))
    local_ids, local = cluster_store(store, 4, 4, seed=0)
    assert node == "127.0.0.1" and ids == local_ids
    assert np.array_equal(remote.labels, local.labels) and np.allclose(remote.distances, local.distances)
    # with the previous groups (renumbered) as one more start, as the final clustering passes them
    previous = dict(zip(local_ids, ((local.labels + 1) % 4).tolist()))
    _, remote = ray_cluster.get(task.remote(str(store.path), 4, 4, 1, previous))[:2]
    _, local = cluster_store(store, 4, 4, seed=1, previous=previous)
    assert np.array_equal(remote.labels, local.labels)
    assert np.array_equal(local.labels, [previous[i] for i in local_ids])  # the same groups, their numbers kept
