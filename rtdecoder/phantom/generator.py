"""The phantom generator: a small pixel-space diffusion UNet conditioned on image tokens.

The phantom world has no SDXL; it needs a generator that runs on 2 CPU cores and is trained on
its own stimulus bank. This one is a diffusers :class:`~diffusers.UNet2DConditionModel` on
32x32 RGB pixels (no VAE), cross-attending to the embedder's tokens (49x1280 for
EfficientNet-Lite0) after a LayerNorm and a linear projection to ``phantom_cross_dim``.

Diffusion is continuous-time with the cosine schedule ``alpha = cos(pi t / 2)``,
``sigma = sin(pi t / 2)``, ``t`` in [0, 1], and the network predicts ``v = alpha eps - sigma x``
(well-behaved at both ends, which progressive distillation in
:mod:`~rtdecoder.phantom.distill` needs). Sampling is deterministic DDIM on a uniform
grid of ``n_steps`` from t=1 (pure noise) to t=0.

Build it with ``rtdecoder engines train-generator`` (or :func:`load_or_train_phantom_generator`,
which trains on first use and caches the weights under ``generator.cache_dir``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rtdecoder.config import GeneratorConfig
from rtdecoder.decode.generators.base import check_steps, check_tokens, from_uint8, to_uint8
from rtdecoder.errors import BundleError

logger = logging.getLogger(__name__)

PHANTOM_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
COND_DROP = 0.1  # share of training rows with the null condition, for optional guidance


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and noise scales of the cosine schedule at continuous time ``t`` in [0, 1]."""
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)


def phantom_unet_config(image_size_px: int, cross_dim: int, channels: tuple[int, int] = (32, 64)) -> dict[str, Any]:
    """Diffusers UNet config of the phantom generator (about 1 M parameters at the default channels)."""
    return {
        "sample_size": image_size_px,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": list(channels),
        "layers_per_block": 1,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": 4,
        "norm_num_groups": min(8, channels[0]),
    }


