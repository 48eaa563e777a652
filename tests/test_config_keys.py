"""Every config key does something: the prior's eta, unCLIP's guidance scale and the low-level
blend weight each change what the live decoder outputs; retired keys still load from saved files,
with a warning naming them; and no key of the schema goes unread."""

from __future__ import annotations

import ast
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtdecoder import config as config_module
from rtdecoder.bundle import SubjectBundle
from rtdecoder.compose import build_live_decoder, load_generator
from rtdecoder.config import RTDecoderConfig, load_config, read_saved_config, save_config
from rtdecoder.decode.generators import unclip
from rtdecoder.decode.generators.base import blend_lowlevel, lowlevel_images
from rtdecoder.decode.model import MindEye2
from rtdecoder.decode.retrieval import CandidateBank
from rtdecoder.errors import ConfigError

N_VOXELS = 24
SIDE_PX = 16
TINY_MODEL = dict(hidden_dim=32, n_blocks=1, dropout=0.0, n_tokens=4, token_dim=16, prior_dim=16, prior_depth=1,
                  prior_heads=2, prior_timesteps=20, prior_sample_steps=5)
PACKAGE = Path(__file__).resolve().parents[1] / "rtdecoder"


def _config(model: dict | None = None, generator: dict | None = None) -> RTDecoderConfig:
    return load_config("phantom", overrides={
        "embedding": {"n_tokens": 4, "token_dim": 16}, "model": {**TINY_MODEL, **(model or {})},
        "generator": generator or {},
    })


def _bundle(folder: Path, model: dict | None = None) -> SubjectBundle:
    config = _config(model)
    torch.manual_seed(0)
    net = MindEye2(config.model, {"sub-01": N_VOXELS}).eval()
    rng = np.random.default_rng(5)
    mask = np.zeros((4, 4, 3), bool)
    mask.ravel()[:N_VOXELS] = True
    bundle = SubjectBundle(
        subject_id="sub-01", config=config, mask=mask, affine=np.diag([3.0, 3.0, 3.0, 1.0]),
        reference=rng.random(mask.shape).astype(np.float32), signal_mean=np.full(N_VOXELS, 100.0, np.float32),
        beta_mean=rng.normal(size=N_VOXELS).astype(np.float32), beta_std=np.ones(N_VOXELS, np.float32),
        hrf_index=np.zeros(N_VOXELS, np.int32), embedding_name="efficientnet_lite0",
    )
    bundle.save(folder, model=net)
    return SubjectBundle.load(folder)


def _bank() -> CandidateBank:
    tokens = np.random.default_rng(1).normal(size=(5, 4, 16)).astype(np.float32)
    return CandidateBank([f"c{i}" for i in range(5)], tokens)


class _Recorder:
    """A generator that keeps the tokens it is given and paints a fixed image."""

    name = "recorder"
    image_size_px = SIDE_PX

    def __init__(self) -> None:
        self.tokens: list[torch.Tensor] = []

    def generate(self, tokens: torch.Tensor, n_steps: int, seed: int) -> np.ndarray:
        self.tokens.append(tokens.clone())
        return np.full((tokens.shape[0], SIDE_PX, SIDE_PX, 3), 200, np.uint8)


def _with(config: RTDecoderConfig, section: str, **values) -> RTDecoderConfig:
    return config.model_copy(update={section: getattr(config, section).model_copy(update=values)})


def _beta() -> np.ndarray:
    return np.random.default_rng(2).normal(size=N_VOXELS).astype(np.float32)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --- model.prior_sample_eta ---


def test_prior_sample_eta_changes_the_live_prior_tokens(tmp_path) -> None:
    bundle = _bundle(tmp_path / "b")
    tokens = {}
    for eta in (0.0, 1.0, 1.0):
        recorder = _Recorder()
        decoder = build_live_decoder(bundle, _with(bundle.config, "model", prior_sample_eta=eta), _bank(), recorder)
        assert decoder.prior_eta == eta
        decoder.reconstruct(decoder.retrieve(_beta(), top_k=2), seed=7)
        tokens.setdefault(eta, []).append(recorder.tokens[0])
    torch.testing.assert_close(tokens[1.0][0], tokens[1.0][1])  # same seed, same eta: same tokens
    assert not torch.allclose(tokens[0.0][0], tokens[1.0][0], atol=1e-3)


# --- generator.guidance_scale (unCLIP) ---


