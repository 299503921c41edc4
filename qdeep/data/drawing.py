"""Drawing primitives of the synthetic tiles (tiles.py): a layer PIL draws crisp shapes on, then
composited onto the float tile (RGB, or RGB + near-infrared), and the random shapes and colours
the tags are drawn with."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


class Layer:
    """A drawing surface the shape of the tile `img` (RGB, or RGB + NIR kept in an RGBA image's
    fourth channel) plus coverage mask, so PIL can draw crisp shapes that are then composited
    (optionally softened or shaded) onto the float tile. Each shape's `nir` is its NIR value, used
    only when the tile has that band."""

    def __init__(self, img: np.ndarray):
        size, self.nir = img.shape[0], img.shape[2] == 4
        self.rgb = Image.new("RGBA" if self.nir else "RGB", (size, size))
        self.mask = Image.new("L", (size, size))
        self._rgb_draw = ImageDraw.Draw(self.rgb)
        self._mask_draw = ImageDraw.Draw(self.mask)

    def _fill(self, colour, nir: float) -> tuple:
        return (*colour, int(nir)) if self.nir else colour

    def polygon(self, points, colour, nir: float) -> None:
        self._rgb_draw.polygon(points, fill=self._fill(colour, nir))
        self._mask_draw.polygon(points, fill=255)

    def ellipse(self, box, colour, nir: float) -> None:
        self._rgb_draw.ellipse(box, fill=self._fill(colour, nir))
        self._mask_draw.ellipse(box, fill=255)

    def line(self, points, colour, width: int, nir: float) -> None:
        self._rgb_draw.line(points, fill=self._fill(colour, nir), width=width, joint="curve")
        self._mask_draw.line(points, fill=255, width=width, joint="curve")

    def composite(self, img: np.ndarray, opacity: float = 1.0, blur: float = 0.0,
                  shade: np.ndarray | None = None, rgb_opacity: float = 1.0) -> np.ndarray:
        """Blend onto ``img`` in place (the visible bands at `rgb_opacity` of the NIR band's
        opacity when there is one); returns the alpha used (H, W)."""
        mask = self.mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else self.mask
        alpha = np.asarray(mask, dtype=np.float32) * (opacity / 255.0)
        top = np.asarray(self.rgb, dtype=np.float32)
        if shade is not None:
            top = top * shade[..., None]
        weight = alpha[..., None] * bands(img, (rgb_opacity,) * 3, 1.0) if self.nir else alpha[..., None]
        img += weight * (top - img)
        return alpha


def bands(img: np.ndarray, rgb, nir: float) -> np.ndarray:
    """A per-band value for `img`'s bands: `rgb`, and `nir` too when it has that band."""
    return np.asarray((*rgb, nir) if img.shape[2] == 4 else rgb, dtype=np.float32)


def jittered(rng: np.random.Generator, base, spread: float = 12.0) -> tuple[int, int, int]:
    """Per-image colour jitter so the model learns a colour range, not one RGB value."""
    c = np.clip(np.asarray(base, dtype=np.float64) + rng.normal(0.0, spread, 3), 0, 255)
    return tuple(int(v) for v in c)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish noise with features about ``size / cells`` pixels wide."""
    cells = max(2, int(cells))
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))


def edge_point(rng: np.random.Generator, size: int, side: int) -> np.ndarray:
    """A point just outside one tile edge, so lines cross the whole tile."""
    t = rng.uniform(0.1, 0.9) * size
    lo, hi = -0.05 * size, 1.05 * size
    return np.array([(lo, t), (hi, t), (t, lo), (t, hi)][side])


def curve(rng: np.random.Generator, size: int, bend: float, n: int = 12,
           start: np.ndarray | None = None, end: np.ndarray | None = None) -> list[tuple[float, float]]:
    """A quadratic Bezier from edge to edge: straight when ``bend`` is 0, river-like when large."""
    sides = rng.permutation(4)[:2]
    p0 = edge_point(rng, size, sides[0]) if start is None else start
    p2 = edge_point(rng, size, sides[1]) if end is None else end
    mid = (p0 + p2) / 2
    d = p2 - p0
    normal = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9)
    p1 = mid + normal * rng.uniform(-bend, bend) * size
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    return [tuple(p) for p in pts.tolist()]


def blob(rng: np.random.Generator, cx: float, cy: float, r: float, vertices: int,
          irregularity: float) -> list[tuple[float, float]]:
    """An irregular polygon: angular when ``vertices`` is small, patch-like when large."""
    angles = np.sort(rng.uniform(0, 2 * math.pi, vertices))
    radii = r * (1 + irregularity * rng.uniform(-1, 1, vertices))
    return list(zip((cx + radii * np.cos(angles)).tolist(), (cy + radii * np.sin(angles)).tolist()))


def rotated_rect(cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    corners = ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]
