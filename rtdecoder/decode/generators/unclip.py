"""MindEye2's SDXL unCLIP generator, converted from Stability's ``generative-models`` checkpoint.

MindEye2 renders its 256x1664 OpenCLIP bigG tokens with an SDXL UNet fine-tuned to take them as
cross-attention context. The released checkpoint is in ``generative-models`` ("sgm") layout::

    model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight   (UNet)
    first_stage_model.decoder.up.3.block.0.conv1.weight                              (VAE)
    conditioner.embedders.*                                                          (not used)

This module renames those keys into a diffusers :class:`~diffusers.UNet2DConditionModel` and
:class:`~diffusers.AutoencoderKL` (the renaming is derived from the two libraries' module
layouts: sgm numbers its blocks in one flat list, diffusers nests them per resolution level), and
samples with the reference setting: Euler on the SDXL noise schedule, classifier-free guidance 5
with random-noise tokens as the unconditional context. The 1024-d vector condition holds only the
original-size and crop embeddings (4 x 256 sinusoidal features), which diffusers' ``text_time``
addition embedding computes when the pooled text embedding is empty.

Few-step sampling uses the same sampler with ``timestep_spacing="trailing"``, so even one step
starts from pure noise (``"leading"`` would start a 1-step schedule at t=1, an almost clean image).

A distilled student (:mod:`rtdecoder.decode.generators.distill_unclip`, ``rtdecoder engines
distill-unclip``) is a diffusers folder of the same layout: :func:`load_unclip_student` reads it,
and it samples with the same Euler sampler, without guidance (it was folded in), at
``generator.student_steps`` steps.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtdecoder.decode.generators.base import check_steps, check_tokens, to_uint8
from rtdecoder.errors import BundleError, DecoderError

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
#: A student folder's record of how it was distilled; written last, so its presence marks a complete folder.
STUDENT_META_NAME = "distillation.json"
VAE_PREFIX = "first_stage_model."

# sgm ResBlock -> diffusers ResnetBlock2D.
_RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# ldm VAE attention (1x1 convolutions) -> diffusers Attention (linear layers).
_VAE_ATTENTION_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def sdxl_unclip_unet_config(image_size_px: int = 768, context_dim: int = 1664) -> dict[str, Any]:
    """Diffusers config of MindEye2's unCLIP UNet (SDXL layout, bigG-token context).

    Parameters
    ----------
    image_size_px : int, default=768
        Output side; the latent is 8x smaller.
    context_dim : int, default=1664
        Width of the cross-attention tokens (OpenCLIP bigG).
    """
    return {
        "sample_size": image_size_px // 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": context_dim,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 1024,
        "norm_num_groups": 32,
    }


def sdxl_vae_config() -> dict[str, Any]:
    """Diffusers config of the SDXL VAE (8x downsampling, 4 latent channels)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


