"""Freeze depth: one meaning for every architecture.

Fine-tuning on a few thousand Planet chips works best when only the top of a pretrained
network moves. Each architecture declares its ordered blocks (see ``ArchSpec.blocks``), so
``head`` / ``last:N`` / ``none`` mean the same thing whatever the backbone. Frozen BatchNorm
layers must also stay in eval mode, or their running statistics drift although their
weights are frozen; ``set_train_mode`` takes care of that at every epoch start.
"""

from __future__ import annotations

from torch import nn

from qdeep.errors import QdeepError
from qdeep.options import parse_freeze


def unwrap(model: nn.Module) -> nn.Module:
    """The qdeep model inside DDP/DataParallel wrappers (they keep it as ``.module``)."""
    while not hasattr(model, "qdeep_arch") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def apply_freeze(model: nn.Module, freeze: str) -> None:
    """Set ``requires_grad`` for ``freeze``; the stem stays frozen for ``head`` and ``last:N``,
    except a first convolution adapted to new bands (``bands.adapt_bands``: its new kernels were
    never learnt), which always trains."""
    parts = _trained_parts(model, freeze)
    bare = unwrap(model)
    bare.requires_grad_(parts is None)
    adapted = getattr(bare, "qdeep_stem", None)
    for module in [*(parts or []), *([bare.get_submodule(adapted)] if adapted else [])]:
        module.requires_grad_(True)


def _trained_parts(model: nn.Module, freeze: str) -> list[nn.Module] | None:
    """The modules that train at depth ``freeze`` (the head, the last N blocks' modules); None: all."""
    kind, n = parse_freeze(freeze)
    model = unwrap(model)
    spec = model.qdeep_arch
    blocks = spec.blocks(model)
    if n > len(blocks):
        raise QdeepError(f"freeze last:{n}: {spec.name} has only {len(blocks)} blocks (use last:1..last:{len(blocks)})")
    if kind == "none":
        return None
    return [spec.head(model), *(module for block in blocks[len(blocks) - n:] for module in block)]


def _is_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def set_train_mode(model: nn.Module, bn_stats: str | None = None) -> nn.Module:
    """``model.train()``, then frozen BatchNorm layers back to eval so their statistics stay put.

    ``bn_stats`` (a freeze depth) chooses instead which BatchNorm layers follow the batch: those a
    run at that depth trains, whether or not their weights train now; the others keep their
    statistics. A two-stage fit's second stage passes ``"head"``: every BatchNorm layer keeps the
    statistics the head was fitted under.
    """
    model.train()
    bare = unwrap(model)
    parts = None if bn_stats is None else _trained_parts(bare, bn_stats)
    following = None if parts is None else {id(m) for part in parts for m in part.modules()}
    for module in bare.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if bn_stats is None:
            keeps_stats = _is_frozen(module)
        else:
            keeps_stats = following is not None and id(module) not in following  # depth none: every layer follows
        if keeps_stats:
            module.eval()
    return model
