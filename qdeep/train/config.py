"""The knobs of one CNN training run, shared by `qdeep train`, sweeps and the ladder."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    weights: str = "none"  # none | imagenet | bundled | PATH
    freeze: str = "none"  # head | last:N | none
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    schedule: str = "cosine"  # cosine | step, after a linear warm-up
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    image_size: int | None = None  # None: the architecture's own input size
    crop: float = 0.0  # random crops of up to this fraction of the side
    pos_weight: bool = False  # weigh rare labels' positives by (negatives / positives)
    val_fraction: float = 0.2
    seed: int = 0
    loader_workers: int = 2  # JPEG-decoding processes per Ray worker

    def as_dict(self) -> dict:
        return asdict(self)
