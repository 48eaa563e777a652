"""MindEye2 training losses: BiMixCo, SoftCLIP, the prior's MSE and the low-level L1.

Contrastive losses take flattened, L2-normalised tokens: ``(B, T*D)`` rows of unit length. The
recipe (docs/mindeye2.md) uses BiMixCo for the first ``mixco_fraction`` of the epochs and
SoftCLIP after, with a temperature cosine-annealed over the SoftCLIP epochs.

Mixup stays inside one subject: a :class:`MixupPlan` is drawn per subject slice and its partner
indices point into that slice only. (The reference code draws partners for every subject as
indices into the first subject's slice.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rtdecoder.config import TrainingConfig
from rtdecoder.errors import ConfigError


@dataclass
class MixupPlan:
    """Which rows are mixed, with whom and how much.

    Attributes
    ----------
    partner : Tensor of shape (B,), int64
        Row each row is mixed with (itself when not selected).
    weight : Tensor of shape (B,), float32
        Share of the row itself; ``1 - weight`` comes from ``partner``. 1 when not selected.
    selected : Tensor of shape (B,), bool
        Rows that are mixed.
    """

    partner: torch.Tensor
    weight: torch.Tensor
    selected: torch.Tensor


def draw_mixup_plan(
    n_rows: int, beta: float, prob: float, generator: torch.Generator | None = None
) -> MixupPlan:
    """Draw a mixup plan for one subject's ``n_rows`` trials.

    Parameters
    ----------
    n_rows : int
        Trials of this subject in the batch.
    beta : float
        Mixing weights are drawn from Beta(beta, beta).
    prob : float
        Probability that a row is mixed.
    generator : torch.Generator, optional
        CPU generator, for draws that are identical on every process.

    Returns
    -------
    MixupPlan
        Indices local to ``0..n_rows-1``.
    """
    partner = torch.randperm(n_rows, generator=generator)
    weight = _beta_from_uniform(torch.rand(n_rows, generator=generator, dtype=torch.float64), beta)
    selected = torch.rand(n_rows, generator=generator) < prob
    partner = torch.where(selected, partner, torch.arange(n_rows))
    weight = torch.where(selected, weight, torch.ones_like(weight))
    return MixupPlan(partner, weight, selected)


def _beta_from_uniform(u: torch.Tensor, a: float) -> torch.Tensor:
    """Beta(a, a) draws by inverting its CDF at ``u``; torch's Beta takes no generator."""
    from scipy.special import betaincinv

    return torch.from_numpy(betaincinv(a, a, u.numpy())).float()


def apply_mixup(x: torch.Tensor, plan: MixupPlan) -> torch.Tensor:
    """Mix rows of one subject's betas: ``w * x[i] + (1 - w) * x[partner[i]]``.

    Parameters
    ----------
    x : Tensor of shape (B, ...)
    plan : MixupPlan
        Drawn for ``B`` rows.

    Returns
    -------
    Tensor of shape (B, ...)
    """
    w = plan.weight.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return w * x + (1 - w) * x[plan.partner]


def concat_plans(plans: Sequence[MixupPlan]) -> MixupPlan:
    """Join per-subject plans into one for the stacked batch, offsetting partner indices."""
    partners, offset = [], 0
    for plan in plans:
        partners.append(plan.partner + offset)
        offset += plan.partner.numel()
    return MixupPlan(
        torch.cat(partners),
        torch.cat([p.weight for p in plans]),
        torch.cat([p.selected for p in plans]),
    )


def bimixco_loss(
    brain: torch.Tensor, image: torch.Tensor, plan: MixupPlan, temperature: float
) -> torch.Tensor:
    """Bidirectional MixCo: InfoNCE whose targets follow the mixup weights.

    Parameters
    ----------
    brain : Tensor of shape (B, K)
        Normalised predictions from (possibly mixed) betas.
    image : Tensor of shape (B, K)
        Normalised image tokens of the unmixed trials.
    plan : MixupPlan
        How each brain row was mixed (indices into the batch).
    temperature : float

    Returns
    -------
    Tensor, scalar
        Mean of the brain->image and image->brain cross-entropies.
    """
    B = brain.shape[0]
    logits = brain @ image.T / temperature  # (B, B)
    eye = torch.eye(B, device=brain.device, dtype=logits.dtype)
    w = plan.weight.to(logits.device, logits.dtype)[:, None]
    targets = w * eye + (1 - w) * eye[plan.partner.to(logits.device)]  # rows sum to 1
    forward = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    backward = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(-1).mean()
    return (forward + backward) / 2


def soft_clip_loss(brain: torch.Tensor, image: torch.Tensor, temperature: float) -> torch.Tensor:
    """SoftCLIP: cross-entropy against the softmax of image-image similarities, both ways.

    Parameters
    ----------
    brain, image : Tensor of shape (B, K)
        Normalised rows.
    temperature : float

    Returns
    -------
    Tensor, scalar
    """
    targets = F.softmax(image @ image.T / temperature, dim=-1)  # (B, B), symmetric logits
    logits = brain @ image.T / temperature
    forward = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    backward = -(targets * F.log_softmax(logits.T, dim=-1)).sum(-1).mean()
    return (forward + backward) / 2


def flatten_normalise(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, D) tokens to (B, T*D) unit rows, in float32 for stable logits."""
    return F.normalize(tokens.float().flatten(1), dim=-1)


def n_mixco_epochs(config: TrainingConfig) -> int:
    """Number of leading epochs trained with BiMixCo."""
    return int(config.mixco_fraction * config.epochs)


def softclip_temperature(epoch: int, config: TrainingConfig) -> float:
    """SoftCLIP temperature at ``epoch``, cosine-annealed from start to end over its epochs.

    Parameters
    ----------
    epoch : int
        0-based epoch, at or after :func:`n_mixco_epochs`.
    config : TrainingConfig

    Returns
    -------
    float

    Examples
    --------
    >>> from rtdecoder.config import TrainingConfig
    >>> cfg = TrainingConfig(epochs=4, mixco_fraction=0.5)
    >>> [round(softclip_temperature(e, cfg), 5) for e in (2, 3)]
    [0.004, 0.0075]
    """
    first = n_mixco_epochs(config)
    if epoch < first:
        raise ConfigError(f"softclip_temperature: epoch {epoch} is a BiMixCo epoch (< {first})")
    n = config.epochs - first
    progress = (epoch - first) / (n - 1) if n > 1 else 1.0
    start, end = config.softclip_temperature_start, config.softclip_temperature_end
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def prior_mse(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the prior's x0 prediction, (B, T, D) against (B, T, D)."""
    return F.mse_loss(predicted.float(), target.float())


def lowlevel_l1(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of the low-level head, (B, C, S, S) against (B, C, S, S)."""
    return F.l1_loss(predicted.float(), target.float())
