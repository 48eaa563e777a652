"""Export a subject's encoder and the prior denoiser to ONNX, batch size left dynamic.

Files written into one engine folder::

    encoder.onnx    betas (B, V) -> backbone_tokens (B, T, D), clip_tokens (B, T, D)[, lowlevel]
    denoiser.onnx   noisy (B, T, D), t (B,) int64, brain (B, T, D) -> x0 (B, T, D)
    engine.json     class name, version, subject, sizes, opset and the output names

Models whose weights exceed :data:`EXTERNAL_DATA_BYTES` keep them in ``<name>.onnx.data`` beside
the graph (protobuf files cannot exceed 2 GiB; the paper-sized encoder alone is about 1 GB).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from rtdecoder.decode.engine import (
    DENOISER_INPUTS,
    DENOISER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    BrainEncoder,
    PriorDenoiser,
)
from rtdecoder.errors import BundleError

logger = logging.getLogger(__name__)

ENGINE_FORMAT_VERSION = 1
ENGINE_META_NAME = "engine.json"
ENCODER_ONNX = "encoder.onnx"
DENOISER_ONNX = "denoiser.onnx"
EXTERNAL_DATA_BYTES = 1 << 30


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: tuple[str, ...],
            output_names: list[str], opset: int, dynamo: bool) -> None:
    external = _parameter_bytes(module) > EXTERNAL_DATA_BYTES
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(
            module, args, str(path), input_names=list(input_names), output_names=output_names,
            dynamic_shapes=tuple({0: batch} for _ in args), opset_version=opset, dynamo=True,
            external_data=external,
        )
    else:
        torch.onnx.export(
            module, args, str(path), input_names=list(input_names), output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in (*input_names, *output_names)},
            opset_version=opset, dynamo=False,
        )
    logger.info("wrote %s (%.1f MB of weights%s)", path, _parameter_bytes(module) / 1e6,
                ", external" if external else "")


def export_onnx(model: nn.Module, subject_id: str, folder: str | Path, opset: int = 18, dynamo: bool = True) -> Path:
    """Export ``model``'s encoder for ``subject_id`` and its prior denoiser to ``folder``.

    Parameters
    ----------
    model : MindEye2
        In eval mode; needs a diffusion prior.
    subject_id : str
    folder : str or Path
        Created if needed; existing ONNX files there are replaced.
    opset : int, default=18
    dynamo : bool, default=True
        Use the ``torch.export``-based exporter; False uses the TorchScript exporter.

    Returns
    -------
    Path
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    config = model.config
    encoder = BrainEncoder(model, subject_id).eval()
    denoiser = PriorDenoiser(model.prior).eval()
    n_voxels = model.adapters[subject_id].in_features
    # Batch 2 in the example inputs: a batch of 1 would let the exporter specialise it away.
    example_betas = torch.randn(2, n_voxels)
    encoder_outputs = list(ENCODER_OUTPUTS if config.lowlevel else ENCODER_OUTPUTS[:2])
    tokens = torch.randn(2, config.n_tokens, config.token_dim)
    with torch.no_grad():
        _export(encoder, (example_betas,), folder / ENCODER_ONNX, ENCODER_INPUTS, encoder_outputs, opset, dynamo)
        _export(denoiser, (tokens, torch.tensor([0, config.prior_timesteps - 1]), tokens.clone()),
                folder / DENOISER_ONNX, DENOISER_INPUTS, list(DENOISER_OUTPUTS), opset, dynamo)
    meta = {
        "_class_name": "OnnxEngine",
        "_version": ENGINE_FORMAT_VERSION,
        "subject_id": subject_id,
        "n_voxels": n_voxels,
        "n_tokens": config.n_tokens,
        "token_dim": config.token_dim,
        "prior_timesteps": config.prior_timesteps,
        "alphas_cumprod": model.prior.alphas_cumprod.tolist(),
        "ddim_schedule": config.prior_ddim_schedule,
        "encoder_outputs": encoder_outputs,
        "opset": opset,
        "input_dtype": "float32",
    }
    (folder / ENGINE_META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def read_engine_meta(folder: str | Path) -> dict:
    """Read and check ``engine.json`` of an engine folder written by :func:`export_onnx`."""
    path = Path(folder) / ENGINE_META_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: cannot read engine metadata: {err}; run 'rtdecoder engines build'") from None
    if meta.get("_version") != ENGINE_FORMAT_VERSION:
        raise BundleError(f"{path}: _version: expected {ENGINE_FORMAT_VERSION} (got {meta.get('_version')!r})")
    for name in (ENCODER_ONNX, DENOISER_ONNX):
        if not (path.parent / name).is_file():
            raise BundleError(f"{path.parent / name}: missing; run 'rtdecoder engines build'")
    return meta
