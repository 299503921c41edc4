"""The learning-rate schedule of a training run (qdeep.distributed.worker.lr_factor): the factor of
--lr at each global step. Plain arithmetic: no Ray, no process group."""

from __future__ import annotations

import math

import pytest

from qdeep.distributed.worker import lr_factor

pytestmark = pytest.mark.unit


def curve(schedule: str, total: int, warmup: int = 0, floor: float | None = None, steps=None) -> list[float]:
    config = {"schedule": schedule, "warmup_steps": warmup}
    if floor is not None:
        config["min_lr_factor"] = floor
    factor = lr_factor(config, total)
    return [factor(s) for s in (range(total) if steps is None else steps)]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_linear_warm_up_then_the_schedule_starts_at_the_full_lr(schedule):
    f = curve(schedule, total=100, warmup=4, steps=range(6))
    assert f[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5]), "step s of the warm-up: (s + 1) / (warmup + 1)"
    assert f[4] == pytest.approx(1.0), "the first step after the warm-up is at the full lr"
    assert f[5] <= 1.0


def test_constant_is_the_full_lr_after_the_warm_up_and_past_the_end():
    assert curve("constant", total=40, warmup=0) == [1.0] * 40
    assert curve("constant", total=40, warmup=5, steps=range(5, 60)) == [1.0] * 55


@pytest.mark.parametrize("floor", [None, 0.0, 0.1])
def test_cosine_decays_from_the_full_lr_to_min_lr_factor(floor):
    total, warmup = 110, 10
    low = floor or 0.0  # min_lr_factor defaults to 0
    f = curve("cosine", total=total, warmup=warmup, floor=floor, steps=range(warmup, total + 20))
    assert f[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f, f[1:])), "never rises"
    assert f[50] == pytest.approx(low + (1 - low) * 0.5), "half-way through the decay: half-way down"
    assert f[25] == pytest.approx(low + (1 - low) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f[total - warmup:] == pytest.approx([low] * 20), "at the end, and after it, min_lr_factor"
    assert min(f) == pytest.approx(low)


def test_step_divides_by_10_at_half_and_again_at_three_quarters_of_the_steps_after_warm_up():
    f = curve("step", total=100, warmup=0)
    assert f[:50] == [1.0] * 50
    assert f[50:75] == pytest.approx([0.1] * 25)
    assert f[75:] == pytest.approx([0.01] * 25)
    g = curve("step", total=120, warmup=20, steps=range(20, 120))  # progress counts from the warm-up's end
    assert g[49] == 1.0 and g[50] == pytest.approx(0.1) and g[74] == pytest.approx(0.1)
    assert g[75] == pytest.approx(0.01)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_the_warm_up_is_capped_at_a_quarter_of_the_run(schedule):
    f = curve(schedule, total=100, warmup=1000, steps=range(30))
    assert f[:25] == pytest.approx([(s + 1) / 26 for s in range(25)]), "warm-up of 100 // 4 = 25 steps"
    assert f[25] == pytest.approx(1.0)
    # a run shorter than 4 steps has no warm-up at all
    assert curve(schedule, total=3, warmup=10, steps=[0]) == [pytest.approx(1.0)]


def test_the_same_steps_give_the_same_factor_whatever_the_stage():
    """One curve for the whole run: a factor is a function of the global step alone."""
    config = {"schedule": "cosine", "warmup_steps": 3, "min_lr_factor": 0.05}
    a, b = lr_factor(config, 60), lr_factor(dict(config), 60)
    assert [a(s) for s in range(60)] == [b(s) for s in range(60)]
    assert [a(s) for s in (40, 10, 40)] == [a(40), a(10), a(40)]
