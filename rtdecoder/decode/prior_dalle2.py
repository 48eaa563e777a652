"""The released MindEye2 prior network (``model.prior_network: dalle2``), for imported weights.

MindEye2 trains the DALL-E 2 prior network of the ``dalle2-pytorch`` package with its own token
layout. Written here from that design so that a released checkpoint computes the same numbers
(``rtdecoder/calibration/import_mindeye2.py`` maps the keys; ``tests/test_import_mindeye2.py`` compares
with outputs of the reference code). What it computes, for ``T`` tokens of width ``D``:

- Tokens: ``T`` brain tokens, one time token, ``T`` noisy image tokens plus a learned per-token
  embedding (``N = 2T + 1`` in all). Brain and image tokens can each be swapped for a learned
  null embedding (condition dropout; the reference drops both at ``prior_cond_drop``).
- Time token: sinusoidal features of the (float) timestep through a 3-layer SiLU MLP.
- ``prior_depth`` blocks ``x += attention(x); x += feed_forward(x)``:
  - attention: LayerNorm (gain only) -> ``heads`` queries of width ``dim_head`` but one shared
    key and value (multi-query), rotary position on the first ``min(32, dim_head)`` features of
    queries and keys, a learned null key/value prepended, cosine similarity times 16, a T5-style
    relative position bias per head, no mask; then Linear -> LayerNorm (gain only).
  - feed-forward: LayerNorm (gain only) -> Linear to ``2 * ff_mult * D`` -> SwiGLU (value
    first, gate second) -> Linear back, no biases anywhere.
- Output: a "stable" LayerNorm (divided by its row maximum first) -> Linear, last ``T`` tokens.

The relative position bias follows the reference exactly, quirks included: keys are numbered
with the null key at 0, and only keys before the query get distinct buckets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rtdecoder.config import ModelConfig
from rtdecoder.decode.prior import PriorBase, cosine_alphas_cumprod

ROTARY_MAX_DIM = 32
ROTARY_THETA = 10000.0
REL_POS_BUCKETS = 32
REL_POS_MAX_DISTANCE = 128
COSINE_SIM_SCALE = 16.0


def rotary_frequencies(rotary_dim: int) -> torch.Tensor:
    """Angular frequency per feature pair, ``theta ** (-2i / rotary_dim)``: shape (rotary_dim // 2,)."""
    return 1.0 / (ROTARY_THETA ** (torch.arange(0, rotary_dim, 2)[: rotary_dim // 2].float() / rotary_dim))


def relative_position_buckets(n_queries: int, n_keys: int) -> torch.Tensor:
    """T5-style bucket of each (query, key) pair: (n_queries, n_keys) int64 in [0, 32).

    Distance ``n = max(query - key, 0)``: exact below 16, then logarithmic up to 128.
    """
    n = (torch.arange(n_queries)[:, None] - torch.arange(n_keys)[None, :]).clamp(min=0)
    exact = REL_POS_BUCKETS // 2
    scaled = torch.log(n.clamp(min=1).float() / exact) / math.log(REL_POS_MAX_DISTANCE / exact)
    large = (exact + (scaled * (REL_POS_BUCKETS - exact)).long()).clamp(max=REL_POS_BUCKETS - 1)
    return torch.where(n < exact, n, large)


class GainLayerNorm(nn.Module):
    """LayerNorm with a gain ``g`` and no bias; ``stable`` first divides each row by its maximum."""

    def __init__(self, dim: int, stable: bool = False) -> None:
        super().__init__()
        self.stable = stable
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3  # the reference's half-precision guard
        return F.layer_norm(x, x.shape[-1:], self.g.to(x.dtype), None, eps)


class DALLE2Block(nn.Module):
    """Multi-query attention with rotary, null key and relative bias, then a SwiGLU feed-forward."""

    def __init__(self, dim: int, n_heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.n_heads, self.dim_head = n_heads, dim_head
        self.attn_norm = GainLayerNorm(dim)
        self.to_q = nn.Linear(dim, n_heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_out = nn.Linear(n_heads * dim_head, dim, bias=False)
        self.out_norm = GainLayerNorm(dim)
        self.ff_norm = GainLayerNorm(dim)
        self.ff_in = nn.Linear(dim, 2 * ff_mult * dim, bias=False)
        self.ff_out = nn.Linear(ff_mult * dim, dim, bias=False)

    def attention(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        B, N, _ = x.shape
        h = self.attn_norm(x)
        q = self.to_q(h).view(B, N, self.n_heads, self.dim_head).transpose(1, 2)  # (B, heads, N, dh)
        k, v = self.to_kv(h).chunk(2, dim=-1)  # (B, N, dh) each, shared by all heads
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        null_k, null_v = (t.to(x.dtype).expand(B, 1, self.dim_head) for t in self.null_kv.unbind(0))
        k, v = torch.cat([null_k, k], dim=1), torch.cat([null_v, v], dim=1)  # (B, N+1, dh)
        sim = COSINE_SIM_SCALE * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1)[:, None].transpose(-1, -2)
        sim = sim + bias.to(sim.dtype)  # (B, heads, N, N+1)
        attn = sim.softmax(dim=-1, dtype=torch.float32).to(sim.dtype)
        out = (attn @ v[:, None]).transpose(1, 2).reshape(B, N, self.n_heads * self.dim_head)
        return self.out_norm(self.to_out(out))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.ff_in(self.ff_norm(x)).chunk(2, dim=-1)
        return self.ff_out(value * F.silu(gate))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x, cos, sin, bias)
        return x + self.feed_forward(x)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position on the first ``cos.shape[-1]`` features; pairs are adjacent features."""
    r = cos.shape[-1]
    head, rest = t[..., :r], t[..., r:]
    pairs = head.unflatten(-1, (r // 2, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return torch.cat([head * cos.to(t.dtype) + turned * sin.to(t.dtype), rest], dim=-1)


class DALLE2Prior(PriorBase):
    """The released MindEye2 diffusion prior; same interface as :class:`~rtdecoder.decode.prior.DiffusionPrior`.

    Parameters
    ----------
    config : ModelConfig
        ``prior_dim`` (= ``token_dim``), ``prior_depth``, ``prior_heads``, ``prior_dim_head``,
        ``prior_ff_mult``, ``prior_timesteps``, ``prior_cond_drop``, sampling settings.
    """

    n_keep_masks = 2  # the reference drops brain and image tokens, each at prior_cond_drop

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        T, D = config.n_tokens, config.prior_dim
        dim_head = config.prior_dim_head or D // config.prior_heads
        self.config = config
        self.image_pos_embed = nn.Parameter(torch.randn(T, D) * D**-0.5)
        self.null_brain = nn.Parameter(torch.randn(T, D))
        self.null_image = nn.Parameter(torch.randn(T, D))
        self.time_mlp = nn.Sequential(
            nn.Linear(D, 2 * D), nn.SiLU(), nn.Linear(2 * D, 2 * D), nn.SiLU(), nn.Linear(2 * D, D)
        )
        self.rel_pos_bias = nn.Embedding(REL_POS_BUCKETS, config.prior_heads)
        self.blocks = nn.ModuleList(
            DALLE2Block(D, config.prior_heads, dim_head, config.prior_ff_mult) for _ in range(config.prior_depth)
        )
        self.norm = GainLayerNorm(D, stable=True)
        self.project_out = nn.Linear(D, D, bias=False)

        n = 2 * T + 1
        angles = torch.arange(n).float()[:, None] * rotary_frequencies(min(ROTARY_MAX_DIM, dim_head))[None, :]
        angles = angles.repeat_interleave(2, dim=-1)  # (N, rotary_dim): both features of a pair
        self.register_buffer("rotary_cos", angles.cos(), persistent=False)
        self.register_buffer("rotary_sin", angles.sin(), persistent=False)
        self.register_buffer("rel_pos_buckets", relative_position_buckets(n, n + 1), persistent=False)
        self.register_buffer(
            "alphas_cumprod", cosine_alphas_cumprod(config.prior_timesteps).float(), persistent=False
        )

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features of float timesteps through the MLP: (B,) -> (B, D)."""
        half = self.config.prior_dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None, :]
        return self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))

    def denoise(
        self,
        noisy: torch.Tensor,
        t: torch.Tensor,
        brain: torch.Tensor,
        keep: torch.Tensor | None = None,
        keep_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict clean (B, T, D) image tokens, as :meth:`rtdecoder.decode.prior.DiffusionPrior.denoise`.

        ``keep_image`` is the one addition: its False rows replace the noisy image tokens with the
        null image embedding, as ``keep``'s False rows replace the brain tokens.
        """
        if keep is not None:
            brain = torch.where(keep[:, None, None], brain, self.null_brain.to(brain.dtype))
        if keep_image is not None:
            noisy = torch.where(keep_image[:, None, None], noisy, self.null_image.to(noisy.dtype))
        time = self.time_features(t).to(brain.dtype)[:, None, :]
        x = torch.cat([brain, time, noisy + self.image_pos_embed.to(noisy.dtype)], dim=1)  # (B, 2T+1, D)
        bias = self.rel_pos_bias(self.rel_pos_buckets).permute(2, 0, 1)  # (heads, N, N+1)
        for block in self.blocks:
            x = block(x, self.rotary_cos, self.rotary_sin, bias)
        return self.project_out(self.norm(x))[:, -self.config.n_tokens :]
