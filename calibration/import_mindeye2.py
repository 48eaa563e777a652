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

Not imported (reported in :class:`ImportReport`, the built model has ``use_prior=False`` and
``lowlevel=False``): the diffusion prior, whose DALL-E 2 network (multi-query attention, rotary
and relative position terms, SwiGLU without biases) is a different architecture from ours, and
the low-level head, whose diffusers VAE decoder differs from our small conv decoder.

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

from rtdecoder.config import ModelConfig
from rtdecoder.decode.model import MindEye2
from rtdecoder.errors import BundleError, ConfigError, DecoderError

log = logging.getLogger(__name__)

_ADAPTER = re.compile(r"^ridge\.linears\.(\d+)\.weight$")
_MIXER1 = re.compile(r"^backbone\.mixer_blocks1\.(\d+)\.")
_CLIP_LINEAR = re.compile(r"^backbone\.clip_proj\.(\d+)\.weight$")
_LOWLEVEL_PREFIXES = (
    "backbone.blin1.", "backbone.bnorm.", "backbone.bupsampler.", "backbone.b_maps_projector.",
)
_PRIOR_PREFIX = "diffusion_prior."


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
        Part (``"diffusion_prior"``, ``"lowlevel"``, ``"mixer_blocks1"``) -> tensors left out.
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
        In eval mode; ``n_blocks=0``, ``use_prior=False``, ``lowlevel=False``.
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
        clip_head_layers=len(clip_linears), lowlevel=False, use_prior=False,
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
    try:
        model.load_state_dict(new, strict=True)
    except RuntimeError as err:
        raise BundleError(f"{origin}: tensor shapes do not fit the inferred sizes: {err}") from None

    skipped = {"diffusion_prior": 0, "lowlevel": 0, "mixer_blocks1": 0}
    unknown = []
    for key in state:
        if key in used:
            continue
        if key.startswith(_PRIOR_PREFIX):
            skipped["diffusion_prior"] += 1
        elif key.startswith(_LOWLEVEL_PREFIXES):
            skipped["lowlevel"] += 1
        elif _MIXER1.match(key):
            skipped["mixer_blocks1"] += 1  # their output is discarded by the reference forward
        else:
            unknown.append(key)
    if unknown:
        raise BundleError(f"{origin}: unexpected keys for the MindEyeV2 layout: {sorted(unknown)[:8]}")
    report = ImportReport(subjects, n_dead, shift, len(used), {k: v for k, v in skipped.items() if v})
    log.info(
        "imported %d tensors for %s; folded %d dead blocks (shift %.6g); left out %s",
        len(used), list(subjects), n_dead, shift, report.skipped or "nothing",
    )
    return model.eval(), report


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
        Where to :meth:`~MindEye2.save_pretrained` the result.
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
    """``python -m calibration.import_mindeye2 last.pth OUT_DIR --subjects subj02 ...``."""
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
