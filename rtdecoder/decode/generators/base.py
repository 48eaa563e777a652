"""The generator interface (image tokens -> images) and what every generator shares.

A generator turns predicted image tokens into pictures. All of them, from the 32 px phantom
generator to MindEye2's SDXL unCLIP, answer the same call::

    images = generator.generate(tokens, n_steps=4, seed=0)   # uint8 (B, H, W, 3)

so the session loop, the benches and the metrics never ask which one they hold. The low-level
("blurry") image of MindEye2 is mixed in afterwards with :func:`blend_lowlevel`: the model's
low-level head gives either a small RGB image or a VAE latent, which :func:`lowlevel_images`
turns into pixels (with the generator's own VAE, :func:`lowlevel_vae_for`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from rtdecoder.errors import ConfigError, DecoderError

#: Channels of a low-level output that is an RGB image rather than a latent.
RGB_CHANNELS = 3


@runtime_checkable
class Generator(Protocol):
    """Anything that renders image tokens into uint8 RGB images.

    Attributes
    ----------
    name : str
        Short label used in logs, benches and result messages (``"phantom-teacher"``).
    image_size_px : int
        Side of the square images :meth:`generate` returns.
    """

    name: str
    image_size_px: int

    def generate(self, tokens: torch.Tensor, n_steps: int, seed: int) -> np.ndarray:
        """Render images from tokens.

        Parameters
        ----------
        tokens : torch.Tensor of shape (B, T, D)
            Image tokens in the space the generator was trained on.
        n_steps : int
            Sampling steps (network evaluations per image, not counting guidance).
        seed : int
            Seed of the starting noise; the same seed gives the same images.

        Returns
        -------
        numpy.ndarray of uint8, shape (B, image_size_px, image_size_px, 3)
        """
        ...


def check_tokens(tokens: torch.Tensor, n_tokens: int | None, token_dim: int, who: str) -> None:
    """Raise a :class:`DecoderError` unless ``tokens`` is a (B, n_tokens, token_dim) tensor.

    ``n_tokens=None`` accepts any number of tokens.
    """
    n_tokens_text = "T" if n_tokens is None else n_tokens
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        shape = tuple(tokens.shape) if hasattr(tokens, "shape") else type(tokens).__name__
        raise DecoderError(f"{who}: tokens: expected a tensor of shape (B, {n_tokens_text}, {token_dim}) (got {shape})")
    if tokens.shape[2] != token_dim or (n_tokens is not None and tokens.shape[1] != n_tokens):
        raise DecoderError(
            f"{who}: tokens: expected shape (B, {n_tokens_text}, {token_dim}) (got {tuple(tokens.shape)})"
        )


def check_steps(n_steps: int, who: str) -> None:
    """Raise a :class:`DecoderError` unless ``n_steps`` is a positive integer."""
    if not isinstance(n_steps, int) or n_steps < 1:
        raise DecoderError(f"{who}: n_steps: expected a positive integer (got {n_steps!r})")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Convert images in [-1, 1] from (B, 3, H, W) float to (B, H, W, 3) uint8."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return images.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray, size_px: int | None = None) -> torch.Tensor:
    """Convert uint8 (B, H, W, 3) images to float (B, 3, H, W) in [-1, 1], optionally resized.

    Resizing uses area averaging (antialiased), so a 224 px stimulus becomes a fair 32 px target.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DecoderError(f"images: expected uint8 array of shape (B, H, W, 3) (got {images.shape})")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if size_px is not None and x.shape[-1] != size_px:
        x = torch.nn.functional.interpolate(x, size=(size_px, size_px), mode="area")
    return x


