"""Tests of the MindEye2 model: shapes, trainable blocks, paper sizes, save/load, prior."""

from __future__ import annotations

import json

import pytest
import torch

from rtdecoder.config import ModelConfig, load_config
from rtdecoder.decode.model import MindEye2, count_parameters
from rtdecoder.decode.prior import cosine_alphas_cumprod, ddim_plan
from rtdecoder.errors import BundleError, ConfigError


def tiny_config(**overrides) -> ModelConfig:
    values = dict(hidden_dim=32, n_blocks=3, dropout=0.0, n_tokens=4, token_dim=16, prior_dim=16,
                  prior_depth=1, prior_heads=2, prior_timesteps=10, prior_sample_steps=4)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def model() -> MindEye2:
    torch.manual_seed(0)
    return MindEye2(tiny_config(lowlevel=True, lowlevel_channels=3), {"s1": 10, "s2": 7})


def test_forward_shapes_follow_input_order(model):
    out = model({"s2": torch.randn(2, 7), "s1": torch.randn(3, 10)})
    assert out.backbone_tokens.shape == (5, 4, 16)
    assert out.clip_tokens.shape == (5, 4, 16)
    assert out.lowlevel.shape == (5, 3, 28, 28)
    model.eval()
    x1, x2 = torch.randn(3, 10), torch.randn(2, 7)
    both = model({"s2": x2, "s1": x1}).clip_tokens
    torch.testing.assert_close(both[2:], model({"s1": x1}).clip_tokens)


def test_every_residual_block_gets_gradient(model):
    out = model({"s1": torch.randn(6, 10), "s2": torch.randn(6, 7)})
    (out.clip_tokens.square().mean() + out.backbone_tokens.mean()).backward()
    for i, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"block {i} {name} has no gradient"


def test_nsd_preset_builds_paper_sizes_on_meta_device():
    cfg = load_config("nsd").model
    with torch.device("meta"):
        model = MindEye2(cfg, {"subj01": 15724})
    assert model.token_proj.weight.is_meta
    adapter = count_parameters(model.adapters["subj01"])
    assert adapter == 15724 * 4096 + 4096  # about 64M
    assert 240e6 < count_parameters(model.prior) < 290e6  # doc: about 260M
    assert 2.1e9 < count_parameters(model) < 2.35e9  # doc: about 2.23B
    assert isinstance(model.prior.brain_in, torch.nn.Identity)  # prior_dim == token_dim


def test_released_prior_at_paper_sizes_has_the_papers_parameter_count():
    cfg = load_config("nsd").model.model_copy(update={"prior_network": "dalle2", "prior_dim_head": 52})
    with torch.device("meta"):
        prior = MindEye2(cfg, {"subj01": 15724}).prior
    assert 255e6 < count_parameters(prior) < 265e6  # doc: about 260M
    assert prior.blocks[0].to_kv.weight.shape == (2 * 52, 1664)  # one key/value head shared by 32 queries


def test_dalle2_step_plan_follows_the_released_sampler():
    abar = cosine_alphas_cumprod(100).float()
    plan = ddim_plan(abar, 20, "dalle2")
    assert [s.t for s in plan] == list(range(94, 3, -5))  # 20 grid points, 19 denoiser calls
    first, last = plan[0], plan[-1]
    assert first.abar_eps == abar[94] and first.abar_t == abar[93] and first.abar_next == abar[88]
    assert last.abar_next == 1 and not last.fresh_noise  # the step into t=-1 returns x0
    assert [s.t for s in ddim_plan(abar, 20, "uniform")][:2] == [99, 94]
    with pytest.raises(ConfigError, match=r"n_steps: expected 2..99 for the dalle2 schedule \(got 100\)"):
        ddim_plan(abar, 100, "dalle2")
    with pytest.raises(ValueError, match="prior_dim .16. must equal token_dim .32."):
        tiny_config(token_dim=32, prior_network="dalle2")


def test_prior_projects_when_prior_dim_differs():
    m = MindEye2(tiny_config(prior_dim=8, prior_heads=2), {"s": 5})
    assert m.prior.brain_in.weight.shape == (8, 16)
    assert m.prior.image_out.weight.shape == (16, 8)
    brain = torch.randn(2, 4, 16)
    assert m.prior.sample(brain, n_steps=3).shape == (2, 4, 16)


