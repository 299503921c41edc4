"""Batch inference of an exported CNN with Ray Data: an actor pool (`tasks.model_stage`: GPU actors
when present) loads the model once per actor and decodes its own batches of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from qdeep.data import BadInputPolicy, ImageSet
from qdeep.data.images import ImageDecodeError
from qdeep.config import DEFAULT_BAND_INIT
from qdeep.data.inputs import InputBands, model_input
from qdeep.data.pack import Pack
from qdeep.distributed.ingest import pack_join
from qdeep.distributed.tasks import (check_visible_everywhere, model_stage, not_visible, raise_user_error,
                                     raising_udf_errors)
from qdeep.errors import QdeepError
from qdeep.io import read_model_json
from qdeep.parts.targets import load_targets

CNN_KIND = "cnn"  # config.json "kind" of models exported by `qdeep train`


def read_config(model_dir: Path) -> dict:
    """OUT/model/config.json of `qdeep train`, with the keys `load_exported` needs; else one line naming it."""
    path = model_dir / "config.json"
    config = read_model_json(path)
    if not isinstance(config, dict):
        raise QdeepError(f"model config {path} is not a JSON object")
    if not isinstance(config.get("arch"), str):
        raise QdeepError(f"model config {path} names no arch")
    labels = config.get("num_labels")
    if not _positive_int(labels):
        raise QdeepError(f"model config {path}: num_labels must be a positive integer, not {labels!r}")
    size = config.get("image_size")
    if size is not None and not _positive_int(size):
        raise QdeepError(f"model config {path}: image_size must be a positive integer or null, not {size!r}")
    bands = config.get("bands")
    config["bands"] = InputBands.from_dict(bands, f"model config {path}") if bands is not None else None
    return config


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def load_exported(model_dir: Path, device: str = "cpu", config: dict | None = None) -> torch.nn.Module:
    """The exported model (OUT/model), rebuilt from its config.json's arch (`config`, when the caller
    has read it already) and loaded with weights_only=True; a missing, corrupt, refused or
    mismatched model.pt is one QdeepError line naming it."""
    from qdeep.models import build_model
    from qdeep.models.weights import load_strict, read_state_dict

    config = config or read_config(model_dir)
    path = model_dir / "model.pt"
    if not path.is_file():
        raise QdeepError(f"{model_dir}: no model.pt (not a complete `qdeep train` model directory)")
    state = read_state_dict(path, "model file")
    try:
        bands = config["bands"]
        model = build_model(config["arch"], config["num_labels"], "none", "none", bands and bands.names,
                            config.get("band_init", DEFAULT_BAND_INIT))
    except QdeepError as err:  # e.g. an arch this qdeep does not know
        raise QdeepError(f"model config {model_dir / 'config.json'}: {err}") from None
    load_strict(model, state, path, "model file")
    return model.to(device).eval()


class CNNInference:
    """Ray Data callable class: one model per actor; rows that fail to decode carry the reason."""

    def __init__(self, model_dir: str, tta: bool = False):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        config = read_config(Path(model_dir))
        self.model = load_exported(Path(model_dir), self.device, config)
        self.read = model_input(self.model.qdeep_arch, config["image_size"], config["bands"])
        self.tta, self.num_labels = tta, config["num_labels"]
        self.targets = load_targets(Path(model_dir) / "labels.json")

    def __call__(self, batch: dict) -> dict:
        tensors, errors = [], []
        for ref in batch["ref"]:  # a path, or a pack's bytes
            try:
                tensors.append(self.read(ref))
                errors.append("")
            except FileNotFoundError:  # listed by the driver, missing on this node
                raise not_visible([ref], len(batch["ref"])) from None
            except ImageDecodeError as exc:
                errors.append(exc.reason)
        errors = np.array(errors)
        proba = np.full((len(errors), self.num_labels), np.nan, dtype=np.float32)
        if tensors:
            proba[errors == ""] = self._predict(torch.stack(tensors).to(self.device))
        return {"index": batch["index"], "proba": proba, "error": errors}

    @torch.no_grad()
    def _predict(self, x: torch.Tensor) -> np.ndarray:
        """The task's activation (sigmoid, softmax); with TTA, averaged over the 8 flips/rotations of the square."""
        with torch.autocast(x.device.type, enabled=x.device.type == "cuda"):
            views = [x]
            if self.tta:
                views = [torch.rot90(v, k, dims=(2, 3)) for v in (x, x.flip(3)) for k in range(4)]
            return torch.stack([self.targets.activation(self.model(v).float()) for v in views]).mean(0).cpu().numpy()


class CNNPredictor:
    """`qdeep predict` for models exported by `qdeep train`. The model is loaded once here, on the
    driver before Ray starts, so that a bad one is one line, not one per actor."""

    def __init__(self, model_dir: Path, tta: bool = False, batch_size: int = 64):
        self.model_dir, self.tta, self.batch_size = model_dir, tta, batch_size
        config = read_config(model_dir)
        load_exported(model_dir, config=config)
        self.num_labels = config["num_labels"]
        self.image_format = "tif" if config["bands"] else "jpg"  # which of a Planet layout's test folders

    def predict_proba(self, images: ImageSet, policy: BadInputPolicy, pack: Pack | None = None
                      ) -> tuple[np.ndarray, ImageSet]:
        """Probabilities for `images`: files at their paths, or, with `pack`, its images of those names."""
        import ray

        n = len(images.names)
        if pack is None:
            check_visible_everywhere(images.paths)  # before the actors load the model
            rows = ray.data.from_items([{"index": i, "ref": str(p)} for i, p in enumerate(images.paths)])
        else:
            rows = pack_join(pack, pa.table({"index": np.arange(n), "image": pa.array(images.names, pa.string())}))
        ds = rows.map_batches(
            CNNInference, fn_constructor_kwargs={"model_dir": str(self.model_dir), "tta": self.tta},
            **model_stage(n, self.batch_size))
        proba = np.zeros((n, self.num_labels), dtype=np.float32)
        keep, seen = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
        try:
            for batch in raising_udf_errors(ds).iter_batches(batch_size=None, batch_format="numpy"):
                proba[batch["index"]] = batch["proba"]
                seen[batch["index"]] = True
                for i, error in zip(batch["index"], batch["error"]):
                    if error:
                        policy.report(str(images.paths[i]), error)
                        keep[i] = False
        except Exception as exc:  # a node's `ImagesNotVisible` comes out as itself, in one line
            raise_user_error(exc)
        if not seen.all():  # never dropped in silence
            raise QdeepError(f"{len(seen) - seen.sum()} images were never predicted, e.g. "
                             f"{images.names[int(np.argmin(seen))]}")
        return proba[keep], images.subset(keep.tolist())
