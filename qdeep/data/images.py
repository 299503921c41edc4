"""Image decoding and the bad-input policy shared by every command that reads images."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from qdeep.errors import BadInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
EXIF_ORIENTATION = 0x0112
JPEG_MAGIC = b"\xff\xd8\xff"

# Truncated JPEGs must fail loudly, never decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(BadInputError):
    """A corrupt, truncated or unreadable image; keeps path and reason apart for skip reports."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | Path | bytes, name: str = "image bytes") -> Image.Image:
    """Decode any supported image (a path, or an encoded image's bytes, e.g. a pack's, called `name`
    in errors) to 8-bit RGB, upright (its EXIF orientation applied, as viewers show it); corrupt or
    truncated ones raise ImageDecodeError.
    A missing file raises FileNotFoundError: the caller listed it, so where it is missing (another
    node, storage that went away) is a setup problem for the caller to name, not bad input to skip."""
    source = io.BytesIO(path) if isinstance(path, (bytes, bytearray, memoryview)) else path
    try:
        with Image.open(source) as img:
            img.load()  # decodes and releases the file; the pixels outlive the `with`
            img = upright(img)
            return img if img.mode == "RGB" else to_rgb(img)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(path if source is path else name, f"cannot decode image ({exc})") from None


def rgb_pixels(path: str | Path | bytes, name: str = "image bytes") -> np.ndarray:
    """`load_rgb`'s image as (H, W, 3) uint8 pixels. A JPEG goes through TorchCodec's `decode_jpeg`
    (1.1-1.7x Pillow's speed here, scripts/bench_ingest.py; the same libjpeg-turbo, so the same pixels,
    EXIF orientation, greyscale and CMYK included: tests/test_data.py); any other format, or a JPEG
    it refuses, through `load_rgb`, whose verdict on a bad file stands."""
    data = path if isinstance(path, (bytes, bytearray, memoryview)) else None
    if data is None and str(path).lower().endswith((".jpg", ".jpeg")):
        with open(path, "rb") as f:  # a missing file: FileNotFoundError, as load_rgb raises it
            data = f.read()
    if data is not None and data[:3] == JPEG_MAGIC:
        try:  # (3, H, W) pixels whose memory is (H, W, 3): the permute is a view
            return _decode_jpeg()(bytes(data)).permute(1, 2, 0).numpy()
        except RuntimeError:
            pass  # load_rgb decodes it or names the file
    return np.asarray(load_rgb(path, name))


@functools.cache
def _decode_jpeg():
    """TorchCodec's JPEG decoder (RGB, upright), imported on first use (`qdeep synth` needs no torch).
    torchvision's `decode_jpeg` gives the same pixels but is deprecated since torchvision 0.29."""
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg


def upright(img: Image.Image) -> Image.Image:
    """The image as its EXIF orientation tag says it is seen (rotated/flipped); unchanged without one."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels as stored
        return img
    return img if orientation in (0, 1) else ImageOps.exif_transpose(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images all become 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8))
    elif img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


@dataclass
class BadInputPolicy:
    """What to do with an unusable file or CSV line: stop with an error (default) or skip and count.

    Skips are kept (file and reason) so commands can report them in metrics.json and MLflow.
    """

    mode: str = "error"
    skipped: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("error", "skip"):
            raise ValueError(f"on-bad-image must be 'error' or 'skip', not {self.mode!r}")

    def report(self, where: str, reason: str) -> None:
        """`where` is a file path, or `file:line` for a CSV row."""
        if self.mode == "error":
            raise BadInputError(f"{where}: {reason} (--on-bad-image skip skips and counts such inputs)")
        self.skipped.append({"file": str(where), "reason": reason})

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)
