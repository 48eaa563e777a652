"""Tests of the importer of released MindEyeV2 checkpoints (tiny checkpoint, same key layout)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calibration.import_mindeye2 import convert_state_dict, import_mindeye2
from rtdecoder.decode.model import MindEye2
from rtdecoder.errors import BundleError, ConfigError

H, T, D, N_BLOCKS = 24, 3, 8, 4
VOXELS = [11, 7]


def released_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped like the reference's model_state_dict (seq_len 1)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    sd = {}
    for i, v in enumerate(VOXELS):
        sd[f"ridge.linears.{i}.weight"], sd[f"ridge.linears.{i}.bias"] = r(H, v), r(H)
    for k in range(N_BLOCKS):
        p1, p2 = f"backbone.mixer_blocks1.{k}", f"backbone.mixer_blocks2.{k}"
        sd[f"{p1}.0.weight"], sd[f"{p1}.0.bias"] = 1 + r(H), r(H)
        sd[f"{p1}.1.0.weight"], sd[f"{p1}.1.0.bias"] = r(H, H), r(H)
        sd[f"{p1}.1.3.weight"], sd[f"{p1}.1.3.bias"] = r(H, H), r(H)
        sd[f"{p2}.0.weight"], sd[f"{p2}.0.bias"] = 1 + r(1), r(1)
        sd[f"{p2}.1.0.weight"], sd[f"{p2}.1.0.bias"] = r(1, 1), r(1)
        sd[f"{p2}.1.3.weight"], sd[f"{p2}.1.3.bias"] = r(1, 1), r(1)
    sd["backbone.backbone_linear.weight"], sd["backbone.backbone_linear.bias"] = r(T * D, H), r(T * D)
    for i in (0, 3, 6):
        sd[f"backbone.clip_proj.{i}.weight"], sd[f"backbone.clip_proj.{i}.bias"] = 1 + r(D), r(D)
    for i in (2, 5, 8):
        sd[f"backbone.clip_proj.{i}.weight"], sd[f"backbone.clip_proj.{i}.bias"] = r(D, D), r(D)
    sd["backbone.blin1.weight"], sd["backbone.bnorm.weight"] = r(64 * 49, H), r(64)
    sd["diffusion_prior.net.null_brain_embeds"] = r(T, D)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], subject: int, x: torch.Tensor):
    """The released network in eval mode, from the doc: ridge, mixer blocks on (B, 1, H), heads."""
    def mlp(prefix, h):
        h = F.linear(h, sd[f"{prefix}.0.weight"], sd[f"{prefix}.0.bias"])
        return F.linear(F.gelu(h), sd[f"{prefix}.3.weight"], sd[f"{prefix}.3.bias"])

    x = F.linear(x, sd[f"ridge.linears.{subject}.weight"], sd[f"ridge.linears.{subject}.bias"])
    x = x[:, None, :]  # (B, seq_len=1, H)
    residual1, residual2 = x, x.permute(0, 2, 1)
    for k in range(N_BLOCKS):
        p1, p2 = f"backbone.mixer_blocks1.{k}", f"backbone.mixer_blocks2.{k}"
        x = mlp(f"{p1}.1", F.layer_norm(x, (H,), sd[f"{p1}.0.weight"], sd[f"{p1}.0.bias"])) + residual1
        residual1 = x
        x = x.permute(0, 2, 1)  # (B, H, 1): the second block normalises over a length-1 axis
        x = mlp(f"{p2}.1", F.layer_norm(x, (1,), sd[f"{p2}.0.weight"], sd[f"{p2}.0.bias"])) + residual2
        residual2 = x
        x = x.permute(0, 2, 1)
    x = x.reshape(len(x), -1)
    backbone = F.linear(x, sd["backbone.backbone_linear.weight"], sd["backbone.backbone_linear.bias"])
    c = backbone.reshape(len(x), T, D)
    for norm, lin in ((0, 2), (3, 5), (6, 8)):
        c = F.layer_norm(c, (D,), sd[f"backbone.clip_proj.{norm}.weight"], sd[f"backbone.clip_proj.{norm}.bias"])
        c = F.linear(F.gelu(c), sd[f"backbone.clip_proj.{lin}.weight"], sd[f"backbone.clip_proj.{lin}.bias"])
    return backbone.reshape(len(x), T, D), c


def test_imported_model_reproduces_released_forward(tmp_path):
    sd = released_state_dict()
    path = tmp_path / "last.pth"
    torch.save({"epoch": 3, "model_state_dict": sd}, path)
    model, report = import_mindeye2(path, tmp_path / "out", subject_ids=["subj02", "subj05"])
    assert report.subjects == {"subj02": 11, "subj05": 7}
    assert report.n_dead_blocks == N_BLOCKS and report.folded_shift != 0
    assert report.skipped == {"diffusion_prior": 1, "lowlevel": 2, "mixer_blocks1": 6 * N_BLOCKS}
    assert model.config.n_blocks == 0 and model.prior is None
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    expected_backbone, expected_clip = reference_forward(sd, 1, x)
    with torch.no_grad():
        out = model({"subj05": x})
    torch.testing.assert_close(out.backbone_tokens, expected_backbone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.clip_tokens, expected_clip, rtol=1e-5, atol=1e-5)
    reloaded = MindEye2.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded({"subj05": x}).clip_tokens, out.clip_tokens)


def test_mixer_blocks1_really_do_not_matter_in_the_reference():
    sd = released_state_dict()
    changed = dict(sd)
    for key in [k for k in sd if k.startswith("backbone.mixer_blocks1.")]:
        changed[key] = torch.randn_like(sd[key])
    x = torch.randn(3, 11)
    torch.testing.assert_close(reference_forward(sd, 0, x)[1], reference_forward(changed, 0, x)[1])


def test_importer_rejects_wrong_files_and_layouts(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(BundleError, match="bad.pth: model_state_dict: expected a dict"):
        import_mindeye2(path)
    sd = released_state_dict()
    with pytest.raises(ConfigError, match="subject_ids: expected 2 names"):
        convert_state_dict(sd, ["only_one"])
    with pytest.raises(BundleError, match=r"unexpected keys .*'backbone\.surprise'"):
        convert_state_dict({**sd, "backbone.surprise": torch.zeros(1)})
    longer = {**sd, "backbone.mixer_blocks2.0.0.weight": torch.ones(2)}
    with pytest.raises(BundleError, match="expected sequence length 1"):
        convert_state_dict(longer)
