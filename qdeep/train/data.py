"""Per-worker data: a map-style dataset over JPEG paths, decoded in DataLoader processes."""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from qdeep.data.images import load_rgb
from qdeep.data.transforms import augment, to_tensor


class ImageDataset(Dataset):
    """(index, image tensor, target row); the index lets validation gather rows from all workers."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray | None, size: int, mean, std,
                 train: bool = False, crop: float = 0.0, seed: int = 0):
        self.paths, self.targets = list(paths), targets
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.train, self.crop, self.seed = train, crop, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = to_tensor(load_rgb(self.paths[i]), self.size, self.mean, self.std)
        if self.train:
            x = augment(x, random.Random(hash((self.seed, self.epoch, i))), self.crop)
        y = torch.from_numpy(self.targets[i].astype(np.float32)) if self.targets is not None else torch.zeros(0)
        return i, x, y


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, workers: int, world_size: int,
                rank: int, seed: int) -> DataLoader:
    """Each rank reads its own shard (DistributedSampler); decoding runs in `workers` processes."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        multiprocessing_context="forkserver" if workers > 0 else None,
    )
