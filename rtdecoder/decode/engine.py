"""What every inference backend provides, and the decode path built on it.

A backend runs two networks of a trained :class:`~rtdecoder.decode.model.MindEye2` for one
subject: the *encoder* (adapter + backbone + heads: betas -> backbone tokens, retrieval tokens and,
when the model has one, the low-level image) and the prior's *denoiser* (noisy tokens, timestep,
brain tokens -> clean tokens). The DDIM loop over the denoiser lives here, once, so that torch,
ONNX Runtime and TensorRT differ only in how they evaluate those two networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from rtdecoder.decode.prior import ddim_plan, ddim_sample
from rtdecoder.errors import ConfigError

ENCODER_INPUTS = ("betas",)
ENCODER_OUTPUTS = ("backbone_tokens", "clip_tokens", "lowlevel")
DENOISER_INPUTS = ("noisy", "t", "brain")
DENOISER_OUTPUTS = ("x0",)


class BrainEncoder(nn.Module):
    """One subject's adapter + backbone + heads as a plain tensor-in, tensors-out module.

    Parameters
    ----------
    model : MindEye2
    subject_id : str
        Whose adapter to use.

    Notes
    -----
    ``forward(betas (B, V)) -> (backbone_tokens (B, T, D), clip_tokens (B, T, D)[, lowlevel
    (B, C, S, S)])``; the third output exists only when ``model.config.lowlevel``.
    """

    def __init__(self, model: nn.Module, subject_id: str) -> None:
        super().__init__()
        if subject_id not in model.adapters:
            raise ConfigError(f"engine: subject_id: no adapter for {subject_id!r}; have {list(model.adapters)}")
        self.model = model
        self.subject_id = subject_id

    def forward(self, betas: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model({self.subject_id: betas})
        if out.lowlevel is None:
            return out.backbone_tokens, out.clip_tokens
        return out.backbone_tokens, out.clip_tokens, out.lowlevel


class PriorDenoiser(nn.Module):
    """The diffusion prior's denoiser: ``(noisy (B,T,D), t (B,) int64, brain (B,T,D)) -> x0 (B,T,D)``."""

    def __init__(self, prior: nn.Module) -> None:
        super().__init__()
        if prior is None:
            raise ConfigError("engine: model.use_prior: expected a model with a diffusion prior (got none)")
        self.prior = prior

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        return self.prior.denoise(noisy, t, brain)


@dataclass
class EncoderOutput:
    """Encoder results as float32 CPU tensors.

    Attributes
    ----------
    backbone_tokens : Tensor of shape (B, T, D)
    clip_tokens : Tensor of shape (B, T, D)
    lowlevel : Tensor of shape (B, C, S, S) or None
    """

    backbone_tokens: torch.Tensor
    clip_tokens: torch.Tensor
    lowlevel: torch.Tensor | None


@runtime_checkable
class Engine(Protocol):
    """A backend that evaluates the encoder and the prior denoiser.

    Attributes
    ----------
    name : str
        ``"torch-eager"``, ``"torch-compiled"``, ``"onnxruntime-cpu"``, ``"tensorrt-fp16"``, ...
    alphas_cumprod : Tensor of shape (prior_timesteps,)
        The prior's noise schedule (float32, CPU).
    ddim_schedule : str
        ``model.prior_ddim_schedule`` of the model it runs (``uniform`` or ``dalle2``).
    device : torch.device
        Where :meth:`denoise` wants its inputs (CPU for ONNX Runtime, whatever its provider).
    """

    name: str
    alphas_cumprod: torch.Tensor
    ddim_schedule: str
    device: torch.device

    def encode(self, betas: torch.Tensor) -> EncoderOutput:
        """Run the encoder on (B, V) float32 betas."""
        ...

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """Run the denoiser once; inputs and output as in :class:`PriorDenoiser`."""
        ...


@torch.no_grad()
def sample_prior(
    engine: Engine, brain: torch.Tensor, n_steps: int, eta: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """DDIM sampling of image tokens through any engine's denoiser.

    The steps are those of the prior's own ``sample`` (:func:`~rtdecoder.decode.prior.ddim_plan`
    with the engine's ``ddim_schedule``); only the noise differs, drawn here from a CPU generator.

    Parameters
    ----------
    engine : Engine
    brain : Tensor of shape (B, T, D)
        Backbone tokens.
    n_steps : int
        As ``model.prior_sample_steps``: denoiser calls (uniform) or grid points (dalle2).
    eta : float, default=0.0
        0 deterministic DDIM, 1 DDPM-like fresh noise.
    seed : int, default=0
        Seed of a CPU generator for the starting noise and the fresh noise.

    Returns
    -------
    Tensor of shape (B, T, D)
        On ``engine.device``.
    """
    device = engine.device
    abar = engine.alphas_cumprod.to(device)
    plan = ddim_plan(abar, n_steps, engine.ddim_schedule, eta)  # a ConfigError is a DecoderError
    generator = torch.Generator().manual_seed(seed)

    def noise(shape: torch.Size) -> torch.Tensor:
        # drawn on the CPU so that every backend and device sees the same numbers
        return torch.randn(shape, generator=generator, dtype=brain.dtype).to(device)

    return ddim_sample(engine.denoise, brain.to(device), plan, eta, noise)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (0 when both are zero)."""
    scale = float(expected.abs().max())
    diff = float((actual.float().cpu() - expected.float().cpu()).abs().max())
    return diff / scale if scale > 0 else diff


def compare_engines(reference: Engine, other: Engine, betas: torch.Tensor, n_steps: int = 2) -> dict[str, float]:
    """Relative errors of ``other`` against ``reference`` on encoder outputs and sampled tokens.

    Parameters
    ----------
    reference, other : Engine
    betas : Tensor of shape (B, V)
    n_steps : int, default=2
        Prior steps for the end-to-end comparison (deterministic DDIM, same seed).

    Returns
    -------
    dict
        ``backbone_tokens``, ``clip_tokens``, ``lowlevel`` (when present) and ``prior_tokens``.
    """
    ref, out = reference.encode(betas), other.encode(betas)
    errors = {
        "backbone_tokens": relative_error(out.backbone_tokens, ref.backbone_tokens),
        "clip_tokens": relative_error(out.clip_tokens, ref.clip_tokens),
    }
    if ref.lowlevel is not None and out.lowlevel is not None:
        errors["lowlevel"] = relative_error(out.lowlevel, ref.lowlevel)
    brain = ref.backbone_tokens.cpu()
    errors["prior_tokens"] = relative_error(
        sample_prior(other, brain, n_steps, eta=0.0, seed=0), sample_prior(reference, brain, n_steps, eta=0.0, seed=0)
    )
    return errors
