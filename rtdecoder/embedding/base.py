"""What every image embedder provides, and how one is chosen from the configuration.

An embedder turns uint8 RGB images into a grid of feature tokens plus one pooled vector; the
decoder learns to predict these tokens from brain activity. Two are built in:

=====================  ==========================================================  =========
``embedding.model``    tokens                                                      shape
=====================  ==========================================================  =========
``efficientnet_lite0`` final 7x7 feature map of the pretrained EfficientNet-Lite0  49 x 1280
``openclip``           last-layer patch tokens of an OpenCLIP ViT (bigG/14: the    256 x 1664
                       MindEye2 target), from a local weights file
=====================  ==========================================================  =========

Image range (``embedding.image_range``)
---------------------------------------
Pixels are always handed over as uint8 and scaled to ``x = p / 255`` in [0, 1], the way the
MindEye2 reference feeds its images. The setting says which range the embedder *takes its input
to be in* before it applies the model's own mean/std normalisation:

``zero_one``
    ``x`` is used as is. This is the correct use of the model, and the default.
``minus_one_one``
    The embedder treats its input as [-1, 1] and first maps it with ``(x + 1) / 2``, so [0, 1]
    pixels end up in [0.5, 1]. This reproduces the MindEye2 reference exactly (its OpenCLIP
    embedder expects [-1, 1] but is fed [0, 1] images); use it, and only it, to match the
    released MindEye2 checkpoints, which were trained on tokens computed this way.

The setting is part of the embedder's :attr:`Embedder.name`, so cached embeddings made under one
convention are never reused under the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

from rtdecoder.errors import ConfigError, DecoderError

if TYPE_CHECKING:
    import torch

    from rtdecoder.config import EmbeddingConfig

ImageRange = Literal["zero_one", "minus_one_one"]
IMAGE_RANGES: tuple[str, ...] = ("zero_one", "minus_one_one")


@dataclass
class Embedding:
    """Embeddings of N images.

    Attributes
    ----------
    tokens : ndarray of shape (N, T, D), float32
        T feature tokens of D dimensions per image.
    pooled : ndarray of shape (N, D), float32
        One vector per image (what "pooled" means is defined by each embedder).
    """

    tokens: np.ndarray
    pooled: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3 or self.pooled.ndim != 2:
            raise DecoderError(
                f"Embedding: tokens must be (N, T, D) and pooled (N, D) "
                f"(got {self.tokens.shape} and {self.pooled.shape})"
            )
        if self.tokens.shape[0] != self.pooled.shape[0] or self.tokens.shape[2] != self.pooled.shape[1]:
            raise DecoderError(
                f"Embedding: tokens {self.tokens.shape} and pooled {self.pooled.shape} "
                "disagree on N or D"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]


@runtime_checkable
class Embedder(Protocol):
    """An image embedder.

    Attributes
    ----------
    name : str
        Identifies the model, its weights (file name and a content fingerprint), the image
        range and the preprocessing, so that equal names mean equal outputs; used as a cache key.
    n_tokens : int
        T, tokens per image.
    token_dim : int
        D, dimensions per token.
    """

    name: str
    n_tokens: int
    token_dim: int

    def embed(self, images: np.ndarray) -> Embedding:
        """Embed images.

        Parameters
        ----------
        images : ndarray of shape (N, H, W, 3), uint8
            RGB images; resized to the model's input size if they differ from it.

        Returns
        -------
        Embedding
            ``tokens`` (N, n_tokens, token_dim) and ``pooled`` (N, token_dim), float32.
        """
        ...


def make_embedder(config: EmbeddingConfig, device: str = "cpu") -> Embedder:
    """Build the embedder a configuration asks for.

    Parameters
    ----------
    config : EmbeddingConfig
        The ``embedding`` section.
    device : str, default="cpu"
        Torch device to run the model on.

    Returns
    -------
    Embedder

    Raises
    ------
    ConfigError
        If a required setting is missing, or the model's token grid differs from
        ``embedding.n_tokens`` / ``embedding.token_dim``.
    BundleError
        If a weights file is missing or does not fit the architecture.
    """
    if config.model == "efficientnet_lite0":
        from rtdecoder.embedding.efficientnet import EfficientNetLite0Embedder

        embedder: Embedder = EfficientNetLite0Embedder(image_range=config.image_range, device=device)
    elif config.model == "openclip":
        from rtdecoder.embedding.openclip import OpenCLIPEmbedder

        if not config.weights_path:
            raise ConfigError(
                "embedding.weights_path: expected a local OpenCLIP weights file when "
                "embedding.model is 'openclip' (nothing is downloaded)"
            )
        embedder = OpenCLIPEmbedder(
            arch=config.openclip_arch,
            weights_path=config.weights_path,
            image_range=config.image_range,
            device=device,
        )
    else:  # the config's Literal already rejects this; kept for direct construction
        raise ConfigError(f"embedding.model: expected 'efficientnet_lite0' or 'openclip' (got {config.model!r})")
    for key in ("n_tokens", "token_dim"):
        if getattr(embedder, key) != getattr(config, key):
            raise ConfigError(
                f"embedding.{key}: {embedder.name} gives {getattr(embedder, key)} "
                f"(config says {getattr(config, key)})"
            )
    return embedder


def check_image_range(image_range: str) -> ImageRange:
    """Validate an ``image_range`` value (see the module docstring)."""
    if image_range not in IMAGE_RANGES:
        raise ConfigError(
            f"embedding.image_range: expected one of {', '.join(IMAGE_RANGES)} (got {image_range!r})"
        )
    return image_range  # type: ignore[return-value]


def check_batch_size(batch_size: int, owner: str) -> int:
    """Validate an embedder's ``batch_size`` and return it as an int.

    Parameters
    ----------
    batch_size : int
        Images per forward pass; at least 1.
    owner : str
        The embedder's class name, for the error message.

    Raises
    ------
    DecoderError
        If ``batch_size`` is below 1.
    """
    if batch_size < 1:
        raise DecoderError(f"{owner}: batch_size must be >= 1 (got {batch_size})")
    return int(batch_size)


def check_images(images: np.ndarray) -> np.ndarray:
    """Check that images are uint8 ``(N, H, W, 3)`` and return them as such.

    Raises
    ------
    DecoderError
        Naming the shape or dtype that was given.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DecoderError(f"embed: images must have shape (N, H, W, 3) (got {images.shape})")
    if images.dtype != np.uint8:
        raise DecoderError(f"embed: images must be uint8 RGB (got dtype {images.dtype})")
    return images


