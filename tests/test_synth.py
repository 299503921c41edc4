"""Tests for the procedural Planet stand-in (qdeep.data.synth): layout, tags, determinism, visibility."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qdeep.data.synth import ATMOSPHERIC_TAGS, PLANET_TAGS, draw_tile, sample_tags, write_synthetic_planet

pytestmark = pytest.mark.unit  # no Ray


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _rows(path: Path) -> list[tuple[str, list[str]]]:
    rows = _read_csv(path)
    assert rows[0] == ["image_name", "tags"]
    return [(name, tags.split()) for name, tags in rows[1:]]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """One 2000-image set (small tiles for speed) shared by the statistical tests."""
    out = tmp_path_factory.mktemp("synth_big")
    summary = write_synthetic_planet(out, n=2000, size=64, seed=0)
    return out, summary


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_small")
    summary = write_synthetic_planet(out, n=40, size=48, seed=3)
    return out, summary


def test_tag_constants():
    assert len(PLANET_TAGS) == 17
    assert list(PLANET_TAGS) == sorted(PLANET_TAGS)
    assert set(ATMOSPHERIC_TAGS) <= set(PLANET_TAGS)
    assert ATMOSPHERIC_TAGS == ("clear", "cloudy", "haze", "partly_cloudy")


def test_layout_and_csv_formats(small):
    out, summary = small
    assert summary["n_train"] == 40 and summary["n_test"] == 10  # n_test defaults to n // 4
    assert summary["size"] == 48 and summary["seed"] == 3

    train = _rows(out / "train_v2.csv")
    assert [name for name, _ in train] == [f"train_{i}" for i in range(40)]
    assert len(list((out / "train-jpg").glob("*.jpg"))) == 40
    for name, _ in train:
        assert (out / "train-jpg" / f"{name}.jpg").is_file()

    solution = _rows(out / "test_solution_v2.csv")
    submission = _read_csv(out / "sample_submission_v2.csv")
    assert submission[0] == ["image_name", "tags"]
    assert [r[0] for r in submission[1:]] == [f"test_{i}" for i in range(10)]
    assert all(r[1] == "primary clear" for r in submission[1:])
    assert [name for name, _ in solution] == [f"test_{i}" for i in range(10)]
    assert len(list((out / "test-jpg").glob("*.jpg"))) == 10

    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers
    raw = (out / "train_v2.csv").read_bytes()
    assert raw.startswith(b"image_name,tags\r\n")  # csv module's default dialect


def test_summary_counts_match_csv(small):
    out, summary = small
    counts = dict.fromkeys(PLANET_TAGS, 0)
    for _, tags in _rows(out / "train_v2.csv"):
        for tag in tags:
            counts[tag] += 1
    assert summary["tag_counts"] == counts


def test_images_are_rgb_jpegs_of_requested_size(small):
    out, _ = small
    for path in [out / "train-jpg" / "train_0.jpg", out / "test-jpg" / "test_9.jpg"]:
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (48, 48)


def test_tag_rules_hold_for_every_row(big):
    out, _ = big
    for csv_name in ("train_v2.csv", "test_solution_v2.csv"):
        for name, tags in _rows(out / csv_name):
            assert tags, name
            assert tags == sorted(set(tags)), name
            assert set(tags) <= set(PLANET_TAGS), name
            assert sum(t in ATMOSPHERIC_TAGS for t in tags) == 1, name
            if "cloudy" in tags:
                assert tags == ["cloudy"], name


def test_every_tag_is_present_and_rare_tags_are_rare(big):
    _, summary = big
    counts = summary["tag_counts"]
    assert set(counts) == set(PLANET_TAGS)
    for tag, count in counts.items():
        assert count >= 10, (tag, count)
    assert counts["primary"] > 0.8 * 2000
    assert counts["clear"] > counts["partly_cloudy"] > counts["haze"]
    assert counts["blow_down"] < counts["water"] < counts["agriculture"]


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path, small):
    ref, _ = small
    again = tmp_path / "again"
    write_synthetic_planet(again, n=40, size=48, seed=3)
    assert _files(again) == _files(ref)

    other = tmp_path / "other"
    write_synthetic_planet(other, n=40, size=48, seed=4)
    assert (other / "train-jpg" / "train_0.jpg").read_bytes() != (ref / "train-jpg" / "train_0.jpg").read_bytes()
    assert _files(other) != _files(ref)


def test_prefix_does_not_depend_on_n(tmp_path, small):
    ref, _ = small
    out = tmp_path / "prefix"
    out.mkdir()  # an existing, empty directory is fine
    write_synthetic_planet(out, n=5, size=48, seed=3, n_test=2)
    for i in range(5):
        name = f"train-jpg/train_{i}.jpg"
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert _rows(out / "train_v2.csv") == _rows(ref / "train_v2.csv")[:5]
    assert _rows(out / "test_solution_v2.csv") == _rows(ref / "test_solution_v2.csv")[:2]


def _load(out: Path, split: str, name: str) -> np.ndarray:
    with Image.open(out / f"{split}-jpg" / f"{name}.jpg") as im:
        return np.asarray(im, dtype=np.float32)


def test_cloud_tags_are_visible_as_white(big):
    out, _ = big
    white: dict[str, list[float]] = {"cloudy": [], "clear": [], "partly_cloudy": []}
    for name, tags in _rows(out / "train_v2.csv")[:800]:
        key = next((t for t in white if t in tags), None)
        if key is not None:
            img = _load(out, "train", name)
            white[key].append(float((img.min(axis=2) > 170).mean()))
    assert min(white["cloudy"]) > 0.6
    assert np.mean(white["cloudy"]) > 0.8
    assert np.mean(white["clear"]) < 0.05
    assert 0.1 < np.mean(white["partly_cloudy"]) < 0.6


def test_water_is_visible_as_blue(big):
    out, _ = big
    blue: dict[bool, list[float]] = {True: [], False: []}
    for name, tags in _rows(out / "train_v2.csv")[:800]:
        if "cloudy" in tags:
            continue
        img = _load(out, "train", name)
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        blue["water" in tags].append(float(((b > g + 10) & (b > r + 20)).mean()))
    assert np.mean(blue[True]) > 0.03
    assert np.mean(blue[True]) > 5 * np.mean(blue[False])


def test_primary_is_dark_green_and_haze_lowers_contrast():
    tile = {}
    for tags in (["clear", "primary"], ["haze", "primary"]):
        tile[tags[0]] = draw_tile(tags, 64, np.random.default_rng(7)).astype(np.float32)
    r, g, b = tile["clear"].reshape(-1, 3).mean(axis=0)
    assert g > r + 15 and g > b + 15 and g < 120
    assert tile["haze"].std() < 0.7 * tile["clear"].std()
    assert tile["haze"].mean() > tile["clear"].mean() + 30


def test_draw_tile_shape_dtype_and_unknown_tag():
    rng = np.random.default_rng(0)
    for size in (32, 64, 100):
        img = draw_tile(sample_tags(rng), size, rng)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
    every_tag = [t for t in PLANET_TAGS if t not in ("cloudy", "haze", "partly_cloudy")]
    assert draw_tile(every_tag, 64, rng).shape == (64, 64, 3)
    with pytest.raises(ValueError):
        draw_tile(["clear", "not_a_tag"], 32, rng)


def test_sample_tags_is_seed_deterministic():
    a = [sample_tags(np.random.default_rng([1, 0, i])) for i in range(50)]
    b = [sample_tags(np.random.default_rng([1, 0, i])) for i in range(50)]
    assert a == b
    assert all(t == sorted(t) for t in a)


def test_progress_bar_option(tmp_path, capsys):
    summary = write_synthetic_planet(tmp_path, n=3, size=32, seed=0, n_test=1, progress=True)
    assert summary["n_test"] == 1
    assert "synthetic planet" in capsys.readouterr().err


def _ndvi(bands: np.ndarray) -> np.ndarray:
    red, nir = bands[..., 0].astype(np.float64), bands[..., 3].astype(np.float64)
    return (nir - red) / (nir + red + 1e-9)


def test_a_4_band_tile_keeps_the_rgb_tile_and_its_nir_separates_the_surfaces():
    for i in range(60):  # the RGB bands are the 3-band tile's, byte for byte, unless blow_down is drawn
        tags = sample_tags(np.random.default_rng([0, 0, i]))
        rgb = draw_tile(tags, 32, np.random.default_rng(i))
        four = draw_tile(tags, 32, np.random.default_rng(i), nir=True)
        assert four.shape == (32, 32, 4) and four.dtype == np.float32 and 0 <= four.min() and four.max() <= 255
        assert np.array_equal(four[..., :3].astype(np.uint8), rgb) == ("blow_down" not in tags), tags
    forest = draw_tile(["clear", "primary"], 64, np.random.default_rng(1), nir=True)
    water = draw_tile(["clear", "primary", "water"], 64, np.random.default_rng(1), nir=True)
    clouds = draw_tile(["cloudy"], 64, np.random.default_rng(1), nir=True)
    assert _ndvi(forest).mean() > 0.5 and abs(_ndvi(clouds).mean()) < 0.1
    wet = water[..., 2] > water[..., 1] + 10  # the river's blue pixels
    assert wet.mean() > 0.03 and water[..., 3][wet].mean() < 0.3 * forest[..., 3].mean()


def test_blow_down_shows_in_nir_far_more_than_in_rgb():
    """The tag NIR carries: its patch darkens the NIR band several times more than the visible ones."""
    rng_state = 11
    forest = draw_tile(["clear", "primary"], 64, np.random.default_rng(rng_state), nir=True)
    fallen = draw_tile(["clear", "primary", "blow_down"], 64, np.random.default_rng(rng_state), nir=True)
    rgb_only = draw_tile(["clear", "primary", "blow_down"], 64, np.random.default_rng(rng_state))
    patch = np.abs(fallen[..., 3] - forest[..., 3]) > 30
    assert patch.mean() > 0.02
    nir_change = np.abs(fallen[..., 3] - forest[..., 3])[patch].mean()
    rgb_change_4band = np.abs(fallen[..., :3] - forest[..., :3])[patch].mean()
    rgb_change_3band = np.abs(rgb_only.astype(np.float32) - forest[..., :3].astype(np.uint8))[patch].mean()
    assert nir_change > 5 * rgb_change_4band and rgb_change_4band < 0.5 * rgb_change_3band


def test_four_bands_write_planet_geotiffs_beside_the_same_jpegs(tmp_path):
    import tifffile

    summary = write_synthetic_planet(tmp_path / "a", n=12, size=32, seed=3, n_test=3, bands=4)
    write_synthetic_planet(tmp_path / "b", n=12, size=32, seed=3, n_test=3, bands=4)
    write_synthetic_planet(tmp_path / "rgb", n=12, size=32, seed=3, n_test=3)
    assert summary["bands"] == 4 and _files(tmp_path / "a") == _files(tmp_path / "b")  # deterministic
    a = tmp_path / "a"
    assert sorted(p.stem for p in (a / "train-tif-v2").iterdir()) == sorted(p.stem for p in (a / "train-jpg").iterdir())
    assert len(list((a / "test-tif-v2").glob("*.tif"))) == 3
    rows = dict(_rows(a / "train_v2.csv"))
    assert rows == dict(_rows(tmp_path / "rgb" / "train_v2.csv"))  # the same tags, image by image
    for name, tags in rows.items():  # the JPEGs are the 3-band set's unless blow_down is drawn
        same = (a / "train-jpg" / f"{name}.jpg").read_bytes() == (tmp_path / "rgb" / "train-jpg" / f"{name}.jpg").read_bytes()
        assert same == ("blow_down" not in tags), name
    with tifffile.TiffFile(a / "train-tif-v2" / "train_0.tif") as tif:
        bands, geo = tif.asarray(), tif.pages[0].geotiff_tags
    assert bands.shape == (4, 32, 32) and bands.dtype == np.uint16 and bands.max() > 255  # 16-bit counts
    assert geo["ProjectedCSTypeGeoKey"] == 32721 and list(geo["ModelPixelScale"]) == [3.0, 3.0, 0.0]
    jpeg = np.asarray(Image.open(a / "train-jpg" / "train_0.jpg"), dtype=np.float64)
    for band, channel in ((0, 2), (1, 1), (2, 0)):  # Planet's order: blue, green, red, then NIR
        assert np.corrcoef(bands[band].ravel(), jpeg[..., channel].ravel())[0, 1] > 0.9
    with pytest.raises(ValueError, match="bands must be 3"):
        write_synthetic_planet(tmp_path / "c", n=2, size=32, bands=5)
