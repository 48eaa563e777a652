"""The diffusion prior: noise schedule, DDIM sampler, and our compact prior network.

A prior maps backbone tokens (B, T, D) to image tokens (B, T, D) by denoising, DALL-E 2 style:
its network predicts the clean tokens ``x0`` from noisy ones, a timestep and the brain tokens.
Two networks share the schedule and the sampler here:

- :class:`DiffusionPrior` (``model.prior_network: compact``): a pre-norm transformer with learned
  positions, standard multi-head attention and SwiGLU, working in ``prior_dim`` (projected from and
  back to ``token_dim`` when they differ). The phantom preset trains it on 2 cores.
- :class:`~rtdecoder.decode.prior_dalle2.DALLE2Prior` (``model.prior_network: dalle2``): the
  released MindEye2 network, so that its weights can be imported and reproduced.

Both derive from :class:`PriorBase` (``add_noise``, ``draw_training_noise``, ``sample``) and
define ``denoise``; training and the engines use only these and the ``alphas_cumprod`` buffer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rtdecoder.config import ModelConfig
from rtdecoder.errors import ConfigError

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSource = Callable[[torch.Size], torch.Tensor]


def cosine_alphas_cumprod(n_timesteps: int, offset: float = 0.008) -> torch.Tensor:
    """Cumulative signal fraction of the cosine noise schedule (Nichol & Dhariwal 2021).

    Parameters
    ----------
    n_timesteps : int
        Number of diffusion steps.
    offset : float, default=0.008
        Keeps the first steps' noise from vanishing.

    Returns
    -------
    Tensor of shape (n_timesteps,)
        ``alpha_bar[t]``, decreasing from near 1 to near 0, float64.

    Examples
    --------
    >>> a = cosine_alphas_cumprod(100)
    >>> bool(a[0] > 0.99 and a[-1] < 1e-3)
    True
    """
    steps = torch.arange(n_timesteps + 1, dtype=torch.float64)
    f = torch.cos((steps / n_timesteps + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


@dataclass(frozen=True)
class DDIMStep:
    """One denoiser call of the sampler and the update after it.

    Attributes
    ----------
    t : int
        Timestep given to the denoiser.
    abar_eps : Tensor (scalar)
        Signal fraction used to turn the predicted ``x0`` back into the noise estimate.
    abar_t : Tensor (scalar)
        Signal fraction the update assumes the current sample has.
    abar_next : Tensor (scalar)
        Signal fraction after the step (1 at the end: the sample becomes ``x0``).
    fresh_noise : bool
        Whether fresh noise is drawn (and scaled by the step's sigma) after this step.
    """

    t: int
    abar_eps: torch.Tensor
    abar_t: torch.Tensor
    abar_next: torch.Tensor
    fresh_noise: bool


def ddim_plan(
    alphas_cumprod: torch.Tensor, n_steps: int, schedule: str = "uniform", eta: float = 1.0
) -> list[DDIMStep]:
    """The sampler's steps for a schedule.

    Parameters
    ----------
    alphas_cumprod : Tensor of shape (n_timesteps,)
    n_steps : int
        ``uniform``: denoiser calls, 1..n_timesteps. ``dalle2``: grid points, 2..n_timesteps-1.
    schedule : {"uniform", "dalle2"}, default="uniform"
        ``uniform``: timesteps evenly spaced from the last to 0, each step's own ``alpha_bar``.
        ``dalle2``: the released MindEye2 sampler: grid ``int(linspace(-1, n_timesteps, n_steps+1))``
        without its last point, walked downwards; the update reads ``alpha_bar[t-1]`` (1 at t=0)
        while the noise estimate reads ``alpha_bar[t]``, and the step into t=-1 returns ``x0``.
        So ``n_steps`` grid points make ``n_steps - 1`` denoiser calls.
    eta : float, default=1.0
        The uniform schedule draws fresh noise only when ``eta > 0``; the dalle2 one always
        draws it before a step that ends above t=0, as the released sampler does.

    Returns
    -------
    list of DDIMStep
    """
    n_timesteps = alphas_cumprod.shape[0]
    one = torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    if schedule == "uniform":
        if not 1 <= n_steps <= n_timesteps:
            raise ConfigError(f"prior sampling: n_steps: expected 1..{n_timesteps} (got {n_steps})")
        ts = torch.linspace(n_timesteps - 1, 0, n_steps).round().long().tolist()
        steps = []
        for i, t in enumerate(ts):
            last = i + 1 == len(ts)
            abar_next = one if last else alphas_cumprod[ts[i + 1]]
            steps.append(DDIMStep(t, alphas_cumprod[t], alphas_cumprod[t], abar_next, not last and eta > 0))
        return steps
    if schedule == "dalle2":
        if not 2 <= n_steps < n_timesteps:
            raise ConfigError(
                f"prior sampling: n_steps: expected 2..{n_timesteps - 1} for the dalle2 schedule (got {n_steps})"
            )
        grid = torch.linspace(-1.0, n_timesteps, steps=n_steps + 1)[:-1].int().tolist()[::-1]
        abar_prev = torch.cat([one[None], alphas_cumprod[:-1]])
        return [
            DDIMStep(t, alphas_cumprod[t], abar_prev[t], abar_prev[t_next] if t_next >= 0 else one, t_next > 0)
            for t, t_next in itertools.pairwise(grid)
        ]
    raise ConfigError(f"prior sampling: schedule: expected 'uniform' or 'dalle2' (got {schedule!r})")


def ddim_sample(
    denoise: Denoiser, brain: torch.Tensor, plan: list[DDIMStep], eta: float, noise: NoiseSource
) -> torch.Tensor:
    """Run DDIM from pure noise along ``plan``.

    Parameters
    ----------
    denoise : callable
        ``(noisy (B, T, D), t (B,) int64, brain (B, T, D)) -> x0 (B, T, D)``.
    brain : Tensor of shape (B, T, D)
        Backbone tokens (the condition); the sample has its shape, device and dtype.
    plan : list of DDIMStep
        From :func:`ddim_plan`.
    eta : float
        0: deterministic DDIM; 1: as much fresh noise as DDPM.
    noise : callable
        ``shape -> standard normal Tensor`` on ``brain``'s device and dtype; called once for the
        start and once per step with ``fresh_noise``, in that order.

    Returns
    -------
    Tensor of shape (B, T, D)
    """
    x = noise(brain.shape)
    B = brain.shape[0]
    for step in plan:
        a_t, a_next = step.abar_t, step.abar_next
        x0 = denoise(x, torch.full((B,), step.t, dtype=torch.long, device=brain.device), brain)
        eps = (x - step.abar_eps.sqrt() * x0) / (1 - step.abar_eps).sqrt()
        sigma = eta * ((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)).clamp(min=0).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next - sigma**2).clamp(min=0).sqrt() * eps
        if step.fresh_noise:
            x = x + sigma * noise(x.shape)
    return x


class PriorBase(nn.Module):
    """What every prior network shares: the forward noising, training draws and DDIM sampling.

    A subclass sets ``self.config`` (a :class:`~rtdecoder.config.ModelConfig`) and an
    ``alphas_cumprod`` buffer, and defines ``denoise(noisy, t, brain, *keep_masks)``;
    ``n_keep_masks`` is how many condition-dropout masks that ``denoise`` takes.
    """

    n_keep_masks = 1
    config: ModelConfig
    alphas_cumprod: torch.Tensor

    def add_noise(self, clean: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``sqrt(a_t) * clean + sqrt(1 - a_t) * noise`` for (B, T, D) tokens and (B,) timesteps."""
        a = self.alphas_cumprod[t].to(clean.dtype)[:, None, None]
        return a.sqrt() * clean + (1 - a).sqrt() * noise

    def draw_training_noise(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Random timesteps, Gaussian noise and condition-keep masks for one batch (on CPU).

        Returns
        -------
        t : Tensor of shape (B,), int64
        noise : Tensor of shape (B, T, D), float32
        *keep : ``n_keep_masks`` Tensors of shape (B,), bool
            Each True with probability ``1 - prior_cond_drop``; passed on to :meth:`denoise`.
        """
        c = self.config
        t = torch.randint(0, c.prior_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(batch_size, c.n_tokens, c.token_dim, generator=generator)
        keeps = [torch.rand(batch_size, generator=generator) >= c.prior_cond_drop for _ in range(self.n_keep_masks)]
        return t, noise, *keeps

    @torch.no_grad()
    def sample(
        self,
        brain: torch.Tensor,
        n_steps: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw image tokens given brain tokens with DDIM (see :func:`ddim_plan`).

        Parameters
        ----------
        brain : Tensor of shape (B, T, D)
            Backbone tokens.
        n_steps : int, optional
            Default ``prior_sample_steps``; its meaning follows ``prior_ddim_schedule``.
        eta : float, optional
            0: deterministic DDIM; 1: as much fresh noise as DDPM (default ``prior_sample_eta``).
        generator : torch.Generator, optional
            On the device of ``brain``, for reproducible draws; default: torch's global one.

        Returns
        -------
        Tensor of shape (B, T, D)
            Predicted clean image tokens.
        """
        c = self.config
        n_steps = c.prior_sample_steps if n_steps is None else n_steps
        eta = c.prior_sample_eta if eta is None else eta
        plan = ddim_plan(self.alphas_cumprod, n_steps, c.prior_ddim_schedule, eta)

        def noise(shape: torch.Size) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=brain.device, dtype=brain.dtype)

        return ddim_sample(self.denoise, brain, plan, eta, noise)


class PriorBlock(nn.Module):
    """Pre-norm transformer block: full (non-causal) self-attention, then a SwiGLU MLP."""

    def __init__(self, dim: int, n_heads: int, ff_mult: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        # no bias: a key bias cannot change attention, so it would get only round-off gradient
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, 2 * ff_mult * dim)
        self.ff_out = nn.Linear(ff_mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, N, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, N, C))
        gate, value = self.ff_in(self.norm2(x)).chunk(2, dim=-1)
        return x + self.ff_out(F.silu(gate) * value)


