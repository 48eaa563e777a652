"""Subject bundles: saved and loaded whole; every mismatch is an error naming file and field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtdecoder.bundle import SubjectBundle, mask_hash
from rtdecoder.config import load_config
from rtdecoder.errors import BundleError, DecoderError


def _bundle(rng: np.random.Generator) -> SubjectBundle:
    mask = np.zeros((6, 7, 5), bool)
    mask[2:5, 2:6, 1:4] = True
    n = int(mask.sum())
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-9, -10, -6]
    return SubjectBundle(
        subject_id="sub-08",
        config=load_config("phantom"),
        mask=mask,
        affine=affine,
        reference=rng.random(mask.shape).astype(np.float32),
        signal_mean=(100 + rng.random(n)).astype(np.float32),
        beta_mean=rng.random(n).astype(np.float32),
        beta_std=(1 + rng.random(n)).astype(np.float32),
        hrf_index=rng.integers(0, 20, n).astype(np.int32),
        embedding_name="efficientnet_lite0",
        evaluation={"image_top1": 0.5},
    )


def test_round_trip(tmp_path, rng) -> None:
    bundle = _bundle(rng)
    bundle.save(tmp_path / "b")
    back = SubjectBundle.load(tmp_path / "b")
    assert back.subject_id == "sub-08" and back.n_voxels == bundle.n_voxels
    np.testing.assert_array_equal(back.mask, bundle.mask)
    np.testing.assert_allclose(back.affine, bundle.affine)
    np.testing.assert_array_equal(back.hrf_index, bundle.hrf_index)
    assert back.metadata["mask_sha256"] == mask_hash(bundle.mask)
    assert back.evaluation == {"image_top1": 0.5}
    assert back.model_dir is None
    with pytest.raises(BundleError, match="holds no model"):
        back.load_model()


def test_changed_mask_is_detected(tmp_path, rng) -> None:
    import nibabel as nib

    bundle = _bundle(rng)
    bundle.save(tmp_path / "b")
    mask = bundle.mask.copy()
    mask[0, 0, 0] = True
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), bundle.affine), tmp_path / "b" / "mask.nii.gz")
    with pytest.raises(BundleError, match=r"stats\.safetensors: signal_mean: expected shape"):
        SubjectBundle.load(tmp_path / "b")


def test_metadata_version_and_missing_files(tmp_path, rng) -> None:
    _bundle(rng).save(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    meta["_version"] = 7
    (tmp_path / "b" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"metadata\.json: _version: expected 1 \(got 7\)"):
        SubjectBundle.load(tmp_path / "b")
    with pytest.raises(BundleError, match="not a subject bundle folder"):
        SubjectBundle.load(tmp_path / "nothing")


def test_live_volume_must_match_grid_and_orientation(rng) -> None:
    bundle = _bundle(rng)
    bundle.check_volume(bundle.mask.shape, bundle.affine)
    with pytest.raises(BundleError, match=r"grid \(6, 7, 6\) does not match"):
        bundle.check_volume((6, 7, 6), bundle.affine)
    moved = bundle.affine.copy()
    moved[0, 3] += 5.0
    with pytest.raises(BundleError, match="affine differs from the bundle's by 5.000 mm"):
        bundle.check_volume(bundle.mask.shape, moved)
    with pytest.raises(BundleError, match="embedding.name"):
        bundle.check_embedding("openclip:ViT-bigG-14")


def test_model_must_match_mask(tmp_path, rng) -> None:
    import torch

    from rtdecoder.decode.model import MindEye2

    bundle = _bundle(rng)
    config = load_config("phantom").model.model_copy(
        update={"hidden_dim": 16, "n_blocks": 1, "prior_dim": 16, "prior_depth": 1, "prior_heads": 2}
    )
    wrong = MindEye2(config, {"sub-08": bundle.n_voxels + 1})
    bundle.save(tmp_path / "b", model=wrong)
    loaded = SubjectBundle.load(tmp_path / "b")
    with pytest.raises(BundleError, match=r"subjects: expected an adapter for 'sub-08' with 36 voxels"):
        loaded.load_model()
    right = MindEye2(config, {"sub-08": bundle.n_voxels})
    bundle.save(tmp_path / "c", model=right)
    model = SubjectBundle.load(tmp_path / "c").load_model()
    assert isinstance(model.adapters["sub-08"], torch.nn.Linear)


@pytest.mark.parametrize("name", ["metadata.json", "config.json", "stats.safetensors", "model/model.safetensors",
                                  "model/config.json"])
def test_a_corrupt_bundle_file_is_a_bundle_error_naming_it(tmp_path, rng, name) -> None:
    from rtdecoder.decode.model import MindEye2

    bundle = _bundle(rng)
    model_config = bundle.config.model.model_copy(update={"hidden_dim": 16, "n_blocks": 0, "use_prior": False})
    bundle.save(tmp_path / "b", model=MindEye2(model_config, {bundle.subject_id: bundle.n_voxels}))
    (tmp_path / "b" / name).write_bytes(bytes(rng.integers(128, 256, 400, dtype=np.uint8)))
    with pytest.raises(DecoderError, match=name.split("/")[-1].replace(".", r"\.")):
        SubjectBundle.load(tmp_path / "b").load_model()
