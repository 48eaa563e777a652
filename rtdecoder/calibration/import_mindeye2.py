"""Import a released MindEyeV2 checkpoint (``last.pth``) into :class:`MindEye2`.

The released file is a ``torch.save`` dict whose ``model_state_dict`` holds (reference layout,
``seq_len`` 1)::

    ridge.linears.{i}.weight / .bias               (H, V_i) / (H,)   one per subject
    backbone.mixer_blocks1.{k}.0.weight / .bias    LayerNorm(H)
    backbone.mixer_blocks1.{k}.1.{0,3}.weight/bias Linear(H, H), GELU, Dropout, Linear(H, H)
    backbone.mixer_blocks2.{k}.0.weight / .bias    LayerNorm(1)
    backbone.mixer_blocks2.{k}.1.{0,3}.weight/bias Linear(1, 1), GELU, Dropout, Linear(1, 1)
    backbone.backbone_linear.weight / .bias        (T*D, H)
    backbone.clip_proj.{0,3,6}.weight / .bias      LayerNorm(D)   (1, 4, 7 are GELU)
    backbone.clip_proj.{2,5,8}.weight / .bias      Linear(D, D)
    backbone.blin1 / bnorm / bupsampler / b_maps_projector ...   low-level head
    diffusion_prior.net ...                        DALL-E 2 prior network

What the released backbone computes. Its blocks alternate a block over the hidden axis
(``mixer_blocks1``) and one over the sequence axis (``mixer_blocks2``), each added to its own
running residual. With a sequence of length 1, ``mixer_blocks2``'s LayerNorm normalises a single
value, so it outputs its bias whatever the input, and the block's output is a constant ``c_k``.
Each ``x = block2(x) + residual2`` then throws away what ``mixer_blocks1`` added, so in eval mode
the whole backbone is ``x + sum_k c_k`` (one scalar added to every hidden feature), followed by
``backbone_linear``. We reproduce that exactly: ``n_blocks=0`` and the scalar folded into the
token projection's bias, ``b' = b + s * W.sum(axis=1)``.

The diffusion prior (``diffusion_prior.net``) becomes a
:class:`~rtdecoder.decode.prior_dalle2.DALLE2Prior` (``prior_network: dalle2``) sampled with the
released sampler's step grid (``prior_ddim_schedule: dalle2``, 20 grid points, eta 1); its noise
schedule and rotary frequencies are checked against ours. The low-level head (``blin1``,
``bnorm``, ``bupsampler``) becomes a :class:`~rtdecoder.decode.model.LowLevelHead` with the
diffusers VAE decoder (``lowlevel_decoder: vae``); it predicts an SD-VAE latent scaled by 0.18215.
``blin1`` reads the same shifted hidden features as ``backbone_linear``, so the constant is folded
into its bias too.
Left out, and reported in :class:`ImportReport`: ``b_maps_projector``, which only serves the
training loss against ConvNeXt features, and ``mixer_blocks1``, whose output the released forward
discards. Key maps are checked by ``tests/test_import_mindeye2.py`` against outputs of the
reference code itself (``tests/data/mindeye2_reference``).

``torch.load`` is used here only, with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from rtdecoder.config import ModelConfig
from rtdecoder.decode.model import LOWLEVEL_CHANNELS, LOWLEVEL_GRID, MindEye2
from rtdecoder.decode.prior import cosine_alphas_cumprod
from rtdecoder.decode.prior_dalle2 import ROTARY_MAX_DIM, rotary_frequencies
from rtdecoder.errors import BundleError, ConfigError, DecoderError

log = logging.getLogger(__name__)

_ADAPTER = re.compile(r"^ridge\.linears\.(\d+)\.weight$")
_MIXER1 = re.compile(r"^backbone\.mixer_blocks1\.(\d+)\.")
_CLIP_LINEAR = re.compile(r"^backbone\.clip_proj\.(\d+)\.weight$")
CONFIG_YAML = "rtdecoder-config.yaml"
_PRIOR = "diffusion_prior.net."
_PRIOR_LAYER = re.compile(r"^diffusion_prior\.net\.causal_transformer\.layers\.(\d+)\.")
_UP_BLOCK = re.compile(r"^backbone\.bupsampler\.up_blocks\.(\d+)\.")
_LOWLEVEL_PROJECTOR = "backbone.b_maps_projector."
_NOISE_SCHEDULE = "diffusion_prior.noise_scheduler."
# released layer-relative key -> ours, per prior block
_PRIOR_BLOCK_KEYS = {
    "0.null_kv": "null_kv", "0.norm.g": "attn_norm.g", "0.to_q.weight": "to_q.weight",
    "0.to_kv.weight": "to_kv.weight", "0.to_out.0.weight": "to_out.weight", "0.to_out.1.g": "out_norm.g",
    "1.0.g": "ff_norm.g", "1.1.weight": "ff_in.weight", "1.5.weight": "ff_out.weight",
}
_PRIOR_KEYS = {
    "learned_query": "image_pos_embed", "null_brain_embeds": "null_brain", "null_image_embed": "null_image",
    "to_time_embeds.0.1.net.0.0.weight": "time_mlp.0.weight", "to_time_embeds.0.1.net.0.0.bias": "time_mlp.0.bias",
    "to_time_embeds.0.1.net.1.0.weight": "time_mlp.2.weight", "to_time_embeds.0.1.net.1.0.bias": "time_mlp.2.bias",
    "to_time_embeds.0.1.net.2.weight": "time_mlp.4.weight", "to_time_embeds.0.1.net.2.bias": "time_mlp.4.bias",
    "causal_transformer.rel_pos_bias.relative_attention_bias.weight": "rel_pos_bias.weight",
    "causal_transformer.norm.g": "norm.g", "causal_transformer.project_out.weight": "project_out.weight",
}


@dataclass
class ImportReport:
    """What the importer took, folded and left out.

    Attributes
    ----------
    subjects : dict of str to int
        Adapter name -> voxel count, in the checkpoint's ``ridge.linears`` order.
    n_dead_blocks : int
        Reference mixer blocks folded into the token projection's bias.
    folded_shift : float
        The constant the dead blocks add to every hidden feature.
    imported_keys : int
        Checkpoint tensors used.
    skipped : dict of str to int
        Part (``"lowlevel_projector"``, ``"mixer_blocks1"``) -> tensors left out.
    """

    subjects: dict[str, int]
    n_dead_blocks: int
    folded_shift: float
    imported_keys: int
    skipped: dict[str, int] = field(default_factory=dict)


def load_released_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``model_state_dict`` from a released ``last.pth`` (weights only, no code runs)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise BundleError(f"{path}: cannot read checkpoint: {err}") from None
    if not isinstance(checkpoint, Mapping) or "model_state_dict" not in checkpoint:
        raise BundleError(f"{path}: model_state_dict: expected a dict holding this key")
    return dict(checkpoint["model_state_dict"])


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    subject_ids: Sequence[str] | None = None,
    dropout: float = 0.15,
    origin: str = "<state dict>",
) -> tuple[MindEye2, ImportReport]:
    """Build a :class:`MindEye2` that computes what the released network computes in eval mode.

    Parameters
    ----------
    state : mapping of str to Tensor
        The released ``model_state_dict``.
    subject_ids : sequence of str, optional
        Names for ``ridge.linears.0, 1, ...`` (the reference orders them by its subject list).
        Default ``ridge0, ridge1, ...``.
    dropout : float, default=0.15
        Recorded in the config (the imported model has no residual blocks to apply it to).
    origin : str
        Names the source in error messages.

    Returns
    -------
    model : MindEye2
        In eval mode; ``n_blocks=0``; the prior and the low-level head when the checkpoint has them.
    report : ImportReport
    """
    state = {k: v.float() for k, v in state.items()}
    n_adapters = 1 + max((int(m.group(1)) for k in state if (m := _ADAPTER.match(k))), default=-1)
    if n_adapters == 0:
        raise BundleError(f"{origin}: ridge.linears.0.weight: expected per-subject adapters")
    if subject_ids is None:
        subject_ids = [f"ridge{i}" for i in range(n_adapters)]
    if len(subject_ids) != n_adapters:
        raise ConfigError(
            f"{origin}: subject_ids: expected {n_adapters} names, one per ridge.linears (got {len(subject_ids)})"
        )
    weight = _get(state, "backbone.backbone_linear.weight", origin)
    hidden = weight.shape[1]
    token_dim = _get(state, "backbone.clip_proj.0.weight", origin).shape[0]
    if weight.shape[0] % token_dim:
        raise BundleError(
            f"{origin}: backbone.backbone_linear.weight: expected rows a multiple of {token_dim} "
            f"(got {weight.shape[0]})"
        )
    n_tokens = weight.shape[0] // token_dim
    clip_linears = sorted(int(m.group(1)) for k in state if (m := _CLIP_LINEAR.match(k)))
    clip_linears = [i for i in clip_linears if i % 3 == 2]  # LayerNorms sit at 0, 3, 6
    n_dead = 1 + max((int(m.group(1)) for k in state if (m := _MIXER1.match(k))), default=-1)

    config = ModelConfig(
        hidden_dim=hidden, n_blocks=0, dropout=dropout, n_tokens=n_tokens, token_dim=token_dim,
        clip_head_layers=len(clip_linears),
        **_prior_sizes(state, n_tokens, token_dim, origin), **_lowlevel_sizes(state, origin),
    )
    subjects = {}
    for i, subject_id in enumerate(subject_ids):
        subjects[subject_id] = _get(state, f"ridge.linears.{i}.weight", origin).shape[1]
    model = MindEye2(config, subjects)

    used: set[str] = set()
    new: dict[str, torch.Tensor] = {}
    for i, subject_id in enumerate(subject_ids):
        for part in ("weight", "bias"):
            new[f"adapters.{subject_id}.{part}"] = _take(state, f"ridge.linears.{i}.{part}", used, origin)
    shift = _dead_block_shift(state, n_dead, used, origin)
    proj_w = _take(state, "backbone.backbone_linear.weight", used, origin)
    proj_b = _take(state, "backbone.backbone_linear.bias", used, origin)
    new["token_proj.weight"] = proj_w
    new["token_proj.bias"] = proj_b + shift * proj_w.double().sum(dim=1).float()
    for layer, linear_index in enumerate(clip_linears):
        norm_index = linear_index - 2
        for part in ("weight", "bias"):
            new[f"retrieval_head.{layer}.norm.{part}"] = _take(
                state, f"backbone.clip_proj.{norm_index}.{part}", used, origin
            )
            new[f"retrieval_head.{layer}.linear.{part}"] = _take(
                state, f"backbone.clip_proj.{linear_index}.{part}", used, origin
            )
    if config.use_prior:
        new.update(_prior_weights(state, config, used, origin))
    if config.lowlevel:
        new.update(_lowlevel_weights(state, shift, used, origin))
    try:
        model.load_state_dict(new, strict=True)
    except RuntimeError as err:
        raise BundleError(f"{origin}: tensor shapes do not fit the inferred sizes: {err}") from None

    skipped = {"lowlevel_projector": 0, "mixer_blocks1": 0}
    unknown = []
    for key in state:
        if key in used:
            continue
        if key.startswith(_LOWLEVEL_PROJECTOR):
            skipped["lowlevel_projector"] += 1  # serves only the training loss on ConvNeXt features
        elif _MIXER1.match(key):
            skipped["mixer_blocks1"] += 1  # their output is discarded by the reference forward
        else:
            unknown.append(key)
    if unknown:
        raise BundleError(f"{origin}: unexpected keys for the MindEyeV2 layout: {sorted(unknown)[:8]}")
    report = ImportReport(subjects, n_dead, shift, len(used), {k: v for k, v in skipped.items() if v})
    log.info(
        "imported %d tensors for %s (prior: %s, low-level head: %s); folded %d dead blocks (shift %.6g); "
        "left out %s",
        len(used), list(subjects), config.use_prior, config.lowlevel, n_dead, shift, report.skipped or "nothing",
    )
    return model.eval(), report


def _prior_sizes(state: Mapping[str, torch.Tensor], n_tokens: int, token_dim: int, origin: str) -> dict:
    """ModelConfig fields for the released prior, read from its tensors' shapes ({} without one)."""
    if not any(k.startswith(_PRIOR) for k in state):
        return {"use_prior": False}
    if f"{_PRIOR}to_time_embeds.0.weight" in state:
        raise BundleError(
            f"{origin}: {_PRIOR}to_time_embeds.0.weight: a discrete time embedding; only the continuous one "
            "(sinusoidal features and an MLP, as MindEye2 trains it) can be imported"
        )
    for key in ("causal_transformer.init_norm.g", "causal_transformer.layers.0.1.3.g"):
        if _PRIOR + key in state:
            raise BundleError(f"{origin}: {_PRIOR}{key}: a prior-network option MindEye2 does not use")
    depth = 1 + max((int(m.group(1)) for k in state if (m := _PRIOR_LAYER.match(k))), default=-1)
    layer0 = f"{_PRIOR}causal_transformer.layers.0."
    dim_head = _get(state, layer0 + "0.null_kv", origin).shape[1]
    heads = _get(state, f"{_PRIOR}causal_transformer.rel_pos_bias.relative_attention_bias.weight", origin).shape[1]
    ff_rows = _get(state, layer0 + "1.1.weight", origin).shape[0]
    checks = [
        (layer0 + "0.to_q.weight", (heads * dim_head, token_dim)),
        (f"{_PRIOR}learned_query", (n_tokens, token_dim)),  # learned_query_mode "pos_emb"
    ]
    for key, shape in checks:
        if tuple(_get(state, key, origin).shape) != shape:
            raise BundleError(f"{origin}: {key}: expected shape {shape} (got {tuple(state[key].shape)})")
    if ff_rows % (2 * token_dim):
        raise BundleError(f"{origin}: {layer0}1.1.weight: expected rows a multiple of {2 * token_dim} (got {ff_rows})")
    n_timesteps = _get(state, _NOISE_SCHEDULE + "alphas_cumprod", origin).shape[0]
    return {
        "use_prior": True, "prior_network": "dalle2", "prior_ddim_schedule": "dalle2", "prior_dim": token_dim,
        "prior_depth": depth, "prior_heads": heads, "prior_dim_head": dim_head,
        "prior_ff_mult": ff_rows // (2 * token_dim), "prior_timesteps": n_timesteps,
        "prior_sample_steps": 20, "prior_sample_eta": 1.0,  # what the released inference uses
    }