def test_save_and_load_round_trip(model, tmp_path):
    model.eval()
    model.save_pretrained(tmp_path / "m")
    payload = json.loads((tmp_path / "m" / "config.json").read_text())
    assert payload["_class_name"] == "MindEye2" and payload["subjects"] == {"s1": 10, "s2": 7}
    loaded = MindEye2.from_pretrained(tmp_path / "m").eval()
    x = {"s1": torch.randn(2, 10)}
    torch.testing.assert_close(loaded(x).clip_tokens, model(x).clip_tokens, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_from_pretrained_rejects_other_versions_and_missing_weights(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    payload = json.loads(path.read_text())
    path.write_text(json.dumps({**payload, "_version": 99}))
    with pytest.raises(BundleError, match=r"config.json: _version: expected 1 \(got 99\)"):
        MindEye2.from_pretrained(tmp_path / "m")
    path.write_text(json.dumps(payload))
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors: missing model weights"):
        MindEye2.from_pretrained(tmp_path / "m")


def test_add_subject_replaces_only_that_adapter(model):
    shared_before = model.token_proj.weight.clone()
    model.add_subject("s1", 12)
    assert model.subjects == {"s1": 12, "s2": 7}
    assert torch.equal(model.token_proj.weight, shared_before)
    assert model({"s1": torch.randn(2, 12)}).clip_tokens.shape == (2, 4, 16)
    with pytest.raises(ConfigError, match="subject_id: expected letters"):
        model.add_subject("sub.01", 5)


def test_wrong_betas_are_rejected(model):
    with pytest.raises(ConfigError, match=r"betas\['s1'\]: expected shape \(B, 10\) \(got \(2, 9\)\)"):
        model({"s1": torch.randn(2, 9)})
    with pytest.raises(ConfigError, match="no adapter for subject 'nobody'"):
        model({"nobody": torch.randn(2, 9)})


def test_cosine_schedule_decreases_from_one_to_zero():
    a = cosine_alphas_cumprod(100)
    assert a.shape == (100,)
    assert torch.all(a[1:] < a[:-1])
    assert a[0] > 0.99 and a[-1] < 1e-3


def test_condition_dropout_uses_null_embedding(model):
    prior = model.prior.eval()
    noisy, t = torch.randn(2, 4, 16), torch.tensor([3, 3])
    keep = torch.tensor([False, False])
    a = prior.denoise(noisy, t, torch.randn(2, 4, 16), keep)
    b = prior.denoise(noisy, t, torch.randn(2, 4, 16), keep)
    torch.testing.assert_close(a, b)
    c = prior.denoise(noisy, t, torch.randn(2, 4, 16), torch.tensor([True, True]))
    assert not torch.allclose(a, c)


def test_sampling_is_reproducible_and_eta_zero_ignores_fresh_noise(model):
    prior = model.prior.eval()
    brain = torch.randn(3, 4, 16)
    draw = lambda eta, seed: prior.sample(brain, eta=eta, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    torch.testing.assert_close(draw(1.0, 1), draw(1.0, 1))
    assert not torch.allclose(draw(1.0, 1), draw(1.0, 2))
    with pytest.raises(ConfigError, match=r"n_steps: expected 1..10 \(got 11\)"):
        prior.sample(brain, n_steps=11)


def test_prior_learns_a_fixed_mapping():
    torch.manual_seed(0)
    m = MindEye2(tiny_config(prior_cond_drop=0.0), {"s": 5})
    prior = m.prior
    brain = torch.randn(8, 4, 16)
    target = brain.flip(-1) * 0.5  # a deterministic function of the condition
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(120):
        t, noise, keep = prior.draw_training_noise(8, gen)
        pred = prior.denoise(prior.add_noise(target, t, noise), t, brain, keep)
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.35 * sum(losses[:10]) / 10
    sample = prior.eval().sample(brain, n_steps=10, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.nn.functional.mse_loss(sample, target) < 0.5 * target.square().mean()
