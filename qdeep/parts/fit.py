"""Fit strategies: how training proceeds, as a list of stages (epochs, freeze depth, learning rate).

`single` trains at the configured freeze depth throughout; with `bn_stats="frozen"` every
BatchNorm layer keeps the running statistics it was loaded with (its scale and shift still train).
`two-stage` is the seed platform's recipe: first only the new head on a frozen backbone, then the
last N blocks too (by default at the same learning rate, `finetune_lr_factor` 1), so the
pretrained features are not pushed around by a random head's large gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qdeep.config import resolved_bn_stats
from qdeep.errors import QdeepError
from qdeep.models import parse_freeze
from qdeep.models.freeze import unwrap
from qdeep.registry import Registry

FIT_STRATEGIES: Registry = Registry("fit strategy")


@dataclass(frozen=True)
class Stage:
    start: float  # where the stage starts, in epochs (a fraction starts it within an epoch)
    end: float  # where it ends
    freeze: str  # head | last:N | none
    lr: float  # the head's learning rate; lower blocks get less with --discriminative-lr
    bn_stats: str | None = None  # the depth whose BatchNorm layers follow the batch (None: those that train)


def kept_bn_stats(config: dict) -> str | None:
    """`Stage.bn_stats` for `config["bn_stats"]`: "head" (every layer keeps its statistics) for
    frozen, None (the layers that train follow the batch) for batch."""
    if resolved_bn_stats(config.get("bn_stats", "batch"), config.get("weights")) == "batch":
        return None
    if str(config["weights"]).strip().lower() == "none":
        raise QdeepError("--bn-stats frozen keeps the starting network's BatchNorm statistics, and --weights none "
                         "has none worth keeping: use --bn-stats batch, or pretrained --weights")
    return "head"


@FIT_STRATEGIES.register("single")
class SingleStage:
    def stages(self, config: dict) -> list[Stage]:
        return [Stage(0, config["epochs"], config["freeze"], config["lr"], bn_stats=kept_bn_stats(config))]


@FIT_STRATEGIES.register("two-stage")
class TwoStage:
    """`head_epochs` epochs (by default a quarter of one) of head only at `lr`, then `freeze`
    (last:N or none) at `lr * finetune_lr_factor`.

    In the second stage the BatchNorm layers of the unfrozen blocks follow the batch, as in a
    single-stage run (`--bn-stats frozen` keeps every layer's statistics in both stages). One
    learning-rate curve spans both stages (see `worker.lr_factor`), so the second stage does not
    restart a warm-up. Measured with `scripts/bench_quality.py` (3 epochs, `--freeze last:2`, three
    seeds): a quarter-epoch head stage matches single-stage training (planet test F2 0.9219 against
    0.9219, digits accuracy 0.980 against 0.978); a whole epoch of head only leaves the blocks two
    epochs and costs 0.006 on planet. The second stage at 0.1 x lr with every layer's statistics
    kept gave 0.936-0.944 on the digits (README, Benchmarks).
    """

    def stages(self, config: dict) -> list[Stage]:
        if parse_freeze(config["freeze"])[0] == "head":
            raise QdeepError("--fit-strategy two-stage unfreezes blocks in its second stage: "
                             "give --freeze last:N or none (the first stage always trains the head only)")
        frozen = kept_bn_stats(config)
        head = min(config["head_epochs"], config["epochs"])
        return [Stage(0, head, "head", config["lr"], bn_stats=frozen),
                Stage(head, config["epochs"], config["freeze"], config["lr"] * config["finetune_lr_factor"],
                      bn_stats=frozen)]


def epoch_pieces(stages: list[Stage], epoch: int, steps: int) -> list[tuple[int, int | None]]:
    """The stages that epoch `epoch` (of about `steps` steps) trains in, in order, as (stage
    index, its steps in the epoch); the last piece's steps are None: the rest of the epoch, however
    many batches the worker's shard has. A stage boundary inside an epoch (`--head-epochs 0.25`)
    falls on the step nearest to it."""
    pieces, steps = [], max(steps, 1)
    for i, s in enumerate(stages):
        lo, hi = (min(steps, max(0, round((x - epoch) * steps))) for x in (s.start, s.end))
        if hi > lo:
            pieces.append((i, hi - lo))
    return [*pieces[:-1], (pieces[-1][0], None)]


def param_groups(model: nn.Module, lr: float, decay: float = 1.0) -> list[dict]:
    """Trainable parameters as optimizer groups: the head at `lr`, the i-th block below it at
    `lr * decay**i` (discriminative learning rates; decay 1 is one group), the stem lowest."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if decay == 1.0:
        return [{"params": trainable, "lr": lr}]
    bare = unwrap(model)
    spec = bare.qdeep_arch
    seen: set[int] = set()
    groups = []
    layers = [[spec.head(bare)], *reversed(spec.blocks(bare))]
    for depth, modules in enumerate(layers):
        params = [p for m in modules for p in m.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(map(id, params))
        if params:
            groups.append({"params": params, "lr": lr * decay ** depth})
    rest = [p for p in trainable if id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr": lr * decay ** len(layers)})
    return groups