def _prior_weights(
    state: Mapping[str, torch.Tensor], config: ModelConfig, used: set[str], origin: str
) -> dict[str, torch.Tensor]:
    """Map ``diffusion_prior.net`` onto ``prior.``; check the schedule and rotary frequencies."""
    new = {f"prior.{ours}": _take(state, _PRIOR + theirs, used, origin) for theirs, ours in _PRIOR_KEYS.items()}
    expected_freqs = rotary_frequencies(min(ROTARY_MAX_DIM, config.prior_dim_head))
    for i in range(config.prior_depth):
        layer = f"{_PRIOR}causal_transformer.layers.{i}."
        for theirs, ours in _PRIOR_BLOCK_KEYS.items():
            new[f"prior.blocks.{i}.{ours}"] = _take(state, layer + theirs, used, origin)
        freqs = _take(state, layer + "0.rotary_emb.freqs", used, origin)
        if freqs.shape != expected_freqs.shape or not torch.allclose(freqs, expected_freqs, rtol=1e-6, atol=0):
            raise BundleError(
                f"{origin}: {layer}0.rotary_emb.freqs: expected the default rotary frequencies "
                f"(theta 10000 over {expected_freqs.numel() * 2} features)"
            )
    abar = _take(state, _NOISE_SCHEDULE + "alphas_cumprod", used, origin)
    ours = cosine_alphas_cumprod(config.prior_timesteps).float()
    if not torch.allclose(abar, ours, rtol=0, atol=1e-6):
        raise BundleError(
            f"{origin}: {_NOISE_SCHEDULE}alphas_cumprod: expected the cosine schedule over "
            f"{config.prior_timesteps} steps (max difference {float((abar - ours).abs().max()):.3g})"
        )
    used.update(k for k in state if k.startswith(_NOISE_SCHEDULE))  # all derived from alphas_cumprod
    return new


