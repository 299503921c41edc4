"""Multiband rasters (qdeep.data.rasters): GeoTIFFs of any band count and sample type, read back
as (bands, height, width) with their no-data value; bad files name themselves."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from qdeep.data.images import ImageDecodeError
from qdeep.data.rasters import PLANET_BANDS, BandLayout, band_indices, read_raster, write_geotiff
from qdeep.errors import QdeepError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_a_geotiff_reads_back_band_first_whatever_its_sample_type(tmp_path, dtype):
    bands = (np.random.default_rng(0).random((4, 9, 7)) * 1000).astype(dtype)
    write_geotiff(tmp_path / "a.tif", bands)
    raster = read_raster(tmp_path / "a.tif")
    assert raster.bands.dtype == dtype and np.array_equal(raster.bands, bands) and raster.nodata is None
    assert np.array_equal(read_raster((tmp_path / "a.tif").read_bytes(), "a pack's a.tif").bands, bands)
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        assert tif.pages[0].geotiff_tags["ModelTiepoint"][3:5] == [500000.0, 9000000.0]


def test_interleaved_and_single_band_tiffs_come_band_first_and_nodata_is_nan(tmp_path):
    pixels = np.arange(5 * 6 * 3, dtype=np.uint16).reshape(5, 6, 3)  # height, width, samples
    tifffile.imwrite(tmp_path / "rgb.tif", pixels, photometric="rgb")
    assert np.array_equal(read_raster(tmp_path / "rgb.tif").bands, np.moveaxis(pixels, -1, 0))
    gray = np.full((4, 4), 7, dtype=np.uint16)
    gray[0, 0] = 0
    tifffile.imwrite(tmp_path / "one.tif", gray, extratags=[(42113, "s", 0, "0", True)])  # GDAL_NODATA "0"
    raster = read_raster(tmp_path / "one.tif")
    assert raster.bands.shape == (1, 4, 4) and raster.nodata == 0.0
    floats = raster.as_float()
    assert np.isnan(floats[0, 0, 0]) and np.isnan(floats).sum() == 1 and floats[0, 1, 1] == 7


def test_corrupt_truncated_and_unreadable_tiffs_name_the_file(tmp_path):
    write_geotiff(tmp_path / "good.tif", np.ones((4, 16, 16), dtype=np.uint16))
    data = (tmp_path / "good.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    for name in ("cut.tif", "junk.tif"):
        with pytest.raises(ImageDecodeError, match="cannot decode TIFF") as err:
            read_raster(tmp_path / name)
        assert err.value.path == str(tmp_path / name) and "\n" not in str(err.value)
    with pytest.raises(ImageDecodeError, match="^a pack's junk.tif: cannot decode TIFF"):
        read_raster(b"not a tiff", "a pack's junk.tif")
    tifffile.imwrite(tmp_path / "complex.tif", np.ones((4, 4), dtype=np.complex64))
    with pytest.raises(ImageDecodeError, match="unreadable samples: complex64"):
        read_raster(tmp_path / "complex.tif")
    with pytest.raises(FileNotFoundError):  # the caller listed it: a setup problem, not bad input
        read_raster(tmp_path / "missing.tif")


def test_every_image_must_have_the_first_ones_bands(tmp_path):
    write_geotiff(tmp_path / "first.tif", np.ones((4, 8, 8), dtype=np.uint16))
    write_geotiff(tmp_path / "three.tif", np.ones((3, 8, 8), dtype=np.uint16))
    write_geotiff(tmp_path / "bytes.tif", np.ones((4, 8, 8), dtype=np.uint8))
    layout = BandLayout.of(read_raster(tmp_path / "first.tif"), tmp_path / "first.tif")
    layout.check(read_raster(tmp_path / "first.tif"), tmp_path / "first.tif")
    with pytest.raises(ImageDecodeError) as err:
        layout.check(read_raster(tmp_path / "three.tif"), tmp_path / "three.tif")
    assert str(err.value) == (f"{tmp_path / 'three.tif'}: has 3 band(s) of uint16; the data set's first image "
                              f"{tmp_path / 'first.tif'} has 4 of uint16")
    with pytest.raises(ImageDecodeError, match="has 4 band\\(s\\) of uint8"):
        layout.check(read_raster(tmp_path / "bytes.tif"), tmp_path / "bytes.tif")


def test_bands_are_chosen_by_name_or_by_gdal_number():
    assert band_indices(None, 4) == [0, 1, 2, 3]
    assert band_indices("r,g,b,nir", 4, PLANET_BANDS) == [2, 1, 0, 3]
    assert band_indices("R, G, B", 4, PLANET_BANDS) == [2, 1, 0]
    assert band_indices("4,1", 13) == [3, 0]
    with pytest.raises(QdeepError, match="^--bands r,g,x: no band 'x' in images of 4 band\\(s\\) "
                                         "\\(use names b, g, r, nir or numbers 1 to 4\\)$"):
        band_indices("r,g,x", 4, PLANET_BANDS)
    with pytest.raises(QdeepError, match="no band '5'"):
        band_indices("5", 4)
    with pytest.raises(QdeepError, match="no band 'nir' in images of 3"):
        band_indices("nir", 3, PLANET_BANDS)
    with pytest.raises(QdeepError, match="named twice"):
        band_indices("r,3", 4, PLANET_BANDS)


def test_band_statistics_skip_no_data_and_give_each_band_its_range():
    from qdeep.data.rasters import Raster, band_statistics

    a = np.array([[[0, 2], [4, 6]], [[10, 10], [10, 10]]], dtype=np.uint16)  # band 2 constant
    b = np.array([[[8, 0], [0, 0]], [[0, 10], [10, 10]]], dtype=np.uint16)  # 0 = no data
    stats = band_statistics([Raster(a), Raster(b, nodata=0.0)])
    valid_1 = [0, 2, 4, 6, 8]  # every value of image a, the one valid value of b
    assert stats.mean[0] == pytest.approx(np.mean(valid_1)) and stats.std[0] == pytest.approx(np.std(valid_1))
    assert stats.mean[1] == 10 and stats.std[1] == 1.0  # a constant band: centred only
    assert (stats.low, stats.high) == ((0.0, 10.0), (8.0, 10.0))
    empty = band_statistics([Raster(np.zeros((1, 2, 2), dtype=np.uint8), nodata=0.0)])
    assert (empty.mean, empty.std, empty.low, empty.high) == ((0.0,), (1.0,), (0.0,), (1.0,))
    with pytest.raises(QdeepError, match="at least one image"):
        band_statistics([])


def test_ndvi_and_ndwi_from_named_bands():
    from qdeep.data.rasters import spectral_index

    bands = np.array([[[10.0, 0.0]], [[40.0, 30.0]], [[20.0, 0.0]], [[60.0, np.nan]]])  # b, g, r, nir
    ndvi = spectral_index(bands, PLANET_BANDS, "ndvi")
    assert ndvi[0, 0] == pytest.approx((60 - 20) / 80) and np.isnan(ndvi[0, 1])
    assert spectral_index(bands, PLANET_BANDS, "ndwi")[0, 0] == pytest.approx((40 - 60) / 100)
    zero = spectral_index(np.zeros((4, 1, 1)), PLANET_BANDS, "ndvi")
    assert np.isnan(zero).all()  # 0 / 0: no value, not an error
    with pytest.raises(QdeepError, match="--indices ndvi needs the nir band\\(s\\); the images' bands are r, g, b"):
        spectral_index(bands[:3], ("r", "g", "b"), "ndvi")
    with pytest.raises(QdeepError, match="unknown index 'evi' \\(known: ndvi, ndwi\\)"):
        spectral_index(bands, PLANET_BANDS, "evi")


def test_a_network_input_from_chosen_bands_normalised_resized_and_flipped():
    import random

    import torch

    from qdeep.data.rasters import BandStats, Raster, raster_input
    from qdeep.data.transforms import augment_pixels

    bands = np.stack([np.full((8, 8), v, dtype=np.uint16) for v in (100, 200, 300, 400)])
    bands[3, 0, 0] = 0  # no data in the NIR band
    stats = BandStats(mean=(100.0, 150.0, 250.0, 500.0), std=(10.0, 50.0, 25.0, 100.0),
                      low=(0.0,) * 4, high=(1000.0,) * 4)
    x = raster_input(Raster(bands, nodata=0.0), [2, 1, 0, 3], 8, stats)  # r, g, b, nir of Planet's order
    assert x.shape == (4, 8, 8) and x.dtype == torch.float32
    assert [float(x[c, 3, 3]) for c in range(4)] == [2.0, 1.0, 0.0, -1.0]
    assert float(x[3, 0, 0]) == 0.0  # no data: the band's mean
    small = raster_input(Raster(bands), [0], 4, stats)
    assert small.shape == (1, 4, 4) and torch.allclose(small, torch.zeros(1, 4, 4))  # a flat band stays flat
    ramp = Raster(np.arange(64, dtype=np.float32).reshape(1, 8, 8))
    plain = raster_input(ramp, [0], 8, stats)
    for seed in range(8):  # the flips and rotations augment_pixels draws from the same generator
        flipped = raster_input(ramp, [0], 8, stats, random.Random(seed), "d4")
        assert torch.equal(flipped, torch.from_numpy(np.ascontiguousarray(
            augment_pixels(plain.numpy(), random.Random(seed), "d4"))))
    with pytest.raises(QdeepError, match="--augment strong is for RGB images; multiband images take d4, flip, none"):
        raster_input(ramp, [0], 8, stats, random.Random(0), "strong")
