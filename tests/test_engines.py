"""Tests of the inference engines: ONNX export + ONNX Runtime parity, torch backend, guards."""

from __future__ import annotations

import json

import pytest
import torch

from rtdecoder.config import ModelConfig
from rtdecoder.decode.engine import EncoderOutput, compare_engines, sample_prior
from rtdecoder.decode.model import MindEye2
from rtdecoder.engines.onnx_export import export_onnx, read_engine_meta
from rtdecoder.engines.onnx_runtime import OnnxRuntimeEngine
from rtdecoder.engines.torch_backend import TorchEngine
from rtdecoder.errors import BundleError, DecoderError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(hidden_dim=32, n_blocks=1, n_tokens=4, token_dim=16, prior_dim=16, prior_depth=1,
                         prior_heads=2, prior_timesteps=20, lowlevel=True, lowlevel_channels=3, lowlevel_upsamples=1)
    return MindEye2(config, {"sub-01": 50}).eval()


@pytest.fixture(scope="module")
def onnx_folder(model, tmp_path_factory):
    return export_onnx(model, "sub-01", tmp_path_factory.mktemp("engine"))


def test_sample_prior_matches_the_models_own_sampler(model):
    engine = TorchEngine(model, "sub-01")
    brain = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1))
    for eta in (0.0, 1.0):
        ours = sample_prior(engine, brain, n_steps=5, eta=eta, seed=4)
        theirs = model.prior.sample(brain, n_steps=5, eta=eta, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(ours, theirs)


def test_onnxruntime_matches_torch_eager_with_dynamic_batch(model, onnx_folder):
    reference = TorchEngine(model, "sub-01")
    engine = OnnxRuntimeEngine(onnx_folder)
    assert engine.name.startswith("onnxruntime-")
    for batch in (1, 5):
        betas = torch.randn(batch, 50, generator=torch.Generator().manual_seed(batch))
        errors = compare_engines(reference, engine, betas, n_steps=3)
        assert set(errors) == {"backbone_tokens", "clip_tokens", "lowlevel", "prior_tokens"}
        assert max(errors.values()) < 1e-4, errors
    out = engine.encode(torch.randn(2, 50))
    assert isinstance(out, EncoderOutput) and out.lowlevel.shape == (2, 3, 14, 14)


def test_released_architecture_runs_through_onnxruntime(tmp_path):
    """The imported layout (dalle2 prior, VAE low-level decoder, dalle2 steps) exports and agrees."""
    torch.manual_seed(0)
    config = ModelConfig(hidden_dim=32, n_blocks=0, n_tokens=4, token_dim=16, prior_dim=16, prior_depth=2,
                         prior_heads=2, prior_dim_head=12, prior_timesteps=20, prior_network="dalle2",
                         prior_ddim_schedule="dalle2", prior_sample_steps=5, lowlevel=True, lowlevel_decoder="vae",
                         lowlevel_channels=4, lowlevel_upsamples=1)
    released = MindEye2(config, {"sub-01": 50}).eval()
    reference = TorchEngine(released, "sub-01")
    assert reference.ddim_schedule == "dalle2"
    brain = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        sample_prior(reference, brain, n_steps=5, eta=1.0, seed=3),
        released.prior.sample(brain, n_steps=5, eta=1.0, generator=torch.Generator().manual_seed(3)),
    )
    engine = OnnxRuntimeEngine(export_onnx(released, "sub-01", tmp_path))
    assert engine.ddim_schedule == "dalle2"
    errors = compare_engines(reference, engine, torch.randn(3, 50), n_steps=4)
    assert max(errors.values()) < 1e-4, errors
    assert engine.encode(torch.randn(1, 50)).lowlevel.shape == (1, 4, 14, 14)


def test_onnxruntime_checks_inputs_and_folder(onnx_folder, tmp_path):
    engine = OnnxRuntimeEngine(onnx_folder)
    with pytest.raises(DecoderError, match=r"betas: expected shape \(B, 50\) for subject sub-01"):
        engine.encode(torch.randn(2, 49))
    with pytest.raises(BundleError, match="cannot read engine metadata"):
        read_engine_meta(tmp_path)
    meta = json.loads((onnx_folder / "engine.json").read_text())
    (tmp_path / "engine.json").write_text(json.dumps({**meta, "_version": 99}))
    with pytest.raises(BundleError, match="_version: expected 1"):
        read_engine_meta(tmp_path)


def test_torch_backend_refuses_compile_on_cpu(model):
    with pytest.raises(DecoderError, match="CUDA graphs need a CUDA device.*eager only"):
        TorchEngine(model, "sub-01", compile=True)
    with pytest.raises(DecoderError, match="no adapter for 'sub-99'"):
        TorchEngine(model, "sub-99")


def test_tensorrt_guard_names_the_package_and_install_hint(onnx_folder):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from rtdecoder.engines.tensorrt import TensorRTEngine, build_tensorrt_engines

        with pytest.raises(DecoderError, match="'tensorrt' package is not installed.*pip install tensorrt"):
            build_tensorrt_engines(onnx_folder)
        with pytest.raises(DecoderError, match="'tensorrt' package is not installed"):
            TensorRTEngine(onnx_folder)
    else:
        pytest.skip("tensorrt is installed here; the guard is not reachable")
