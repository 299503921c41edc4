"""A network's first convolution adapted to images of other bands than RGB (`--band-init`).

`bands` names what each input channel holds, in order ("r", "g", "b" for the visible bands the
pretrained kernels were learnt on; any other name is a new band, e.g. "nir"). The pretrained RGB
kernels stay on the RGB bands wherever those are; the new bands' kernels come from the strategy:

  rgb-copy  random, as the layer initialises itself (TorchGeo keeps RGB and initialises the rest)
  tile      timm's `adapt_input_conv`: the RGB kernels repeated over every band and scaled by
            3 / bands, whatever the bands are (timm's `in_chans`)
  mean      the mean of the RGB kernels
  zero      zeros: the network starts as the RGB one and learns what the new bands add

The default is `mean` (config.DEFAULT_BAND_INIT): in scripts/bench_bands.py's 5-epoch fine-tuning the
NIR kernels of `rgb-copy` and `zero` never learnt the tag that only NIR shows; `mean`'s did.
  parallel  a second convolution of the same shape over the new bands alone, added to the pretrained
            one over the RGB bands (as Raster Vision does); randomly initialised

A frozen backbone still trains its adapted first layer (`freeze.apply_freeze` reads `qdeep_stem`),
since the new kernels were never learnt. Works for every architecture of the zoo: the first `nn.Conv2d` over 3 channels,
copied with its class (timm's TF-"same"-padded stems stay so); Inception-v3's own input transform
(ImageNet statistics to Google's [-1, 1]) goes on applying to the RGB bands alone.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch
from torch import nn

from qdeep.config import BAND_INITS, DEFAULT_BAND_INIT
from qdeep.errors import QdeepError

__all__ = ["BAND_INITS", "ParallelStem", "adapt_bands", "first_conv"]
RGB = ("r", "g", "b")  # the order of the pretrained kernels' input channels


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The dotted name and module of the first convolution over 3 input channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return name, module
    raise QdeepError(f"{type(model).__name__}: no convolution over 3 input channels to adapt to other bands")


def _like(conv: nn.Conv2d, in_channels: int, bias: bool = True) -> nn.Conv2d:
    """A convolution of `conv`'s class and settings over `in_channels`, freshly initialised as the
    layer initialises itself."""
    new = copy.deepcopy(conv)
    new.in_channels = in_channels
    new.weight = nn.Parameter(conv.weight.new_empty(conv.out_channels, in_channels // conv.groups, *conv.kernel_size))
    if not bias:
        new.bias = None
    new.reset_parameters()
    return new


def _transform_rgb_bands(model: nn.Module, x: torch.Tensor, rgb_index: Sequence[int]) -> torch.Tensor:
    """Inception-v3's input transform applied to the bands at `rgb_index` (r, g, b), the others as they are."""
    x = x.clone()
    x[:, list(rgb_index)] = type(model)._transform_input(model, x[:, list(rgb_index)])
    return x


class ParallelStem(nn.Module):
    """The pretrained convolution over the RGB bands plus a new one over the other bands, summed."""

    def __init__(self, rgb: nn.Conv2d, rgb_index: Sequence[int], extra_index: Sequence[int]):
        super().__init__()
        self.rgb = rgb
        self.extra = _like(rgb, len(extra_index), bias=False)
        self.register_buffer("rgb_index", torch.tensor(list(rgb_index)), persistent=False)
        self.register_buffer("extra_index", torch.tensor(list(extra_index)), persistent=False)
        self.in_channels = len(rgb_index) + len(extra_index)  # what the stem takes, as a Conv2d says

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rgb(x.index_select(1, self.rgb_index)) + self.extra(x.index_select(1, self.extra_index))


def adapt_bands(model: nn.Module, bands: Sequence[str], strategy: str = DEFAULT_BAND_INIT) -> nn.Module:
    """`model` (in place, and returned) taking `bands` as its input channels; see the module's doc."""
    if strategy not in BAND_INITS:
        raise QdeepError(f"--band-init must be one of {', '.join(BAND_INITS)}, got {strategy!r}")
    bands = [b.lower() for b in bands]
    if not bands or len(set(bands)) != len(bands):
        raise QdeepError(f"bands must be distinct names, got {', '.join(bands) or 'none'}")
    if bands == list(RGB):
        return model
    name, conv = first_conv(model)
    rgb_at = {band: i for i, band in enumerate(bands) if band in RGB}
    extra_at = [i for i, band in enumerate(bands) if band not in RGB]
    if getattr(model, "transform_input", False):  # torchvision's Inception-v3
        if len(rgb_at) == 3:
            model._transform_input = functools.partial(_transform_rgb_bands, model, rgb_index=[rgb_at[c] for c in RGB])
        else:
            model.transform_input = False
    if strategy == "parallel":
        if len(rgb_at) != 3 or not extra_at:
            raise QdeepError("--band-init parallel needs the r, g and b bands and at least one other band")
        model.set_submodule(name, ParallelStem(conv, [rgb_at[c] for c in RGB], extra_at))
        model.qdeep_stem = name
        return model
    old = conv.weight.detach()
    new = _like(conv, len(bands))
    with torch.no_grad():
        if strategy == "tile":
            from timm.models import adapt_input_conv

            new.weight.copy_(adapt_input_conv(len(bands), old))
        else:
            if strategy in ("mean", "zero"):
                fill = old.mean(dim=1) if strategy == "mean" else torch.zeros_like(old[:, 0])
                for i in extra_at:
                    new.weight[:, i] = fill
            for band, i in rgb_at.items():  # rgb-copy keeps the new layer's own init elsewhere
                new.weight[:, i] = old[:, RGB.index(band)]
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.requires_grad_(conv.weight.requires_grad)
    model.set_submodule(name, new)
    model.qdeep_stem = name
    return model
