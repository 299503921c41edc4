"""What each group (cluster) of images looks like: its dominant colours, its texture, and what sets it
apart from the whole collection, in numbers and in words.

`describe_image` turns one RGB image into a few interpretable numbers (`FEATURES`: colour from
CIELAB, texture from a grey-level co-occurrence matrix and Canny edges); `lab_pixels` samples its
pixels in CIELAB. `profile_groups` then summarises every group: a k-means `palette` of its sampled pixels, the
median and interquartile range of each feature, each median's z-score against the collection, and a
short sentence (`describe`) such as "greener and smoother than the collection; few edges".
`swatch_strip` draws a palette as a PNG strip. No Ray and no torch: scikit-image, scikit-learn, PIL.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

FEATURES: tuple[str, ...] = ("lightness", "greenness", "blueness", "chroma", "contrast", "homogeneity", "entropy",
                             "edge_density")
SIDE = 128  # images larger than this (longest side) are downscaled before the descriptors
GREY_LEVELS = 32  # grey levels of the co-occurrence matrix
ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)

# Each feature's words when a group's median is (above, below) the collection's. Comparative words
# join into "greener and smoother than the collection"; PHRASES stand alone after "; ".
WORDS: dict[str, tuple[str, str]] = {
    "lightness": ("brighter", "darker"),
    "greenness": ("greener", "less green"),
    "blueness": ("bluer", "yellower"),
    "chroma": ("more colourful", "duller"),
    "contrast": ("more contrasted", "flatter"),
    "homogeneity": ("smoother", "rougher"),
    "entropy": ("busier in texture", "more uniform in texture"),
    "edge_density": ("many edges", "few edges"),
}
PHRASES = frozenset({"edge_density"})
# Canny's smoothing: at 1 px it marks a forest's mottled canopy (crowns a few px wide) more than a
# town's roofs and roads (0.20 vs 0.12 of the pixels on the synthetic scenes); at 2 px the canopy
# blurs away and the edges are those of structures: roofs, roads, fields, shores (0.00 vs 0.02-0.03)
EDGE_SIGMA = 2.0


def _downscaled(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    if max(h, w) <= SIDE:
        return rgb
    scale = SIDE / max(h, w)
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                  Image.BILINEAR))


def _checked(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    return rgb


def describe_image(rgb: np.ndarray) -> np.ndarray:
    """`FEATURES` of an (H, W, 3) uint8 image, downscaled to SIDE px first (float32): lightness = mean
    L*, greenness = -mean a*, blueness = -mean b*, chroma = mean of sqrt(a*² + b*²); then the grey-level
    co-occurrence matrix's contrast, homogeneity and entropy, and the share of Canny edge pixels."""
    from skimage.color import rgb2gray, rgb2lab
    from skimage.feature import canny, graycomatrix, graycoprops

    rgb = _downscaled(_checked(rgb))
    lab = rgb2lab(rgb / 255.0).reshape(-1, 3)
    colour = (lab[:, 0].mean(), -lab[:, 1].mean(), -lab[:, 2].mean(), np.hypot(lab[:, 1], lab[:, 2]).mean())
    grey = rgb2gray(rgb)  # floats in [0, 1]
    levels = np.minimum((grey * GREY_LEVELS).astype(np.uint8), GREY_LEVELS - 1)
    glcm = graycomatrix(levels, [1], ANGLES, levels=GREY_LEVELS, symmetric=True, normed=True)
    p = glcm[:, :, 0, :].mean(axis=-1)
    p = p[p > 0]
    texture = (graycoprops(glcm, "contrast").mean(), graycoprops(glcm, "homogeneity").mean(),
               -(p * np.log2(p)).sum(), canny(grey, sigma=EDGE_SIGMA).mean())
    return np.asarray(colour + texture, dtype=np.float32)


