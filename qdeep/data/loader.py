"""Per-worker data: what a training worker makes of the rows Ray Data streams it (`Decoder`: image
bytes or paths -> input tensors, in threads), and DeepCluster's map-style dataset over image paths or bytes,
decoded in DataLoader processes, with the sampler that gives each rank its share of an epoch."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from qdeep.data.inputs import RasterInput, RGBInput
from qdeep.data.transforms import PixelBatch, symmetry


class ImageDataset(Dataset):
    """Items are (index, image tensor, target); the index lets validation gather rows from all
    workers. Keys are (epoch, index) pairs, so augmentation differs per epoch even in persistent
    loader processes, which never see attribute changes made in the trainer."""

    def __init__(self, paths: Sequence[str] | pa.BinaryArray, targets: np.ndarray | None, read: RGBInput | RasterInput,
                 train: bool = False, crop: float = 0.0, seed: int = 0, augment: str = "d4"):
        # image paths, or encoded images' bytes as one Arrow array (a pack's: one buffer, which
        # forked loader processes share, where a list of bytes objects would be copied page by page)
        self.paths = paths if isinstance(paths, pa.Array) else list(paths)
        self.targets, self.read = targets, read  # `read`: an image's input tensor (data.inputs)
        self.train, self.crop, self.seed, self.augment = train, crop, seed, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        epoch, i = key
        rng = random.Random(hash((self.seed, epoch, i))) if self.train else None
        ref = self.paths[i]
        ref = ref.as_py() if isinstance(ref, pa.Scalar) else ref
        x = self.read(ref, rng, self.crop, self.augment)
        y = torch.as_tensor(self.targets[i]) if self.targets is not None else torch.zeros(0)
        return i, x, y


class ShardSampler(Sampler):
    """This rank's share of an epoch, as (epoch, index) keys. The epoch's index list comes from
    `plan(epoch)` (default: every row once; e.g. a uniform per-class draw), is shuffled with a seed
    all ranks share, padded by repeats to a multiple of the world size, then dealt out by rank."""

    def __init__(self, n: int, world_size: int, rank: int, shuffle: bool, seed: int,
                 plan: Callable[[int], np.ndarray] | None = None):
        self.n, self.world, self.rank, self.shuffle, self.seed, self.plan = n, world_size, rank, shuffle, seed, plan
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        idx = self.plan(self.epoch) if self.plan else np.arange(self.n)
        if self.shuffle:
            idx = np.random.default_rng((self.seed, self.epoch)).permutation(idx)
        idx = np.resize(idx, len(idx) + -len(idx) % self.world)  # padded by repeating the order, even past n
        return iter([(self.epoch, int(i)) for i in idx[self.rank::self.world]])

    def __len__(self) -> int:
        total = len(self.plan(self.epoch)) if self.plan else self.n
        return -(-total // self.world)


def uniform_class_sample(labels: np.ndarray, n: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices for one epoch of the DeepCluster reference's UnifLabelSampler: about n / (classes
    present) images from each class, with replacement only where a class is too small, shuffled.
    It keeps a few huge classes (clusters) from dominating the epoch."""
    rng = np.random.default_rng(seed)
    n = len(labels) if n is None else n
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    per = int(n // len(classes)) + 1
    out = np.concatenate([rng.choice(members, per, replace=len(members) < per) for members in classes])
    rng.shuffle(out)
    return out[:n]


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, workers: int, world_size: int,
                rank: int, seed: int, plan: Callable[[int], np.ndarray] | None = None) -> DataLoader:
    """Each rank reads its own shard; decoding runs in `workers` processes."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), world_size, rank, shuffle, seed, plan),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        multiprocessing_context="forkserver" if workers > 0 else None,
    )


class Decoder:
    """Batches of rows, {"row": ids, "ref": image bytes or paths, "y": targets} as Ray Data's
    `iter_batches` yields them, -> (row, input, target) tensors, decoded and augmented in `threads`
    threads of this process (PIL and torch let go of the GIL; 0: inline), one batch ahead of the
    one being trained on. A row's augmentation is drawn from (seed, epoch, row): every epoch sees
    other flips and crops, the same on a rerun. RGB images with flips and rotations only come out
    as a `transforms.PixelBatch` of uint8 pixels, which its `.to(device)` finishes there, to the
    same tensor; other inputs (bands, `strong`, crops) as float tensors made here."""

    def __init__(self, read: RGBInput | RasterInput, train: bool = False, crop: float = 0.0, seed: int = 0,
                 augment: str = "d4", threads: int = 0, y_dtype=np.float32):
        self.read = read  # an image's input tensor (data.inputs)
        self.train, self.crop, self.seed, self.augment, self.y_dtype = train, crop, seed, augment, y_dtype
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 0 else None
        # uint8 pixels and symmetry codes out, the rest on the device (`transforms.PixelBatch`): the
        # CPU's share of an image is then its decode and one copy (scripts/bench_ingest.py)
        self.raw = read.finishes_on_device(augment if train else "none", crop if train else 0.0)
        self.codes = self.raw and train and augment != "none"

    def one(self, ref, row: int, epoch: int):
        rng = random.Random(hash((self.seed, epoch, row))) if self.train else None
        if self.raw:
            return self.read.pixels(ref), symmetry(rng, self.augment) if self.codes else 0
        return self.read(ref, rng, self.crop, self.augment)

    def collate(self, made: list):
        """The batch of `one`'s outputs: a (B, C, H, W) float tensor, or a `PixelBatch`."""
        if not self.raw:
            return torch.stack(made)
        pixels = torch.from_numpy(np.stack([p for p, _ in made]))
        codes = torch.tensor([c for _, c in made], dtype=torch.int64) if self.codes else None
        return PixelBatch(pixels, codes, self.read.mean, self.read.std)

    def __call__(self, batches: Iterable[dict], epoch: int = 0) -> Iterator[tuple]:
        def start(batch):
            rows = np.array(batch["row"], dtype=np.int64)
            jobs = [(ref, int(r), epoch) for ref, r in zip(batch["ref"], rows)]
            xs = [self.pool.submit(self.one, *job) for job in jobs] if self.pool else [self.one(*job) for job in jobs]
            return rows, xs, batch["y"]

        def finish(started):
            rows, xs, y = started
            x = self.collate([f.result() for f in xs] if self.pool else xs)
            return torch.from_numpy(rows), x, torch.from_numpy(np.array(y, dtype=self.y_dtype))  # a copy: Ray's is read-only

        ahead: deque = deque()
        for batch in batches:
            ahead.append(start(batch))
            if len(ahead) > 1:
                yield finish(ahead.popleft())
        while ahead:
            yield finish(ahead.popleft())