class PhantomGeneratorNet(nn.Module):
    """Token projection + pixel-space UNet predicting ``v``.

    Parameters
    ----------
    n_tokens, token_dim : int
        Shape of the conditioning tokens (T, D).
    image_size_px : int
    cross_dim : int
        Width the tokens are projected to before cross-attention.
    channels : tuple of int, default=(32, 64)
        UNet widths at full and half resolution.
    """

    def __init__(self, n_tokens: int, token_dim: int, image_size_px: int, cross_dim: int,
                 channels: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.sizes = {"n_tokens": n_tokens, "token_dim": token_dim, "image_size_px": image_size_px,
                      "cross_dim": cross_dim, "channels": list(channels)}
        self.token_norm = nn.LayerNorm(token_dim)
        self.token_proj = nn.Linear(token_dim, cross_dim)
        self.null_tokens = nn.Parameter(torch.zeros(n_tokens, cross_dim))
        self.unet = UNet2DConditionModel(**phantom_unet_config(image_size_px, cross_dim, tuple(channels)))

    def context(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Project (B, T, D) tokens to (B, T, cross_dim); rows with ``keep`` False get the null context."""
        ctx = self.token_proj(self.token_norm(tokens))
        if keep is not None:
            ctx = torch.where(keep[:, None, None], ctx, self.null_tokens.to(ctx.dtype))
        return ctx

    def forward(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Predict ``v`` for noisy images (B, 3, S, S) at times (B,) in [0, 1] given projected context."""
        return self.unet(z, t * 1000, encoder_hidden_states=context).sample


class PhantomGenerator:
    """A :class:`~rtdecoder.decode.generators.base.Generator` over a :class:`PhantomGeneratorNet`.

    Parameters
    ----------
    net : PhantomGeneratorNet
    name : str, default="phantom"
    guidance_scale : float, default=1.0
        Classifier-free guidance against the learned null context; 1 = off.
    """

    def __init__(self, net: PhantomGeneratorNet, name: str = "phantom", guidance_scale: float = 1.0) -> None:
        self.net = net.eval()
        self.name = name
        self.image_size_px = net.sizes["image_size_px"]
        self.guidance_scale = guidance_scale

    def predict_v(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        """The (guided) ``v`` prediction for (B, 3, S, S) images at (B,) times."""
        if self.guidance_scale == 1.0:
            return self.net(z, t, context)
        v_uncond, v_cond = self.net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([null, context])).chunk(2)
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, n_steps: int, seed: int) -> np.ndarray:
        """Render (B, T, D) tokens into uint8 (B, S, S, 3) images with ``n_steps`` DDIM steps."""
        sizes = self.net.sizes
        check_tokens(tokens, sizes["n_tokens"], sizes["token_dim"], self.name)
        check_steps(n_steps, self.name)
        param = next(self.net.parameters())
        tokens = tokens.to(param.device, param.dtype)
        batch, side = tokens.shape[0], self.image_size_px
        generator = torch.Generator("cpu").manual_seed(seed)
        z = torch.randn((batch, 3, side, side), generator=generator).to(param.device, param.dtype)
        context = self.net.context(tokens)
        null = self.net.null_tokens.expand(batch, -1, -1).to(param.dtype)
        grid = torch.linspace(1.0, 0.0, n_steps + 1, device=param.device, dtype=param.dtype)
        for i in range(n_steps):
            z = ddim_step(self.predict_v, z, grid[i], grid[i + 1], context, null)
        return to_uint8(z)


def ddim_step(predict_v: Any, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
              context: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step of (B, 3, S, S) images from time ``t`` to ``s < t``."""
    t_batch = t.expand(z.shape[0])
    v = predict_v(z, t_batch, context, null)
    a_t, s_t = alpha_sigma(t)
    a_s, s_s = alpha_sigma(s)
    x0 = (a_t * z - s_t * v).clamp(-1, 1)
    eps = s_t * z + a_t * v
    return a_s * x0 + s_s * eps


def train_phantom_generator(
    images: np.ndarray,
    tokens: torch.Tensor,
    config: GeneratorConfig,
    seed: int = 0,
    progress: bool = True,
    channels: tuple[int, int] = (32, 64),
) -> PhantomGeneratorNet:
    """Train the phantom generator on stimulus images and their tokens.

    Parameters
    ----------
    images : numpy.ndarray of uint8, shape (N, H, W, 3)
        Stimuli; resized (area) to ``config.image_size_px``.
    tokens : torch.Tensor of shape (N, T, D)
        Their embedder tokens.
    config : GeneratorConfig
        ``image_size_px``, ``phantom_cross_dim``, ``phantom_train_steps``,
        ``phantom_batch_size``, ``phantom_lr``.
    seed : int, default=0
    progress : bool, default=True
        Show a tqdm bar.
    channels : tuple of int, default=(32, 64)
        UNet widths.

    Returns
    -------
    PhantomGeneratorNet
        In eval mode.
    """
    from tqdm import tqdm

    if len(images) != len(tokens):
        raise BundleError(f"phantom generator: tokens: expected {len(images)} rows like images (got {len(tokens)})")
    torch.manual_seed(seed)
    targets = from_uint8(images, config.image_size_px)  # (N, 3, S, S) in [-1, 1]
    tokens = tokens.float()
    net = PhantomGeneratorNet(
        tokens.shape[1], tokens.shape[2], config.image_size_px, config.phantom_cross_dim, channels
    )
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.phantom_lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.phantom_lr, total_steps=config.phantom_train_steps,
                                                   pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    bar = tqdm(range(config.phantom_train_steps), desc="train phantom generator", disable=not progress)
    for _ in bar:
        rows = torch.randint(0, len(targets), (config.phantom_batch_size,), generator=generator)
        # No mirror augmentation: the 7x7 tokens are a spatial grid and would no longer match.
        loss = v_loss(net, targets[rows], net.context(tokens[rows], _keep_mask(len(rows), generator)), generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.eval()


def _keep_mask(batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(batch, generator=generator) >= COND_DROP


def v_loss(
    net: PhantomGeneratorNet, x: torch.Tensor, context: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Mean squared ``v`` error at random times for clean images ``x`` (B, 3, S, S)."""
    t = torch.rand(x.shape[0], generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    a, s = (v[:, None, None, None] for v in alpha_sigma(t))
    z = a * x + s * noise
    return torch.nn.functional.mse_loss(net(z, t, context), a * noise - s * x)


def save_phantom_net(net: PhantomGeneratorNet, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` (sizes, class name, version, ``extra``) and ``model.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"_class_name": "PhantomGeneratorNet", "_version": PHANTOM_FORMAT_VERSION, **net.sizes, **(extra or {})}
    (folder / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))


def load_phantom_net(folder: str | Path) -> PhantomGeneratorNet:
    """Read a folder written by :func:`save_phantom_net`, checking class name and version."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / CONFIG_NAME
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: cannot read generator config: {err}") from None
    if payload.get("_class_name") != "PhantomGeneratorNet" or payload.get("_version") != PHANTOM_FORMAT_VERSION:
        raise BundleError(
            f"{path}: _class_name/_version: expected 'PhantomGeneratorNet' version {PHANTOM_FORMAT_VERSION} "
            f"(got {payload.get('_class_name')!r} version {payload.get('_version')!r})"
        )
    net = PhantomGeneratorNet(payload["n_tokens"], payload["token_dim"], payload["image_size_px"], payload["cross_dim"],
                              tuple(payload.get("channels", (32, 64))))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise BundleError(f"{weights}: missing generator weights")
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


def phantom_cache_key(config: Any) -> str:
    """Short hash of everything the phantom generator's weights depend on (an RTDecoderConfig)."""
    relevant = {
        "phantom": config.phantom.model_dump(mode="json"),
        "embedding": config.embedding.model_dump(mode="json", exclude={"cache_dir"}),
        "generator": config.generator.model_dump(
            mode="json", include={"image_size_px", "phantom_train_steps", "phantom_batch_size", "phantom_lr",
                                  "phantom_cross_dim", "n_steps", "student_steps", "distill_steps_per_round"}),
        "version": PHANTOM_FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


HELD_OUT_FRACTION = 0.1
SHIPPED_WEIGHTS_DIR = Path(__file__).parent / "generator_weights"


def phantom_weights_folder(config: Any, role: str) -> Path:
    """Where the phantom ``role`` ("teacher" or "student") weights for this config live.

    Weights shipped with the package (made by ``rtdecoder engines train-generator --ship`` for the
    ``phantom`` preset) are used when their key matches; otherwise the cache folder, where they are
    trained on first use.
    """
    name = f"phantom-{phantom_cache_key(config)}"
    shipped = SHIPPED_WEIGHTS_DIR / name / role
    if (shipped / WEIGHTS_NAME).is_file():
        return shipped
    return Path(config.generator.cache_dir) / name / role


def phantom_split(n_stimuli: int) -> tuple[np.ndarray, np.ndarray]:
    """Stimulus indices the phantom generators train on, and the held-out rest (last 10%, >= 2)."""
    n_test = max(2, int(round(n_stimuli * HELD_OUT_FRACTION)))
    if n_stimuli - n_test < 2:
        raise BundleError(f"phantom generator: phantom.n_stimuli: expected at least 4 stimuli (got {n_stimuli})")
    return np.arange(n_stimuli - n_test), np.arange(n_stimuli - n_test, n_stimuli)


def phantom_training_data(config: Any, indices: np.ndarray, progress: bool = True) -> tuple[np.ndarray, torch.Tensor]:
    """Stimulus images at ``generator.image_size_px`` and their (cached) embedder tokens.

    Parameters
    ----------
    config : RTDecoderConfig
    indices : numpy.ndarray of int
        Rows of the phantom stimulus bank.

    Returns
    -------
    images : numpy.ndarray of uint8, shape (N, S, S, 3)
    tokens : torch.Tensor of shape (N, T, D)
    """
    from rtdecoder.embedding.base import make_embedder
    from rtdecoder.embedding.cache import EmbeddingCache
    from rtdecoder.phantom.stimuli import StimulusBank

    ph = config.phantom
    bank = StimulusBank.build(ph.n_stimuli, size_px=ph.image_size_px, seed=ph.seed)
    # The whole bank's embedding is the one every other part caches; index it rather than cache a subset.
    embedding = EmbeddingCache(config.embedding.cache_dir).get_or_compute(
        make_embedder(config.embedding), bank, progress=progress
    )
    side = config.generator.image_size_px
    small = []
    for start in range(0, len(indices), 256):  # full-size crops in chunks: 3000 x 224 px is 450 MB
        chunk = from_uint8(bank.images(indices[start:start + 256]), side)
        small.append(to_uint8(chunk))
    return np.concatenate(small), torch.from_numpy(np.ascontiguousarray(embedding.tokens[indices]))


def load_or_train_phantom_generator(config: Any, progress: bool = True) -> PhantomGenerator:
    """The phantom teacher generator, trained on first use and cached.

    Weights go to ``<generator.cache_dir>/phantom-<key>/teacher`` where ``key`` hashes every
    setting they depend on (:func:`phantom_cache_key`); a later call with the same settings
    loads them. Training uses the first 90% of the phantom stimulus bank (see
    :func:`phantom_split`).

    Parameters
    ----------
    config : RTDecoderConfig
    progress : bool, default=True
        tqdm bars while embedding and training.
    """
    folder = phantom_weights_folder(config, "teacher")
    if not (folder / WEIGHTS_NAME).is_file():
        train_idx, _ = phantom_split(config.phantom.n_stimuli)
        images, tokens = phantom_training_data(config, train_idx, progress)
        logger.info("training the phantom generator on %d stimuli (cached in %s)", len(images), folder)
        net = train_phantom_generator(images, tokens, config.generator, seed=config.phantom.seed, progress=progress)
        save_phantom_net(net, folder)
    return PhantomGenerator(load_phantom_net(folder), "phantom-teacher", config.generator.guidance_scale)
