"""Images the driver lists but a node cannot see (issue 13, defect 3): a setup error naming the node,
never a decode error, never skipped by `--on-bad-image skip`. The two-node case is in test_multinode."""

from __future__ import annotations

import pytest
from ray.train import WorkerGroupError

from qdeep.data import BadInputPolicy, ImageSet
from qdeep.data.images import load_rgb
from qdeep.data.synth import write_synthetic_classes
from qdeep.distributed.tasks import ImagesNotVisible, check_images, map_images, require_visible, spread, user_error
from qdeep.errors import QdeepError


@pytest.fixture
def scenes(tmp_path):
    write_synthetic_classes(tmp_path / "scenes", n_per_class=4, size=16, seed=0)
    return sorted((tmp_path / "scenes").rglob("*.jpg"))


def test_a_missing_file_is_not_a_decode_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "gone.jpg")


def test_require_visible_names_this_node_and_an_example(ray_cluster, scenes):
    require_visible(scenes)
    gone = scenes[3]
    gone.unlink()
    with pytest.raises(ImagesNotVisible, match=r"images not visible from node 127\.0\.0\.1 \(node [0-9a-f]{8}\): "
                                               rf"1 of {len(scenes)} checked paths do not exist there, e\.g\. {gone}"):
        require_visible(scenes)


def test_the_sample_is_spread_over_the_list():
    paths = [f"p{i}" for i in range(1000)]
    sample = spread(paths, 64)
    assert len(sample) == 64 and sample[0] == "p0" and sample[-1] == "p999"
    assert spread(paths[:10], 64) == paths[:10]


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_file_gone_on_the_reading_node_stops_the_check_whatever_the_policy(ray_cluster, scenes, mode):
    """A decode task that cannot find a listed file raises ImagesNotVisible; with `skip` it was
    silently dropped as undecodable before."""
    bad = scenes[0].parent / "corrupt.jpg"
    bad.write_bytes(b"not a jpeg")
    images = ImageSet(names=[p.name for p in [*scenes, bad]], paths=[*scenes, bad])
    scenes[5].unlink()
    policy = BadInputPolicy(mode)
    with pytest.raises(ImagesNotVisible, match=rf"images not visible from node 127\.0\.0\.1 .*e\.g\. {scenes[5]}"):
        map_images(lambda image: [0.0], images.paths)
    with pytest.raises(ImagesNotVisible):
        check_images(images, policy)
    assert policy.skipped == []  # nothing was counted as undecodable


def test_undecodable_files_still_meet_the_policy(ray_cluster, scenes):
    bad = scenes[0].parent / "corrupt.jpg"
    bad.write_bytes(b"not a jpeg")
    images = ImageSet(names=[p.name for p in [*scenes, bad]], paths=[*scenes, bad])
    policy = BadInputPolicy("skip")
    kept = check_images(images, policy)
    assert len(kept) == len(scenes) and [s["file"] for s in policy.skipped] == [str(bad)]
    assert "cannot decode image" in policy.skipped[0]["reason"]


def test_a_workers_qdeep_error_comes_out_of_ray_train_on_its_own():
    """What `driver.fit` re-raises from Ray Train's error for a worker that could not see the images."""
    inner = ImagesNotVisible("images not visible from node 10.0.0.7 (node abcdef12): ...")
    wrapped = WorkerGroupError("rank 1 failed", {0: RuntimeError("peer gone"), 1: inner})
    assert user_error(wrapped) is inner
    assert user_error(WorkerGroupError("x", {0: RuntimeError("oom")})) is None
    try:
        try:
            raise inner
        except QdeepError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert user_error(outer) is inner


def test_a_tasks_qdeep_error_is_unwrapped_from_ray_task_error(ray_cluster, scenes):
    """ray.get raises a RayTaskError that is also an instance of the task's exception class; the
    CLI must print the task's own one-line message, not the wrapper's multi-line report."""
    scenes[0].unlink()
    ref = ray_cluster.remote(require_visible).remote([str(p) for p in scenes])
    with pytest.raises(ray_cluster.exceptions.RayTaskError) as info:
        ray_cluster.get(ref)
    err = user_error(info.value)
    assert type(err) is ImagesNotVisible and "\n" not in str(err)
    assert str(err).startswith("images not visible from node 127.0.0.1 (node ")
