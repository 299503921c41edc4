"""The model zoo: one name -> one architecture, with a fresh head.

Every model ends in ``nn.Linear(feature_dim, num_labels)``, one logit per tag or class (the
task's targets part chooses the activation and the loss). Each architecture also declares its
input size, normalisation, head and ordered blocks in an ``ArchSpec``; training, freezing,
inference and clustering read it from ``model.qdeep_arch`` instead of knowing about
architectures themselves. Names outside the registry go to torchvision, then timm, with blocks
found by a heuristic.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from qdeep.config import DEFAULT_BAND_INIT, NAMED_WEIGHTS
from qdeep.errors import QdeepError
from qdeep.models.bands import adapt_bands, first_conv
from qdeep.models.freeze import apply_freeze, parse_freeze, unwrap
from qdeep.models.weights import imagenet_model, library_model, load_bundled, load_strict, read_file
from qdeep.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- blocks -----------------------------------------------------------------------------------


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _within(name: str, ancestor: str) -> bool:
    """True when module ``name`` is ``ancestor`` or lies inside it."""
    return name == ancestor or name.startswith(ancestor + ".")


def _units(module: nn.Module, keep: set[str], prefix: str = "") -> list[str]:
    """Modules in definition order: ``keep`` names atomic, their ancestors opened, others atomic if they have params."""
    out = []
    for name, child in module.named_children():
        full = prefix + name
        if full in keep:
            out.append(full)
        elif any(k.startswith(full + ".") for k in keep):
            out.extend(_units(child, keep, full + "."))
        elif _n_params(child):
            out.append(full)
    return out


def block_layout(model: nn.Module, anchors: list[str], head: str, anchors_end_stages: bool) -> list[list[str]]:
    """Module names of each block, in order.

    Block i spans the modules after anchor i-1 up to anchor i; whatever comes after the
    last anchor (except the head) joins the last block. Modules before the first anchor are
    the stem, unless the anchors close their stages (VGG's MaxPools), when they open block 1.
    """
    units = _units(model, set(anchors) | {head})
    positions = [units.index(a) for a in anchors]
    start = 0 if anchors_end_stages else positions[0]
    blocks = []
    for pos in positions:
        blocks.append(units[start:pos + 1])
        start = pos + 1
    blocks[-1] += [u for u in units[start:] if u != head]
    return blocks


def _named(names: tuple[str, ...], model: nn.Module) -> list[str]:
    return list(names)


def _children_of(container: str, model: nn.Module) -> list[str]:
    return [f"{container}.{name}" for name, _ in model.get_submodule(container).named_children()]


def _pools(container: str, model: nn.Module) -> list[str]:
    """The MaxPool layers of ``container``: VGG/AlexNet conv stages end at them."""
    return [f"{container}.{name}" for name, m in model.get_submodule(container).named_children()
            if isinstance(m, nn.MaxPool2d)]


def _largest_group(head: str, model: nn.Module) -> list[str]:
    """Generic stages: the same-class sibling modules (>= 2, depth <= 3) holding the most parameters."""
    best, best_score = [], 0
    for parent_name, parent in model.named_modules():
        if parent_name.count(".") > 1 or (parent_name and _within(parent_name, head)):
            continue
        groups: dict[type, list[tuple[str, int]]] = defaultdict(list)
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            if not _within(head, full) and _n_params(child):
                groups[type(child)].append((full, _n_params(child)))
        for members in groups.values():
            score = sum(n for _, n in members)
            if len(members) >= 2 and score > best_score:
                best, best_score = [name for name, _ in members], score
    if best:
        return best
    return [name for name, child in model.named_children() if not _within(head, name) and _n_params(child)]


# ---- spec -------------------------------------------------------------------------------------


@dataclass(eq=False)
class ArchSpec:
    """An architecture: how its library builds it (what `ARCHS` registers; any other torchvision or
    timm name gets a generic one), then what `arch_spec` reads from a probe model: what the rest of
    qdeep needs to know, from ``model.qdeep_arch``."""

    library: str  # "torchvision" | "timm"
    source_name: str  # the library's name for it
    anchors: Callable[[nn.Module], list[str]] | None = field(default=None, repr=False)  # None: `_largest_group`
    anchors_end_stages: bool = False
    build_kwargs: dict = field(default_factory=dict, repr=False)
    scratch_kwargs: dict = field(default_factory=dict, repr=False)
    ignore_keys: tuple[str, ...] = ()  # state_dict prefixes dropped from weight files
    # read from the probe model by `arch_spec`
    name: str = ""
    input_size: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    feature_dim: int = 0
    head_path: str = ""  # dotted module name of the classifier Linear

    def block_names(self, model: nn.Module) -> list[list[str]]:
        """Module names of each block, first to last."""
        return block_layout(unwrap(model), self.anchors(unwrap(model)), self.head_path, self.anchors_end_stages)

    def blocks(self, model: nn.Module) -> list[list[nn.Module]]:
        """The modules of each block, first to last (the stem and head are in none)."""
        model = unwrap(model)
        return [[model.get_submodule(n) for n in names] for names in self.block_names(model)]

    def head(self, model: nn.Module) -> nn.Module:
        """The classifier ``nn.Linear``."""
        return unwrap(model).get_submodule(self.head_path)


def _resnet(source: str) -> ArchSpec:
    return ArchSpec("torchvision", source, functools.partial(_named, ("layer1", "layer2", "layer3", "layer4")))


def _conv_stages(source: str) -> ArchSpec:
    return ArchSpec("torchvision", source, functools.partial(_pools, "features"), anchors_end_stages=True)


def _lite(n: int) -> ArchSpec:
    return ArchSpec("timm", f"tf_efficientnet_lite{n}", functools.partial(_children_of, "blocks"))


_MIXED = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
          "Mixed_7a", "Mixed_7b", "Mixed_7c")

ARCHS: Registry[ArchSpec] = Registry("arch", hint="or any torchvision or timm model name")
ARCHS.register("alexnet")(_conv_stages("alexnet"))
ARCHS.register("vgg11_bn")(_conv_stages("vgg11_bn"))
ARCHS.register("vgg16_bn")(_conv_stages("vgg16_bn"))
ARCHS.register("resnet18")(_resnet("resnet18"))
ARCHS.register("resnet50")(_resnet("resnet50"))
# No auxiliary head (it would make forward return a tuple in train mode); inputs are
# normalised with ImageNet statistics and mapped to Google's [-1, 1] inside the model.
ARCHS.register("inception_v3")(ArchSpec("torchvision", "inception_v3", functools.partial(_named, _MIXED),
                                        build_kwargs={"aux_logits": False, "transform_input": True},
                                        scratch_kwargs={"init_weights": True}, ignore_keys=("AuxLogits.",)))
# Chollet's Xception (Keras weights ported by Cadene); timm 1.0 calls it legacy_xception.
ARCHS.register("xception")(ArchSpec("timm", "legacy_xception",
                                    functools.partial(_named, tuple(f"block{i}" for i in range(1, 13)))))
ARCHS.register("efficientnet_lite0")(_lite(0))
ARCHS.register("efficientnet_lite1")(_lite(1))
ARCHS.register("efficientnet_lite2")(_lite(2))


def list_archs() -> list[str]:
    """Registered architecture names (other torchvision/timm names work too)."""
    return ARCHS.names()


def _recipe(arch: str) -> ArchSpec:
    """The registered spec, else a generic torchvision or timm one (not yet probed)."""
    if arch in ARCHS:
        return ARCHS.get(arch)
    import torchvision

    if arch in torchvision.models.list_models():
        return ArchSpec("torchvision", arch)
    import timm

    if timm.is_model(arch):
        return ArchSpec("timm", arch)
    return ARCHS.get(arch)  # "unknown arch ... (known: ...; or any torchvision or timm model name)"


def _probe_model(recipe: ArchSpec) -> nn.Module:
    """A throwaway model to read shapes from: on the meta device (no memory) when possible."""
    kwargs = {**recipe.build_kwargs, **recipe.scratch_kwargs}
    try:
        with torch.device("meta"):
            return library_model(recipe.library, recipe.source_name, **kwargs)
    except Exception:  # some constructors compute on their tensors
        return library_model(recipe.library, recipe.source_name, **kwargs)


def _find_head(model: nn.Module, library: str) -> str:
    """Dotted name of the ImageNet classifier ``nn.Linear``."""
    if library == "timm":
        path = model.pretrained_cfg.get("classifier")
    else:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        path = linears[-1] if linears else None
    if not isinstance(path, str) or not isinstance(model.get_submodule(path), nn.Linear):
        raise QdeepError(f"{model.__class__.__name__}: no single nn.Linear classifier to replace; pick another arch")
    return path


def _input_stats(recipe: ArchSpec, model: nn.Module) -> tuple[int, tuple, tuple]:
    """Input size and normalisation the library documents for the pretrained weights."""
    if recipe.library == "timm":
        cfg = model.pretrained_cfg
        return int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"])
    import torchvision

    try:
        preprocess = torchvision.models.get_model_weights(recipe.source_name).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):
        return 224, IMAGENET_MEAN, IMAGENET_STD
    return int(preprocess.crop_size[0]), tuple(preprocess.mean), tuple(preprocess.std)


@functools.lru_cache(maxsize=None)
def arch_spec(arch: str) -> ArchSpec:
    """The ``ArchSpec`` of ``arch``, its shapes read from a probe model (QdeepError for unknown names)."""
    recipe = _recipe(arch)
    probe = _probe_model(recipe)
    head = _find_head(probe, recipe.library)
    size, mean, std = _input_stats(recipe, probe)
    return replace(recipe, name=arch, input_size=size, mean=mean, std=std,
                   feature_dim=probe.get_submodule(head).in_features, head_path=head,
                   anchors=recipe.anchors or functools.partial(_largest_group, head))


# ---- build ------------------------------------------------------------------------------------


def _replace_head(model: nn.Module, spec: ArchSpec, num_labels: int) -> None:
    """A fresh ``nn.Linear(feature_dim, num_labels)`` in place of the ImageNet classifier."""
    if spec.library == "timm":
        model.reset_classifier(num_labels)
    else:
        model.set_submodule(spec.head_path, nn.Linear(spec.feature_dim, num_labels))
    head = model.get_submodule(spec.head_path)
    assert isinstance(head, nn.Linear) and head.out_features == num_labels, head


def reset_head(model: nn.Module) -> None:
    """A freshly initialised head of the same size (DeepCluster re-initialises it every iteration)."""
    model = unwrap(model)
    _replace_head(model, model.qdeep_arch, model.get_submodule(model.qdeep_arch.head_path).out_features)


def _create(spec: ArchSpec, weights: str) -> nn.Module:
    """An ImageNet-headed model with ``weights`` ``none`` (random init), ``imagenet`` or ``bundled``."""
    if weights == "imagenet":
        return imagenet_model(spec.name, spec.library, spec.source_name, **spec.build_kwargs)
    model = library_model(spec.library, spec.source_name, **spec.build_kwargs, **spec.scratch_kwargs)
    if weights == "bundled":
        load_bundled(model, spec.source_name)
    return model


def _from_file(spec: ArchSpec, path: str, num_labels: int | None, bands: Sequence[str] | None = None,
               band_init: str = DEFAULT_BAND_INIT) -> nn.Module:
    """Random init, then the file (with whatever head it was saved with: ImageNet's, or one
    trained by qdeep), then a new head of `num_labels` unless the file's already has that size.
    With `bands`, the first convolution is adapted before the file loads if the file's is (a
    multiband qdeep model), after it if the file's takes RGB."""
    state = read_file(path)
    state = {k: v for k, v in state.items() if not k.startswith(spec.ignore_keys)}
    model = _create(spec, "none")
    stem = state.get(first_conv(model)[0] + ".weight")
    rgb_file = stem is not None and stem.ndim == 4 and stem.shape[1] == 3
    if bands and not rgb_file:
        adapt_bands(model, bands, band_init)
    head = state.get(spec.head_path + ".weight")
    rows = None if head is None else head.shape[0]
    if rows is not None and rows != model.get_submodule(spec.head_path).out_features:
        _replace_head(model, spec, rows)
    load_strict(model, state, path)
    if bands and rgb_file:
        adapt_bands(model, bands, band_init)
    if num_labels is not None and rows != num_labels:
        _replace_head(model, spec, num_labels)
    return model


