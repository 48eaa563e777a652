"""TensorRT engines built from the exported ONNX files (NVIDIA GPUs with ``tensorrt`` installed).

``build_tensorrt_engines`` parses ``encoder.onnx`` and ``denoiser.onnx`` into explicit-batch
networks, adds one optimisation profile covering batch 1..``max_batch``, enables fp16 when asked
and the GPU has fast fp16, and serialises ``encoder.plan`` and ``denoiser.plan`` beside the ONNX
files. :class:`TensorRTEngine` deserialises them and runs each with ``set_input_shape``,
``set_tensor_address`` and ``execute_async_v3`` on torch CUDA buffers.

Without the ``tensorrt`` package every entry point raises a :class:`DecoderError` that says how
to install it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rtdecoder.decode.engine import EncoderOutput
from rtdecoder.engines.onnx_export import DENOISER_ONNX, ENCODER_ONNX, read_engine_meta
from rtdecoder.errors import BundleError, DecoderError

logger = logging.getLogger(__name__)

ENCODER_PLAN = "encoder.plan"
DENOISER_PLAN = "denoiser.plan"
INSTALL_HINT = "pip install tensorrt (NVIDIA GPU and a matching CUDA driver needed)"
WORKSPACE_BYTES = 4 << 30


def import_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module, or raise a :class:`DecoderError` with an install hint."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise DecoderError(
            f"tensorrt backend: the 'tensorrt' package is not installed ({err}); {INSTALL_HINT}"
        ) from None
    return trt


def _build_plan(trt: Any, onnx_path: Path, plan_path: Path, max_batch: int, opt_batch: int, fp16: bool) -> None:
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # TensorRT 10 networks are always explicit-batch; older versions need the flag.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):  # follows external weight files too
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"{onnx_path}: TensorRT cannot parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        if builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            logger.warning("%s: this GPU has no fast fp16; building fp32", onnx_path.name)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    plan_path.write_bytes(bytes(serialized))
    logger.info("wrote %s (%s, batch 1..%d)", plan_path, "fp16" if fp16 else "fp32", max_batch)


def build_tensorrt_engines(folder: str | Path, max_batch: int = 8, fp16: bool = True) -> Path:
    """Build and serialise TensorRT engines from an ONNX engine folder.

    Parameters
    ----------
    folder : str or Path
        Written by :func:`rtdecoder.engines.onnx_export.export_onnx`.
    max_batch : int, default=8
        Largest batch the optimisation profile allows (optimised for batch 1).
    fp16 : bool, default=True
        Let TensorRT pick fp16 kernels where the GPU supports them.

    Returns
    -------
    Path
        The folder, now with ``encoder.plan`` and ``denoiser.plan``.
    """
    trt = import_tensorrt()
    folder = Path(folder)
    read_engine_meta(folder)
    for onnx_name, plan_name in ((ENCODER_ONNX, ENCODER_PLAN), (DENOISER_ONNX, DENOISER_PLAN)):
        _build_plan(trt, folder / onnx_name, folder / plan_name, max_batch, 1, fp16)
    return folder


class _PlanRunner:
    """One deserialised engine with its execution context; runs on torch CUDA tensors."""

    def __init__(self, trt: Any, runtime: Any, plan_path: Path) -> None:
        if not plan_path.is_file():
            raise BundleError(f"{plan_path}: missing; run 'rtdecoder engines build --backend tensorrt'")
        self.engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise BundleError(f"{plan_path}: cannot deserialise (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream()
        for name in self.inputs:
            tensor = feeds[name].to("cuda", self.dtypes[name]).contiguous()
            feeds[name] = tensor  # keep it alive until the launch is queued
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise DecoderError("tensorrt backend: execute_async_v3 failed")
        return outputs


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
             trt.int32: torch.int32, trt.bool: torch.bool}
    if dtype not in table:
        raise DecoderError(f"tensorrt backend: unsupported tensor dtype {dtype}")
    return table[dtype]


class TensorRTEngine:
    """An :class:`~rtdecoder.decode.engine.Engine` over ``encoder.plan`` and ``denoiser.plan``.

    Parameters
    ----------
    folder : str or Path
        An engine folder after :func:`build_tensorrt_engines`.
    """

    def __init__(self, folder: str | Path) -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise DecoderError("tensorrt backend: no CUDA device visible to torch")
        self.folder = Path(folder)
        self.meta = read_engine_meta(self.folder)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._encoder = _PlanRunner(trt, runtime, self.folder / ENCODER_PLAN)
        self._denoiser = _PlanRunner(trt, runtime, self.folder / DENOISER_PLAN)
        self.name = "tensorrt"
        self.device = torch.device("cuda")
        self.alphas_cumprod = torch.tensor(self.meta["alphas_cumprod"], dtype=torch.float32)
        self.ddim_schedule = self.meta.get("ddim_schedule", "uniform")  # exports before it existed: uniform

    def encode(self, betas: torch.Tensor) -> EncoderOutput:
        """Run the encoder on (B, V) betas; outputs are float32 CUDA tensors."""
        outputs = [o.float() for o in self._encoder({"betas": betas})]
        return EncoderOutput(outputs[0], outputs[1], outputs[2] if len(outputs) > 2 else None)

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """Run the denoiser once; see :class:`~rtdecoder.decode.engine.Engine`."""
        return self._denoiser({"noisy": noisy, "t": t, "brain": brain})[0].to(noisy.dtype)
