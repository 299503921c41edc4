"""What every CNN run prepares on the driver before Ray Train starts: the checked, encoded and split
training images (shared by a training run, a sweep's trials, the ladder's rungs), the model
checked once, and the plain-values config each worker receives."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from qdeep.config import NAMED_WEIGHTS, TrainConfig
from qdeep.data import BadInputPolicy, load_dataset, load_rgb
from qdeep.data.inputs import InputBands, input_bands
from qdeep.data.pack import Pack, is_pack
from qdeep.distributed.tasks import check_images
from qdeep.errors import QdeepError
from qdeep.io import is_uri
from qdeep.models import build_model, parse_freeze
from qdeep.parts import FIT_STRATEGIES, TARGETS, VALIDATIONS, infer_task
from qdeep.parts.targets import Targets


@dataclass
class TrainingData:
    """Checked images, their targets and the held-out split: prepared once on the driver, shared
    by a training run, every trial of a sweep, every rung of the ladder, every DeepCluster iteration."""

    targets: Targets
    paths: list[str]
    y: np.ndarray  # what targets.encode made: (n, L) 0/1 rows, or (n,) class ids
    is_val: np.ndarray
    policy: BadInputPolicy
    source: str
    validation: str  # the validation part that scores this data
    pack: str | None = None  # the pack the images are in (`paths` are then their names in it)
    bands: InputBands | None = None  # multiband images (`--image-format tif`): what the network takes; None: RGB

    @property
    def sizes(self) -> dict:
        return {"n_train": int((~self.is_val).sum()), "n_val": int(self.is_val.sum())}

    @property
    def score_metric(self) -> str:
        """What the best epoch and the best trial are chosen by: "val_f2", "val_accuracy", ..."""
        return f"val_{VALIDATIONS.get(self.validation).metric}"


def settle(config: TrainConfig, data=None, labels=None, images=None) -> TrainConfig:
    """The config as every worker must see it, checked on the driver before Ray starts: its task
    inferred from the data when not given (`parts.infer_task`), its validation part the task's own
    when not given, its weights path absolute (workers and trials run in other directories, maybe on
    other nodes), its parts and freeze depth known."""
    parse_freeze(config.freeze)
    if config.bands and config.image_format != "tif":
        raise QdeepError("--bands is for multiband images: add --image-format tif")
    task = config.task or (Pack(str(data)).task if data and is_pack(data) else infer_task(data, labels, images))
    targets = TARGETS.get(task)
    validation = config.validation or targets.validation
    VALIDATIONS.get(validation)
    FIT_STRATEGIES.get(config.fit_strategy)
    if config.balance == "uniform" and targets.dtype != np.int64:
        raise QdeepError(f"--balance uniform samples classes uniformly: it needs a one-class-per-image task, "
                         f"not {task!r} (use --balance weights)")
    return replace(config, task=task, validation=validation, weights=resolve_weight_path(config.weights))


def prepare_data(data=None, labels=None, images=None, on_bad_image: str = "error", val_fraction: float = 0.2,
                 seed: int = 0, task: str = "multilabel", validation: str | None = None, image_format: str = "jpg",
                 bands: str | None = None) -> TrainingData:
    """Load, decode-check (on Ray: call inside a Ray session), encode and split the training images:
    a folder's, or a pack's (`--data PACK`: its training rows, decoding checked when it was packed).
    Multiband images (`image_format` tif) also get their InputBands (`bands` selects), and every
    image is checked to have the bands of the first."""
    policy = BadInputPolicy(on_bad_image)
    dataset = load_dataset(policy, data=data, labels=labels, images=images, image_format=image_format)
    chosen = input_bands(image_format, dataset.train.paths, bands, Pack(dataset.pack) if dataset.pack else None)
    train = dataset.train if dataset.pack else check_images(dataset.train, policy,
                                                             decode=chosen.read if chosen else load_rgb)
    names, tags, origins = [str(p) for p in train.paths], train.tags, train.origins
    targets = TARGETS.get(task).from_labels(tags)
    y = targets.encode(tags, origins)
    validation = validation or targets.validation
    is_val = VALIDATIONS.get(validation)().holdout(y, val_fraction, seed)
    return TrainingData(targets, names, y, is_val, policy, dataset.source, validation, pack=dataset.pack, bands=chosen)


def resolve_weight_path(weights: str) -> str:
    """A weights PATH made absolute here, on the driver; the named weights and URIs as they are."""
    return weights if weights.strip().lower() in NAMED_WEIGHTS or is_uri(weights) else str(Path(weights).resolve())


def check_model(config: TrainConfig, num_labels: int, bands: InputBands | None = None) -> None:
    """Fail on the driver, in one line, on a bad arch, freeze depth, fit strategy, weights, band
    adaptation or input size, not in every worker."""
    model = build_model(config.arch, num_labels, config.weights, config.freeze, bands and bands.names,
                        config.band_init, config.frozen_stem).eval()
    FIT_STRATEGIES.get(config.fit_strategy)().stages(config.as_dict())
    try_input_size(model, config.arch, config.image_size or model.qdeep_arch.input_size,
                   len(bands.index) if bands else 3)


def try_input_size(run, arch: str, size: int, channels: int = 3):
    """`run` (a model, or a function of one) on one blank image of `channels` x size x size; one
    line if `arch` cannot take it."""
    try:
        with torch.no_grad():
            return run(torch.zeros(1, channels, size, size))
    except RuntimeError as exc:
        raise QdeepError(f"{arch} cannot take {size}x{size} px input ({str(exc).splitlines()[0]}); "
                         "use a larger --image-size") from None


def loop_config(config: TrainConfig, data: TrainingData, mlflow_uri: str | None, mlflow_run_id: str | None,
                plugins: list[str] | None = None, train_on_all: bool = False) -> dict:
    """Everything `worker.train_func` needs, as plain values: a few numbers per label at most,
    whatever the number of images (they reach the workers as Ray Data datasets: `ingest`).
    `train_on_all`: the validation rows are trained on too (a refit; its validation scores are then
    no longer held out)."""
    train = np.ones_like(data.is_val) if train_on_all else ~data.is_val
    weights = data.targets.loss_weights(data.y[train]) if config.balance == "weights" else None
    return {
        **config.as_dict(),
        "task": data.targets.kind,
        "validation": data.validation,
        "score_metric": data.score_metric,
        "labels": data.targets.vocabulary,
        "n_train": int(train.sum()),
        "n_val": int(data.is_val.sum()),
        "train_on_all": train_on_all,
        "input_bands": data.bands.to_dict() if data.bands else None,
        "loss_weights": weights,
        "plugins": list(plugins or []),
        "launch_id": uuid.uuid4().hex,
        "mlflow_uri": mlflow_uri,
        "mlflow_run_id": mlflow_run_id,
    }