def sdxl_scheduler_config() -> dict[str, Any]:
    """EulerDiscreteScheduler config: SDXL's training noise schedule, trailing spacing."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
    }


def _unet_prefix_map(config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """sgm module prefix -> (diffusers prefix, kind); kind picks the inner renaming."""
    n_levels = len(config["block_out_channels"])
    n_layers = config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    mapping = {
        "time_embed.0": ("time_embedding.linear_1", "plain"),
        "time_embed.2": ("time_embedding.linear_2", "plain"),
        "label_emb.0.0": ("add_embedding.linear_1", "plain"),
        "label_emb.0.2": ("add_embedding.linear_2", "plain"),
        "input_blocks.0.0": ("conv_in", "plain"),
        "middle_block.0": ("mid_block.resnets.0", "resnet"),
        "middle_block.1": ("mid_block.attentions.0", "plain"),
        "middle_block.2": ("mid_block.resnets.1", "resnet"),
        "out.0": ("conv_norm_out", "plain"),
        "out.2": ("conv_out", "plain"),
    }
    # sgm: input_blocks = [conv_in] + per level (n_layers x [res, attn?]) + [downsample] except last.
    for level in range(n_levels):
        first = 1 + level * (n_layers + 1)
        for j in range(n_layers):
            mapping[f"input_blocks.{first + j}.0"] = (f"down_blocks.{level}.resnets.{j}", "resnet")
            if down_attn[level]:
                mapping[f"input_blocks.{first + j}.1"] = (f"down_blocks.{level}.attentions.{j}", "plain")
        if level < n_levels - 1:
            mapping[f"input_blocks.{first + n_layers}.0"] = (f"down_blocks.{level}.downsamplers.0", "down")
    # sgm: output_blocks = per level, deepest first, (n_layers + 1) x [res, attn?, upsample at end].
    for level in range(n_levels):
        for j in range(n_layers + 1):
            index = level * (n_layers + 1) + j
            mapping[f"output_blocks.{index}.0"] = (f"up_blocks.{level}.resnets.{j}", "resnet")
            if up_attn[level]:
                mapping[f"output_blocks.{index}.1"] = (f"up_blocks.{level}.attentions.{j}", "plain")
            if j == n_layers and level < n_levels - 1:
                slot = 2 if up_attn[level] else 1
                mapping[f"output_blocks.{index}.{slot}"] = (f"up_blocks.{level}.upsamplers.0", "plain")
    return mapping


def convert_unet_state_dict(sgm_unet: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename an sgm UNet state dict (keys without ``model.diffusion_model.``) to diffusers keys.

    Parameters
    ----------
    sgm_unet : dict of str to torch.Tensor
        ``input_blocks.*``, ``middle_block.*``, ``output_blocks.*``, ``time_embed.*``,
        ``label_emb.*``, ``out.*``.
    config : dict
        The diffusers UNet2DConditionModel config the weights are for.

    Returns
    -------
    dict of str to torch.Tensor
        Keys of ``UNet2DConditionModel(**config).state_dict()``.

    Raises
    ------
    BundleError
        When a key belongs to no module of that layout.
    """
    mapping = _unet_prefix_map(config)
    converted = {}
    for key, value in sgm_unet.items():
        parts = key.split(".")
        # Module prefixes are 2 or 3 dotted parts deep; try the longest first.
        for depth in (3, 2):
            prefix = ".".join(parts[:depth])
            if prefix in mapping:
                break
        else:
            raise BundleError(f"unet: key {key!r}: no module of the configured UNet layout matches it")
        target, kind = mapping[prefix]
        rest = ".".join(parts[depth:])
        if kind == "resnet":
            for old, new in _RESNET_RENAMES.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
        elif kind == "down":
            rest = rest.replace("op.", "conv.", 1)
        converted[f"{target}.{rest}"] = value
    return converted


def convert_vae_state_dict(sgm_vae: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename an ldm VAE state dict (keys without ``first_stage_model.``) to diffusers keys.

    The mid-block attention's 1x1 convolution weights (C, C, 1, 1) become linear weights (C, C).
    """
    n_levels = len(config["block_out_channels"])
    converted = {}
    for key, value in sgm_vae.items():
        parts = key.split(".")
        side = parts[0]
        if side not in ("encoder", "decoder"):
            converted[key] = value  # quant_conv, post_quant_conv
            continue
        head = parts[1]
        if head in ("down", "up"):
            level = int(parts[2])
            # ldm numbers decoder levels from the lowest resolution's end; diffusers from the top.
            block = f"down_blocks.{level}" if head == "down" else f"up_blocks.{n_levels - 1 - level}"
            if parts[3] == "block":
                rest = ".".join(parts[5:]).replace("nin_shortcut", "conv_shortcut")
                new = f"{side}.{block}.resnets.{parts[4]}.{rest}"
            else:  # downsample / upsample
                sampler = "downsamplers" if head == "down" else "upsamplers"
                new = f"{side}.{block}.{sampler}.0.{'.'.join(parts[4:])}"
        elif head == "mid":
            module = parts[2]
            rest = ".".join(parts[3:])
            if module.startswith("block_"):
                rest = rest.replace("nin_shortcut", "conv_shortcut")
                new = f"{side}.mid_block.resnets.{int(module[-1]) - 1}.{rest}"
            else:
                name, leaf = rest.rsplit(".", 1)
                new = f"{side}.mid_block.attentions.0.{_VAE_ATTENTION_RENAMES[name]}.{leaf}"
                if name != "norm" and leaf == "weight":
                    value = value.reshape(value.shape[0], value.shape[1])
        elif head == "norm_out":
            new = f"{side}.conv_norm_out.{'.'.join(parts[2:])}"
        else:  # conv_in, conv_out
            new = key
        converted[new] = value
    return converted


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.ckpt``/``.pt`` checkpoint into a flat state dict (on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: unCLIP checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    payload = torch.load(str(path), map_location="cpu", weights_only=True)
    return payload.get("state_dict", payload)


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a generative-models state dict into (UNet, VAE) parts with their prefixes removed."""
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    vae = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    ignored = len(state) - len(unet) - len(vae)
    if ignored:
        logger.info("unCLIP checkpoint: %d keys outside the UNet and VAE (conditioner etc.) not used", ignored)
    return unet, vae


def _load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], who: str, path: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"{path}: {who}: keys do not match the configured layout "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise BundleError(
                f"{path}: {who}: {key}: expected shape {tuple(expected[key].shape)} (got {tuple(value.shape)})"
            )
    model.load_state_dict(weights, assign=True)


