"""qdeep.profiles: per-group colour and texture profiles, on the synthetic scene classes and on
hand-made inputs whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2lab

from qdeep.data.synth import write_synthetic_classes
from qdeep.profiles import (FEATURES, SIDE, WORDS, GroupProfile, describe, describe_image, lab_pixels, palette,
                            profile_groups, swatch_strip)

pytestmark = pytest.mark.unit

CLASSES = ("forest", "farmland", "river", "town", "clouds")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, GroupProfile]:
    """Profiles of 20 synthetic 64-px scenes per class, one group per class."""
    root = tmp_path_factory.mktemp("scenes")
    write_synthetic_classes(root, n_per_class=20, size=64, seed=0)
    rng = np.random.default_rng(0)
    labels, features, pixels = [], [], {}
    for group, name in enumerate(CLASSES):
        files = sorted((root / name).glob("*.jpg"))
        assert len(files) == 20
        sampled = []
        for path in files:
            rgb = np.asarray(Image.open(path).convert("RGB"))
            labels.append(group)
            features.append(describe_image(rgb))
            sampled.append(lab_pixels(rgb, 256, rng))
        pixels[group] = np.concatenate(sampled)
    profiles = profile_groups(np.array(labels), np.array(features), pixels)
    assert [p.group for p in profiles] == list(range(len(CLASSES)))
    return dict(zip(CLASSES, profiles))


def test_scene_colours(scenes):
    med = {name: p.median for name, p in scenes.items()}
    assert med["forest"]["greenness"] > med["town"]["greenness"] + 5  # about 21.8 vs 9.1 (-a*)
    assert med["river"]["blueness"] > med["forest"]["blueness"] + 2  # the river's blue pulls -b* up
    assert med["river"]["blueness"] > med["town"]["blueness"] + 1
    assert med["clouds"]["lightness"] > 75 and med["clouds"]["chroma"] < 5  # a white-grey deck
    top = scenes["forest"].palette[0]
    assert top["lab"][1] < -10 and top["rgb"][1] > top["rgb"][0] and top["rgb"][1] > top["rgb"][2]  # green
    assert "greener" in scenes["forest"].words
    assert all(p.size == 20 for p in scenes.values())
    assert all(abs(sum(c["share"] for c in p.palette) - 1) < 1e-9 for p in scenes.values())


def test_scene_texture(scenes):
    med = {name: p.median for name, p in scenes.items()}
    assert med["town"]["contrast"] > 3 * med["forest"]["contrast"]  # bright roofs and roads on scrub
    # Canny at profiles.EDGE_SIGMA: the edges of roofs and roads, not the forest's mottled canopy
    assert med["town"]["edge_density"] > 4 * med["forest"]["edge_density"] + 0.01
    assert med["clouds"]["edge_density"] < 0.02 and med["clouds"]["homogeneity"] > 0.8
    assert "more contrasted" in scenes["town"].words


def test_profile_to_dict_is_json(scenes):
    d = scenes["river"].to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d["median"]) == set(d["spread"]) == set(d["z"]) == set(FEATURES)
    assert all(type(v) is float for v in d["z"].values())


def test_profile_groups_order_zero_std_and_missing_pixels():
    labels = np.array([3, 1, 3, 1, 3, 1])
    features = np.zeros((6, len(FEATURES)))
    features[:, 0] = [10, 0, 10, 0, 10, 0]  # lightness: group 3 bright; every other feature constant
    lab = np.tile([[50.0, -30.0, 20.0]], (10, 1))
    out = profile_groups(labels, features, {3: lab})
    assert [p.group for p in out] == [1, 3] and [p.size for p in out] == [3, 3]
    assert out[1].median["lightness"] == 10 and out[1].z["lightness"] == pytest.approx(1.0)  # (10 - 5) / 5
    assert out[0].z["lightness"] == pytest.approx(-1.0) and out[0].words == "darker than the collection"
    assert all(out[1].z[f] == 0 for f in FEATURES[1:])
    assert out[0].palette == [] and len(out[1].palette) == 1 and out[1].palette[0]["share"] == 1
    with pytest.raises(ValueError):
        profile_groups(labels, features[:, :3], {})


def test_describe_sentences():
    assert describe({"greenness": 1.2, "homogeneity": 0.8, "lightness": 0.1}) == \
        "greener and smoother than the collection"
    assert describe({"greenness": 1.2, "homogeneity": 0.8, "edge_density": -1.0}) == \
        "greener and smoother than the collection; few edges"
    assert describe({"lightness": 2, "chroma": -1.5, "contrast": 1, "entropy": 0.9}) == \
        "brighter, duller and more contrasted than the collection"  # top 3 by |z|, largest first
    assert describe({"edge_density": 0.7, "lightness": 0.2}) == "many edges"
    assert describe({"blueness": -0.5, "entropy": -3}) == \
        "more uniform in texture and yellower than the collection"  # |z| == min_z qualifies
    assert describe({"lightness": 0.3, "greenness": -0.49}) == "like the collection as a whole"
    assert describe({}) == "like the collection as a whole"
    assert describe({"blueness": -0.6}, min_z=1.0) == "like the collection as a whole"
    assert describe({"blueness": -0.6, "lightness": 3}, top=1) == "brighter than the collection"
    assert set(WORDS) == set(FEATURES)


def _hex_rgb(code: str) -> np.ndarray:
    return np.array([int(code[i:i + 2], 16) for i in (1, 3, 5)])


def test_palette_two_colours():
    red, blue = (200, 40, 40), (30, 60, 180)
    rgb = np.array([red] * 300 + [blue] * 100, dtype=np.uint8)[:, None, :]
    lab = rgb2lab(rgb / 255.0)[:, 0, :]
    colours = palette(lab, n_colours=5)  # only two distinct pixels: two colours
    assert [round(c["share"], 6) for c in colours] == [0.75, 0.25]
    assert np.abs(_hex_rgb(colours[0]["hex"]) - red).max() <= 1
    assert np.abs(_hex_rgb(colours[1]["hex"]) - blue).max() <= 1
    assert colours[0]["rgb"] == list(_hex_rgb(colours[0]["hex"]))

    noisy = lab + np.random.default_rng(1).normal(0, 1.0, lab.shape)  # many distinct pixels
    colours = palette(noisy, n_colours=2, seed=3)
    assert [c["share"] for c in colours] == pytest.approx([0.75, 0.25])
    assert np.abs(_hex_rgb(colours[0]["hex"]) - red).max() <= 4
    assert np.abs(_hex_rgb(colours[1]["hex"]) - blue).max() <= 4
    assert palette(noisy, n_colours=2, seed=3) == colours  # deterministic for a seed
    assert palette(np.empty((0, 3))) == []


def test_describe_image_on_the_image_downscaled():
    rng = np.random.default_rng(0)
    big = np.asarray(Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).resize((300, 300)))
    feats = describe_image(big)
    assert feats.shape == (len(FEATURES),) and feats.dtype == np.float32
    small = np.asarray(Image.fromarray(big).resize((SIDE, SIDE), Image.BILINEAR))
    np.testing.assert_allclose(feats, describe_image(small), rtol=1e-6)  # the same downscaled image
    wide = np.concatenate([big, big], axis=1)  # 300 x 600: described at 64 x 128
    half = np.asarray(Image.fromarray(wide).resize((SIDE, SIDE // 2), Image.BILINEAR))
    np.testing.assert_allclose(describe_image(wide), describe_image(half), rtol=1e-6)
    with pytest.raises(ValueError):
        describe_image(big.astype(np.float32))


def test_lab_pixels_without_replacement_when_there_are_enough():
    rgb = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)  # 256 distinct pixels
    every = sorted(map(tuple, rgb2lab(rgb / 255.0).reshape(-1, 3).astype(np.float32)))
    pix = lab_pixels(rgb, 256, np.random.default_rng(0))
    assert pix.shape == (256, 3) and pix.dtype == np.float32 and sorted(map(tuple, pix)) == every
    more = lab_pixels(rgb, 1000, np.random.default_rng(0))  # fewer pixels than asked: with replacement
    assert more.shape == (1000, 3) and set(map(tuple, more)) <= set(every)


def test_describe_image_flat_grey():
    grey = np.full((50, 40, 3), 128, dtype=np.uint8)
    f = dict(zip(FEATURES, describe_image(grey).tolist()))
    assert f["edge_density"] == 0 and f["contrast"] == 0 and f["entropy"] == 0 and f["homogeneity"] == 1
    assert f["lightness"] == pytest.approx(53.59, abs=0.01)  # L* of sRGB 128
    assert abs(f["greenness"]) < 0.01 and abs(f["blueness"]) < 0.01 and f["chroma"] < 0.01  # grey: neutral
    assert np.ptp(lab_pixels(grey, 20, np.random.default_rng(0)), axis=0).max() == 0


def test_swatch_strip(tmp_path: Path):
    colours = [{"rgb": [255, 0, 0], "share": 0.75}, {"rgb": [0, 0, 255], "share": 0.25}]
    path = tmp_path / "strips" / "group-0.png"
    swatch_strip(colours, path)
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (320, 36)
    a = np.asarray(img.convert("RGB"))
    assert (a[:, :240] == [255, 0, 0]).all() and (a[:, 240:] == [0, 0, 255]).all()
    swatch_strip(colours[:1], path, width=50, height=10)  # replaces it
    assert Image.open(path).size == (50, 10)
    assert [p.name for p in path.parent.iterdir()] == ["group-0.png"]  # no temporary file left
    swatch_strip([], tmp_path / "empty.png", width=8, height=4)
    assert Image.open(tmp_path / "empty.png").size == (8, 4)