def build_model(arch: str, num_labels: int | None, weights: str = "none", freeze: str = "none",
                bands: Sequence[str] | None = None, band_init: str = DEFAULT_BAND_INIT,
                frozen_stem: bool = False) -> nn.Module:
    """``arch`` with ``weights``, a head of ``num_labels`` logits (None: keep ImageNet's) and ``freeze``.
    ``bands`` (None: RGB) names the input channels, the first convolution adapted by ``band_init``
    (``models.bands``); frozen blocks leave it training unless ``frozen_stem``."""
    parse_freeze(freeze)
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
        raise QdeepError(f"num_labels must be a positive integer, got {num_labels!r}")
    spec = arch_spec(arch)
    choice = str(weights).strip()
    if choice.lower() in NAMED_WEIGHTS:
        model = _create(spec, choice.lower())
        if bands:
            adapt_bands(model, bands, band_init)
        if num_labels is not None:
            _replace_head(model, spec, num_labels)
    else:
        model = _from_file(spec, choice, num_labels, bands, band_init)
    model.qdeep_arch = spec
    if frozen_stem:
        model.qdeep_stem = None
    apply_freeze(model, freeze)
    return model


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate, globally pooled features (B, feature_dim): the head's input."""
    model = unwrap(model)
    spec: ArchSpec = model.qdeep_arch
    if spec.library == "timm":
        return model.forward_head(model.forward_features(x), pre_logits=True)
    captured = []
    hook = spec.head(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return captured[-1].flatten(1)
