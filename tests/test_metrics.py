"""Tests of retrieval top-1 over random pools."""

from __future__ import annotations

import pytest
import torch

from rtdecoder.decode.metrics import retrieval_top1
from rtdecoder.errors import ConfigError


def test_perfect_and_chance_level_retrieval():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(400, 4, 8, generator=g)
    perfect = retrieval_top1(target + 0.01 * torch.randn(400, 4, 8, generator=g), target, n_pools=5)
    assert (perfect.image, perfect.brain, perfect.pool_size, perfect.n_pools) == (1.0, 1.0, 300, 5)
    unrelated = retrieval_top1(torch.randn(400, 4, 8, generator=g), target, n_pools=5)
    assert unrelated.image < 0.05 and unrelated.brain < 0.05


def test_image_and_brain_directions_differ():
    # trial 0's prediction is closest to image 1 (image retrieval fails for it), yet each
    # image's closest prediction is its own trial's (brain retrieval succeeds everywhere)
    target = torch.eye(3)
    predicted = torch.tensor([[0.1, 1.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 1.0]])
    scores = retrieval_top1(predicted, target)
    assert scores.pool_size == 3 and scores.n_pools == 1
    assert scores.image == pytest.approx(2 / 3)
    assert scores.brain == 1.0


def test_shapes_must_match():
    with pytest.raises(ConfigError, match=r"expected equal shapes .* \(got \(3, 2\) and \(4, 2\)\)"):
        retrieval_top1(torch.zeros(3, 2), torch.zeros(4, 2))
