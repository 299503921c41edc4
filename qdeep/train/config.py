"""The knobs of one CNN training run, shared by `qdeep train`, sweeps, the ladder and DeepCluster."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    weights: str = "none"  # none | imagenet | bundled | PATH
    freeze: str = "none"  # head | last:N | none (for two-stage: the second stage's depth)
    epochs: int = 5
    batch_size: int = 64  # the global batch, shared out among the workers
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    schedule: str = "constant"  # cosine | step | constant, after a linear warm-up (measured: scripts/bench_quality.py)
    warmup_steps: int = 0
    min_lr_factor: float = 0.0  # cosine: where the decay ends, as a fraction of the lr
    weight_decay: float = 1e-4
    image_size: int | None = None  # None: the architecture's own input size
    crop: float = 0.0  # random crops of up to this fraction of the side
    augment: str = "d4"  # d4 (flips + 90-degree rotations) | flip | strong | none
    bn_stats: str = "batch"  # batch (BatchNorm layers that train follow the batch) | frozen (all keep their statistics)
    task: str = "multilabel"  # a targets part: multilabel | multiclass | pseudo | a plugin's
    validation: str | None = None  # a validation part; None: the task's own (f2 | accuracy)
    fit_strategy: str = "single"  # single | two-stage | a plugin's
    head_epochs: int = 1  # two-stage: epochs of head-only training first
    finetune_lr_factor: float = 1.0  # two-stage: the second stage's lr relative to --lr
    discriminative_lr: float = 1.0  # each block below the head trains at this factor of the one above
    balance: str = "none"  # none | weights (rare tags/classes weigh more) | uniform (classes sampled uniformly)
    val_fraction: float = 0.2
    refit: bool = False  # after choosing the epochs and thresholds on the validation split, retrain on every row
    seed: int = 0
    loader_workers: int = 2  # JPEG-decoding processes per Ray worker

    def as_dict(self) -> dict:
        return asdict(self)
