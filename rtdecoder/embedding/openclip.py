"""OpenCLIP ViT image embedder (ViT-bigG/14 is MindEye2's target), from a local weights file.

Which tokens
------------
MindEye2 predicts what its reference embedder (open_clip 2.24 ``VisionTransformer`` with
``output_tokens=True``) returns as tokens: the **last transformer layer's patch tokens after
``ln_post``, without the CLS token and without the output projection** (``proj`` only maps the
pooled CLS token to the 1280-d contrastive space; the tokens keep the width, 1664 for bigG). For
bigG at 224 px that is 16 x 16 = 256 tokens of 1664, row-major over the patch grid. This module
returns exactly those (taken from open_clip's own forward pass). ``pooled`` is the CLS token
after ``ln_post``, also unprojected, so it lives in the same 1664-d space as the tokens; CLIP's
contrastive image embedding would be ``pooled @ proj``.

Only the vision tower is built (the bigG text tower is 0.7 B parameters that would go unused);
from a full CLIP checkpoint only the ``visual.*`` weights are read. Nothing is ever downloaded:
the architecture comes from open_clip's bundled configs (or a JSON file) and the weights from
``embedding.weights_path``.

Preprocessing: pixels in [0, 1] (mapped with ``(x + 1) / 2`` first under
``image_range="minus_one_one"``, see :mod:`rtdecoder.embedding.base`), resized to the model's input
size if needed, then normalised with the model's mean/std (OpenAI's for the LAION bigG). The
reference resizes with kornia (bicubic, ``align_corners=True``); here torch's antialiased bicubic
is used, so only 224 px inputs (MindEye2's stored images are 224 px) match the reference bit for
bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from rtdecoder.embedding.base import (
    Embedding,
    ImageRange,
    check_batch_size,
    check_image_range,
    check_images,
    file_fingerprint,
    to_model_input,
)
from rtdecoder.errors import BundleError, ConfigError

logger = logging.getLogger(__name__)

_VISUAL_PREFIX = "visual."


def resolve_model_config(arch: str) -> dict[str, Any]:
    """The OpenCLIP model config (``embed_dim``, ``vision_cfg``, ...) for an architecture.

    Parameters
    ----------
    arch : str
        A name bundled with open_clip (``"ViT-bigG-14"``) or the path of a JSON file in
        open_clip's config format (optionally wrapped as ``{"model_cfg": {...}}``). Hub names
        (``hf-hub:...``) are refused: nothing is downloaded.

    Returns
    -------
    dict

    Raises
    ------
    ConfigError
        If the name is unknown, the file unreadable, or it has no ``vision_cfg``.
    """
    if arch.endswith(".json"):
        path = Path(arch)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: embedding.openclip_arch: cannot read model config JSON: {err}") from None
        config = config.get("model_cfg", config)
        origin = str(path)
    else:
        if ":" in arch:
            raise ConfigError(
                f"embedding.openclip_arch: {arch!r} names a remote or schema source; expected a "
                "bundled open_clip architecture name or a local .json model config"
            )
        import open_clip

        config = open_clip.get_model_config(arch)
        if config is None:
            raise ConfigError(
                f"embedding.openclip_arch: unknown OpenCLIP architecture {arch!r}; expected a "
                "name from open_clip.list_models() (e.g. 'ViT-bigG-14') or a .json model config"
            )
        origin = "open_clip"
    if not isinstance(config, dict) or "vision_cfg" not in config or "embed_dim" not in config:
        raise ConfigError(f"{origin}: embedding.openclip_arch {arch!r}: expected 'embed_dim' and 'vision_cfg' keys")
    return config


def openclip_token_grid(model_config: dict[str, Any]) -> tuple[int, int]:
    """Tokens per image and token width a ViT config produces, without building the model.

    Returns
    -------
    (n_tokens, token_dim) : tuple of int
        ``(image_size // patch_size) ** 2`` (per axis) and the transformer width.

    Raises
    ------
    ConfigError
        If the vision tower is not a plain ViT with CLS-token pooling.
    """
    vision = model_config["vision_cfg"]
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
        raise ConfigError("embedding.openclip_arch: expected a ViT vision tower (got a timm or ResNet tower)")
    if vision.get("attentional_pool") or vision.get("pool_type", "tok") != "tok" or vision.get("final_ln_after_pool"):
        raise ConfigError(
            "embedding.openclip_arch: expected CLS-token pooling with ln_post before pooling "
            "(pool_type 'tok', no attentional_pool, final_ln_after_pool false), as MindEye2's bigG"
        )
    image = _pair(vision.get("image_size", 224))
    patch = _pair(vision.get("patch_size", 16))
    if image[0] != image[1]:
        raise ConfigError(f"embedding.openclip_arch: expected a square image_size (got {image})")
    n_tokens = (image[0] // patch[0]) * (image[1] // patch[1])
    return n_tokens, int(vision.get("width", 768))


class OpenCLIPEmbedder:
    """An OpenCLIP ViT vision tower as an :class:`~rtdecoder.embedding.base.Embedder`.

    Parameters
    ----------
    arch : str
        Architecture: an open_clip name (``"ViT-bigG-14"``) or a .json model config path; see
        :func:`resolve_model_config`. Ignored for the structure when ``model_config`` is given,
        but still part of :attr:`name`.
    weights_path : str or Path
        Local weights: a full OpenCLIP checkpoint (``visual.*`` keys are used) or a vision-tower
        state dict; ``.safetensors``, or a torch file (``.bin``/``.pt``, loaded weights-only).
    image_range : {"zero_one", "minus_one_one"}, default="zero_one"
        Input convention (see :mod:`rtdecoder.embedding.base`); ``minus_one_one`` reproduces the
        MindEye2 reference.
    device : str, default="cpu"
    batch_size : int, default=16
        Images per forward pass inside :meth:`embed`.
    model_config : dict, optional
        An open_clip model config to use instead of looking ``arch`` up.

    Attributes
    ----------
    name : str
        ``openclip[arch=...,cfg=<hash>,weights=<file>:<fingerprint>,range=...,px=...]``.
    n_tokens, token_dim : int
        256 and 1664 for ViT-bigG-14.
    model : torch.nn.Module
        The vision tower, in eval mode.
    """

    def __init__(
        self,
        arch: str,
        weights_path: str | Path,
        image_range: ImageRange = "zero_one",
        device: str = "cpu",
        batch_size: int = 16,
        model_config: dict[str, Any] | None = None,
    ) -> None:
        import torch

        self.image_range = check_image_range(image_range)
        self.batch_size = check_batch_size(batch_size, "OpenCLIPEmbedder")
        self.device = torch.device(device)
        config = resolve_model_config(arch) if model_config is None else dict(model_config)
        self.n_tokens, self.token_dim = openclip_token_grid(config)
        path = Path(weights_path)
        if not path.is_file():
            raise BundleError(f"{path}: OpenCLIP weights file not found (embedding.weights_path)")
        self.input_size_px = _pair(config["vision_cfg"].get("image_size", 224))[0]
        preprocess = config.get("preprocess_cfg", {})
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.mean = tuple(preprocess.get("mean", OPENAI_DATASET_MEAN))
        self.std = tuple(preprocess.get("std", OPENAI_DATASET_STD))
        self.model = self._build(config, arch).eval()
        self._load_weights(path, arch)
        self.model.to(self.device)
        config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        self.name = (
            f"openclip[arch={Path(arch).stem if arch.endswith('.json') else arch},cfg={config_hash},"
            f"weights={path.name}:{file_fingerprint(path)},range={self.image_range},"
            f"px={self.input_size_px}]"
        )
        logger.info("loaded %s (%d tokens of %d)", self.name, self.n_tokens, self.token_dim)

    def embed(self, images: np.ndarray) -> Embedding:
        """Embed images into the last layer's patch tokens.

        Parameters
        ----------
        images : ndarray of shape (N, H, W, 3), uint8
            RGB images; other sizes than the model's input size are resized.

        Returns
        -------
        Embedding
            ``tokens`` (N, n_tokens, token_dim): patch tokens after ``ln_post``, unprojected;
            ``pooled`` (N, token_dim): the CLS token after ``ln_post``, unprojected. float32.
        """
        import torch

        images = check_images(images)
        tokens = np.empty((len(images), self.n_tokens, self.token_dim), dtype=np.float32)
        pooled = np.empty((len(images), self.token_dim), dtype=np.float32)
        captured: list[torch.Tensor] = []
        # ln_post's output holds the CLS token before open_clip projects it away
        hook = self.model.ln_post.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with torch.no_grad():
                for start in range(0, len(images), self.batch_size):
                    batch = images[start : start + self.batch_size]
                    x = to_model_input(
                        batch, self.image_range, self.mean, self.std, self.input_size_px, self.device
                    )
                    captured.clear()
                    _projected, patch_tokens = self.model(x)  # (B, T, D) after ln_post
                    tokens[start : start + len(batch)] = patch_tokens.float().cpu().numpy()
                    pooled[start : start + len(batch)] = captured[-1][:, 0].float().cpu().numpy()
        finally:
            hook.remove()
        return Embedding(tokens=tokens, pooled=pooled)

    def _build(self, config: dict[str, Any], arch: str):
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        vision = dict(config["vision_cfg"], output_tokens=True)
        try:
            vision_cfg = CLIPVisionCfg(**vision)
        except TypeError as err:
            raise ConfigError(
                f"embedding.openclip_arch {arch!r}: vision_cfg does not fit this open_clip: {err}"
            ) from None
        import torch

        # built without memory or random init: bigG's 1.8 B parameters are replaced by the
        # file's at once (load_state_dict(assign=True)), halving peak memory
        with torch.device("meta"):
            return _build_vision_tower(
                int(config["embed_dim"]), vision_cfg, quick_gelu=bool(config.get("quick_gelu", False))
            )

    def _load_weights(self, path: Path, arch: str) -> None:
        state = _read_visual_state(path)
        expected = self.model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        mismatched = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and tuple(state[k].shape) != tuple(v.shape)
        ]
        if missing or unexpected or mismatched:
            raise BundleError(
                f"{path}: weights do not fit OpenCLIP {arch!r} vision tower: "
                f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                f"{unexpected[:3]}, {len(mismatched)} shape mismatches {mismatched[:3]}"
            )
        import torch

        state = {k: v.float() if torch.is_floating_point(v) else v for k, v in state.items()}
        self.model.load_state_dict(state, strict=True, assign=True)
        left = [name for name, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if left:
            raise BundleError(f"{path}: OpenCLIP {arch!r} tensors not set by the weights file: {left[:3]}")


def _read_visual_state(path: Path) -> dict[str, Any]:
    """Vision-tower tensors of a weights file, keys without the ``visual.`` prefix."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                has_prefix = any(k.startswith(_VISUAL_PREFIX) for k in keys)
                # read only the vision tower: a full bigG checkpoint is 10 GB
                wanted = [k for k in keys if k.startswith(_VISUAL_PREFIX)] if has_prefix else keys
                state = {k: handle.get_tensor(k) for k in wanted}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except Exception as err:  # safetensors and torch raise several unrelated types
        raise BundleError(f"{path}: cannot read OpenCLIP weights: {err}") from None
    if not isinstance(state, dict):
        raise BundleError(f"{path}: expected a state dict of tensors (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith(_VISUAL_PREFIX) for k in state):
        state = {k[len(_VISUAL_PREFIX):]: v for k, v in state.items() if k.startswith(_VISUAL_PREFIX)}
    return state


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)
