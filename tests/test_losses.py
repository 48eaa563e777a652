"""Tests of BiMixCo, SoftCLIP, mixup plans and the temperature schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rtdecoder.config import TrainingConfig
from rtdecoder.decode import losses as L
from rtdecoder.errors import ConfigError


def unit_rows(n: int, k: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_mixup_partners_stay_within_each_subject_slice():
    gen = torch.Generator().manual_seed(3)
    sizes = [5, 3, 6]
    plans = [L.draw_mixup_plan(n, beta=0.15, prob=0.9, generator=gen) for n in sizes]
    joint = L.concat_plans(plans)
    subject_of_row = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    assert torch.equal(subject_of_row[joint.partner], subject_of_row)
    assert joint.selected.any() and (joint.partner != torch.arange(14)).any()


def test_mixup_plan_weights_and_unselected_rows():
    plan = L.draw_mixup_plan(400, beta=0.15, prob=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.all((plan.weight >= 0) & (plan.weight <= 1))
    assert torch.all(plan.weight[~plan.selected] == 1)
    assert torch.equal(plan.partner[~plan.selected], torch.arange(400)[~plan.selected])
    assert 0.4 < plan.selected.float().mean() < 0.6
    # Beta(0.15, 0.15) is U-shaped: most weights near 0 or 1
    w = plan.weight[plan.selected]
    assert ((w < 0.1) | (w > 0.9)).float().mean() > 0.5


def test_mixup_plan_is_reproducible():
    a = L.draw_mixup_plan(10, 0.15, 0.5, torch.Generator().manual_seed(5))
    b = L.draw_mixup_plan(10, 0.15, 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(a.partner, b.partner) and torch.equal(a.weight, b.weight)


def test_apply_mixup_mixes_rows_with_partners():
    x = torch.arange(12.0).view(4, 3)
    plan = L.MixupPlan(torch.tensor([1, 0, 2, 3]), torch.tensor([0.25, 1.0, 1.0, 1.0]),
                       torch.tensor([True, False, False, False]))
    mixed = L.apply_mixup(x, plan)
    torch.testing.assert_close(mixed[0], 0.25 * x[0] + 0.75 * x[1])
    torch.testing.assert_close(mixed[1:], x[1:])


def test_bimixco_without_mixing_is_symmetric_infonce():
    brain, image = unit_rows(6, 8, 0), unit_rows(6, 8, 1)
    plan = L.MixupPlan(torch.arange(6), torch.ones(6), torch.zeros(6, dtype=torch.bool))
    logits = brain @ image.T / 0.1
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    torch.testing.assert_close(L.bimixco_loss(brain, image, plan, 0.1), expected)


def test_bimixco_targets_follow_the_mix():
    brain, image = unit_rows(4, 8, 2), unit_rows(4, 8, 5)
    plan = L.MixupPlan(torch.tensor([2, 1, 2, 3]), torch.tensor([0.3, 1.0, 1.0, 1.0]),
                       torch.tensor([True, False, False, False]))
    targets = torch.eye(4)
    targets[0] = torch.tensor([0.3, 0.0, 0.7, 0.0])  # row 0 is 0.3 of trial 0 and 0.7 of trial 2
    logits = brain @ image.T / 0.05
    expected = (-(targets * logits.log_softmax(-1)).sum(-1).mean()
                - (targets.T * logits.T.log_softmax(-1)).sum(-1).mean()) / 2
    torch.testing.assert_close(L.bimixco_loss(brain, image, plan, 0.05), expected)


def test_soft_clip_matches_hand_computation_and_prefers_alignment():
    brain, image = unit_rows(5, 8, 3), unit_rows(5, 8, 4)
    temp = 0.2
    soft = F.softmax(image @ image.T / temp, dim=-1)
    logits = brain @ image.T / temp
    expected = (-(soft * logits.log_softmax(-1)).sum(-1).mean()
                - (soft * logits.T.log_softmax(-1)).sum(-1).mean()) / 2
    torch.testing.assert_close(L.soft_clip_loss(brain, image, temp), expected)
    assert L.soft_clip_loss(image, image, temp) < L.soft_clip_loss(brain, image, temp)


def test_softclip_temperature_anneals_between_bounds():
    cfg = TrainingConfig(epochs=9, mixco_fraction=1 / 3)
    assert L.n_mixco_epochs(cfg) == 3
    temps = [L.softclip_temperature(e, cfg) for e in range(3, 9)]
    assert temps[0] == pytest.approx(0.004) and temps[-1] == pytest.approx(0.0075)
    assert all(b > a for a, b in zip(temps, temps[1:], strict=False))
    with pytest.raises(ConfigError, match="epoch 2 is a BiMixCo epoch"):
        L.softclip_temperature(2, cfg)


def test_prior_and_lowlevel_losses():
    a, b = torch.zeros(2, 3, 4), torch.full((2, 3, 4), 2.0)
    assert L.prior_mse(a, b).item() == pytest.approx(4.0)
    assert L.lowlevel_l1(a, b).item() == pytest.approx(2.0)