def blend_lowlevel(images: np.ndarray, blurry: np.ndarray, lowlevel_weight: float = 0.25) -> np.ndarray:
    """Mix reconstructions with low-level ("blurry") images, MindEye2's 0.75/0.25 blend.

    Parameters
    ----------
    images : numpy.ndarray of uint8, shape (B, H, W, 3)
        Reconstructions from a :class:`Generator`.
    blurry : numpy.ndarray of uint8, shape (B, h, w, 3)
        Low-level images; resized (bilinear) to (H, W) when they differ.
    lowlevel_weight : float, default=0.25
        Weight of the blurry image; the reconstruction gets ``1 - lowlevel_weight``.

    Returns
    -------
    numpy.ndarray of uint8, shape (B, H, W, 3)
    """
    if not 0.0 <= lowlevel_weight <= 1.0:
        raise DecoderError(f"blend_lowlevel: lowlevel_weight: expected a value in [0, 1] (got {lowlevel_weight})")
    if images.shape[0] != blurry.shape[0]:
        raise DecoderError(
            f"blend_lowlevel: blurry: expected {images.shape[0]} images like the reconstructions "
            f"(got {blurry.shape[0]})"
        )
    low = from_uint8(blurry)
    if low.shape[-2:] != images.shape[1:3]:
        low = torch.nn.functional.interpolate(low, size=images.shape[1:3], mode="bilinear", align_corners=False)
    mixed = (1 - lowlevel_weight) * from_uint8(images) + lowlevel_weight * low
    return to_uint8(mixed)


@torch.no_grad()
def decode_lowlevel(latents: torch.Tensor, vae: torch.nn.Module, scaling_factor: float | None = None) -> np.ndarray:
    """Decode the model's low-level head output (a VAE latent) into blurry images.

    Parameters
    ----------
    latents : torch.Tensor of shape (B, C, h, w)
        Output of the low-level head, in the VAE's scaled latent space (MindEye2: SD-VAE latent
        of a 224 px image, C=4, h=w=28).
    vae : diffusers.AutoencoderKL
        The decoder of that latent space.
    scaling_factor : float, optional
        Latent scale; defaults to ``vae.config.scaling_factor``.

    Returns
    -------
    numpy.ndarray of uint8, shape (B, f h, f w, 3)
        ``f`` is the VAE's upsampling factor (8 for the SD/SDXL VAE).
    """
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    param = next(vae.parameters())
    images = vae.decode(latents.to(param.device, param.dtype) / scale).sample
    return to_uint8(images)


def lowlevel_vae_for(generator: Generator, channels: int) -> torch.nn.Module | None:
    """The VAE that turns a ``channels``-channel low-level output into pixels for ``generator``.

    A generator with a VAE of that many latent channels (unCLIP: the SDXL VAE, 4) decodes latents
    with it; a 3-channel output is an RGB image and needs none.

    Parameters
    ----------
    generator : Generator
    channels : int
        ``model.lowlevel_channels`` of the model whose low-level head is blended in.

    Returns
    -------
    diffusers.AutoencoderKL or None
        ``None``: the output is an RGB image (:func:`lowlevel_images` without a VAE).

    Raises
    ------
    ConfigError
        When the output is a latent that the generator has no VAE for.
    """
    vae = getattr(generator, "vae", None)
    if vae is not None and getattr(vae.config, "latent_channels", None) == channels:
        return vae
    if channels == RGB_CHANNELS:
        return None
    have = "no VAE" if vae is None else f"a VAE of {getattr(vae.config, 'latent_channels', '?')} latent channels"
    raise ConfigError(
        f"model.lowlevel_channels: the low-level head gives {channels}-channel latents but generator "
        f"{generator.name!r} has {have} to decode them; set generator.lowlevel_weight: 0 to leave them out"
    )


def lowlevel_images(lowlevel: torch.Tensor, vae: torch.nn.Module | None = None) -> np.ndarray:
    """The low-level head's output as uint8 images.

    Parameters
    ----------
    lowlevel : torch.Tensor of shape (B, C, S, S)
        Without ``vae``: an RGB image (C = 3) in [-1, 1], the generators' pixel range. With it: a
        latent in the VAE's scaled latent space, decoded as :func:`decode_lowlevel` does.
    vae : diffusers.AutoencoderKL, optional
        From :func:`lowlevel_vae_for`.

    Returns
    -------
    numpy.ndarray of uint8, shape (B, S', S', 3)
        ``S' = S`` for RGB, ``f S`` for latents (``f``: the VAE's upsampling factor).
    """
    if vae is not None:
        return decode_lowlevel(lowlevel, vae)
    if lowlevel.ndim != 4 or lowlevel.shape[1] != RGB_CHANNELS:
        raise DecoderError(
            f"lowlevel_images: expected (B, 3, S, S) RGB without a VAE (got {tuple(lowlevel.shape)})"
        )
    return to_uint8(lowlevel)