def _lowlevel_sizes(state: Mapping[str, torch.Tensor], origin: str) -> dict:
    """ModelConfig fields for the released low-level head ({"lowlevel": False} without one)."""
    if "backbone.blin1.weight" not in state:
        return {"lowlevel": False}
    rows = state["backbone.blin1.weight"].shape[0]
    if rows != LOWLEVEL_CHANNELS * LOWLEVEL_GRID**2:
        raise BundleError(
            f"{origin}: backbone.blin1.weight: expected {LOWLEVEL_CHANNELS * LOWLEVEL_GRID**2} rows "
            f"({LOWLEVEL_CHANNELS}x{LOWLEVEL_GRID}x{LOWLEVEL_GRID}) (got {rows})"
        )
    n_blocks = 1 + max((int(m.group(1)) for k in state if (m := _UP_BLOCK.match(k))), default=-1)
    top = _get(state, "backbone.bupsampler.conv_in.weight", origin).shape[0]
    if n_blocks < 1 or top != 32 * 2 ** (n_blocks - 1):
        raise BundleError(
            f"{origin}: backbone.bupsampler: expected decoder blocks of widths 32, 64, ... "
            f"(got {n_blocks} blocks, widest {top})"
        )
    channels = _get(state, "backbone.bupsampler.conv_out.weight", origin).shape[0]
    return {"lowlevel": True, "lowlevel_decoder": "vae", "lowlevel_channels": channels,
            "lowlevel_upsamples": n_blocks - 1}


