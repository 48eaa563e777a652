"""Seed ensembles: calibrations that differ only in seed, saved in one bundle and decoded as one model
by every engine, their outputs averaged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_bundle_engines import N_VOXELS, _config, _model, _save_bundle

from rtdecoder.bundle import SubjectBundle, model_folder_digest
from rtdecoder.compose import make_engine
from rtdecoder.decode.engine import compare_engines, sample_prior
from rtdecoder.decode.ensemble import ModelEnsemble
from rtdecoder.decode.model import MindEye2
from rtdecoder.engines.onnx_runtime import OnnxRuntimeEngine
from rtdecoder.engines.torch_backend import TorchEngine
from rtdecoder.errors import BundleError


def _lowlevel_model(seed: int) -> MindEye2:
    torch.manual_seed(seed)
    config = _config().model.model_copy(update={"lowlevel": True})
    return MindEye2(config, {"sub-01": N_VOXELS}).eval()


def test_the_ensemble_averages_every_output_and_samples_with_the_first_members_prior() -> None:
    members = [_lowlevel_model(seed) for seed in range(3)]
    ensemble = ModelEnsemble(members).eval()
    betas = torch.randn(5, N_VOXELS, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = [m({"sub-01": betas}) for m in members]
        mean = ensemble({"sub-01": betas})
    for field in ("backbone_tokens", "clip_tokens", "lowlevel"):
        expected = torch.stack([getattr(o, field) for o in outputs]).mean(0)
        torch.testing.assert_close(getattr(mean, field), expected)
        assert not torch.allclose(getattr(outputs[0], field), expected)  # the members do differ
    engine = TorchEngine(ensemble, "sub-01")
    first = TorchEngine(members[0], "sub-01")
    brain = mean.backbone_tokens
    torch.testing.assert_close(sample_prior(engine, brain, 3, seed=4), sample_prior(first, brain, 3, seed=4))


def test_members_of_other_sizes_or_subjects_are_refused() -> None:
    with pytest.raises(BundleError, match="at least 2 members"):
        ModelEnsemble([_model()])
    other_subject = MindEye2(_config().model, {"sub-02": N_VOXELS})
    with pytest.raises(BundleError, match=r"member 1: expected the sizes and subjects of member 0"):
        ModelEnsemble([_model(), other_subject])
    wider = MindEye2(_config().model.model_copy(update={"hidden_dim": 48}), {"sub-01": N_VOXELS})
    with pytest.raises(BundleError, match="other model sizes"):
        ModelEnsemble([_model(), wider])


def test_a_bundle_holds_every_member_and_loads_them_as_the_ensemble(tmp_path) -> None:
    members = [_model(seed) for seed in range(3)]
    bundle = _save_bundle(tmp_path / "b", ModelEnsemble(members))
    assert bundle.n_models == 3
    assert [d.name for d in bundle.model_dirs] == ["model", "model-1", "model-2"]
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    assert meta["n_models"] == 3 and set(meta["model_files"]) == {"model", "model-1", "model-2"}
    loaded = bundle.load_model()
    assert isinstance(loaded, ModelEnsemble) and len(loaded) == 3
    betas = torch.randn(2, N_VOXELS)
    with torch.no_grad():
        expected = torch.stack([m({"sub-01": betas}).clip_tokens for m in members]).mean(0)
        torch.testing.assert_close(loaded.eval()({"sub-01": betas}).clip_tokens, expected)

    # The engines' key covers every member: another seed's weights give another key.
    digest = bundle.model_sha256()
    assert digest != model_folder_digest(tmp_path / "b" / "model")
    _model(seed=7).save_pretrained(tmp_path / "b" / "model-2")
    assert SubjectBundle.load(tmp_path / "b").model_sha256() != digest

    # Saved again with one model, the earlier members are gone and the bundle is a single model.
    bundle.save(tmp_path / "b", model=_model())
    assert not (tmp_path / "b" / "model-1").exists() and not (tmp_path / "b" / "model-2").exists()
    again = SubjectBundle.load(tmp_path / "b")
    assert again.n_models == 1 and isinstance(again.load_model(), MindEye2)
    assert again.model_sha256() == model_folder_digest(tmp_path / "b" / "model")


def test_a_missing_member_folder_or_a_bad_count_is_named(tmp_path) -> None:
    _save_bundle(tmp_path / "b", ModelEnsemble([_model(0), _model(1)]))
    shutil.rmtree(tmp_path / "b" / "model-1")
    with pytest.raises(BundleError, match=r"model-1: metadata\.json says the bundle has 2 model\(s\), but "
                                          r"model-1/config\.json is missing"):
        SubjectBundle.load(tmp_path / "b")
    meta_path = tmp_path / "b" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["n_models"] = "three"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"metadata\.json: n_models: expected a whole number >= 1 .* \(got 'three'\)"):
        SubjectBundle.load(tmp_path / "b")


def test_onnx_runtime_runs_the_ensemble_as_torch_does(tmp_path) -> None:
    bundle = _save_bundle(tmp_path / "b", ModelEnsemble([_model(seed) for seed in range(3)]))
    config = _config(engine_backend="onnxruntime")
    engine = make_engine(config, bundle.load_model(), bundle.subject_id, bundle=bundle)
    assert isinstance(engine, OnnxRuntimeEngine)
    assert engine.folder.parent == tmp_path / "b" / "engines"
    betas = torch.randn(2, N_VOXELS, generator=torch.Generator().manual_seed(1))
    errors = compare_engines(TorchEngine(bundle.load_model(), bundle.subject_id), engine, betas)
    assert max(errors.values()) < 1e-4, errors
    single = _save_bundle(tmp_path / "single", _model(0))
    single_engine = make_engine(config, single.load_model(), single.subject_id, bundle=single)
    ensemble_tokens = engine.encode(betas).clip_tokens
    assert not np.allclose(ensemble_tokens.numpy(), single_engine.encode(betas).clip_tokens.numpy(), atol=1e-3)


def test_the_ensemble_size_leaves_the_pretraining_cache_alone() -> None:
    """Calibration-only: a preset that decodes three calibrations reuses the model pretrained for one."""
    from rtdecoder.calibration.pretrain import pretraining_key
    from rtdecoder.config import load_config

    config = load_config("phantom")
    one = config.model_copy(update={"training": config.training.model_copy(update={"ensemble_size": 1})})
    three = config.model_copy(update={"training": config.training.model_copy(update={"ensemble_size": 3})})
    longer = config.model_copy(update={"training": config.training.model_copy(update={"pretrain_epochs": 9})})
    assert pretraining_key(one, "data") == pretraining_key(three, "data") != pretraining_key(longer, "data")
