"""The data layer on Kaggle-layout folders written here, and every bad input with its outcome."""

import numpy as np
import pytest
from PIL import Image

from qdeep.data import (BadInputPolicy, ImageDecodeError, image_id, load_labeled_folder, load_planet, load_rgb,
                        scan_images)
from qdeep.errors import BadInputError, QdeepError

pytestmark = pytest.mark.unit  # no Ray


def _jpg(path, color=(10, 120, 30), size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, "JPEG")
    return path


def _planet(root, rows, test=(), sample=None, extra_lines=""):
    """rows: (name, tags) written to train_v2.csv, each with a JPEG unless tags is None-image."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["image_name,tags"]
    for name, tags in rows:
        lines.append(f"{name},{tags}")
        _jpg(root / "train-jpg" / f"{name}.jpg")
    (root / "train_v2.csv").write_text("\n".join(lines) + "\n" + extra_lines)
    for name in test:
        _jpg(root / ("test-jpg-additional" if name.startswith("file_") else "test-jpg") / f"{name}.jpg")
    if sample is not None:
        (root / "sample_submission_v2.csv").write_text(
            "image_name,tags\n" + "".join(f"{n},primary clear\n" for n in sample))
    return root


GOOD = [("train_0", "clear primary"), ("train_1", "haze primary water"), ("train_2", "cloudy")]


def test_planet_layout_loads_tags_vocabulary_and_test_order(tmp_path):
    root = _planet(tmp_path / "d", GOOD, test=["test_0", "test_1", "file_0"], sample=["test_1", "file_0", "test_0"])
    ds = load_planet(root, BadInputPolicy())
    assert ds.train.names == ["train_0", "train_1", "train_2"]
    assert ds.train.tags[1] == ["haze", "primary", "water"]
    assert ds.train.vocabulary() == ["clear", "cloudy", "haze", "primary", "water"]
    assert all(p.is_file() for p in ds.train.paths)
    assert ds.test.names == ["test_1", "file_0", "test_0"]  # sample-submission order
    assert ds.test.paths[1].parent.name == "test-jpg-additional"


def test_test_images_sorted_without_sample_submission_and_train_csv_fallback(tmp_path):
    root = _planet(tmp_path / "d", GOOD, test=["test_2", "test_10"])
    (root / "train_v2.csv").rename(root / "train.csv")
    ds = load_planet(root, BadInputPolicy())
    assert len(ds.train) == 3
    assert ds.test.names == ["test_10", "test_2"]


def test_labels_csv_over_any_folder_with_subfolders_and_extensions(tmp_path):
    _jpg(tmp_path / "imgs" / "a" / "x.jpg")
    Image.new("L", (8, 8), 100).save(tmp_path / "imgs" / "b.png")
    (tmp_path / "l.csv").write_text("image_name,tags\na/x.jpg,road\nb,water road\n")
    ds = load_labeled_folder(tmp_path / "l.csv", tmp_path / "imgs", BadInputPolicy())
    assert ds.train.names == ["a/x.jpg", "b"]
    assert [p.name for p in ds.train.paths] == ["x.jpg", "b.png"]
    assert len(ds.test) == 0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_every_image_mode_comes_out_rgb(tmp_path, mode):
    arr = (np.arange(12 * 10) % 200).reshape(10, 12).astype(np.uint16 if mode == "I;16" else np.uint8)
    img = Image.fromarray(arr) if mode in ("L", "I;16") else Image.fromarray(arr).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (12, 10)
    assert np.asarray(out).max() > 0


def test_scan_images_is_recursive_and_names_are_relative(tmp_path):
    _jpg(tmp_path / "z.jpg")
    _jpg(tmp_path / "sub" / "a.JPEG")
    (tmp_path / "sub" / "deep").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "sub" / "deep" / "b.tiff")
    paths = scan_images(tmp_path, BadInputPolicy())
    assert sorted(image_id(p, tmp_path) for p in paths) == ["sub/a", "sub/deep/b", "z"]


# ---- bad inputs: each has a defined outcome, by default an error naming file (and line) ----

def _bad_cases():
    """name -> (build the folder, expected fragment of the error, expected skipped count)."""
    def corrupt(root):
        (root / "train-jpg" / "train_1.jpg").write_bytes(b"not a jpeg at all")
        return "train_1.jpg: cannot decode image"

    def truncated(root):
        path = root / "train-jpg" / "train_1.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:600])
        return "train_1.jpg: cannot decode image"

    return {"corrupt": corrupt, "truncated": truncated}


@pytest.mark.parametrize("case", ["corrupt", "truncated"])
def test_undecodable_images_raise_naming_the_file(tmp_path, case):
    root = _planet(tmp_path / "d", GOOD)
    fragment = _bad_cases()[case](root)
    with pytest.raises(ImageDecodeError, match=fragment):
        load_rgb(root / "train-jpg" / "train_1.jpg")
    with pytest.raises(ImageDecodeError, match=fragment):  # a pack's bytes, named by the caller
        load_rgb((root / "train-jpg" / "train_1.jpg").read_bytes(), "train_1.jpg")


def test_image_bytes_decode_as_their_file_does(tmp_path):
    root = _planet(tmp_path / "d", GOOD)
    path = root / "train-jpg" / "train_1.jpg"
    assert np.array_equal(np.asarray(load_rgb(path.read_bytes())), np.asarray(load_rgb(path)))


def test_csv_row_whose_image_is_missing(tmp_path):
    root = _planet(tmp_path / "d", GOOD)
    (root / "train-jpg" / "train_2.jpg").unlink()
    with pytest.raises(BadInputError, match=r"train_v2.csv:4: image 'train_2' not found"):
        load_planet(root, BadInputPolicy())
    policy = BadInputPolicy("skip")
    ds = load_planet(root, policy)
    assert ds.train.names == ["train_0", "train_1"]
    assert policy.n_skipped == 1 and policy.skipped[0]["file"].endswith("train_v2.csv:4")


def test_image_with_no_csv_row(tmp_path):
    root = _planet(tmp_path / "d", GOOD)
    _jpg(root / "train-jpg" / "stray.jpg")
    with pytest.raises(BadInputError, match=r"stray.jpg: image has no row in .*train_v2.csv"):
        load_planet(root, BadInputPolicy())
    policy = BadInputPolicy("skip")
    assert len(load_planet(root, policy).train) == 3
    assert policy.n_skipped == 1 and policy.skipped[0]["file"].endswith("stray.jpg")


@pytest.mark.parametrize("content", ["", "image_name,tags\n", "image_name,tags\n\n\n"])
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_empty_csv_is_always_an_error(tmp_path, content, mode):
    root = _planet(tmp_path / "d", [])
    (root / "train_v2.csv").write_text(content)
    with pytest.raises(QdeepError, match=r"train_v2.csv: empty CSV"):
        load_planet(root, BadInputPolicy(mode))


def test_malformed_row(tmp_path):
    root = _planet(tmp_path / "d", GOOD, extra_lines="train_9,clear,primary\n")
    with pytest.raises(BadInputError, match=r"train_v2.csv:5: malformed row 'train_9,clear,primary'"):
        load_planet(root, BadInputPolicy())
    policy = BadInputPolicy("skip")
    assert len(load_planet(root, policy).train) == 3
    assert policy.skipped == [{"file": f"{root / 'train_v2.csv'}:5",
                               "reason": "malformed row 'train_9,clear,primary' (expected image_name,tags)"}]


def test_wrong_header_names_line_one(tmp_path):
    root = _planet(tmp_path / "d", GOOD)
    (root / "train_v2.csv").write_text("name,labels\ntrain_0,clear\n")
    with pytest.raises(QdeepError, match=r"train_v2.csv:1: expected header 'image_name,tags'"):
        load_planet(root, BadInputPolicy("skip"))


def test_duplicate_image_name_keeps_the_first_when_skipping(tmp_path):
    root = _planet(tmp_path / "d", GOOD, extra_lines="train_0,water\n")
    with pytest.raises(BadInputError, match=r"train_v2.csv:5: duplicate image_name 'train_0' \(first on line 2\)"):
        load_planet(root, BadInputPolicy())
    policy = BadInputPolicy("skip")
    ds = load_planet(root, policy)
    assert ds.train.tags[0] == ["clear", "primary"] and policy.n_skipped == 1


def test_unsupported_file(tmp_path):
    root = _planet(tmp_path / "d", GOOD)
    (root / "train-jpg" / "notes.txt").write_text("hello")
    with pytest.raises(BadInputError, match=r"notes.txt: unsupported file"):
        load_planet(root, BadInputPolicy())
    policy = BadInputPolicy("skip")
    assert len(load_planet(root, policy).train) == 3 and policy.n_skipped == 1


def test_sample_submission_rows_and_test_images_are_matched_both_ways(tmp_path):
    root = _planet(tmp_path / "d", GOOD, test=["test_0", "test_1"], sample=["test_0", "test_7"])
    with pytest.raises(BadInputError, match=r"sample_submission_v2.csv:3: image 'test_7' not found"):
        load_planet(root, BadInputPolicy())
    policy = BadInputPolicy("skip")
    assert load_planet(root, policy).test.names == ["test_0"]
    assert sorted(s["file"].rsplit("/", 1)[-1] for s in policy.skipped) == ["sample_submission_v2.csv:3", "test_1.jpg"]


def test_missing_folders_and_files_are_clear_errors(tmp_path):
    with pytest.raises(QdeepError, match="data directory not found"):
        load_planet(tmp_path / "nope", BadInputPolicy())
    (tmp_path / "d").mkdir()
    with pytest.raises(QdeepError, match="no train_v2.csv or train.csv"):
        load_planet(tmp_path / "d", BadInputPolicy())


# ---- encodings, delimiters inside tags, EXIF orientation (issue 18) ----

def test_a_utf8_csv_with_a_bom_loads(tmp_path):
    root = _planet(tmp_path / "d", GOOD)
    csv = root / "train_v2.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())
    assert load_planet(root, BadInputPolicy()).train.names == ["train_0", "train_1", "train_2"]


def test_a_csv_that_is_not_utf8_names_the_file_and_line_or_is_read_with_its_encoding(tmp_path):
    from qdeep.data.planet import csv_encoding

    root = _planet(tmp_path / "d", GOOD)
    (root / "train_v2.csv").write_bytes("image_name,tags\ntrain_0,clear primary\ntrain_1,haze \u00e9t\u00e9\n"
                                        "train_2,cloudy\n".encode("latin-1"))
    with pytest.raises(QdeepError, match=r"train_v2.csv:3: not utf-8 text \(byte 0xe9 at column 14\)"):
        load_planet(root, BadInputPolicy("skip"))
    with csv_encoding("latin-1"):
        assert load_planet(root, BadInputPolicy()).train.tags[1] == ["haze", "\u00e9t\u00e9"]
    with pytest.raises(QdeepError, match="not utf-8 text"):  # the encoding was the block's only
        load_planet(root, BadInputPolicy())


def test_a_tag_holding_the_delimiter_is_bad_input_naming_the_line(tmp_path):
    root = _planet(tmp_path / "d", GOOD)
    (root / "train_v2.csv").write_text('image_name,tags\ntrain_0,clear primary\ntrain_1,"haze,primary"\n'
                                       "train_2,cloudy\n")
    with pytest.raises(BadInputError, match=r"train_v2.csv:3: tag 'haze,primary' contains the delimiter ','"):
        load_planet(root, BadInputPolicy())
    policy = BadInputPolicy("skip")
    ds = load_planet(root, policy)  # the row is skipped, and so its image, which then has no row
    assert ds.train.names == ["train_0", "train_2"] and "haze,primary" not in ds.train.vocabulary()
    assert [s["file"].rsplit("/", 1)[-1] for s in policy.skipped] == ["train_v2.csv:3", "train_1.jpg"]


@pytest.mark.parametrize("body, line", [('train_0,"clear primary\ntrain_1,haze\n', 2), ('train_0,clear\ntrain_1,"clear"x\n', 3)])
def test_a_stray_quote_names_the_line(tmp_path, body, line):
    root = _planet(tmp_path / "d", GOOD)
    (root / "train_v2.csv").write_text("image_name,tags\n" + body)
    with pytest.raises(QdeepError, match=rf"train_v2.csv:{line}: not a readable CSV"):
        load_planet(root, BadInputPolicy("skip"))


@pytest.mark.parametrize("orientation, size", [(1, (20, 10)), (3, (20, 10)), (6, (10, 20)), (8, (10, 20))])
def test_exif_orientation_is_applied(tmp_path, orientation, size):
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # the left half red
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "x.jpg", "JPEG", exif=exif, quality=95)
    out = np.asarray(load_rgb(tmp_path / "x.jpg")).astype(int)
    assert out.shape[:2] == (size[1], size[0])
    red = out[..., 0] > 128
    # 1: red left; 3 (180 degrees): red right; 6 (90 degrees clockwise to view): red on top; 8: red at the bottom
    where = {1: red[:, :5].all(), 3: red[:, -5:].all(), 6: red[:5].all(), 8: red[-5:].all()}[orientation]
    assert where and red.mean() == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("case", ["corrupt", "truncated"])
def test_rgb_pixels_errors_name_the_file_as_load_rgb_does(tmp_path, case):
    """TorchCodec refuses these JPEGs; Pillow's verdict, naming the file or the bytes' name, stands."""
    from qdeep.data.images import rgb_pixels

    root = _planet(tmp_path / "d", GOOD)
    fragment = _bad_cases()[case](root)
    with pytest.raises(ImageDecodeError, match=fragment):
        rgb_pixels(root / "train-jpg" / "train_1.jpg")
    with pytest.raises(ImageDecodeError, match=fragment):
        rgb_pixels((root / "train-jpg" / "train_1.jpg").read_bytes(), "train_1.jpg")
    with pytest.raises(FileNotFoundError):
        rgb_pixels(root / "train-jpg" / "gone.jpg")


def test_rgb_pixels_are_load_rgbs_for_every_kind_of_jpeg_and_other_formats(tmp_path):
    """JPEGs decoded by TorchCodec (colour at every chroma subsampling, greyscale, CMYK, EXIF-rotated)
    and other formats decoded by Pillow: the pixels load_rgb gives, from a path or the bytes."""
    from PIL import ImageFilter

    from qdeep.data.images import rgb_pixels

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    rotated = photo.getexif()
    rotated[0x0112] = 6
    cases = {f"sub{s}.jpg": (photo, {"quality": 90, "subsampling": s}) for s in (0, 1, 2)}
    cases |= {"grey.jpg": (photo.convert("L"), {}), "cmyk.jpg": (photo.convert("CMYK"), {}),
              "exif.jpg": (photo, {"exif": rotated}), "rgba.png": (photo.convert("RGBA"), {}),
              "palette.png": (photo.convert("P"), {}), "photo.tif": (photo, {})}
    for name, (image, options) in cases.items():
        image.save(tmp_path / name, **options)
        want = np.asarray(load_rgb(tmp_path / name))
        for src in (tmp_path / name, (tmp_path / name).read_bytes()):
            got = rgb_pixels(src)
            assert got.dtype == np.uint8 and got.shape == want.shape and np.array_equal(got, want), name
    assert rgb_pixels(tmp_path / "exif.jpg").shape == (40, 30, 3)  # turned upright