@pytest.fixture(scope="module")
def tiny_unclip(tmp_path_factory):
    """A tiny generative-models unCLIP checkpoint, and the layouts to read it with."""
    from safetensors.torch import save_file
    from test_generators import TINY_UNET, TINY_VAE, _ldm_vae_shapes, _sgm_unet_shapes

    g = torch.Generator().manual_seed(7)
    state = {f"model.diffusion_model.{k}": torch.randn(s, generator=g) * 0.2 for k, s in _sgm_unet_shapes().items()}
    state.update({f"first_stage_model.{k}": torch.randn(s, generator=g) * 0.2 for k, s in _ldm_vae_shapes().items()})
    path = tmp_path_factory.mktemp("unclip") / "tiny-unclip.safetensors"
    save_file(state, str(path))
    return path, TINY_UNET, TINY_VAE


@pytest.fixture
def unclip_config(tiny_unclip, monkeypatch):
    """A config whose generator is the tiny unCLIP (its layout replaces SDXL's)."""
    path, unet_layout, vae_layout = tiny_unclip
    monkeypatch.setattr(unclip, "sdxl_unclip_unet_config", lambda *args, **kwargs: dict(unet_layout))
    monkeypatch.setattr(unclip, "sdxl_vae_config", lambda: dict(vae_layout))
    return _config(generator={"kind": "unclip", "unclip_weights_path": str(path), "image_size_px": 32})


def test_guidance_scale_reaches_the_unclip_generator(unclip_config) -> None:
    tokens = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    images = {}
    for scale in (2.0, 5.0):
        generator = load_generator(_with(unclip_config, "generator", guidance_scale=scale))
        assert generator.guidance_scale == scale
        images[scale] = generator.generate(tokens, n_steps=2, seed=3)
    assert not np.array_equal(images[2.0], images[5.0])


# --- generator.lowlevel_weight ---


def test_lowlevel_weight_blends_the_lowlevel_image_into_the_png(tmp_path) -> None:
    # An RGB low-level head (3 channels, 7x7 px): blended into the recorder's image, resized.
    bundle = _bundle(tmp_path / "b", {"lowlevel": True, "lowlevel_channels": 3, "lowlevel_upsamples": 0})
    pngs = {}
    for weight in (0.0, 0.25, 0.75):
        config = _with(bundle.config, "generator", lowlevel_weight=weight)
        decoder = build_live_decoder(bundle, config, _bank(), _Recorder())
        pngs[weight] = _png(decoder.reconstruct(decoder.retrieve(_beta(), top_k=2), seed=7))
    np.testing.assert_array_equal(pngs[0.0], np.full((SIDE_PX, SIDE_PX, 3), 200, np.uint8))
    assert not np.array_equal(pngs[0.25], pngs[0.0]) and not np.array_equal(pngs[0.75], pngs[0.25])

    lowlevel = decoder.engine.encode(torch.from_numpy((_beta() - bundle.beta_mean)[None])).lowlevel
    expected = blend_lowlevel(np.full((1, SIDE_PX, SIDE_PX, 3), 200, np.uint8), lowlevel_images(lowlevel), 0.75)[0]
    np.testing.assert_array_equal(pngs[0.75], expected)


def test_lowlevel_latents_are_decoded_with_the_generators_vae(tmp_path, unclip_config) -> None:
    bundle = _bundle(tmp_path / "b", {"lowlevel": True, "lowlevel_channels": 4, "lowlevel_upsamples": 0})
    config = _with(unclip_config, "model", **bundle.config.model.model_dump())
    pngs = {}
    for weight in (0.0, 0.5):
        decoder = build_live_decoder(bundle, _with(config, "generator", lowlevel_weight=weight), _bank(),
                                     load_generator(config), generator_steps=1)
        assert (decoder.lowlevel_vae is not None) == (weight > 0)
        pngs[weight] = _png(decoder.reconstruct(decoder.retrieve(_beta(), top_k=2), seed=7))
    assert pngs[0.5].shape == (32, 32, 3) and not np.array_equal(pngs[0.0], pngs[0.5])
    with pytest.raises(ConfigError, match=r"4-channel latents but generator 'recorder' has no VAE"):
        build_live_decoder(bundle, _with(config, "generator", lowlevel_weight=0.5), _bank(), _Recorder())


# --- retired keys ---