def load_unclip_models(
    checkpoint: str | Path | dict[str, torch.Tensor],
    unet_config: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Build the diffusers UNet and VAE from a generative-models unCLIP checkpoint.

    Parameters
    ----------
    checkpoint : path or dict
        The checkpoint file, or its already-read state dict.
    unet_config, vae_config : dict, optional
        Diffusers configs; default to :func:`sdxl_unclip_unet_config` and :func:`sdxl_vae_config`.

    Returns
    -------
    (UNet2DConditionModel, AutoencoderKL), in eval mode.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    origin = "<state dict>" if isinstance(checkpoint, dict) else str(checkpoint)
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    sgm_unet, sgm_vae = split_checkpoint(state)
    if not sgm_unet:
        raise BundleError(f"{origin}: no '{UNET_PREFIX}*' keys; expected a generative-models checkpoint")
    unet_config = unet_config or sdxl_unclip_unet_config()
    vae_config = vae_config or sdxl_vae_config()
    # Build on the meta device: the real checkpoint is 18 GB, weights are assigned, not copied.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    _load_into(unet, convert_unet_state_dict(sgm_unet, unet_config), "unet", origin)
    if sgm_vae:
        _load_into(vae, convert_vae_state_dict(sgm_vae, vae_config), "vae", origin)
    else:
        raise BundleError(f"{origin}: no '{VAE_PREFIX}*' keys; expected the VAE in the checkpoint")
    return unet.eval(), vae.eval()


class UnclipGenerator:
    """MindEye2 unCLIP sampling: Euler + CFG with random-noise unconditional tokens.

    Parameters
    ----------
    unet : UNet2DConditionModel
        Cross-attention on (B, T, D) tokens, ``text_time`` vector condition of 4 x 256.
    vae : AutoencoderKL
    image_size_px : int, default=768
    guidance_scale : float, default=5.0
        1 disables guidance (one UNet pass per step instead of two).
    scheduler_config : dict, optional
        Defaults to :func:`sdxl_scheduler_config`.
    name : str, default="unclip"
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        image_size_px: int = 768,
        guidance_scale: float = 5.0,
        scheduler_config: dict[str, Any] | None = None,
        name: str = "unclip",
    ) -> None:
        self.unet = unet
        self.vae = vae
        self.image_size_px = image_size_px
        self.guidance_scale = guidance_scale
        self.scheduler_config = scheduler_config or sdxl_scheduler_config()
        self.name = name

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, n_steps: int, seed: int) -> np.ndarray:
        """Render (B, T, D) tokens into uint8 (B, H, W, 3) images; see :class:`Generator`."""
        from diffusers import EulerDiscreteScheduler

        check_tokens(tokens, None, self.unet.config.cross_attention_dim, self.name)
        check_steps(n_steps, self.name)
        param = next(self.unet.parameters())
        device, dtype = param.device, param.dtype
        batch = tokens.shape[0]
        scheduler = EulerDiscreteScheduler(**self.scheduler_config)
        scheduler.set_timesteps(n_steps, device=device)
        generator = torch.Generator("cpu").manual_seed(seed)
        side = self.image_size_px // 2 ** (len(self.vae.config.block_out_channels) - 1)  # SDXL: /8
        latents = torch.randn((batch, self.unet.config.in_channels, side, side), generator=generator)
        latents = (latents * scheduler.init_noise_sigma).to(device, dtype)
        context = tokens.to(device, dtype)
        guided = self.guidance_scale != 1.0
        if guided:
            uncond = torch.randn(tokens.shape, generator=generator).to(device, dtype)
            context = torch.cat([uncond, context])
        rows = context.shape[0]
        # Vector condition: original size (H, W) and crop top-left (0, 0), as in the reference.
        time_ids = torch.tensor([[self.image_size_px, self.image_size_px, 0, 0]], device=device, dtype=dtype)
        added = {"text_embeds": torch.zeros(rows, 0, device=device, dtype=dtype),
                 "time_ids": time_ids.expand(rows, -1)}
        for t in scheduler.timesteps:
            model_in = torch.cat([latents] * 2) if guided else latents
            model_in = scheduler.scale_model_input(model_in, t)
            noise = self.unet(model_in, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            if guided:
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + self.guidance_scale * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return to_uint8(images)


def _load_diffusers_part(cls: type, folder: Path, part: str) -> torch.nn.Module:
    """One diffusers model from ``folder/part`` (config.json + diffusion_pytorch_model*.safetensors, shards too).

    Built on the meta device and given the file's tensors, as :func:`load_unclip_models` does: no
    random initialisation of 2.5 B parameters first, and no second copy in memory.
    """
    from safetensors.torch import load_file

    where = folder / part
    # The one file or its shards; not variants such as diffusion_pytorch_model.fp16.safetensors.
    files = sorted(p for p in where.glob("diffusion_pytorch_model*.safetensors")
                   if re.fullmatch(r"diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors", p.name))
    if not (where / "config.json").is_file() or not files:
        raise BundleError(f"{folder}: expected a diffusers folder with {part}/config.json and "
                          f"{part}/diffusion_pytorch_model.safetensors")
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(where))
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        weights.update(load_file(str(path)))
    _load_into(model, weights, part, str(where))
    return model


def load_unclip_folder(folder: str | Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Read a diffusers folder with ``unet/`` and ``vae/`` (as :func:`save_diffusers_folder` writes it).

    Returns
    -------
    (UNet2DConditionModel, AutoencoderKL), float32 on the CPU, in eval mode.

    Raises
    ------
    BundleError
        When a part is missing or is not an image-token unCLIP UNet (cross-attention and the
        ``text_time`` vector condition).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    unet = _load_diffusers_part(UNet2DConditionModel, folder, "unet")
    vae = _load_diffusers_part(AutoencoderKL, folder, "vae")
    if unet.config.cross_attention_dim is None or unet.config.addition_embed_type != "text_time":
        raise BundleError(f"{folder / 'unet'}: not an unCLIP UNet (expected cross-attention on image tokens and "
                          "addition_embed_type 'text_time')")
    return unet.float().eval(), vae.float().eval()


def load_unclip_teacher(source: str | Path, image_size_px: int = 768) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The (UNet, VAE) of a generative-models checkpoint file (SDXL layout) or of a diffusers folder."""
    if Path(source).is_dir():
        return load_unclip_folder(source)
    return load_unclip_models(source, sdxl_unclip_unet_config(image_size_px))


def load_unclip_generator(
    checkpoint: str | Path,
    image_size_px: int = 768,
    guidance_scale: float = 5.0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UnclipGenerator:
    """Wrap a generative-models unCLIP checkpoint (converted) or a diffusers folder as a :class:`UnclipGenerator`."""
    if image_size_px % 8:
        raise DecoderError(f"unclip: image_size_px: expected a multiple of 8 (got {image_size_px})")
    unet, vae = load_unclip_teacher(checkpoint, image_size_px)
    return UnclipGenerator(unet.to(device, dtype), vae.to(device, dtype), image_size_px, guidance_scale)


def load_unclip_student(
    folder: str | Path,
    image_size_px: int = 768,
    student_steps: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UnclipGenerator:
    """A distilled unCLIP student (``generator.unclip_student_path``) as an unguided :class:`UnclipGenerator`.

    Parameters
    ----------
    folder : str or Path
        What ``rtdecoder engines distill-unclip --out`` wrote: ``unet/``, ``vae/``, ``distillation.json``.
    image_size_px : int, default=768
        Output side; a size other than the one it was distilled at is logged (it still runs).
    student_steps : int, optional
        The steps it will be run at (``generator.student_steps``); others than it was distilled
        for are logged.
    device : str, default="cpu"
    dtype : torch.dtype, default=torch.float32

    Raises
    ------
    BundleError
        When the folder, its record or its models are missing (naming ``generator.unclip_student_path``).
    """
    folder = Path(folder)
    meta_path = folder / STUDENT_META_NAME
    if not meta_path.is_file():
        raise BundleError(
            f"{folder}: generator.unclip_student_path: no distilled student here (expected {STUDENT_META_NAME}, "
            "unet/ and vae/ from 'rtdecoder engines distill-unclip --out'); unset the key to use the teacher"
        )
    meta = json.loads(meta_path.read_text())
    if student_steps is not None and meta.get("steps") != student_steps:
        logger.warning("%s: distilled for %s steps, run at %d (generator.student_steps)", folder, meta.get("steps"),
                       student_steps)
    if meta.get("image_size_px") not in (None, image_size_px):
        logger.warning("%s: distilled at %s px, run at %d px (generator.image_size_px)", folder,
                       meta.get("image_size_px"), image_size_px)
    unet, vae = load_unclip_folder(folder)
    # No guidance: the teacher's guidance was folded into the student's first round.
    return UnclipGenerator(unet.to(device, dtype), vae.to(device, dtype), image_size_px, 1.0, name="unclip-student")


def save_diffusers_folder(unet: torch.nn.Module, vae: torch.nn.Module, folder: str | Path) -> None:
    """Write converted models as diffusers folders ``unet/`` and ``vae/`` plus the scheduler config."""
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler_config.json").write_text(json.dumps(sdxl_scheduler_config(), indent=2) + "\n")