def to_model_input(
    images: np.ndarray,
    image_range: ImageRange,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    size_px: int,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """uint8 images -> the normalised float batch a model takes.

    Parameters
    ----------
    images : ndarray of shape (N, H, W, 3), uint8
    image_range : {"zero_one", "minus_one_one"}
        Convention described in the module docstring.
    mean, std : tuple of 3 float
        The model's per-channel normalisation, for [0, 1] pixels.
    size_px : int
        Model input edge; other sizes are resized (bicubic, antialiased).
    device : str or torch.device

    Returns
    -------
    torch.Tensor of shape (N, 3, size_px, size_px), float32
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W) in [0, 1]
    if x.shape[-2:] != (size_px, size_px):
        x = F.interpolate(x, size=(size_px, size_px), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    if image_range == "minus_one_one":
        x = (x + 1.0) / 2.0
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def file_fingerprint(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Short content fingerprint of a (possibly multi-GB) weights file.

    SHA-256 over the file size, its first and its last ``chunk_bytes``: cheap for a 10 GB
    checkpoint, and different for any two checkpoints met in practice.

    Returns
    -------
    str
        12 hexadecimal characters.
    """
    path = Path(path)
    size = path.stat().st_size
    sha = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        sha.update(handle.read(chunk_bytes))
        if size > chunk_bytes:
            handle.seek(max(chunk_bytes, size - chunk_bytes))
            sha.update(handle.read(chunk_bytes))
    return sha.hexdigest()[:12]
