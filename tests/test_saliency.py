"""Grad-CAM (Captum) of a network whose classes are known to live in known parts of the image."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qdeep.models import build_model
from qdeep.models.saliency import grad_cam, last_spatial_layer, overlay

pytestmark = pytest.mark.unit


class TwoSpots(nn.Module):
    """Class 0 is the red channel's mean, class 1 the green's: a 1x1 convolution, ReLU, global pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 1] = 1.0
        self.features = nn.Sequential(self.conv, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


def test_each_class_lights_up_where_it_is_in_the_image():
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, :16, :16] = 1.0  # red top left
    x[0, 1, 16:, 16:] = 1.0  # green bottom right
    model = TwoSpots().train()
    assert last_spatial_layer(model, x) is model.features  # the last module that ends with a spatial map
    cams = grad_cam(model, x.repeat(2, 1, 1, 1), [0, 1])
    assert cams.shape == (2, 32, 32) and cams.dtype == np.float32 and model.training  # its mode restored
    assert cams.min() >= 0 and np.allclose(cams.max(axis=(1, 2)), 1.0)
    red, green = cams
    assert red[:16, :16].mean() > 0.9 and red[16:, 16:].mean() < 0.1
    assert green[16:, 16:].mean() > 0.9 and green[:16, :16].mean() < 0.1


@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("efficientnet_lite0", 64), ("alexnet", 96)])
def test_zoo_networks_give_one_map_per_image(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, 4, "none", "none")
    cams = grad_cam(model, torch.randn(3, 3, size, size), [0, 1, 3])
    assert cams.shape == (3, size, size) and np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1


def test_overlay_blends_the_map_over_the_photo():
    photo = Image.new("RGB", (40, 40), (0, 0, 0))
    cam = np.zeros((8, 8), np.float32)
    cam[:4, :4] = 1.0
    out = np.asarray(overlay(photo, cam))
    assert out.shape == (40, 40, 3)
    hot, cold = out[5, 5].astype(int), out[35, 35].astype(int)  # jet's dark red, 60 % over black; the photo
    assert hot[0] > 60 and hot[1] == hot[2] == 0 and cold.tolist() == [0, 0, 0]


def test_the_map_is_the_deepest_of_at_least_four_cells_a_side():
    model = build_model("resnet18", 4, "none", "none").eval()
    assert last_spatial_layer(model, torch.zeros(1, 3, 224, 224)) is model.layer4  # 7 x 7
    assert last_spatial_layer(model, torch.zeros(1, 3, 64, 64)) is model.layer3  # layer4 is 2 x 2 there
    assert last_spatial_layer(model, torch.zeros(1, 3, 32, 32)) is model.layer2  # 4 x 4
    assert last_spatial_layer(model, torch.zeros(1, 3, 64, 64), min_side=100) is model.layer4  # none: the last