def test_retired_keys_load_from_saved_configs_and_bundles_with_a_warning(tmp_path, caplog) -> None:
    bundle = _bundle(tmp_path / "b")
    raw = json.loads((tmp_path / "b" / "config.json").read_text())
    raw["preprocess"]["normalise"] = "zscore"  # as bundles calibrated before the key was retired hold it
    raw["generator"]["retrieval_top_k"] = 5
    (tmp_path / "b" / "config.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="rtdecoder.config"):
        assert SubjectBundle.load(tmp_path / "b").config == bundle.config
    assert "preprocess.normalise: retired key ignored" in caplog.text
    assert "generator.retrieval_top_k: retired key ignored" in caplog.text

    caplog.clear()
    save_config(bundle.config, tmp_path / "clean.json")
    with caplog.at_level(logging.WARNING, logger="rtdecoder.config"):
        read_saved_config(tmp_path / "clean.json")
    assert caplog.text == ""


def test_retired_key_in_yaml_says_why_it_went(tmp_path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text("preset: phantom\npreprocess:\n  normalise: zscore\n")
    with pytest.raises(ConfigError, match=r"preprocess\.normalise: unknown key \(retired: never read: .*percent"):
        load_config(path)


# --- no key goes unread ---


def _names_read(path: Path) -> set[str]:
    """Attributes read (not called) and string constants (not docstrings) in one module."""
    tree = ast.parse(path.read_text())
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
        and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in called:
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.add(node.value)
    return names


def test_every_config_key_is_read_outside_the_schema() -> None:
    read = set().union(*(_names_read(path) for path in sorted(PACKAGE.glob("**/*.py")) if path.name != "config.py"))
    section = config_module.Section
    sections = [cls for cls in vars(config_module).values()
                if isinstance(cls, type) and issubclass(cls, section) and cls is not section]
    unread = sorted(f"{cls.__name__}.{key}" for cls in sections for key in cls.model_fields if key not in read)
    assert not unread, f"config keys nothing reads: {unread}"


# --- candidates.hubness_k ---


def _write_calibration_betas(bundle: SubjectBundle, n_trials: int = 30) -> np.ndarray:
    """A betas/ folder as calibrate writes it: (n_trials, n_voxels) betas, the last 6 trials test."""
    import nibabel as nib

    from rtdecoder.calibration.betas import BETAS_NAME, MASK_NAME, TRIALS_COLUMNS, TRIALS_NAME
    from rtdecoder.preprocess.mask import VoxelMask

    folder = bundle.directory / "betas"
    folder.mkdir()
    betas = np.random.default_rng(8).normal(size=(n_trials, N_VOXELS)).astype(np.float32)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(betas.T[:, None, None, :]), np.eye(4)), folder / BETAS_NAME)
    VoxelMask(bundle.mask, bundle.affine).to_nifti(folder / MASK_NAME)
    rows = ["\t".join(TRIALS_COLUMNS)] + [
        f"{t}\trun-01\t{t}\t{4.0 * t}\t3\tc{t % 5}\t{t % 5}\t{'true' if t >= n_trials - 6 else 'false'}"
        for t in range(n_trials)
    ]
    (folder / TRIALS_NAME).write_text("\n".join(rows) + "\n")
    return betas


def test_hubness_k_ranks_live_candidates_by_csls_against_the_bundles_training_predictions(tmp_path, caplog) -> None:
    from rtdecoder.calibration.calibrate import predict_clip_tokens
    from rtdecoder.decode.hubness import HubnessReference, unit_rows

    bundle = _bundle(tmp_path / "b")
    config = bundle.config
    with caplog.at_level("WARNING"):
        assert build_live_decoder(bundle, config, _bank(), None).bank.hubness_penalty is None
    assert "no calibration betas" in caplog.text  # an older bundle: plain cosine, said so

    betas = _write_calibration_betas(bundle)
    decoder = build_live_decoder(bundle, config, _bank(), None)
    z = (betas[:24] - bundle.beta_mean) / bundle.beta_std  # the training trials only
    predictions = predict_clip_tokens(bundle.load_model(), "sub-01", z)
    expected = HubnessReference.from_predictions(predictions, None, config.candidates.hubness_k)
    bank = _bank()
    np.testing.assert_allclose(decoder.bank.hubness_penalty.numpy(), expected.image_penalty(bank._unit), atol=1e-5)
    plain = build_live_decoder(bundle, _with(config, "candidates", hubness_k=0), _bank(), None)
    assert plain.bank.hubness_penalty is None
    query = torch.from_numpy(predictions[:3])
    csls = (unit_rows(query) @ bank._unit.T).numpy() - expected.image_penalty(bank._unit)[None, :]
    np.testing.assert_array_equal(decoder.bank.top_k(query, 5).indices, np.argsort(-csls, axis=1))


def test_live_contrast_references_the_run_front_ends_live_betas_to_the_bundles_mean_beta(tmp_path) -> None:
    from rtdecoder.glm.events import Trial
    from rtdecoder.session.frontend import build_run_frontend
    from rtdecoder.session.runner import SessionGeometry

    bundle = _bundle(tmp_path / "bundle")
    geometry = SessionGeometry.from_bundle(bundle)
    trials = [Trial("t0", 4.8, 3.0)]
    for on in (True, False):
        # the tiny bundle's reference is too small to register to; the GLM is what is tested
        config = _with(_with(bundle.config, "glm", live_contrast=on), "preprocess", motion_correction=False)
        glm = build_run_frontend(config, geometry, trials, 1.6, 40, 0.0).glm
        if on:
            np.testing.assert_array_equal(glm.live_level, bundle.beta_mean)
        else:
            assert glm.live_level is None
