"""Run exported encoder and denoiser with ONNX Runtime (CUDA provider when present, else CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rtdecoder.decode.engine import EncoderOutput
from rtdecoder.engines.onnx_export import DENOISER_ONNX, ENCODER_ONNX, read_engine_meta
from rtdecoder.errors import DecoderError


def available_providers() -> list[str]:
    """ONNX Runtime execution providers to use, best first (CUDA, then CPU)."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OnnxRuntimeEngine:
    """An :class:`~rtdecoder.decode.engine.Engine` over ``encoder.onnx`` and ``denoiser.onnx``.

    Parameters
    ----------
    folder : str or Path
        Written by :func:`rtdecoder.engines.onnx_export.export_onnx`.
    providers : list of str, optional
        Defaults to :func:`available_providers`.
    n_threads : int, default=1
        Intra-op threads on CPU (the scanner host shares its cores with preprocessing).
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None, n_threads: int = 1) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.meta = read_engine_meta(self.folder)
        providers = providers or available_providers()
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads
        options.inter_op_num_threads = 1
        self.encoder = ort.InferenceSession(str(self.folder / ENCODER_ONNX), options, providers=providers)
        self.denoiser = ort.InferenceSession(str(self.folder / DENOISER_ONNX), options, providers=providers)
        self.name = "onnxruntime-" + ("cuda" if providers[0].startswith("CUDA") else "cpu")
        self.alphas_cumprod = torch.tensor(self.meta["alphas_cumprod"], dtype=torch.float32)
        self.ddim_schedule = self.meta.get("ddim_schedule", "uniform")  # exports before it existed: uniform
        self.device = torch.device("cpu")  # feeds are numpy arrays whatever the provider

    def encode(self, betas: torch.Tensor) -> EncoderOutput:
        """Run the encoder on (B, V) float32 betas; see :class:`~rtdecoder.decode.engine.Engine`."""
        n_voxels = self.meta["n_voxels"]
        if betas.ndim != 2 or betas.shape[1] != n_voxels:
            raise DecoderError(
                f"{self.folder}: betas: expected shape (B, {n_voxels}) for subject "
                f"{self.meta['subject_id']} (got {tuple(betas.shape)})"
            )
        outputs = self.encoder.run(None, {"betas": _numpy(betas)})
        tensors = [torch.from_numpy(o) for o in outputs]
        return EncoderOutput(tensors[0], tensors[1], tensors[2] if len(tensors) > 2 else None)

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """Run the denoiser once; see :class:`~rtdecoder.decode.engine.Engine`."""
        feeds = {"noisy": _numpy(noisy), "t": t.detach().cpu().numpy().astype(np.int64), "brain": _numpy(brain)}
        return torch.from_numpy(self.denoiser.run(None, feeds)[0])


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().float().numpy())