def lab_pixels(rgb: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) float32 CIELAB values of n pixels of an (H, W, 3) uint8 image, drawn without replacement
    (with, when it has fewer)."""
    from skimage.color import rgb2lab

    flat = _checked(rgb).reshape(-1, 3)
    rows = rng.choice(len(flat), size=int(n), replace=len(flat) < n)
    return rgb2lab(flat[rows][None] / 255.0)[0].astype(np.float32)


def palette(lab_pixels: np.ndarray, n_colours: int = 5, seed: int = 0) -> list[dict]:
    """k-means (sklearn KMeans, n_init=3, random_state=seed) in CIELAB on the pixels: one dict per
    colour, largest share first: {"hex": "#rrggbb", "rgb": [r, g, b] ints 0-255, "lab": [L, a, b]
    floats, "share": float}; shares sum to 1. Fewer colours when there are fewer distinct pixels than
    n_colours; none for no pixels."""
    from skimage.color import lab2rgb
    from sklearn.cluster import KMeans

    lab_pixels = np.asarray(lab_pixels, dtype=np.float64).reshape(-1, 3)
    k = min(int(n_colours), len(np.unique(lab_pixels, axis=0)))
    if k < 1:
        return []
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(lab_pixels)
    shares = np.bincount(km.labels_, minlength=k) / len(lab_pixels)
    with warnings.catch_warnings():  # a centre just outside the sRGB gamut is clipped below
        warnings.simplefilter("ignore")
        rgbs = lab2rgb(km.cluster_centers_[None])[0]
    rgbs = np.clip(np.round(rgbs * 255), 0, 255).astype(int)
    colours = []
    for i in np.argsort(-shares, kind="stable"):
        r, g, b = (int(v) for v in rgbs[i])
        colours.append({"hex": f"#{r:02x}{g:02x}{b:02x}", "rgb": [r, g, b],
                        "lab": [float(v) for v in km.cluster_centers_[i]], "share": float(shares[i])})
    return colours


@dataclass
class GroupProfile:
    """One group's look: its palette, each feature's median and interquartile range over its images,
    each median's z-score against the collection (mean and std over all images), and those in words."""

    group: int
    size: int
    palette: list[dict]
    median: dict[str, float]
    spread: dict[str, float]
    z: dict[str, float]
    words: str

    def to_dict(self) -> dict:
        """JSON-ready: plain ints, floats, strings, lists and dicts."""
        d = asdict(self)
        d["group"], d["size"] = int(self.group), int(self.size)
        for key in ("median", "spread", "z"):
            d[key] = {name: float(v) for name, v in d[key].items()}
        return d


def profile_groups(labels: np.ndarray, features: np.ndarray, pixels: dict[int, np.ndarray], n_colours: int = 5,
                   seed: int = 0) -> list[GroupProfile]:
    """labels (N,) ints: each image's group; features (N, len(FEATURES)), from `describe_image`;
    pixels: group -> (n, 3) Lab pixels sampled from its members (a group missing there gets an empty
    palette). One profile per group present in labels, in increasing group order."""
    labels = np.asarray(labels).reshape(-1)
    features = np.asarray(features, dtype=np.float64)
    if features.shape != (len(labels), len(FEATURES)):
        raise ValueError(f"features must be ({len(labels)}, {len(FEATURES)}) for {len(labels)} labels, "
                         f"got {features.shape}")
    mean, std = features.mean(axis=0), features.std(axis=0)
    profiles = []
    for g in np.unique(labels):
        own = features[labels == g]
        median = np.median(own, axis=0)
        q25, q75 = np.percentile(own, [25, 75], axis=0)
        z = np.divide(median - mean, std, out=np.zeros_like(mean), where=std > 0)
        zs = dict(zip(FEATURES, map(float, z)))
        profiles.append(GroupProfile(
            group=int(g), size=len(own),
            palette=palette(pixels.get(int(g), np.empty((0, 3))), n_colours, seed),
            median=dict(zip(FEATURES, map(float, median))), spread=dict(zip(FEATURES, map(float, q75 - q25))),
            z=zs, words=describe(zs)))
    return profiles


def describe(z: dict[str, float], top: int = 3, min_z: float = 0.5) -> str:
    """The `top` features with the largest |z| >= min_z, in words (`WORDS`). Comparative features join
    as "greener and smoother than the collection"; phrase features ("many edges") follow after "; ".
    "like the collection as a whole" when none qualifies."""
    chosen = sorted((f for f in FEATURES if f in z and abs(z[f]) >= min_z), key=lambda f: -abs(z[f]))[:top]
    words = {f: WORDS[f][0 if z[f] > 0 else 1] for f in chosen}
    comparative = [words[f] for f in chosen if f not in PHRASES]
    parts = [words[f] for f in chosen if f in PHRASES]
    if comparative:
        joined = comparative[0] if len(comparative) == 1 else ", ".join(comparative[:-1]) + " and " + comparative[-1]
        parts.insert(0, f"{joined} than the collection")
    return "; ".join(parts) or "like the collection as a whole"


def swatch_strip(colours: list[dict], path: str | os.PathLike, width: int = 320, height: int = 36) -> None:
    """A PNG strip at `path`: one block per colour, its width proportional to its share (light grey
    when there are no colours), written atomically (`qdeep.io.atomic_path`)."""
    from qdeep.io import atomic_path

    strip = np.full((height, width, 3), 224, dtype=np.uint8)
    total = sum(c["share"] for c in colours)
    if total > 0:
        edges = np.round(np.cumsum([0.0] + [c["share"] / total for c in colours]) * width).astype(int)
        for c, x0, x1 in zip(colours, edges[:-1], edges[1:]):
            strip[:, x0:x1] = c["rgb"]
    with atomic_path(path) as tmp:
        Image.fromarray(strip).save(tmp, format="PNG")
