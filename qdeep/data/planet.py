"""The Kaggle Planet layout (train_v2.csv + train-jpg/ + test-jpg/), and any labels CSV + folder.

Every CSV row and every file in the image folders is accounted for: used, or passed to the
bad-input policy (error naming file and line, or a counted skip).
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qdeep.data.folders import image_id, scan_images
from qdeep.data.images import BadInputPolicy
from qdeep.errors import QdeepError

HEADER = ["image_name", "tags"]
TRAIN_CSVS = ("train_v2.csv", "train.csv")
TRAIN_DIR = "train-jpg"
TEST_DIRS = ("test-jpg", "test-jpg-additional")
# `--image-format`: the Planet layout's folders of each format (Kaggle shipped both): 8-bit RGB JPEGs,
# or 4-band (blue, green, red, near-infrared) 16-bit GeoTIFFs
PLANET_FOLDERS = {"jpg": (TRAIN_DIR, TEST_DIRS), "tif": ("train-tif-v2", ("test-tif-v2",))}
IMAGE_FORMATS = tuple(PLANET_FOLDERS)
SAMPLE_SUBMISSION = "sample_submission_v2.csv"
DELIMITER = ","

# The CSVs' text encoding: UTF-8 (a BOM is dropped) unless a command says otherwise (`--encoding`).
_ENCODING: contextvars.ContextVar[str] = contextvars.ContextVar("qdeep_csv_encoding", default="utf-8")


@contextlib.contextmanager
def csv_encoding(encoding: str | None) -> Iterator[None]:
    """Read every CSV in the block as `encoding` (None: leave the current one, UTF-8 by default)."""
    if not encoding:
        yield
        return
    codecs.lookup(encoding)  # LookupError for an unknown codec
    token = _ENCODING.set(encoding)
    try:
        yield
    finally:
        _ENCODING.reset(token)


def decode_csv(csv_path: Path) -> str:
    """The text of `csv_path`; bytes that are not in the CSV encoding are an error naming the file, line and column."""
    encoding = _ENCODING.get()
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        data = csv_path.read_bytes()
    except OSError as exc:
        raise QdeepError(f"{csv_path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise QdeepError(f"{csv_path}:{line}: not {encoding} text (byte 0x{data[exc.start]:02x} at column {column}); "
                         "save the file as UTF-8, or give its encoding with --encoding (e.g. --encoding latin-1)"
                         ) from None


@dataclass
class ImageSet:
    """Images with their names (the CSV's image_name) and, for training data, their tags."""

    names: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    tags: list[list[str]] | None = None
    origins: list[str] | None = None  # where each image's labels came from ("file.csv:12", or its folder)

    def __len__(self) -> int:
        return len(self.names)

    def vocabulary(self) -> list[str]:
        """The sorted set of tags seen: the label order every model saves and predicts in."""
        return sorted({t for tags in self.tags or [] for t in tags})

    def subset(self, keep: list[bool]) -> ImageSet:
        def pick(xs):
            return None if xs is None else [x for x, k in zip(xs, keep) if k]

        return ImageSet(pick(self.names), pick(self.paths), pick(self.tags), pick(self.origins))


@dataclass
class Dataset:
    train: ImageSet
    test: ImageSet
    source: str
    pack: str | None = None  # the pack the images are in (`qdeep pack`): their `paths` are their names in it


def train_csv(data_dir: Path) -> Path | None:
    """`DIR/train_v2.csv`, else `DIR/train.csv`, else None."""
    return next((data_dir / n for n in TRAIN_CSVS if (data_dir / n).exists()), None)


def load_planet(data_dir: str | Path, policy: BadInputPolicy, image_format: str = "jpg") -> Dataset:
    """`DIR/train_v2.csv` (or train.csv) + `DIR/train-jpg/` (`train-tif-v2/` for "tif"), and test
    images when present."""
    data_dir = Path(data_dir).resolve()  # workers on other processes and nodes need absolute paths
    if not data_dir.is_dir():
        raise QdeepError(f"{data_dir}: data directory not found")
    csv_path = train_csv(data_dir)
    if csv_path is None:
        raise QdeepError(f"{data_dir}: no {' or '.join(TRAIN_CSVS)} (expected the Kaggle Planet layout)")
    train = read_labeled(csv_path, data_dir / PLANET_FOLDERS[image_format][0], policy, recursive=False)
    return Dataset(train=train, test=read_test(data_dir, policy, image_format), source=str(data_dir))


def load_labeled_folder(labels_csv: str | Path, images_dir: str | Path, policy: BadInputPolicy) -> Dataset:
    """Any labels CSV (image_name,tags) over any image folder; no test split."""
    train = read_labeled(Path(labels_csv).resolve(), Path(images_dir).resolve(), policy, recursive=True)
    return Dataset(train=train, test=ImageSet(), source=str(labels_csv))


def load_class_folders(images_dir: str | Path, policy: BadInputPolicy) -> Dataset:
    """One sub-folder per class (`DIR/<class>/**/*.jpg`): each image's label is its folder's name.
    Files directly in DIR belong to no class and go to the policy."""
    root = Path(images_dir).resolve()
    out = ImageSet(tags=[], origins=[])
    for path in scan_images(root, policy, recursive=True):
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            policy.report(str(path), f"image is not inside a class folder of {root}")
            continue
        out.names.append(rel.as_posix())
        out.paths.append(path)
        out.tags.append([rel.parts[0]])
        out.origins.append(str(path))
    if len({t[0] for t in out.tags}) < 2:
        raise QdeepError(f"{root}: a folder-per-class layout needs at least 2 class folders with images")
    return Dataset(train=out, test=ImageSet(), source=str(root))


def read_labeled(csv_path: Path, images_dir: Path, policy: BadInputPolicy, recursive: bool) -> ImageSet:
    """Rows of `csv_path` matched to files of `images_dir`; unmatched files are reported too."""
    rows = _read_rows(csv_path, policy)
    if not images_dir.is_dir():
        raise QdeepError(f"{images_dir}: image directory not found")
    on_disk = scan_images(images_dir, policy, recursive=recursive)
    # A row names its image by its path below the folder, with or without the extension (the whole path wins).
    by_id = {image_id(p, images_dir): p for p in on_disk}
    lookup = by_id | {p.relative_to(images_dir).as_posix(): p for p in on_disk}
    out = ImageSet(tags=[], origins=[])
    used = set()
    for line, name, tags in rows:
        path = lookup.get(name)
        if path is None:
            policy.report(f"{csv_path}:{line}", f"image {name!r} not found in {images_dir}")
            continue
        used.add(path)
        out.names.append(name)
        out.paths.append(path)
        out.tags.append(tags)
        out.origins.append(f"{csv_path}:{line}")
    for path in on_disk:
        if path not in used:
            policy.report(str(path), f"image has no row in {csv_path}")
    if not out.names:
        raise QdeepError(f"{csv_path}: no usable rows")
    return out


def read_test(data_dir: Path, policy: BadInputPolicy, image_format: str = "jpg") -> ImageSet:
    """Test images from test-jpg/ and test-jpg-additional/ (test-tif-v2/ for "tif"), in
    sample-submission order if given."""
    data_dir = Path(data_dir).resolve()
    test_dirs = PLANET_FOLDERS[image_format][1]
    dirs = [data_dir / d for d in test_dirs if (data_dir / d).is_dir()]
    by_name: dict[str, Path] = {}
    for d in dirs:
        for path in scan_images(d, policy, recursive=False):
            by_name[image_id(path, d)] = path
    sample = data_dir / SAMPLE_SUBMISSION
    if not sample.exists():
        names = sorted(by_name)
        return ImageSet(names=names, paths=[by_name[n] for n in names])
    out = ImageSet()
    for line, name, _ in _read_rows(sample, policy, check_tags=False):
        if name not in by_name:
            policy.report(f"{sample}:{line}", f"image {name!r} not found in {' or '.join(map(str, dirs)) or test_dirs[0]}")
            continue
        out.names.append(name)
        out.paths.append(by_name.pop(name))
    for path in by_name.values():
        policy.report(str(path), f"test image has no row in {sample}")
    return out


def _read_rows(csv_path: Path, policy: BadInputPolicy, check_tags: bool = True) -> list[tuple[int, str, list[str]]]:
    """(line, image_name, tags) for each well-formed, first-seen row; the rest go to the policy.
    A tag holding the delimiter (a quoted "clear,primary") is a malformed row, not a label."""
    if not csv_path.is_file():
        raise QdeepError(f"{csv_path}: file not found")
    records = _records(csv_path, decode_csv(csv_path))
    _, header = next(records, (0, None))
    if header is None:
        raise QdeepError(f"{csv_path}: empty CSV (expected header 'image_name,tags' and rows)")
    if [h.strip() for h in header] != HEADER:
        raise QdeepError(f"{csv_path}:1: expected header 'image_name,tags', got {','.join(header)!r}")
    rows, first_line, n_data_rows = [], {}, 0
    for line, row in records:
        if not row:
            continue
        n_data_rows += 1
        if len(row) != 2 or not row[0].strip():
            policy.report(f"{csv_path}:{line}", f"malformed row {','.join(row)!r} (expected image_name,tags)")
            continue
        name, tags = row[0].strip(), sorted(set(row[1].split()))
        bad = [t for t in tags if DELIMITER in t] if check_tags else []
        if bad:
            policy.report(f"{csv_path}:{line}", f"tag {bad[0]!r} contains the delimiter {DELIMITER!r} "
                                                f"(tags are separated by spaces, e.g. 'clear primary')")
            continue
        if name in first_line:
            policy.report(f"{csv_path}:{line}", f"duplicate image_name {name!r} (first on line {first_line[name]})")
            continue
        first_line[name] = line
        rows.append((line, name, tags))
    if n_data_rows == 0:
        raise QdeepError(f"{csv_path}: empty CSV (header only, no rows)")
    return rows


def _records(csv_path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of each record (its last line, for a quoted field spanning lines). A stray or
    unclosed quote is an error naming the line its record starts on: the rows after it cannot be trusted."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=DELIMITER, strict=True)
    end = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise QdeepError(f"{csv_path}:{end + 1}: not a readable CSV ({exc}; a stray or unclosed quote?)") from None
        end = reader.line_num
        yield end, row


def load_dataset(policy: BadInputPolicy, data: str | Path | None = None, labels: str | Path | None = None,
                 images: str | Path | None = None, image_format: str = "jpg") -> Dataset:
    """`--data DIR` (Kaggle Planet layout, or a pack: a folder or URI), `--labels CSV --images DIR`,
    or `--images DIR` alone (one sub-folder per class). `image_format` chooses the Planet layout's
    folders (the other layouts list whatever images they hold)."""
    if data and not (labels or images):
        from qdeep.data.pack import Pack, is_pack

        if is_pack(data):
            pack = Pack(str(data))
            pack.check_format(image_format, f"--data {data}")
            return pack.dataset()
        return load_planet(data, policy, image_format)
    if labels and images and not data:
        return load_labeled_folder(labels, images, policy)
    if images and not (data or labels):
        return load_class_folders(images, policy)
    raise QdeepError("give --data DIR, or --labels CSV with --images DIR, or --images DIR (a folder per class)")
