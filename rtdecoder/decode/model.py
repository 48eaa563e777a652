"""The MindEye2 model: subject adapters, shared backbone, retrieval and low-level heads, prior.

Data path for one batch (``B`` trials of one subject, ``V`` voxels, hidden ``H``, ``T`` tokens of
width ``D``)::

    betas (B, V) --adapter[subject]--> (B, H) --residual MLP blocks--> (B, H)
        --token projection--> backbone tokens (B, T, D) --retrieval head--> clip tokens (B, T, D)
        \\--low-level head (optional)--> (B, C, 7*2**k, 7*2**k)
    backbone tokens --diffusion prior (sampled)--> predicted image tokens (B, T, D)

Every size comes from :class:`~rtdecoder.config.ModelConfig`. One choice differs from the
reference code on purpose (see docs/mindeye2.md): the backbone is a residual MLP whose blocks
train (LayerNorm -> Linear -> GELU -> Dropout -> Linear, plus skip). The reference's mixer
blocks see a sequence of length 1 and collapse to a constant; :mod:`rtdecoder.calibration.import_mindeye2`
reproduces that behaviour by folding them into the token projection's bias and setting
``n_blocks=0``.

The diffusion prior is in :mod:`rtdecoder.decode.prior` (our compact network, its schedule and
sampler) or :mod:`rtdecoder.decode.prior_dalle2` (the released network, for imported weights),
chosen by ``model.prior_network``.

Subject adapters live in ``model.adapters[subject_id]`` so that one can be replaced (a new
subject's voxel count) without touching the shared weights; see :meth:`MindEye2.add_subject`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rtdecoder.config import ModelConfig
from rtdecoder.decode.prior import DiffusionPrior
from rtdecoder.decode.prior_dalle2 import DALLE2Prior
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
    """Hidden features to a small image: Linear -> 64x7x7 -> GroupNorm -> decoder -> C channels.

    Two decoders (``model.lowlevel_decoder``), both ending at side ``7 * 2**lowlevel_upsamples``:

    - ``conv``: per stage nearest x2, 3x3 conv, GroupNorm, SiLU, the channel count halving (at
      least 16), then a 3x3 conv to ``lowlevel_channels``. Small enough for 2 cores.
    - ``vae``: the diffusers VAE decoder the released MindEye2 uses (``UpDecoderBlock2D`` blocks of
      widths 32, 64, 128, ... one per upsampling plus one, one resnet layer each, a mid block with
      attention), so that released weights can be imported.

    ``lowlevel_channels`` is 4 for an SD-VAE latent, 3 for a low-resolution RGB image.
    """

    def __init__(
        self, hidden_dim: int, out_channels: int, n_upsamples: int, dropout: float, decoder: str = "conv"
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_dim, LOWLEVEL_CHANNELS * LOWLEVEL_GRID**2)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.GroupNorm(1, LOWLEVEL_CHANNELS)
        self.decoder: nn.Module | None = None
        if decoder == "vae":
            from diffusers.models.autoencoders.vae import Decoder

            self.decoder = Decoder(
                in_channels=LOWLEVEL_CHANNELS,
                out_channels=out_channels,
                up_block_types=("UpDecoderBlock2D",) * (n_upsamples + 1),
                block_out_channels=tuple(32 * 2**i for i in range(n_upsamples + 1)),
                layers_per_block=1,
            )
            return
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
        maps = self.norm(self.dropout(self.linear(x)).view(B, LOWLEVEL_CHANNELS, LOWLEVEL_GRID, LOWLEVEL_GRID))
        if self.decoder is not None:
            return self.decoder(maps)  # (B, C, S, S)
        return self.out(self.upsampler(maps))


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
            LowLevelHead(
                H, config.lowlevel_channels, config.lowlevel_upsamples, dropout=0.3, decoder=config.lowlevel_decoder
            )
            if config.lowlevel
            else None
        )
        prior_class = DALLE2Prior if config.prior_network == "dalle2" else DiffusionPrior
        self.prior = prior_class(config) if config.use_prior else None

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
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleError(f"{config_path}: cannot read model config: {err}") from None
        if not isinstance(payload, dict):
            raise BundleError(f"{config_path}: expected a JSON object")
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
        try:
            state = load_file(str(weights_path), device="cpu")
        except (OSError, ValueError, SafetensorError) as err:
            raise BundleError(f"{weights_path}: cannot read model weights: {err}") from None
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
