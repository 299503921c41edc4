"""The knobs of one CNN training run, shared by `qdeep train`, sweeps, the ladder and DeepCluster."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from qdeep.errors import QdeepError

NAMED_WEIGHTS = ("none", "imagenet", "bundled")  # --weights besides a PATH


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


SWEPT = ("arch", "weights", "freeze", "lr")  # what `qdeep tune` sweeps from the command line


@dataclass
class Sweep:
    """What is swept (lists: grid; {"choice": [...]}, {"uniform"/"loguniform": [lo, hi]}: sampled)
    and everything held fixed."""

    space: dict
    base: TrainConfig = field(default_factory=TrainConfig)
    num_samples: int = 1
    scheduler: str = "asha"  # asha | none
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent: int | None = None
    workers_per_trial: int = 1
    gpus_per_trial: float = 0
    max_failures: int = 2  # a failed trial (a worker's node lost) is retried, resuming from its last checkpoint

    @classmethod
    def from_yaml(cls, path: str | Path, **defaults) -> "Sweep":
        """The sweep file's keys win over `defaults` (the command line's sweep options)."""
        import yaml

        spec = yaml.safe_load(Path(path).read_text()) or {}
        space = {k: spec.pop(k) for k in SWEPT if k in spec}
        base = TrainConfig(**{k: spec.pop(k) for k in list(spec) if k in TrainConfig.__dataclass_fields__})
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise QdeepError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(space=space, base=base, **{**defaults, **spec})


@dataclass
class DeepClusterConfig:
    arch: str = "efficientnet_lite0"
    weights: str = "bundled"  # the starting network: none | imagenet | bundled | PATH
    k: int = 5  # clusters (pseudo-classes) per iteration
    iterations: int = 10
    epochs_per_iteration: int = 1
    final_k: int = 20  # the final over-clustering
    ctrl_fraction: float = 0.25  # images never trained on, to measure the pseudo-label task honestly
    balance: str = "weights"  # weights (balanced class weights) | uniform (uniform per-cluster sampler)
    pca: int | None = None  # whitened dims (default: from the number of images, see choose_pca_dim)
    freeze: str = "none"  # the reference trains the whole network
    lr: float = 0.001  # constant across iterations (after a warm-up in the first); 0.01 diverged with frozen BN
    optimizer: str = "sgd"  # momentum 0.9, as the reference; the body's state carries over between iterations
    augment: str = "flip"  # d4 | flip | strong (random-resized crops, flips, colour jitter) | none
    bn_stats: str = "auto"  # frozen | batch | auto: frozen from pretrained weights, batch from none
    batch_size: int = 64
    image_size: int | None = None
    loader_workers: int = 2
    seed: int = 0

    def fingerprint(self) -> dict:
        """What must not change when a run is resumed (more iterations may be asked for)."""
        return {k: v for k, v in asdict(self).items() if k not in ("iterations", "loader_workers")}

    def resolved_bn_stats(self) -> str:
        """Pseudo-label training on a pretrained network keeps its BatchNorm statistics: letting them follow
        augmented batches moved every descriptor (NMI on the digits 0.67 -> 0.46 in one iteration at lr 1e-3),
        whereas a network trained from scratch has no statistics worth keeping."""
        if self.bn_stats != "auto":
            return self.bn_stats
        return "batch" if str(self.weights).strip().lower() == "none" else "frozen"

    def train_config(self, weights: str) -> TrainConfig:
        """The pseudo-label training of every iteration (`weights`: the network it starts from): a new
        head each iteration, the body's optimizer state kept across them, at a constant lr."""
        return TrainConfig(arch=self.arch, weights=weights, freeze=self.freeze, epochs=self.epochs_per_iteration,
                           batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer, schedule="constant",
                           augment=self.augment, bn_stats=self.resolved_bn_stats(), image_size=self.image_size,
                           task="pseudo", validation="accuracy", balance=self.balance, seed=self.seed,
                           loader_workers=self.loader_workers, val_fraction=self.ctrl_fraction)
