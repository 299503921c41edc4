"""Up-front checks of the paths a command reads and writes, before Ray starts or any image is read.

Each check raises a one-line `QdeepError` naming the option and the path: an input that is missing,
of the wrong kind (a file where a folder is expected, or the other way round) or empty; an output
that cannot be created (under a regular file, not writable, a file where a folder is expected); an
output inside the input data (a rerun would read the previous run's outputs as images). No Ray here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from qdeep.config import NAMED_WEIGHTS
from qdeep.data.images import IMAGE_EXTENSIONS, is_image_file
from qdeep.data.pack import is_pack
from qdeep.data.planet import PLANET_FOLDERS, TRAIN_CSVS, train_csv
from qdeep.errors import QdeepError
from qdeep.io import child, exists, is_uri


def _name(path, option: str | None) -> str:
    return f"{option} {path}" if option else str(path)


def _local(path) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.lower().startswith("file://") else text)


def input_dir(path, option: str | None = None) -> Path:
    """An existing, readable, non-empty directory; returns it resolved."""
    p = Path(path)
    if not p.exists():
        raise QdeepError(f"{_name(path, option)}: no such directory")
    if not p.is_dir():
        raise QdeepError(f"{_name(path, option)}: not a directory")
    try:
        with os.scandir(p) as entries:
            empty = next(entries, None) is None
    except OSError as exc:
        raise QdeepError(f"{_name(path, option)}: cannot be read ({exc.strerror or exc})") from None
    if empty:
        raise QdeepError(f"{_name(path, option)}: empty directory")
    return p.resolve()


def input_file(path, option: str | None = None) -> Path:
    """An existing, readable, non-empty regular file; returns it resolved."""
    p = Path(path)
    if not p.exists():
        raise QdeepError(f"{_name(path, option)}: no such file")
    if p.is_dir():
        raise QdeepError(f"{_name(path, option)}: is a directory, not a file")
    if not os.access(p, os.R_OK):
        raise QdeepError(f"{_name(path, option)}: cannot be read (permission denied)")
    if p.stat().st_size == 0:
        raise QdeepError(f"{_name(path, option)}: empty file")
    return p.resolve()


def image_dir(path, option: str | None = "--images") -> Path:
    """A folder holding at least one image, in it or below it."""
    root = input_dir(path, option)
    if not any(is_image_file(f) for _, _, files in os.walk(root) for f in files):
        raise QdeepError(f"{_name(path, option)}: no images ({', '.join(IMAGE_EXTENSIONS)}) in or below this folder")
    return root


def planet_dir(path, option: str | None = "--data", split: str = "train", image_format: str | None = "jpg") -> Path:
    """A Kaggle Planet layout: train_v2.csv (or train.csv) and train-jpg/ for `split` "train",
    test-jpg/ (or test-jpg-additional/) for "test"; train-tif-v2/ and test-tif-v2/ for "tif"
    (None: the test folders of any format)."""
    root = input_dir(path, option)
    train_dir, test_dirs = PLANET_FOLDERS[image_format or "jpg"]
    if image_format is None:
        test_dirs = tuple(d for _, dirs in PLANET_FOLDERS.values() for d in dirs)
    if split == "train":
        csv = train_csv(root)
        if csv is None:
            raise QdeepError(f"{_name(path, option)}: no {' or '.join(TRAIN_CSVS)} (expected the Kaggle Planet "
                             f"layout: train_v2.csv, {train_dir}/)")
        input_file(csv)
        if not (root / train_dir).is_dir():
            raise QdeepError(f"{_name(path, option)}: no {train_dir}/ folder (expected the Kaggle Planet layout)")
    elif not any((root / d).is_dir() for d in test_dirs):
        raise QdeepError(f"{_name(path, option)}: no {' or '.join(test_dirs)}/ folder of test images")
    return root


PACK_READERS = "train, tune, ladder, baseline, predict"  # the commands whose --data may be a pack (`qdeep pack`)


def is_pack_or_uri(path) -> bool:
    """A pack, or a URI (which only a pack can be); a pack is checked as it opens."""
    return is_uri(path) or is_pack(path)


def training_data(data=None, labels=None, images=None, packs: bool = False, image_format: str = "jpg") -> None:
    """`--data` a Planet layout (or, where the command reads `packs`, a pack: a folder or URI),
    `--labels` a CSV, `--images` a folder of images, where given."""
    if data and is_pack_or_uri(data):
        if not packs:
            raise QdeepError(f"--data {data}: a pack (or a URI); this command reads folders only "
                             f"(packs: {PACK_READERS})")
        return  # a pack is checked as it opens (its manifest, every shard's size)
    if data:
        planet_dir(data, "--data", image_format=image_format)
    if labels:
        input_file(labels, "--labels")
    if images:
        image_dir(images, "--images")


def weights_file(weights: str | None, option: str = "--weights") -> None:
    """A weights PATH must be a non-empty file; the named weights (none, imagenet, bundled) pass."""
    if weights and weights.strip().lower() not in NAMED_WEIGHTS:  # as models.build_model reads them
        if is_uri(weights):
            if not exists(weights):
                raise QdeepError(f"{_name(weights, option)}: no such file")
            return
        input_file(weights, option)


def _creatable(p: Path, option: str | None, original) -> None:
    """The nearest existing ancestor of `p` is a writable directory."""
    anc = p
    while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise QdeepError(f"{_name(original, option)}: cannot be created: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise QdeepError(f"{_name(original, option)}: cannot be created: {anc} is not writable")


def _not_inside(target: Path, option: str | None, original, inputs: Iterable[tuple[str, object]]) -> None:
    for input_option, input_path in inputs:
        if not input_path or is_uri(input_path):
            continue
        root = Path(input_path).resolve()
        if target == root or root in target.parents:
            raise QdeepError(f"{_name(original, option)}: is inside the input data ({input_option} {input_path}); "
                             f"a rerun would read these outputs as input: choose an {option or 'output'} outside it")


def output_dir(path, option: str | None = "--out", inputs: Iterable[tuple[str, object]] = ()) -> None:
    """A directory that exists or can be created, and is neither one of `inputs` ((option, path)
    pairs of input folders) nor inside one."""
    if not path or is_uri(path):
        return
    p = _local(path).absolute()
    if p.exists() and not p.is_dir():
        raise QdeepError(f"{_name(path, option)}: exists and is not a directory")
    if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
        raise QdeepError(f"{_name(path, option)}: not writable")
    _creatable(p, option, path)
    _not_inside(p.resolve(), option, path, inputs)


def output_file(path, option: str | None = "--out", inputs: Iterable[tuple[str, object]] = ()) -> None:
    """A file that can be written (replaced if it exists), and is not inside one of `inputs`; a URI
    (s3://...) is for its store to refuse."""
    if is_uri(path):
        return
    p = _local(path).absolute()
    if p.is_dir():
        raise QdeepError(f"{_name(path, option)}: is a directory (expected a file name)")
    if p.exists() and not os.access(p, os.W_OK):
        raise QdeepError(f"{_name(path, option)}: not writable")
    _creatable(p.parent, option, path)
    _not_inside(p.resolve(), option, path, inputs)


def os_error_line(exc: OSError) -> str | None:
    """`PATH: reason` for a filesystem error that names its path, else None."""
    if exc.filename is None:
        return None
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {exc.strerror or type(exc).__name__}"


def model_dir(path, option: str | None = "--model") -> Path:
    """A saved model: a directory with config.json (or a URI, s3://.../model, with one)."""
    if is_uri(path):
        if not exists(child(path, "config.json")):
            raise QdeepError(f"{_name(path, option)}: not a qdeep model directory (no config.json)")
        return path
    p = Path(path)
    if not p.exists():
        raise QdeepError(f"{_name(path, option)}: no such directory")
    if not p.is_dir():
        raise QdeepError(f"{_name(path, option)}: not a directory (expected a model directory, e.g. OUT/model)")
    if not (p / "config.json").is_file():
        raise QdeepError(f"{_name(path, option)}: not a qdeep model directory (no config.json)")
    return p.resolve()
