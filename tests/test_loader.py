"""ShardSampler: each rank's share of an epoch, as (epoch, index) keys. No Ray, no process group:
each rank's sampler is built here as its worker would build it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from qdeep.data.loader import ShardSampler

pytestmark = pytest.mark.unit


def shards(n, world, epoch=0, shuffle=True, seed=0, plan=None) -> list[list[tuple[int, int]]]:
    """Every rank's keys for one epoch."""
    out = []
    for rank in range(world):
        sampler = ShardSampler(n, world, rank, shuffle, seed, plan)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def rows(keys) -> list[int]:
    return [i for _, i in keys]


def dealt(shards_: list[list]) -> list[int]:
    """The epoch's order before it was dealt out: rank r has positions r, r + world, ..."""
    world = len(shards_)
    return [rows(shards_[j % world])[j // world] for j in range(sum(map(len, shards_)))]


@pytest.mark.parametrize("n, world", [(24, 1), (24, 2), (24, 3), (24, 4), (23, 2), (23, 3), (23, 4), (5, 8),
                                      (1, 3), (2, 7)])
def test_every_row_once_per_epoch_padded_by_repeats_to_a_multiple_of_the_world(n, world):
    parts = shards(n, world)
    pad = -n % world
    assert all(len(p) == (n + pad) // world for p in parts), "every rank gets as many keys (DDP steps in lockstep)"
    order = dealt(parts)
    assert sorted(order[:n]) == list(range(n)), "every row once, then the padding"
    assert order == (order[:n] * (pad // n + 2))[:n + pad], "the padding repeats the epoch's order from its start"
    counts = Counter(order)
    if pad <= n:
        assert sorted(counts.values()) == [1] * (n - pad) + [2] * pad, "no row repeated twice before all once"


def test_the_shuffle_is_shared_by_the_ranks_and_dealt_out_by_rank():
    n, world = 23, 3
    (alone,) = shards(n, 1, epoch=2, seed=7)  # one rank: the epoch's whole order
    order = rows(alone)
    assert sorted(order) == list(range(n)) and order != list(range(n))
    parts = shards(n, world, epoch=2, seed=7)
    padded = order + order[:-n % world]
    for rank, part in enumerate(parts):
        assert rows(part) == padded[rank::world]
    # each rank builds its own sampler: the same arguments give the same keys, every time
    assert shards(n, world, epoch=2, seed=7) == parts


def test_the_order_differs_per_epoch_and_per_seed_and_keys_carry_the_epoch():
    n, world = 40, 2
    by_epoch = {e: shards(n, world, epoch=e) for e in range(4)}
    orders = {e: tuple(dealt(p)) for e, p in by_epoch.items()}
    assert len(set(orders.values())) == 4, "each epoch its own order"
    assert all(sorted(o) == list(range(n)) for o in orders.values())
    assert tuple(dealt(shards(n, world, epoch=1, seed=1))) != orders[1], "the seed matters"
    for e, parts in by_epoch.items():
        assert {epoch for part in parts for epoch, _ in part} == {e}, "(epoch, index): augmentation follows the epoch"


def test_set_epoch_moves_an_existing_sampler():
    sampler = ShardSampler(10, 2, 1, True, 0)
    first = list(sampler)
    sampler.set_epoch(3)
    third = list(sampler)
    assert rows(third) != rows(first) and {e for e, _ in third} == {3}
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_without_shuffle_the_rows_are_dealt_in_order():
    parts = shards(7, 3, shuffle=False)
    assert [rows(p) for p in parts] == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]  # padded with rows 0 and 1


def test_the_plan_gives_the_epochs_rows_repeats_included():
    """E.g. DeepCluster's uniform per-cluster draw: the plan, not range(n), is the epoch."""
    calls = []

    def plan(epoch):
        calls.append(epoch)
        rng = np.random.default_rng(epoch)
        return rng.choice(50, size=31 + epoch)  # with replacement, of another length than n

    n, world = 50, 4
    for epoch in (0, 1):
        calls.clear()
        parts = shards(n, world, epoch=epoch, plan=plan)
        assert set(calls) == {epoch}
        planned = plan(epoch)
        pad = -len(planned) % world
        order = dealt(parts)
        assert Counter(order[:len(planned)]) == Counter(planned.tolist()), "the plan's rows, each as often"
        assert order[len(planned):] == order[:pad] and len(order) == len(planned) + pad
        for rank in range(world):
            sampler = ShardSampler(n, world, rank, True, 0, plan)
            sampler.set_epoch(epoch)
            assert len(sampler) == len(parts[rank]) == -(-len(planned) // world)


def test_the_plan_is_shuffled_unless_shuffle_is_off():
    planned = np.array([4, 4, 1, 9, 2])
    (ordered,) = shards(10, 1, shuffle=False, plan=lambda e: planned)
    assert rows(ordered) == planned.tolist()
    (shuffled,) = shards(10, 1, shuffle=True, seed=3, plan=lambda e: planned)
    assert sorted(rows(shuffled)) == sorted(planned.tolist())


# (1, 3) and (2, 7): fewer rows than the padding needs, repeated as often as it takes, so that every rank
# gets its len() (it once came up short: the last ranks had one batch fewer than the others).
@pytest.mark.parametrize("n, world", [(1, 1), (10, 3), (12, 3), (13, 4), (5, 8), (0, 2), (1, 3), (2, 7)])
def test_len_is_the_keys_each_rank_yields(n, world):
    for rank, part in enumerate(shards(n, world)):
        sampler = ShardSampler(n, world, rank, True, 0)
        assert len(sampler) == len(part) == -(-n // world)


@pytest.mark.parametrize("kind", ["d4", "flip", "none", "strong"])
@pytest.mark.parametrize("crop", [0.0, 0.2])
def test_the_training_transform_is_augment_then_normalize(kind, crop):
    """train_input moves uint8 pixels for flips and rotations, then converts once: the same tensor as
    the float path (augment, then normalize), draw for draw, for every seed."""
    import random

    import torch
    from PIL import Image

    from qdeep.data.transforms import augment, normalize, to_tensor, to_unit, train_input

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    seen = set()
    for seed in range(16):
        got = train_input(image, 16, mean, std, random.Random(seed), crop, kind)
        want = normalize(augment(to_unit(image, 16), random.Random(seed), crop, kind), mean, std)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        seen.add(got.numpy().tobytes())
    assert len(seen) >= {"d4": 5, "flip": 2, "none": 1, "strong": 5}[kind]  # the seeds do change the image
    torch.testing.assert_close(train_input(image, 16, mean, std), normalize(to_unit(image, 16), mean, std),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(to_tensor(image, 16, mean, std), normalize(to_unit(image, 16), mean, std),
                               rtol=0, atol=1e-5)


def test_image_dataset_decodes_paths_or_a_packs_bytes_alike(tmp_path):
    """DeepCluster's dataset over a pack holds the images' bytes as one Arrow array: the same items
    as over their files."""
    import pyarrow as pa
    import torch
    from PIL import Image

    from qdeep.data.inputs import RGBInput
    from qdeep.data.loader import ImageDataset

    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(paths[-1])
    data = pa.array([open(p, "rb").read() for p in paths], pa.binary())
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    for train in (False, True):
        from_files = ImageDataset(paths, None, RGBInput(8, mean, std), train=train, seed=3)
        from_bytes = ImageDataset(data, None, RGBInput(8, mean, std), train=train, seed=3)
        assert len(from_bytes) == 3 and from_bytes.paths is data  # kept as one array, not a list of objects
        for key in [(0, 0), (1, 2), (4, 1)]:
            (i, x, _), (j, y, _) = from_files[key], from_bytes[key]
            assert i == j and x.shape == (3, 8, 8)
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("augment, crop, size", [("d4", 0.0, 16), ("d4", 0.0, 12), ("flip", 0.0, 16),
                                                 ("none", 0.0, 16), ("d4", 0.2, 16), ("strong", 0.0, 16)])
def test_a_workers_batches_finish_on_the_device_as_the_cpu_made_them(tmp_path, augment, crop, size):
    """The training Decoder hands out RGB images with flips and rotations as uint8 PixelBatches whose
    .to(device) is, bit for bit, the batch of each image's CPU-made input (RGBInput: the draws, the
    resize, the normalisation); with crops, `strong` or for bands it hands out that float batch itself.
    Validation batches (train=False) are never augmented."""
    import random

    import torch
    from PIL import Image

    from qdeep.data.inputs import RGBInput
    from qdeep.data.loader import Decoder
    from qdeep.data.transforms import PixelBatch

    rng = np.random.default_rng(0)
    refs = []
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
        refs.append(str(tmp_path / f"{i}.jpg") if i % 2 else (tmp_path / f"{i}.jpg").read_bytes())
    read = RGBInput(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    batches = [{"row": np.arange(s, min(s + 16, 40)) + 100, "ref": refs[s : s + 16], "y": np.ones(min(16, 40 - s))}
               for s in range(0, 40, 16)]
    for train in (True, False):
        on_device = not train or crop == 0 and augment != "strong"
        seen = set()
        for rows, x, y in Decoder(read, train=train, crop=crop, seed=7, augment=augment)(batches, epoch=3):
            assert isinstance(x, PixelBatch) is on_device and len(x) == len(rows) == len(y)
            got = x.to("cpu")
            want = torch.stack([read(refs[r - 100], random.Random(hash((7, 3, r))) if train else None, crop, augment)
                                for r in rows.tolist()])
            assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, want)
            seen |= {img.numpy().tobytes() for img in got}
            if on_device:
                assert x.pixels.dtype == torch.uint8 and x.pixels.shape == (len(rows), size, size, 3)
                assert (x.codes is None) == (not train or augment == "none")
        if train and augment == "d4" and not crop:  # the flips and rotations did happen, per image
            assert len({c for c in range(16)} & set(Decoder(read, True, seed=7).one(refs[0], 0, e)[1]
                                                    for e in range(40))) >= 6
        assert len(seen) == 40 or train and augment != "none"


def test_the_batched_device_form_of_the_finish_is_the_cpus():
    """`finish_in_groups` (what a GPU runs) and `finish` on the CPU (image by image, numpy views) give
    the same batch for every one of the 16 codes and without codes, each image turned as
    `augment_pixels` turns it and normalised as `pixels_to_input` does."""
    import random

    import torch

    from qdeep.data.transforms import augment_pixels, finish, finish_in_groups, pixels_to_input, symmetry

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (40, 6, 6, 3), dtype=np.uint8))
    codes = torch.tensor([i % 16 for i in range(40)])  # image i has code i % 16
    cpu = finish(pixels, codes, mean, std)
    assert cpu.is_contiguous() and torch.equal(finish_in_groups(pixels, codes, mean, std), cpu)
    for seed in range(32):  # the code drawn from a generator is the turn augment_pixels draws from it
        i = symmetry(random.Random(seed))
        want = pixels_to_input(augment_pixels(pixels[i].permute(2, 0, 1).numpy(), random.Random(seed)), mean, std)
        assert torch.equal(cpu[i], want)
    plain = torch.stack([pixels_to_input(p.permute(2, 0, 1).numpy(), mean, std) for p in pixels])
    assert torch.equal(finish(pixels, None, mean, std), plain)
    assert torch.equal(finish_in_groups(pixels, None, mean, std), plain)