def _lowlevel_weights(
    state: Mapping[str, torch.Tensor], shift: float, used: set[str], origin: str
) -> dict[str, torch.Tensor]:
    """Map ``blin1``, ``bnorm`` and ``bupsampler`` onto ``lowlevel_head.``.

    ``blin1`` reads the backbone's hidden features after the dead blocks, so the constant they
    add is folded into its bias as into the token projection's.
    """
    renames = {"backbone.blin1.": "lowlevel_head.linear.", "backbone.bnorm.": "lowlevel_head.norm.",
               "backbone.bupsampler.": "lowlevel_head.decoder."}
    new = {}
    for key in state:
        for theirs, ours in renames.items():
            if key.startswith(theirs):
                new[ours + key[len(theirs):]] = _take(state, key, used, origin)
    linear_w = new["lowlevel_head.linear.weight"]
    new["lowlevel_head.linear.bias"] = new["lowlevel_head.linear.bias"] + shift * linear_w.double().sum(dim=1).float()
    return new


def import_mindeye2(
    checkpoint_path: str | Path,
    out_dir: str | Path | None = None,
    subject_ids: Sequence[str] | None = None,
) -> tuple[MindEye2, ImportReport]:
    """Read a released ``last.pth``, convert it, and optionally save it as a model folder.

    Parameters
    ----------
    checkpoint_path : str or Path
    out_dir : str or Path, optional
        Where to :meth:`~MindEye2.save_pretrained` the result. Beside it goes
        ``rtdecoder-config.yaml``: the ``nsd`` preset with this model's sizes, the config that
        ``rtdecoder calibrate --pretrained OUT`` needs (its model section must match the folder's).
    subject_ids : sequence of str, optional
        See :func:`convert_state_dict`.

    Returns
    -------
    model : MindEye2
    report : ImportReport
    """
    state = load_released_state_dict(checkpoint_path)
    model, report = convert_state_dict(state, subject_ids, origin=str(checkpoint_path))
    if out_dir is not None:
        model.save_pretrained(out_dir)
        config = {
            "preset": "nsd",
            "embedding": {"n_tokens": model.config.n_tokens, "token_dim": model.config.token_dim},
            "model": model.config.model_dump(mode="json"),
        }
        header = f"# The nsd preset with the sizes of the model imported from {Path(checkpoint_path).name}.\n"
        (Path(out_dir) / CONFIG_YAML).write_text(header + yaml.safe_dump(config, sort_keys=False))
    return model, report


