"""Tests of the importer of released MindEyeV2 checkpoints (tiny checkpoints, same key layout).

Two kinds: a retrieval-only checkpoint checked against the forward pass written out below, and
a whole one (adapters, backbone, low-level head, diffusion prior) checked against outputs of the
reference code itself, stored in ``data/mindeye2_reference`` (see its ``make_fixture.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from rtdecoder.calibration.calibrate import _check_pretrained
from rtdecoder.calibration.import_mindeye2 import convert_state_dict, import_mindeye2
from rtdecoder.config import load_config
from rtdecoder.decode.model import MindEye2
from rtdecoder.errors import BundleError, ConfigError

H, T, D, N_BLOCKS = 24, 3, 8, 4
VOXELS = [11, 7]
REFERENCE = Path(__file__).parent / "data" / "mindeye2_reference" / "fixture.safetensors"


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
    return sd


def seeded_reference_weights(manifest: dict[str, list], seed: int) -> dict[str, torch.Tensor]:
    """Weights for the keys of a reference fixture, drawn the same way by the fixture's maker.

    ``manifest`` maps a key to ``[shape, kind]``: ``gain`` (norm scales, near 1), ``bias`` (small),
    ``weight`` (scaled by fan-in so deep stacks stay well conditioned). Keys of kind ``fixed``
    (rotary frequencies, noise-schedule buffers) are stored in the fixture itself.
    """
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for key, (shape, kind) in manifest.items():
        if kind == "fixed":
            continue
        draw = torch.randn(*shape, generator=g)
        if kind == "gain":
            weights[key] = 1 + 0.1 * draw
        elif kind == "bias":
            weights[key] = 0.1 * draw
        else:
            weights[key] = draw / math.prod(shape[1:]) ** 0.5
    return weights


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
    assert report.skipped == {"mixer_blocks1": 6 * N_BLOCKS}
    assert model.config.n_blocks == 0 and model.prior is None and model.lowlevel_head is None
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


def reference_checkpoint() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The reference fixture's weights (rebuilt from its seed) and its stored inputs and outputs."""
    with safe_open(str(REFERENCE), "pt") as f:
        metadata = f.metadata()
        stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    state = seeded_reference_weights(json.loads(metadata["manifest"]), int(metadata["seed"]))
    state.update({key.removeprefix("fixed/"): v for key, v in stored.items() if key.startswith("fixed/")})
    return state, stored


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol)


def test_whole_released_model_reproduces_the_reference_code(tmp_path):
    state, ref = reference_checkpoint()
    path = tmp_path / "last.pth"
    torch.save({"epoch": 1, "model_state_dict": state}, path)
    model, report = import_mindeye2(path, tmp_path / "out", subject_ids=["subj01", "subj02"])
    assert report.skipped == {"lowlevel_projector": 8, "mixer_blocks1": 12}
    c = model.config
    assert (c.prior_network, c.prior_ddim_schedule, c.lowlevel_decoder) == ("dalle2", "dalle2", "vae")
    assert (c.prior_depth, c.prior_heads, c.prior_dim_head, c.prior_ff_mult) == (2, 2, 36, 4)
    assert (c.lowlevel_channels, c.lowlevel_upsamples, c.prior_sample_steps) == (4, 2, 20)

    noisy, times, brain = ref["input/noisy"], ref["input/times"], ref["output/backbone"]
    drop_all = torch.zeros(len(noisy), dtype=torch.bool)
    with torch.no_grad(), torch.random.fork_rng():
        out = model({"subj02": ref["input/betas_subject1"]})
        close(out.backbone_tokens, ref["output/backbone"])
        close(out.clip_tokens, ref["output/clip_tokens"])
        close(out.lowlevel, ref["output/blurry_latent"])
        close(model.prior.denoise(noisy, times, brain), ref["output/denoised"])
        close(model.prior.denoise(noisy, times, brain, drop_all, drop_all), ref["output/denoised_null"])
        # The reference samples with torch's global generator: the same seed gives the same draws.
        # Its noise estimate uses precomputed sqrt(1/a) constants; 19 steps of that round-off stay
        # below 1e-4 on values of order 1.
        torch.manual_seed(7)
        close(model.prior.sample(brain), ref["output/sampled_seed7_steps20"], atol=2e-4)
        torch.manual_seed(8)
        close(model.prior.sample(brain, n_steps=7), ref["output/sampled_seed8_steps7"], atol=2e-4)
        reloaded = MindEye2.from_pretrained(tmp_path / "out").eval()
        close(reloaded.prior.denoise(noisy, times, brain), ref["output/denoised"])
        close(reloaded({"subj02": ref["input/betas_subject1"]}).lowlevel, ref["output/blurry_latent"])
    # the config written beside the folder is what calibrating from it requires
    config = load_config(tmp_path / "out" / "rtdecoder-config.yaml")
    assert config.model == model.config and config.embedding.model == "openclip"
    _check_pretrained(tmp_path / "out", config)


def test_imported_prior_is_wired_to_every_weight():
    """Each prior tensor changes the output: none is silently ignored by the key map."""
    state, ref = reference_checkpoint()
    model, _ = convert_state_dict(state)
    noisy, times, brain = ref["input/noisy"], ref["input/times"], ref["output/backbone"]
    drop_all = torch.zeros(len(noisy), dtype=torch.bool)
    with torch.no_grad():
        base = model.prior.denoise(noisy, times, brain, None, drop_all)
        for name, param in model.prior.named_parameters():
            if name == "null_brain":
                continue  # only used when the brain tokens are dropped
            saved = param.clone()
            param.add_(0.5)
            changed = model.prior.denoise(noisy, times, brain, None, drop_all)
            param.copy_(saved)
            assert not torch.allclose(changed, base), name


def test_importer_rejects_priors_it_cannot_reproduce():
    state, _ = reference_checkpoint()
    layer0 = "diffusion_prior.net.causal_transformer.layers.0."
    freqs = dict(state)
    freqs[layer0 + "0.rotary_emb.freqs"] = state[layer0 + "0.rotary_emb.freqs"] * 2
    with pytest.raises(BundleError, match="rotary_emb.freqs: expected the default rotary frequencies"):
        convert_state_dict(freqs)
    schedule = dict(state)
    schedule["diffusion_prior.noise_scheduler.alphas_cumprod"] = torch.linspace(0.99, 0.01, 100)
    with pytest.raises(BundleError, match="alphas_cumprod: expected the cosine schedule over 100 steps"):
        convert_state_dict(schedule)
    discrete = {**state, "diffusion_prior.net.to_time_embeds.0.weight": torch.zeros(100, 40)}
    with pytest.raises(BundleError, match="a discrete time embedding"):
        convert_state_dict(discrete)
    wide = {**state, "backbone.blin1.weight": torch.zeros(100, 16)}
    with pytest.raises(BundleError, match=r"blin1.weight: expected 3136 rows"):
        convert_state_dict(wide)
