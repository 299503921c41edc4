"""Drawing one synthetic Planet tile: every tag leaves a visible trace in the pixels (`synth`
decides the tags and writes the files). Colour tags (forest, fields, water, clouds, haze, ...)
shift the colour histogram; shape tags (roads, buildings, logging tracks, mines) occupy few pixels
of ambiguous colour, so they reward a model that looks at spatial structure.

With `nir=True` a tile also has a near-infrared band, as Planet's 4-band analytic GeoTIFFs do:
every surface is drawn with its own NIR reflectance (canopy and crops bright, soil middling,
water, burn scars and fallen trunks dark, clouds as bright as in the visible, haze thinner), so
NDVI separates vegetation from the rest; `blow_down` is the tag NIR shows and RGB barely does (its
visible trace is faint). The RGB bands are the 3-band tile's, byte for byte, for every other tag:
the NIR values are constants and its noise is drawn last, so the random stream is the same."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import ImageFilter

from qdeep.data.drawing import Layer, bands, blob, curve, jittered, rotated_rect, smooth_noise

PLANET_TAGS: tuple[str, ...] = (
    "agriculture",
    "artisinal_mine",
    "bare_ground",
    "blooming",
    "blow_down",
    "clear",
    "cloudy",
    "conventional_mine",
    "cultivation",
    "habitation",
    "haze",
    "partly_cloudy",
    "primary",
    "road",
    "selective_logging",
    "slash_burn",
    "water",
)

_FOREST = (34, 68, 36)
_SCRUB = (92, 106, 74)
_FIELD_COLOURS = ((128, 168, 78), (164, 176, 92), (184, 164, 112), (112, 150, 70), (150, 160, 96))
_SOIL_COLOURS = ((152, 102, 58), (170, 126, 70), (138, 92, 56))
_WATER_COLOURS = ((26, 52, 100), (30, 72, 102), (40, 66, 116))
# Near-infrared values on the same 0-255 scale (drawn only with nir=True): green vegetation reflects
# NIR strongly, soil moderately, water almost not at all; fallen and burnt vegetation loses it.
_NIR_FOREST, _NIR_SCRUB, _NIR_FIELD, _NIR_SOIL, _NIR_WATER = 205, 140, 185, 105, 10
_NIR_BLOW_DOWN = 60  # fallen trunks: dark in NIR, a faint trace in the visible (RGB_BLOW_DOWN)
_RGB_BLOW_DOWN = 0.25  # the visible bands' share of blow-down's opacity in a 4-band tile


# ------------------------------------------------------------------- land cover


def _draw_ground(size: int, rng: np.random.Generator, forest: bool, nir: bool = False) -> np.ndarray:
    """Mottled canopy (primary) or flat grey-olive scrub: the backdrop every other tag sits on."""
    base = np.asarray(jittered(rng, _FOREST if forest else _SCRUB, 5), dtype=np.float32)
    if nir:
        base = np.append(base, np.float32(_NIR_FOREST if forest else _NIR_SCRUB))
    crowns = smooth_noise(rng, size, size // 3)          # individual tree crowns
    stands = smooth_noise(rng, size, max(3, size // 16))  # patches of taller/denser forest
    amp = (0.22, 0.10) if forest else (0.08, 0.10)
    shade = 1.0 + amp[0] * crowns + amp[1] * stands
    return base[None, None, :] * shade[..., None]


def _draw_fields(img, size, rng) -> None:
    """Agriculture: a rotated grid of large light fields covering a big share of the tile."""
    layer = Layer(img)
    angle = rng.uniform(-0.6, 0.6)
    cols, rows = int(rng.integers(2, 5)), int(rng.integers(2, 4))
    cw, ch = rng.uniform(0.14, 0.24, 2) * size
    gap = max(1.0, size / 128)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    c, s = math.cos(angle), math.sin(angle)
    for i in range(cols):
        for j in range(rows):
            if rng.random() < 0.12:
                continue
            ox, oy = (i - (cols - 1) / 2) * cw, (j - (rows - 1) / 2) * ch
            fx, fy = cx + ox * c - oy * s, cy + ox * s + oy * c
            colour = jittered(rng, _FIELD_COLOURS[int(rng.integers(len(_FIELD_COLOURS)))], 10)
            layer.polygon(rotated_rect(fx, fy, cw - gap, ch - gap, angle), colour, _NIR_FIELD)
    layer.composite(img)


def _draw_bare_ground(img, size, rng) -> None:
    """Bare ground: one or two brown/ochre soil patches."""
    layer = Layer(img)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        r = rng.uniform(0.08, 0.18) * size
        colour = jittered(rng, _SOIL_COLOURS[int(rng.integers(len(_SOIL_COLOURS)))], 10)
        layer.polygon(blob(rng, cx, cy, r, 9, 0.35), colour, _NIR_SOIL)
    layer.composite(img, blur=size / 128, shade=1 + 0.08 * smooth_noise(rng, size, size // 6))


def _draw_cultivation(img, size, rng) -> None:
    """Cultivation: a few small irregular clearings inside the forest."""
    layer = Layer(img)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        r = rng.uniform(0.03, 0.07) * size
        green = rng.random() < 0.6
        base = (112, 148, 72) if green else (140, 112, 72)
        layer.polygon(blob(rng, cx, cy, r, 7, 0.4), jittered(rng, base, 10), _NIR_FIELD if green else _NIR_SOIL)
    layer.composite(img)


def _draw_blow_down(img, size, rng) -> None:
    """Blow down: a patch of lighter canopy with parallel streaks of fallen trunks."""
    layer = Layer(img)
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    layer.polygon(blob(rng, cx, cy, rng.uniform(0.1, 0.2) * size, 10, 0.3),
                  jittered(rng, (104, 122, 72), 8), _NIR_BLOW_DOWN)
    theta = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) * (2 * math.pi / max(2.5, 4 * size / 128))
    streaks = 1.0 + 0.22 * np.sin(phase + 1.5 * smooth_noise(rng, size, 6))
    layer.composite(img, blur=0.6, shade=streaks, rgb_opacity=_RGB_BLOW_DOWN)


def _draw_water(img, size, rng) -> None:
    """Water: a winding river band, or sometimes a lake."""
    layer = Layer(img)
    colour = jittered(rng, _WATER_COLOURS[int(rng.integers(len(_WATER_COLOURS)))], 6)
    if rng.random() < 0.7:
        width = max(3, int(rng.uniform(0.06, 0.14) * size))
        layer.line(curve(rng, size, bend=0.35, n=16), colour, width, _NIR_WATER)
    else:
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        layer.polygon(blob(rng, cx, cy, rng.uniform(0.12, 0.22) * size, 12, 0.25), colour, _NIR_WATER)
    layer.composite(img, blur=0.7)


def _draw_conventional_mine(img, size, rng) -> None:
    """Conventional mine: a large angular open pit stepped with concentric terraces."""
    layer = Layer(img)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    outline = np.asarray(blob(rng, cx, cy, rng.uniform(0.2, 0.32) * size, int(rng.integers(5, 8)), 0.25))
    base = np.asarray(jittered(rng, (176, 166, 148), 10), dtype=np.float64)
    for k, scale in enumerate((1.0, 0.78, 0.56, 0.34)):
        pts = (outline - (cx, cy)) * scale + (cx, cy)
        tone = base + (-18 if k % 2 else 12)
        layer.polygon([tuple(p) for p in pts.tolist()], tuple(int(v) for v in np.clip(tone, 0, 255)), 150)
    if rng.random() < 0.5:  # flooded pit bottom
        pts = (outline - (cx, cy)) * 0.15 + (cx, cy)
        layer.polygon([tuple(p) for p in pts.tolist()], jittered(rng, (60, 120, 120), 10), _NIR_WATER)
    layer.composite(img)


def _draw_artisinal_mine(img, size, rng) -> None:
    """Artisanal mine: muddy pits and turquoise/ochre pools strung along a stream."""
    layer = Layer(img)
    stream = curve(rng, size, bend=0.3, n=16)
    layer.line(stream, jittered(rng, (150, 112, 70), 10), max(2, int(0.03 * size)), _NIR_SOIL)
    pts = np.asarray(stream)
    lo, hi = len(pts) // 4, 3 * len(pts) // 4
    for _ in range(int(rng.integers(5, 12))):
        x, y = pts[int(rng.integers(lo, hi))] + rng.normal(0, 0.05 * size, 2)
        r = rng.uniform(0.015, 0.04) * size
        kind = rng.random()
        base = (176, 110, 60) if kind < 0.5 else (76, 172, 160) if kind < 0.8 else (192, 152, 72)
        wet = 0.5 <= kind < 0.8  # turquoise pools
        layer.polygon(blob(rng, x, y, r, 6, 0.35), jittered(rng, base, 10), _NIR_WATER if wet else _NIR_SOIL)
    layer.composite(img)


def _draw_slash_burn(img, size, rng) -> None:
    """Slash and burn: small charcoal-black scars with a grey smoke plume."""
    scars, smoke = Layer(img), Layer(img)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        r = rng.uniform(0.03, 0.07) * size
        scars.polygon(blob(rng, cx, cy, r, 7, 0.4), jittered(rng, (24, 21, 19), 4), 15)
        sx, sy = np.array([cx, cy]) + rng.normal(0, r, 2)
        smoke.ellipse((sx - 1.5 * r, sy - r, sx + 1.5 * r, sy + r), jittered(rng, (150, 150, 148), 8), 150)
    scars.composite(img)
    smoke.composite(img, opacity=0.5, blur=0.06 * size)


def _draw_selective_logging(img, size, rng) -> None:
    """Selective logging: thin winding skid trails with small log-landing clearings."""
    layer = Layer(img)
    colour = jittered(rng, (158, 124, 86), 10)
    for _ in range(int(rng.integers(1, 4))):
        p = rng.uniform(0.1, 0.9, 2) * size
        heading = rng.uniform(0, 2 * math.pi)
        step = 0.05 * size
        pts = [tuple(p)]
        for _ in range(int(rng.integers(8, 16))):
            heading += rng.normal(0, 0.5)
            p = p + step * np.array([math.cos(heading), math.sin(heading)])
            pts.append(tuple(p))
        layer.line(pts, colour, 1, 120)
        for x, y in (pts[i] for i in rng.choice(len(pts), size=3, replace=False)):
            r = rng.uniform(1.2, 2.5) * size / 128
            layer.ellipse((x - r, y - r, x + r, y + r), colour, 120)
    layer.composite(img)


def _draw_roads(img, size, rng) -> None:
    """Roads: thin, light tan/grey lines, straight or gently curving, crossing the tile."""
    layer = Layer(img)
    colour = jittered(rng, (186, 172, 146), 12)
    for _ in range(int(rng.integers(1, 3))):
        width = max(1, int(round(rng.uniform(1, 3) * size / 128)))
        layer.line(curve(rng, size, bend=rng.uniform(0, 0.2)), colour, width, 150)
    layer.composite(img)


def _draw_habitation(img, size, rng) -> None:
    """Habitation: a cleared lot with a cluster of small bright roofs."""
    ground, roofs = Layer(img), Layer(img)
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    spread = rng.uniform(0.05, 0.1) * size
    ground.polygon(blob(rng, cx, cy, 2 * spread, 9, 0.3), jittered(rng, (148, 140, 116), 8), 130)
    angle = rng.uniform(0, math.pi / 2)
    palette, nirs = ((228, 228, 222), (170, 170, 166), (186, 86, 64)), (225, 165, 150)
    for _ in range(int(rng.integers(8, 26))):
        x, y = np.array([cx, cy]) + rng.normal(0, spread, 2)
        w, h = rng.uniform(2, 5, 2) * size / 128
        kind = int(rng.integers(3))
        roofs.polygon(rotated_rect(x, y, w, h, angle), jittered(rng, palette[kind], 8), nirs[kind])
    ground.composite(img, opacity=0.6, blur=0.04 * size)
    roofs.composite(img)


def _draw_blooming(img, size, rng) -> None:
    """Blooming: flowering trees as bright yellow/pink speckles scattered in the canopy."""
    n = int(rng.integers(40, 140) * (size / 128) ** 2)
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    ys = np.clip(rng.normal(cy, 0.25 * size, n), 0, size - 1).astype(int)
    xs = np.clip(rng.normal(cx, 0.25 * size, n), 0, size - 1).astype(int)
    bases = np.array([(236, 222, 70), (232, 150, 190), (240, 236, 190)], dtype=np.float32)
    colours = bases[rng.integers(0, 3, n)] + rng.normal(0, 8, (n, 3)).astype(np.float32)
    if img.shape[2] == 4:  # flowering crowns: bright in NIR too
        colours = np.hstack([colours, np.full((n, 1), 220, dtype=np.float32)])
    img[ys, xs] = colours
    big = rng.random(n) < 0.4  # some crowns cover two pixels
    img[ys[big], np.minimum(xs[big] + 1, size - 1)] = colours[big]


# ------------------------------------------------------------------- atmosphere


def _apply_haze(img, size, rng) -> None:
    """Haze: a low-contrast bluish-grey veil over the whole tile."""
    veil = bands(img, jittered(rng, (184, 192, 206), 6), 150)
    strength = rng.uniform(0.4, 0.6) * (1 + 0.12 * smooth_noise(rng, size, 4))
    img += np.clip(strength, 0, 0.8)[..., None] * bands(img, (1, 1, 1), 0.4) * (veil - img)  # NIR sees through


def _draw_partial_clouds(img, size, rng) -> None:
    """Partly cloudy: a few soft white blobs covering roughly 15-50 % of the tile."""
    target = rng.uniform(0.15, 0.5)
    layer = Layer(img)
    white = int(rng.uniform(232, 250))
    colour = (white, white, min(255, white + 2))
    covered = 0.0
    for _ in range(20):
        if covered >= target:
            break
        room = max(target - covered, 0.04)
        r = min(rng.uniform(0.1, 0.28), math.sqrt(room / math.pi) * 1.2) * size
        cx, cy = rng.uniform(0, 1, 2) * size
        layer.ellipse((cx - r * rng.uniform(0.8, 1.6), cy - r, cx + r * rng.uniform(0.8, 1.6), cy + r), colour, white)
        covered = float(np.count_nonzero(np.asarray(layer.mask))) / (size * size)
    layer.composite(img, opacity=0.95, blur=0.04 * size,
                    shade=1 - 0.05 * np.abs(smooth_noise(rng, size, 8)))


def _draw_overcast(img, size, rng) -> None:
    """Cloudy: an almost unbroken white/grey deck with at most a few small gaps."""
    grey = rng.uniform(196, 238)
    deck = np.float32(grey) * (1 + 0.04 * smooth_noise(rng, size, 5))[..., None]
    deck = deck * bands(img, (0.98, 0.99, 1.01), 1.0)
    gaps = Layer(img)
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = rng.uniform(0, 1, 2) * size
        r = rng.uniform(0.04, 0.1) * size
        gaps.ellipse((cx - r, cy - r, cx + r, cy + r), (255, 255, 255), 255)
    hole = np.asarray(gaps.mask.filter(ImageFilter.GaussianBlur(0.03 * size)), dtype=np.float32) / 255
    alpha = 1 - 0.8 * hole
    img += alpha[..., None] * (deck - img)


# ------------------------------------------------------------------------- tile

# Painting order: broad land cover first, fine structures on top, atmosphere last.
_LAND_DRAWERS = (
    ("agriculture", _draw_fields),
    ("bare_ground", _draw_bare_ground),
    ("cultivation", _draw_cultivation),
    ("blow_down", _draw_blow_down),
    ("water", _draw_water),
    ("conventional_mine", _draw_conventional_mine),
    ("artisinal_mine", _draw_artisinal_mine),
    ("slash_burn", _draw_slash_burn),
    ("selective_logging", _draw_selective_logging),
    ("road", _draw_roads),
    ("habitation", _draw_habitation),
    ("blooming", _draw_blooming),
)


def draw_tile(tags: Sequence[str], size: int, rng: np.random.Generator, nir: bool = False) -> np.ndarray:
    """Render one (size, size, 3) uint8 RGB tile in which every tag in ``tags`` is visible; with
    `nir`, (size, size, 4) float32 R, G, B, NIR on the same 0-255 scale, unrounded (the caller
    chooses the bit depth)."""
    tags = set(tags)
    unknown = tags - set(PLANET_TAGS)
    if unknown:
        raise ValueError(f"unknown tags: {sorted(unknown)}")
    img = _draw_ground(size, rng, forest="primary" in tags or "cloudy" in tags, nir=nir)
    for tag, drawer in _LAND_DRAWERS:
        if tag in tags:
            drawer(img, size, rng)
    img *= np.float32(rng.uniform(0.92, 1.08))  # sensor/illumination variation
    if "haze" in tags:
        _apply_haze(img, size, rng)
    elif "partly_cloudy" in tags:
        _draw_partial_clouds(img, size, rng)
    elif "cloudy" in tags:
        _draw_overcast(img, size, rng)
    img[..., :3] += rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(3.0)
    if nir:
        img[..., 3] += rng.standard_normal((size, size), dtype=np.float32) * np.float32(3.0)
        return np.clip(img, 0, 255)
    return np.clip(img, 0, 255).astype(np.uint8)
