"""The bundle is the runtime artifact: engines built into it once, keyed by the model's digest and
the engine settings, loaded by the run instead of exported again; the run's config must agree with
the bundle's where the bundle fixes what betas and model mean."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rtdecoder.bundle import SubjectBundle, model_folder_digest
from rtdecoder.cli import main
from rtdecoder.compose import make_engine
from rtdecoder.config import RTDecoderConfig, load_config
from rtdecoder.decode.model import MindEye2
from rtdecoder.engines import store
from rtdecoder.engines.onnx_runtime import OnnxRuntimeEngine
from rtdecoder.errors import ConfigError

N_VOXELS = 24
TINY_MODEL = dict(hidden_dim=32, n_blocks=1, n_tokens=4, token_dim=16, prior_dim=16, prior_depth=1, prior_heads=2,
                  prior_timesteps=20, prior_sample_steps=5)


def _config(**generator) -> RTDecoderConfig:
    return load_config("phantom", overrides={
        "embedding": {"n_tokens": 4, "token_dim": 16}, "model": TINY_MODEL, "generator": generator,
    })


def _model(seed: int = 0) -> MindEye2:
    torch.manual_seed(seed)
    return MindEye2(_config().model, {"sub-01": N_VOXELS}).eval()


def _save_bundle(folder: Path, model: MindEye2, config: RTDecoderConfig | None = None) -> SubjectBundle:
    rng = np.random.default_rng(3)
    mask = np.zeros((4, 4, 3), bool)
    mask.ravel()[:N_VOXELS] = True
    bundle = SubjectBundle(
        subject_id="sub-01", config=config or _config(), mask=mask, affine=np.diag([3.0, 3.0, 3.0, 1.0]),
        reference=rng.random(mask.shape).astype(np.float32),
        signal_mean=np.full(N_VOXELS, 100.0, np.float32), beta_mean=np.zeros(N_VOXELS, np.float32),
        beta_std=np.ones(N_VOXELS, np.float32), hrf_index=np.zeros(N_VOXELS, np.int32),
        embedding_name="efficientnet_lite0",
    )
    bundle.save(folder, model=model)
    return SubjectBundle.load(folder)


@pytest.fixture
def count_exports(monkeypatch):
    """Counts ONNX exports (the step that re-exporting at every start repeated)."""
    calls = []
    original = store.export_onnx

    def counted(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(store, "export_onnx", counted)
    return calls


def _engine_folders(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []


def test_bundle_records_the_model_digest_and_rehashes_changed_files(tmp_path) -> None:
    bundle = _save_bundle(tmp_path / "b", _model())
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    assert meta["model_sha256"] == model_folder_digest(tmp_path / "b" / "model") == bundle.model_sha256()
    assert set(meta["model_files"]) == {"config.json", "model.safetensors"}

    _model(seed=1).save_pretrained(tmp_path / "b" / "model")  # weights replaced behind the bundle's back
    assert bundle.model_sha256() == model_folder_digest(tmp_path / "b" / "model") != meta["model_sha256"]


def test_engines_build_writes_into_the_bundle_and_run_loads_them_without_exporting(tmp_path, count_exports) -> None:
    bundle = _save_bundle(tmp_path / "b", _model())

    assert main(["engines", "build", "--bundle", str(tmp_path / "b"), "--backend", "onnxruntime"]) == 0

    (name,) = _engine_folders(tmp_path / "b" / "engines")
    assert re.fullmatch(r"onnxruntime-[0-9a-f]{16}", name)
    meta = json.loads((tmp_path / "b" / "engines" / name / "engine.json").read_text())
    assert meta["engine_key"]["weights_sha256"] == bundle.model_sha256()
    assert meta["engine_key"]["opset"] == 18 and meta["engine_key"]["subject_id"] == "sub-01"
    assert len(count_exports) == 1

    config = _config(engine_backend="onnxruntime", engine_dir=str(tmp_path / "cache"))
    engine = make_engine(config, bundle.load_model(), "sub-01", bundle=bundle)
    assert isinstance(engine, OnnxRuntimeEngine) and engine.folder == tmp_path / "b" / "engines" / name
    assert len(count_exports) == 1  # loaded, not exported again
    assert not (tmp_path / "cache").exists()
    betas = torch.randn(2, N_VOXELS, generator=torch.Generator().manual_seed(0))
    expected = bundle.load_model().eval()({"sub-01": betas}).clip_tokens
    torch.testing.assert_close(engine.encode(betas).clip_tokens, expected, rtol=1e-4, atol=1e-5)


def test_run_builds_a_missing_engine_once_and_a_new_one_for_new_weights_or_settings(
    tmp_path, count_exports, caplog
) -> None:
    bundle = _save_bundle(tmp_path / "b", _model())
    config = _config(engine_backend="onnxruntime", engine_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="rtdecoder.engines.store"):
        first = make_engine(config, bundle.load_model(), "sub-01", bundle=bundle)
        again = make_engine(config, bundle.load_model(), "sub-01", bundle=bundle)
    assert first.folder == again.folder and first.folder.parent == tmp_path / "b" / "engines"
    assert len(count_exports) == 1
    assert "building the onnxruntime engine of sub-01" in caplog.text

    other_opset = make_engine(config.model_copy(update={"generator": config.generator.model_copy(
        update={"onnx_opset": 20})}), bundle.load_model(), "sub-01", bundle=bundle)
    assert other_opset.folder != first.folder and len(count_exports) == 2

    retrained = _save_bundle(tmp_path / "b", _model(seed=1))  # recalibrated into the same folder
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rtdecoder.engines.store"):
        fresh = make_engine(config, retrained.load_model(), "sub-01", bundle=retrained)
    assert fresh.folder not in (first.folder, other_opset.folder) and len(count_exports) == 3
    assert "engines for other weights or settings" in caplog.text
    assert not any(name.startswith(".") for name in _engine_folders(tmp_path / "b" / "engines"))  # no partials


def test_a_damaged_engine_folder_is_rebuilt(tmp_path, count_exports) -> None:
    bundle = _save_bundle(tmp_path / "b", _model())
    config = _config(engine_backend="onnxruntime", engine_dir=str(tmp_path / "cache"))
    folder = make_engine(config, bundle.load_model(), "sub-01", bundle=bundle).folder
    (folder / "denoiser.onnx").unlink()  # e.g. a copy interrupted half-way

    rebuilt = make_engine(config, bundle.load_model(), "sub-01", bundle=bundle)
    assert rebuilt.folder == folder and (folder / "denoiser.onnx").is_file() and len(count_exports) == 2


def test_a_read_only_bundle_gets_its_engines_in_engine_dir_with_the_same_key(tmp_path, monkeypatch, count_exports,
                                                                               caplog) -> None:
    bundle = _save_bundle(tmp_path / "b", _model())
    writable = store._writable
    # Root ignores permission bits, so a read-only bundle folder is simulated where writability is decided.
    monkeypatch.setattr(store, "_writable", lambda p: not p.is_relative_to(tmp_path / "b") and writable(p))
    config = _config(engine_backend="onnxruntime", engine_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="rtdecoder.engines.store"):
        engine = make_engine(config, bundle.load_model(), "sub-01", bundle=bundle)
    key = store.engine_key(bundle.model_sha256(), "sub-01", config.generator)
    assert engine.folder == tmp_path / "cache" / key.folder_name
    assert "is read-only" in caplog.text
    assert _engine_folders(tmp_path / "b" / "engines") == []
    assert make_engine(config, bundle.load_model(), "sub-01", bundle=bundle).folder == engine.folder
    assert len(count_exports) == 1


def test_engines_built_from_a_model_folder_are_found_by_the_run(tmp_path, count_exports) -> None:
    # 'engines build MODEL_DIR --subject' and the run key engines the same way: no second naming scheme.
    bundle = _save_bundle(tmp_path / "b", _model())
    config_path = tmp_path / "run.yaml"
    config_path.write_text(f"preset: phantom\ngenerator:\n  engine_dir: {tmp_path / 'cache'}\n")
    assert main(["engines", "build", str(tmp_path / "b" / "model"), "--subject", "sub-01",
                 "--config", str(config_path)]) == 0
    (name,) = _engine_folders(tmp_path / "cache")
    bundle_engines = tmp_path / "b" / "engines"
    config = _config(engine_backend="onnxruntime", engine_dir=str(tmp_path / "cache"))
    engine = make_engine(config, bundle.load_model(), "sub-01", bundle=bundle)
    assert engine.folder == tmp_path / "cache" / name and not bundle_engines.exists()
    assert len(count_exports) == 1


def test_without_a_bundle_engines_are_keyed_by_the_state_dict_in_engine_dir(tmp_path, count_exports) -> None:
    config = _config(engine_backend="onnxruntime", engine_dir=str(tmp_path / "cache"))
    first = make_engine(config, _model(), "sub-01")
    assert make_engine(config, _model(), "sub-01").folder == first.folder and len(count_exports) == 1
    assert make_engine(config, _model(seed=1), "sub-01").folder != first.folder and len(count_exports) == 2
    assert first.folder.parent == tmp_path / "cache"


def test_run_config_must_match_the_bundle_where_it_governs(tmp_path) -> None:
    bundle = _save_bundle(tmp_path / "b", _model())
    assert bundle.config.glm.hrf == "library"
    bundle.check_run_config(bundle.config)

    run = load_config("phantom", overrides={
        "embedding": {"n_tokens": 4, "token_dim": 16, "image_range": "minus_one_one"},
        "model": {**TINY_MODEL, "hidden_dim": 64},
        "glm": {"hrf": "canonical", "method": "lsa", "slice_time_ref_s": 0.0},
        "preprocess": {"motion_correction": False},
    })
    with pytest.raises(ConfigError) as err:
        bundle.check_run_config(run)
    message = str(err.value)
    for line in ("glm.hrf: bundle 'library', run 'canonical'", "glm.method: bundle 'lss', run 'lsa'",
                 "glm.slice_time_ref_s: bundle 'auto', run 0.0",
                 "preprocess.motion_correction: bundle True, run False",
                 "embedding.image_range: bundle 'zero_one', run 'minus_one_one'",
                 "model.hidden_dim: bundle 32, run 64"):
        assert line in message
    assert str(tmp_path / "b" / "config.json") in message
    assert len(message.splitlines()) == 7  # the header and the six keys, nothing else


def test_run_time_keys_may_differ_from_the_bundle(tmp_path) -> None:
    bundle = _save_bundle(tmp_path / "b", _model())
    run = load_config("phantom", overrides={
        "embedding": {"n_tokens": 4, "token_dim": 16, "cache_dir": "elsewhere", "weights_path": "/other/place.pt"},
        "model": {**TINY_MODEL, "prior_sample_steps": 3, "prior_sample_eta": 0.0, "dropout": 0.0},
        "glm": {"beta_wait_s": 4.0, "publish_refinements": False, "fracridge": True, "high_pass_hz": 0.02},
        "preprocess": {"motion_n_samples": 2000, "motion_max_iterations": 3},
        "generator": {"engine_backend": "onnxruntime"}, "session": {"retrieval_top_k": 2},
    })
    assert bundle.config.glm.drift_model == "polynomial"  # so high_pass_hz is unused
    bundle.check_run_config(run)
    with pytest.raises(ConfigError, match=r"glm\.drift_order: bundle 2, run 3"):
        bundle.check_run_config(run.model_copy(update={"glm": run.glm.model_copy(update={"drift_order": 3})}))
