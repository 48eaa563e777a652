"""The MindEye2 model: subject adapters, shared backbone, retrieval and low-level heads, prior.

Data path for one batch (``B`` trials of one subject, ``V`` voxels, hidden ``H``, ``T`` tokens of
width ``D``)::

    betas (B, V) --adapter[subject]--> (B, H) --residual MLP blocks--> (B, H)
        --token projection--> backbone tokens (B, T, D) --retrieval head--> clip tokens (B, T, D)
        \\--low-level head (optional)--> (B, C, 7*2**k, 7*2**k)
    backbone tokens --diffusion prior (sampled)--> predicted image tokens (B, T, D)

Every size comes from :class:`~rtdecoder.config.ModelConfig`. Two choices differ from the
reference code on purpose (see docs/mindeye2.md):

- The backbone is a residual MLP whose blocks train (LayerNorm -> Linear -> GELU -> Dropout ->
  Linear, plus skip). The reference's mixer blocks see a sequence of length 1 and collapse to a
  constant; :mod:`calibration.import_mindeye2` reproduces that behaviour by folding them into the
  token projection's bias and setting ``n_blocks=0``.
- The prior works in ``prior_dim``. When it differs from ``token_dim`` (the phantom preset: 1280
  EfficientNet channels, prior 256) brain and image tokens are projected in and the prediction
  projected back out; at the paper's sizes ``prior_dim == token_dim`` and these are identities.

Subject adapters live in ``model.adapters[subject_id]`` so that one can be replaced (a new
subject's voxel count) without touching the shared weights; see :meth:`MindEye2.add_subject`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from rtdecoder.config import ModelConfig
from rtdecoder.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LOWLEVEL_GRID = 7  # the low-level head starts from a 7x7 map, as the reference's
LOWLEVEL_CHANNELS = 64
_SUBJECT_ID = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class MindEye2Output:
    """What one forward pass returns, rows in the order of the input mapping.

    Attributes
    ----------
    backbone_tokens : Tensor of shape (B, T, D)
        The shared backbone's tokens; the diffusion prior's condition.
    clip_tokens : Tensor of shape (B, T, D)
        The retrieval head's tokens, compared with image tokens by cosine.
    lowlevel : Tensor of shape (B, C, S, S) or None
        The low-level head's image (or latent), ``None`` when the head is off.
    """

    backbone_tokens: torch.Tensor
    clip_tokens: torch.Tensor
    lowlevel: torch.Tensor | None


class ResidualMLPBlock(nn.Module):
    """``x + Linear(Dropout(GELU(Linear(LayerNorm(x)))))`` on (B, H) features."""

    def __init__(self, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.dropout(F.gelu(self.fc1(self.norm(x)))))


class RetrievalHeadLayer(nn.Module):
    """``Linear(GELU(LayerNorm(x)))`` applied per token on (B, T, D)."""

    def __init__(self, token_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(token_dim)
        self.linear = nn.Linear(token_dim, token_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.gelu(self.norm(x)))


class LowLevelHead(nn.Module):
    """Hidden features to a small image: Linear -> 64x7x7 -> (x2 upsample, conv) * k -> C.

    Each upsampling stage is nearest x2, 3x3 conv, GroupNorm, SiLU; the channel count halves
    per stage (at least 16). A final 3x3 conv gives ``lowlevel_channels`` (4 for an SD-VAE
    latent, 3 for a low-resolution RGB image). Output side is ``7 * 2**lowlevel_upsamples``.
    """

    def __init__(self, hidden_dim: int, out_channels: int, n_upsamples: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_dim, LOWLEVEL_CHANNELS * LOWLEVEL_GRID**2)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.GroupNorm(1, LOWLEVEL_CHANNELS)
        stages: list[nn.Module] = []
        channels = LOWLEVEL_CHANNELS
        for _ in range(n_upsamples):
            next_channels = max(16, channels // 2)
            stages += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, next_channels, 3, padding=1),
                nn.GroupNorm(1, next_channels),
                nn.SiLU(),
            ]
            channels = next_channels
        self.upsampler = nn.Sequential(*stages)
        self.out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        maps = self.dropout(self.linear(x)).view(B, LOWLEVEL_CHANNELS, LOWLEVEL_GRID, LOWLEVEL_GRID)
        return self.out(self.upsampler(self.norm(maps)))  # (B, C, S, S)


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


class DiffusionPrior(nn.Module):
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

    def add_noise(self, clean: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``sqrt(a_t) * clean + sqrt(1 - a_t) * noise`` for (B, T, D) tokens and (B,) steps."""
        a = self.alphas_cumprod[t].to(clean.dtype)[:, None, None]
        return a.sqrt() * clean + (1 - a).sqrt() * noise

    def draw_training_noise(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random timesteps, Gaussian noise and condition-keep mask for one batch (on CPU).

        Returns
        -------
        t : Tensor of shape (B,), int64
        noise : Tensor of shape (B, T, D), float32
        keep : Tensor of shape (B,), bool
            True with probability ``1 - prior_cond_drop``.
        """
        c = self.config
        t = torch.randint(0, c.prior_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(batch_size, c.n_tokens, c.token_dim, generator=generator)
        keep = torch.rand(batch_size, generator=generator) >= c.prior_cond_drop
        return t, noise, keep

    @torch.no_grad()
    def sample(
        self,
        brain: torch.Tensor,
        n_steps: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw image tokens given brain tokens with DDIM over a subset of the timesteps.

        Parameters
        ----------
        brain : Tensor of shape (B, T, D)
            Backbone tokens.
        n_steps : int, optional
            Denoising steps (default ``prior_sample_steps``), at most ``prior_timesteps``.
        eta : float, optional
            0: deterministic DDIM; 1: as much fresh noise as DDPM (default ``prior_sample_eta``).
        generator : torch.Generator, optional
            On the device of ``brain``, for reproducible draws.

        Returns
        -------
        Tensor of shape (B, T, D)
            Predicted clean image tokens.
        """
        c = self.config
        n_steps = c.prior_sample_steps if n_steps is None else n_steps
        eta = c.prior_sample_eta if eta is None else eta
        if not 1 <= n_steps <= c.prior_timesteps:
            raise ConfigError(
                f"prior sampling: n_steps: expected 1..{c.prior_timesteps} (got {n_steps})"
            )
        timesteps = torch.linspace(c.prior_timesteps - 1, 0, n_steps).round().long().tolist()
        B = brain.shape[0]
        x = torch.randn(brain.shape, generator=generator, device=brain.device, dtype=brain.dtype)
        abar = self.alphas_cumprod
        for i, t in enumerate(timesteps):
            a_t = abar[t]
            a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones_like(a_t)
            t_batch = torch.full((B,), t, dtype=torch.long, device=brain.device)
            x0 = self.denoise(x, t_batch, brain)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
            if float(sigma) > 0:
                x = x + sigma * torch.randn(
                    x.shape, generator=generator, device=x.device, dtype=x.dtype
                )
        return x


class MindEye2(nn.Module):
    """Subject adapters + shared residual-MLP backbone + heads + optional diffusion prior.

    Parameters
    ----------
    config : ModelConfig
        All sizes.
    subjects : mapping of str to int
        Voxel count per subject id; one linear adapter each (ids: letters, digits, ``_``, ``-``).

    Examples
    --------
    >>> from rtdecoder.config import ModelConfig
    >>> cfg = ModelConfig(hidden_dim=32, n_blocks=1, n_tokens=4, token_dim=16, prior_dim=16,
    ...                   prior_depth=1, prior_heads=2)
    >>> model = MindEye2(cfg, {"sub-01": 50}).eval()
    >>> out = model({"sub-01": torch.randn(3, 50)})
    >>> tuple(out.clip_tokens.shape)
    (3, 4, 16)
    """

    def __init__(self, config: ModelConfig, subjects: Mapping[str, int]) -> None:
        super().__init__()
        self.config = config
        H, T, D = config.hidden_dim, config.n_tokens, config.token_dim
        self.adapters = nn.ModuleDict()
        for subject_id, n_voxels in subjects.items():
            self.add_subject(subject_id, n_voxels)
        self.blocks = nn.ModuleList(ResidualMLPBlock(H, config.dropout) for _ in range(config.n_blocks))
        self.token_proj = nn.Linear(H, T * D)
        self.retrieval_head = nn.Sequential(*(RetrievalHeadLayer(D) for _ in range(config.clip_head_layers)))
        self.lowlevel_head = (
            LowLevelHead(H, config.lowlevel_channels, config.lowlevel_upsamples, dropout=0.3)
            if config.lowlevel
            else None
        )
        self.prior = DiffusionPrior(config) if config.use_prior else None

    @property
    def subjects(self) -> dict[str, int]:
        """Voxel count per subject id, in adapter order."""
        return {name: adapter.in_features for name, adapter in self.adapters.items()}

    def add_subject(self, subject_id: str, n_voxels: int) -> None:
        """Add a freshly initialised adapter, replacing any adapter of the same id.

        Parameters
        ----------
        subject_id : str
            Letters, digits, ``_`` or ``-``.
        n_voxels : int
            Length of this subject's beta vectors (voxels in the mask).
        """
        if not _SUBJECT_ID.match(subject_id):
            raise ConfigError(
                f"subject_id: expected letters, digits, '_' or '-' (got {subject_id!r})"
            )
        if n_voxels < 1:
            raise ConfigError(f"{subject_id}: n_voxels: expected a positive count (got {n_voxels})")
        reference = next(self.parameters(), None)
        adapter = nn.Linear(n_voxels, self.config.hidden_dim)
        if reference is not None:
            adapter = adapter.to(device=reference.device, dtype=reference.dtype)
        if subject_id in self.adapters:
            log.info("replacing the adapter of %s with a fresh one (%d voxels)", subject_id, n_voxels)
        self.adapters[subject_id] = adapter

    def remove_subject(self, subject_id: str) -> None:
        """Drop one subject's adapter."""
        if subject_id not in self.adapters:
            raise ConfigError(f"subject_id: no adapter for {subject_id!r}; have {list(self.adapters)}")
        del self.adapters[subject_id]

    def shared_features(self, betas: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Each subject's betas through its adapter, stacked, then the residual blocks.

        Parameters
        ----------
        betas : mapping of subject id to Tensor of shape (B_s, V_s)

        Returns
        -------
        Tensor of shape (sum B_s, H)
        """
        parts = []
        for subject_id, x in betas.items():
            if subject_id not in self.adapters:
                raise ConfigError(
                    f"betas: no adapter for subject {subject_id!r}; have {list(self.adapters)}"
                )
            adapter = self.adapters[subject_id]
            if x.ndim != 2 or x.shape[1] != adapter.in_features:
                raise ConfigError(
                    f"betas[{subject_id!r}]: expected shape (B, {adapter.in_features}) "
                    f"(got {tuple(x.shape)})"
                )
            parts.append(adapter(x))
        h = torch.cat(parts, dim=0)  # (B, H)
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, betas: Mapping[str, torch.Tensor]) -> MindEye2Output:
        """Backbone tokens, retrieval tokens and the low-level image for a batch.

        Parameters
        ----------
        betas : mapping of subject id to Tensor of shape (B_s, V_s)
            z-scored single-trial betas; output rows follow the mapping's order.

        Returns
        -------
        MindEye2Output
        """
        h = self.shared_features(betas)
        tokens = self.token_proj(h).view(h.shape[0], self.config.n_tokens, self.config.token_dim)
        lowlevel = self.lowlevel_head(h) if self.lowlevel_head is not None else None
        return MindEye2Output(tokens, self.retrieval_head(tokens), lowlevel)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (sizes, subjects, class name, version) and ``model.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "_class_name": type(self).__name__,
            "_version": MODEL_FORMAT_VERSION,
            "model": self.config.model_dump(mode="json"),
            "subjects": self.subjects,
        }
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> MindEye2:
        """Build a model from a folder written by :meth:`save_pretrained`."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        try:
            payload = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BundleError(f"{config_path}: cannot read model config: {err}") from None
        if payload.get("_class_name") != cls.__name__:
            raise BundleError(
                f"{config_path}: _class_name: expected {cls.__name__!r} (got {payload.get('_class_name')!r})"
            )
        if payload.get("_version") != MODEL_FORMAT_VERSION:
            raise BundleError(
                f"{config_path}: _version: expected {MODEL_FORMAT_VERSION} (got {payload.get('_version')!r})"
            )
        try:
            config = ModelConfig.model_validate(payload["model"])
            subjects = {str(k): int(v) for k, v in payload["subjects"].items()}
        except (KeyError, AttributeError, ValidationError) as err:
            raise BundleError(f"{config_path}: model/subjects: invalid model config: {err}") from None
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise BundleError(f"{weights_path}: missing model weights")
        model = cls(config, subjects)
        state = load_file(str(weights_path), device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BundleError(
                f"{weights_path}: weights do not match config.json "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
        return model.to(device)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