class DiffusionPrior(PriorBase):
    """Maps backbone tokens to image tokens by denoising, DALL-E 2 style, predicting x0.

    The transformer sees ``T`` brain tokens, one time token and ``T`` noisy image tokens, all in
    ``prior_dim``, each position with a learned embedding, attending without a causal mask; the
    last ``T`` outputs are the predicted clean image tokens. During training the brain tokens of
    a ``prior_cond_drop`` share of the batch are replaced by a learned null embedding.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        T, D, P = config.n_tokens, config.token_dim, config.prior_dim
        self.config = config
        project = P != D
        self.brain_in = nn.Linear(D, P) if project else nn.Identity()
        self.image_in = nn.Linear(D, P) if project else nn.Identity()
        self.image_out = nn.Linear(P, D) if project else nn.Identity()
        self.null_brain = nn.Parameter(torch.randn(T, D) * D**-0.5)
        self.time_embed = nn.Embedding(config.prior_timesteps, P)
        self.pos_embed = nn.Parameter(torch.randn(2 * T + 1, P) * P**-0.5)
        self.blocks = nn.ModuleList(
            PriorBlock(P, config.prior_heads, config.prior_ff_mult) for _ in range(config.prior_depth)
        )
        self.norm = nn.LayerNorm(P)
        self.head = nn.Linear(P, P)
        self.register_buffer(
            "alphas_cumprod", cosine_alphas_cumprod(config.prior_timesteps).float(), persistent=False
        )

    def denoise(
        self, noisy: torch.Tensor, t: torch.Tensor, brain: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict clean image tokens.

        Parameters
        ----------
        noisy : Tensor of shape (B, T, D)
            Image tokens at noise level ``t``.
        t : Tensor of shape (B,), int64
            Timestep index in ``[0, prior_timesteps)``.
        brain : Tensor of shape (B, T, D)
            Backbone tokens (the condition).
        keep : Tensor of shape (B,), bool, optional
            False rows use the null brain embedding (condition dropout). Default: keep all.

        Returns
        -------
        Tensor of shape (B, T, D)
        """
        if keep is not None:
            brain = torch.where(keep[:, None, None], brain, self.null_brain.to(brain.dtype))
        tokens = torch.cat(
            [self.brain_in(brain), self.time_embed(t)[:, None, :], self.image_in(noisy)], dim=1
        )  # (B, 2T+1, P)
        x = tokens + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.head(self.norm(x[:, -self.config.n_tokens :]))  # (B, T, P)
        return self.image_out(x)
