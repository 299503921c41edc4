"""A network's first convolution adapted to other bands than RGB (qdeep.models.bands, `--band-init`)."""

from __future__ import annotations

import pytest
import torch

from qdeep.errors import QdeepError
from qdeep.models import build_model
from qdeep.models.bands import BAND_INITS, ParallelStem, adapt_bands, first_conv
from qdeep.models.freeze import apply_freeze
from qdeep.models.zoo import list_archs

pytestmark = pytest.mark.unit

PLANET = ["b", "g", "r", "nir"]  # Planet's analytic band order


def _pair(arch="resnet18"):
    torch.manual_seed(0)
    rgb = build_model(arch, 5, "none").eval()
    four = build_model(arch, 5, "none").eval()
    four.load_state_dict(rgb.state_dict())
    return rgb, four


@pytest.mark.parametrize("arch", list_archs())
def test_every_arch_with_zero_new_kernels_sees_its_rgb_bands_as_before(arch):
    """`zero`: the adapted network's output on b, g, r, nir is the RGB network's on r, g, b, whatever the NIR."""
    rgb, four = _pair(arch)
    adapt_bands(four, PLANET, "zero")
    assert first_conv(rgb)[0] == four.qdeep_stem and four.get_submodule(four.qdeep_stem).in_channels == 4
    x = torch.rand(2, 4, 80, 80)
    with torch.no_grad():
        assert torch.allclose(four(x), rgb(x[:, [2, 1, 0]]), rtol=1e-4, atol=1e-5)


def test_each_strategy_keeps_the_rgb_kernels_on_their_bands():
    for strategy in ("rgb-copy", "mean", "zero"):
        rgb, four = _pair()
        old = rgb.conv1.weight
        adapt_bands(four, PLANET, strategy)
        new = four.conv1.weight
        assert new.shape == (64, 4, 7, 7)
        assert torch.equal(new[:, 0], old[:, 2]) and torch.equal(new[:, 1], old[:, 1]) and torch.equal(new[:, 2], old[:, 0])
        nir = new[:, 3]
        if strategy == "mean":
            assert torch.allclose(nir, old.mean(dim=1))
        elif strategy == "zero":
            assert not nir.any()
        else:  # the layer's own random init: not a copy of any RGB kernel, not zero
            assert nir.std() > 0 and all(not torch.allclose(nir, old[:, c]) for c in range(3))


def test_tile_is_timms_in_chans_adaptation():
    from timm.models import adapt_input_conv

    rgb, four = _pair()
    adapt_bands(four, PLANET, "tile")
    assert torch.allclose(four.conv1.weight, adapt_input_conv(4, rgb.conv1.weight))


def test_parallel_adds_a_trainable_convolution_over_the_new_bands():
    rgb, four = _pair("efficientnet_lite0")
    adapt_bands(four, PLANET, "parallel")
    stem = four.get_submodule(four.qdeep_stem)
    assert isinstance(stem, ParallelStem) and stem.extra.in_channels == 1 and stem.in_channels == 4
    x = torch.rand(2, 4, 64, 64)
    with torch.no_grad():
        stem.extra.weight.zero_()
        assert torch.allclose(four(x), rgb(x[:, [2, 1, 0]]), rtol=1e-4, atol=1e-5)
    apply_freeze(four, "head")  # a frozen backbone still trains its adapted stem (its new kernels were never learnt)
    assert stem.extra.weight.requires_grad and not four.blocks[0][0].conv_dw.weight.requires_grad
    four.train()
    four(x).sum().backward()
    assert stem.extra.weight.grad is not None and stem.extra.weight.grad.abs().sum() > 0
    assert stem.rgb.weight.grad is not None
    assert all(p.grad is None for n, p in four.named_parameters() if n.startswith("blocks.0"))
    state = four.state_dict()  # the extra kernels are saved with the model
    assert "conv_stem.extra.weight" in state and "conv_stem.rgb.weight" in state


def test_rgb_stays_as_it_is_and_bad_requests_are_refused():
    rgb, same = _pair()
    assert adapt_bands(same, ["r", "g", "b"], "tile") is same and same.conv1 is not None and same.conv1.in_channels == 3
    assert not hasattr(same, "qdeep_stem")
    apply_freeze(same, "head")  # nothing adapted: the stem is frozen with the rest
    assert not same.conv1.weight.requires_grad
    with pytest.raises(QdeepError, match="--band-init must be one of rgb-copy, tile, mean, zero, parallel"):
        adapt_bands(_pair()[1], PLANET, "copy")
    with pytest.raises(QdeepError, match="distinct"):
        adapt_bands(_pair()[1], ["r", "r", "nir"])
    with pytest.raises(QdeepError, match="parallel needs the r, g and b bands"):
        adapt_bands(_pair()[1], ["nir", "swir"], "parallel")
    nir_only = adapt_bands(_pair()[1], ["nir", "swir"], "mean")  # no RGB band: every kernel is new
    assert nir_only.conv1.in_channels == 2
    assert BAND_INITS == ("rgb-copy", "tile", "mean", "zero", "parallel")


def test_build_model_adapts_then_loads_either_kind_of_weights_file(tmp_path):
    """A file of RGB kernels (ImageNet's, a 3-band model's) loads before the stem is adapted; a
    multiband model's own file loads into the adapted stem; a frozen stem stays frozen when asked."""
    rgb, _ = _pair()
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    four = build_model("resnet18", 5, str(tmp_path / "rgb.pt"), "head", bands=PLANET, band_init="zero").eval()
    assert four.conv1.in_channels == 4 and four.conv1.weight.requires_grad and not four.layer1[0].conv1.weight.requires_grad
    x = torch.rand(2, 4, 64, 64)
    with torch.no_grad():
        assert torch.allclose(four(x), rgb(x[:, [2, 1, 0]]), rtol=1e-4, atol=1e-5)
    for init in ("rgb-copy", "parallel"):
        saved = build_model("resnet18", 5, "none", bands=PLANET, band_init=init).eval()
        torch.save(saved.state_dict(), tmp_path / f"{init}.pt")
        again = build_model("resnet18", 5, str(tmp_path / f"{init}.pt"), bands=PLANET, band_init=init).eval()
        with torch.no_grad():
            assert torch.equal(again(x), saved(x))
    frozen = build_model("resnet18", 5, "none", "head", bands=PLANET, frozen_stem=True)
    assert not frozen.conv1.weight.requires_grad
