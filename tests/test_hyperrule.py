"""The BiT-HyperRule, value by value."""

from __future__ import annotations

import pytest

from bit_core.config import TrainConfig
from bit_core.hyperrule import get_lr, get_mixup, get_resolution, get_schedule
from bit_core.train import make_plan


@pytest.mark.parametrize("size, schedule", [
    (1, [100, 200, 300, 400, 500]), (19_999, [100, 200, 300, 400, 500]),
    (20_000, [500, 3000, 6000, 9000, 10_000]), (499_999, [500, 3000, 6000, 9000, 10_000]),
    (500_000, [500, 6000, 12_000, 18_000, 20_000]), (1_281_167, [500, 6000, 12_000, 18_000, 20_000]),
])
def test_schedule_by_dataset_size(size, schedule):
    assert get_schedule(size) == schedule


CIFAR = [500, 3000, 6000, 9000, 10_000]


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (250, 0.0015), (499, 0.003 * 499 / 500), (500, 0.003), (2999, 0.003), (3000, 0.003),
    (3001, 0.0003), (6001, 0.00003), (9001, 0.000003), (9999, 0.000003), (10_000, None),
])
def test_lr_warmup_and_staircase(step, expected):
    lr = get_lr(step, 0.003, 512, CIFAR)
    assert lr == pytest.approx(expected) if expected is not None else lr is None


@pytest.mark.parametrize("batch", [128, 512, 1024])
def test_lr_scales_with_batch(batch):
    assert get_lr(600, 0.003, batch, CIFAR) == pytest.approx(0.003 * batch / 512)


@pytest.mark.parametrize("size, alpha", [(100, 0.0), (19_999, 0.0), (20_000, 0.1), (10**6, 0.1)])
def test_mixup(size, alpha):
    assert get_mixup(size) == alpha


@pytest.mark.parametrize("shape, sizes", [((32, 32), (160, 128)), ((95, 96), (160, 128)),
                                          ((96, 96), (512, 480)), ((375, 500), (512, 480))])
def test_resolution(shape, sizes):
    assert get_resolution(shape) == sizes


def test_plan_follows_rule_unless_overridden():
    plan = make_plan(TrainConfig(batch=512, batch_split=4), 50_000)
    assert plan.schedule == CIFAR and plan.mixup_alpha == 0.1 and plan.lr == 0.003
    assert plan.micro_batch == 128 and plan.steps == 10_000
    custom = make_plan(TrainConfig(batch=64, schedule=[10, 20], mixup_alpha=0.0), 50_000)
    assert custom.schedule == [10, 20] and custom.mixup_alpha == 0.0
    assert custom.lr == pytest.approx(0.003 / 8)


def test_resolution_overrides_keep_the_rule_ratio():
    from bit_core.hyperrule import resolve_resolution

    assert resolve_resolution((32, 32)) == (160, 128)
    assert resolve_resolution((300, 400)) == (512, 480)
    assert resolve_resolution((8, 8), crop=24) == (30, 24)  # 24 * 160 / 128
    assert resolve_resolution((8, 8), crop=24, precrop=26) == (26, 24)
    assert resolve_resolution((300, 400), precrop=600) == (600, 480)
    assert resolve_resolution((300, 400), precrop=160) == (160, 150)  # 480 would not fit
    assert resolve_resolution((32, 32), precrop=100) == (100, 80)