def _dead_block_shift(
    state: Mapping[str, torch.Tensor], n_blocks: int, used: set[str], origin: str
) -> float:
    """Sum over blocks of ``mlp2_k(LayerNorm2_k.bias)``: the constant the backbone adds."""
    total = torch.zeros((), dtype=torch.float64)
    for k in range(n_blocks):
        prefix = f"backbone.mixer_blocks2.{k}"
        norm_w = _take(state, f"{prefix}.0.weight", used, origin)
        if norm_w.numel() != 1:
            raise BundleError(
                f"{origin}: {prefix}.0.weight: expected sequence length 1 (got {norm_w.numel()}); "
                "only single-trial checkpoints can be imported"
            )
        value = _take(state, f"{prefix}.0.bias", used, origin).double().reshape(1)
        a_w, a_b = (_take(state, f"{prefix}.1.0.{p}", used, origin).double() for p in ("weight", "bias"))
        b_w, b_b = (_take(state, f"{prefix}.1.3.{p}", used, origin).double() for p in ("weight", "bias"))
        hidden = F.gelu(a_w.reshape(1, 1) @ value + a_b)
        total = total + (b_w.reshape(1, 1) @ hidden + b_b).squeeze()
    return float(total)


def _get(state: Mapping[str, torch.Tensor], key: str, origin: str) -> torch.Tensor:
    if key not in state:
        raise BundleError(f"{origin}: {key}: missing from the checkpoint")
    return state[key]


def _take(state: Mapping[str, torch.Tensor], key: str, used: set[str], origin: str) -> torch.Tensor:
    used.add(key)
    return _get(state, key, origin)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rtdecoder.calibration.import_mindeye2 last.pth OUT_DIR --subjects subj02 ...``."""
    parser = argparse.ArgumentParser(description="Convert a released MindEyeV2 last.pth to a model folder.")
    parser.add_argument("checkpoint", help="the released last.pth")
    parser.add_argument("out_dir", help="folder to write config.json and model.safetensors into")
    parser.add_argument("--subjects", nargs="*", help="names for ridge.linears.0, 1, ... in order")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _, report = import_mindeye2(args.checkpoint, args.out_dir, args.subjects)
    except DecoderError as err:
        print(f"import_mindeye2: error: {err}", file=sys.stderr)
        return 1
    print(f"subjects {report.subjects}; folded {report.n_dead_blocks} blocks; left out {report.skipped}")
    config_path = Path(args.out_dir) / CONFIG_YAML
    print(f"calibrate with: rtdecoder calibrate --config {config_path} --pretrained {args.out_dir} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
