"""Where in an image a network looks for a class: Grad-CAM (Selvaraju et al. 2017) through Captum.

The deepest feature maps (of at least MIN_SIDE cells a side) of any network, weighted by the
class logit's gradient, upsampled to the input and scaled to [0, 1]; `overlay` draws one on the photo.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from qdeep.models.freeze import unwrap


MIN_SIDE = 4  # Grad-CAM's map: the deepest one at least this many cells a side (ResNet's last is 2 x 2 at 64 px)


def last_spatial_layer(model: nn.Module, x: torch.Tensor, min_side: int = MIN_SIDE) -> nn.Module:
    """The module that finishes last with a spatial map (B, C, H, W) of at least `min_side` cells a
    side when `model` runs on `x` (else the last with more than one cell): the deepest feature maps,
    such as ResNet's layer4 or EfficientNet's last norm at 224 px; a stage earlier on small images."""
    deepest, fine = [], []

    def keep(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            deepest[:] = [module]
            if min(output.shape[-2:]) >= min_side:
                fine[:] = [module]

    hooks = [m.register_forward_hook(keep) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for hook in hooks:
            hook.remove()
    if not deepest:
        raise ValueError(f"{type(model).__name__} makes no spatial feature map at {tuple(x.shape[-2:])} px")
    return (fine or deepest)[0]


def grad_cam(model: nn.Module, x: torch.Tensor, targets: list[int] | torch.Tensor,
             layer: nn.Module | None = None) -> np.ndarray:
    """(B, H, W) float32 maps in [0, 1] of where `model` finds class `targets[i]` in `x[i]` (B, C, H, W),
    from `layer` (default `last_spatial_layer`). The model runs in eval mode; its mode is restored."""
    from captum.attr import LayerAttribution, LayerGradCam

    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        layer = layer if layer is not None else last_spatial_layer(model, x)
        targets = torch.as_tensor(targets, dtype=torch.long, device=x.device)
        with torch.enable_grad():
            cam = LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    finally:
        model.train(was_training)
    cam = cam[:, 0].float().cpu().numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0).astype(np.float32)


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """`image` with `cam` (H, W in [0, 1], resized to the image) over it in a heat colour map, as opaque
    as the map is strong (up to `alpha`): the photo shows through where the class is not."""
    from matplotlib import colormaps

    heat = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR),
                      dtype=np.float32) / 255.0
    coloured = colormaps["jet"](heat)[..., :3] * 255.0
    weight = alpha * heat[..., None]
    photo = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip(photo * (1 - weight) + coloured * weight, 0, 255).astype(np.uint8))
