"""How an image becomes a network's input (qdeep.data.inputs): multiband GeoTIFFs through the chosen
bands, normalised by the training set's statistics, the same from a path or from bytes, in the
loaders that training and DeepCluster use; bad rasters name their file."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from qdeep.data.images import ImageDecodeError
from qdeep.data.inputs import InputBands, RasterInput, RGBInput, input_bands, model_input
from qdeep.data.loader import Decoder, ImageDataset
from qdeep.data.rasters import write_geotiff
from qdeep.errors import QdeepError
from qdeep.models import arch_spec

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tifs(planet4):
    return sorted((planet4 / "train-tif-v2").glob("*.tif"))


def test_input_bands_of_planet_geotiffs_survive_a_json_round_trip(tifs):
    bands = InputBands.of(tifs, "r,g,b,nir")
    assert bands.index == (2, 1, 0, 3) and bands.names == ("r", "g", "b", "nir") and bands.extra == ("nir",)
    assert bands.count == 4 and bands.dtype == "uint16" and bands.first == str(tifs[0])
    assert len(bands.mean) == len(bands.std) == 4 and all(s > 0 for s in bands.std) and max(bands.mean) > 255
    assert InputBands.from_dict(json.loads(json.dumps(bands.to_dict())), "config") == bands
    visible = bands.only(("r", "g", "b"))
    assert visible.index == (2, 1, 0) and visible.names == ("r", "g", "b") and visible.mean == bands.mean
    assert bands.only(("r", "swir")) is None
    assert InputBands.of(tifs).names == ("b", "g", "r", "nir")  # every band, in the files' order
    with pytest.raises(QdeepError, match="model config x: `bands` is not a multiband input"):
        InputBands.from_dict({**bands.to_dict(), "index": [0, 9]}, "model config x")


def test_unnamed_bands_are_numbered_and_none_is_taken_for_rgb(tmp_path):
    six = tmp_path / "six.tif"
    write_geotiff(six, np.arange(6 * 64, dtype=np.uint16).reshape(6, 8, 8))
    bands = InputBands.of([six], "6,1")
    assert bands.index == (5, 0) and bands.names == ("6", "1") and bands.extra == ("6", "1")
    assert bands.only(("r", "g", "b")) is None
    with pytest.raises(QdeepError, match="--bands r: no band 'r' in images of 6 band"):
        InputBands.of([six], "r")


def test_a_raster_input_is_the_same_from_a_path_or_its_bytes_and_checks_the_layout(tifs, tmp_path):
    read = RasterInput(24, InputBands.of(tifs, "r,g,b,nir"))
    x = read(tifs[3])
    assert x.shape == (4, 24, 24) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1.5  # normalised by the set's statistics
    assert torch.equal(read(tifs[3].read_bytes(), name="train_3"), x)
    for seed in range(4):
        assert torch.equal(read(tifs[3], random.Random(seed)), read(tifs[3].read_bytes(), random.Random(seed)))
    cropped = read(tifs[3], random.Random(0), crop=0.5)
    assert cropped.shape == x.shape and not torch.equal(cropped, x)
    three = tmp_path / "three.tif"
    write_geotiff(three, np.ones((3, 32, 32), dtype=np.uint16))
    with pytest.raises(ImageDecodeError, match=f"{three}: has 3 band\\(s\\) of uint16; the training set's first image"):
        read(three)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(tifs[0].read_bytes()[:300])
    with pytest.raises(ImageDecodeError, match=f"{broken}: cannot decode TIFF"):
        read(broken)
    with pytest.raises(ImageDecodeError, match="train_9: cannot decode TIFF"):
        read(b"not a tiff", name="train_9")


def test_loaders_feed_every_band(tifs):
    bands = InputBands.of(tifs, "r,g,b,nir")
    data = ImageDataset([str(p) for p in tifs[:4]], None, RasterInput(16, bands), train=True, seed=1)
    i, x, _ = data[(0, 2)]
    assert i == 2 and x.shape == (4, 16, 16)
    batch = {"row": np.arange(4), "ref": np.array([str(p) for p in tifs[:4]], dtype=object), "y": np.zeros(4)}
    rows, xs, _ = next(Decoder(RasterInput(16, bands), threads=2)([batch]))
    assert xs.shape == (4, 4, 16, 16) and torch.equal(xs[1], RasterInput(16, bands)(str(tifs[1])))


def test_model_input_and_input_bands_choose_by_format(tifs):
    spec = arch_spec("resnet18")
    assert model_input(spec, None, None) == RGBInput(spec.input_size, tuple(spec.mean), tuple(spec.std))
    bands = input_bands("tif", tifs, "nir")
    assert model_input(spec, 32, bands) == RasterInput(32, bands) and bands.names == ("nir",)
    assert input_bands("jpg", tifs) is None
    with pytest.raises(QdeepError, match="--bands is for multiband images: add --image-format tif"):
        input_bands("jpg", tifs, "nir")


def test_a_preview_shows_the_visible_bands_stretched(tifs):
    picture = InputBands.of(tifs, "nir").preview(tifs[0])  # whatever the network takes, people see r, g, b
    assert picture.mode == "RGB" and picture.size == (32, 32)
    pixels = np.asarray(picture)
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 20
