"""The torch backend: eager everywhere; on CUDA, optionally ``torch.compile`` with CUDA graphs.

The prior loop calls the denoiser ``n_steps`` times with identical shapes, the case CUDA graphs
are for: ``mode="reduce-overhead"`` records the kernels once and replays them, removing the
per-kernel launch cost that dominates small batches. On CPU there is nothing to replay and the
compile time (tens of seconds) would never pay back within a session, so compiling is refused
there rather than silently skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from rtdecoder.decode.engine import BrainEncoder, EncoderOutput, PriorDenoiser
from rtdecoder.errors import DecoderError


class TorchEngine:
    """An :class:`~rtdecoder.decode.engine.Engine` running the model's own modules.

    Parameters
    ----------
    model : MindEye2
    subject_id : str
    device : str or torch.device, default="cpu"
    compile : bool, default=False
        ``torch.compile(mode="reduce-overhead")`` on the encoder and denoiser; CUDA only.
    dtype : torch.dtype, default=torch.float32
        Weights and activations (``torch.float16`` / ``bfloat16`` on GPU).
    """

    def __init__(self, model: nn.Module, subject_id: str, device: str | torch.device = "cpu",
                 compile: bool = False, dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        if compile and self.device.type != "cuda":
            raise DecoderError(
                f"torch engine: compile: CUDA graphs need a CUDA device (got {self.device}); "
                "on CPU the torch backend runs eager only"
            )
        self.dtype = dtype
        model = model.eval().to(self.device, dtype)
        self._encoder = BrainEncoder(model, subject_id).eval()
        self._denoiser = PriorDenoiser(model.prior).eval()
        if compile:
            self._encoder = torch.compile(self._encoder, mode="reduce-overhead", dynamic=False)
            self._denoiser = torch.compile(self._denoiser, mode="reduce-overhead", dynamic=False)
        self.compiled = compile
        self.name = f"torch-{'compiled' if compile else 'eager'}-{self.device.type}"
        self.alphas_cumprod = model.prior.alphas_cumprod.detach().float().cpu()
        self.ddim_schedule = model.config.prior_ddim_schedule

    @torch.no_grad()
    def encode(self, betas: torch.Tensor) -> EncoderOutput:
        """Run the encoder on (B, V) betas; outputs are float32 on this engine's device."""
        outputs = self._encoder(betas.to(self.device, self.dtype))
        # CUDA-graph outputs live in memory the next replay overwrites: copy them out.
        outputs = [o.float().clone() for o in outputs]
        return EncoderOutput(outputs[0], outputs[1], outputs[2] if len(outputs) > 2 else None)

    @torch.no_grad()
    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """Run the denoiser once; see :class:`~rtdecoder.decode.engine.Engine`."""
        x0 = self._denoiser(noisy.to(self.device, self.dtype), t.to(self.device), brain.to(self.device, self.dtype))
        return x0.to(noisy.dtype).clone()
