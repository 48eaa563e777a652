"""Tests of the generators: sgm -> diffusers conversion, phantom UNet, distillation, blending."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdecoder.config import GeneratorConfig
from rtdecoder.decode.generators.base import Generator, blend_lowlevel, decode_lowlevel, from_uint8
from rtdecoder.decode.generators.unclip import UnclipGenerator, load_unclip_models
from rtdecoder.errors import BundleError, DecoderError
from rtdecoder.phantom.distill import _teacher_two_steps, distillation_target, progressive_distillation
from rtdecoder.phantom.generator import (
    PhantomGenerator,
    PhantomGeneratorNet,
    alpha_sigma,
    load_phantom_net,
    save_phantom_net,
    train_phantom_generator,
    v_loss,
)

# --- A tiny checkpoint in generative-models layout, described in sgm's own module terms. ---


def _norm(p, c, out):
    out[f"{p}.weight"], out[f"{p}.bias"] = (c,), (c,)


def _linear(p, n_out, n_in, out, bias=True):
    out[f"{p}.weight"] = (n_out, n_in)
    if bias:
        out[f"{p}.bias"] = (n_out,)


def _conv(p, n_out, n_in, k, out):
    out[f"{p}.weight"], out[f"{p}.bias"] = (n_out, n_in, k, k), (n_out,)


def _sgm_resblock(p, c_in, c_out, emb, out):
    _norm(f"{p}.in_layers.0", c_in, out)
    _conv(f"{p}.in_layers.2", c_out, c_in, 3, out)
    _linear(f"{p}.emb_layers.1", c_out, emb, out)
    _norm(f"{p}.out_layers.0", c_out, out)
    _conv(f"{p}.out_layers.3", c_out, c_out, 3, out)
    if c_in != c_out:
        _conv(f"{p}.skip_connection", c_out, c_in, 1, out)


def _sgm_transformer(p, c, context, out):
    _norm(f"{p}.norm", c, out)
    _linear(f"{p}.proj_in", c, c, out)
    block = f"{p}.transformer_blocks.0"
    for attn, kv in (("attn1", c), ("attn2", context)):
        _linear(f"{block}.{attn}.to_q", c, c, out, bias=False)
        _linear(f"{block}.{attn}.to_k", c, kv, out, bias=False)
        _linear(f"{block}.{attn}.to_v", c, kv, out, bias=False)
        _linear(f"{block}.{attn}.to_out.0", c, c, out)
    for name in ("norm1", "norm2", "norm3"):
        _norm(f"{block}.{name}", c, out)
    _linear(f"{block}.ff.net.0.proj", 8 * c, c, out)
    _linear(f"{block}.ff.net.2", c, 4 * c, out)
    _linear(f"{p}.proj_out", c, c, out)


def _sgm_unet_shapes(context=16, adm=32):
    """model_channels 32, channel_mult (1, 2), 1 res block, attention at level 1 only."""
    s, emb = {}, 128
    _linear("time_embed.0", emb, 32, s)
    _linear("time_embed.2", emb, emb, s)
    _linear("label_emb.0.0", emb, adm, s)
    _linear("label_emb.0.2", emb, emb, s)
    _conv("input_blocks.0.0", 32, 4, 3, s)
    _sgm_resblock("input_blocks.1.0", 32, 32, emb, s)
    s["input_blocks.2.0.op.weight"], s["input_blocks.2.0.op.bias"] = (32, 32, 3, 3), (32,)
    _sgm_resblock("input_blocks.3.0", 32, 64, emb, s)
    _sgm_transformer("input_blocks.3.1", 64, context, s)
    _sgm_resblock("middle_block.0", 64, 64, emb, s)
    _sgm_transformer("middle_block.1", 64, context, s)
    _sgm_resblock("middle_block.2", 64, 64, emb, s)
    _sgm_resblock("output_blocks.0.0", 128, 64, emb, s)
    _sgm_transformer("output_blocks.0.1", 64, context, s)
    _sgm_resblock("output_blocks.1.0", 96, 64, emb, s)
    _sgm_transformer("output_blocks.1.1", 64, context, s)
    _conv("output_blocks.1.2.conv", 64, 64, 3, s)
    _sgm_resblock("output_blocks.2.0", 96, 32, emb, s)
    _sgm_resblock("output_blocks.3.0", 64, 32, emb, s)
    _norm("out.0", 32, s)
    _conv("out.2", 4, 32, 3, s)
    return s


def _ldm_res(p, c_in, c_out, out):
    _norm(f"{p}.norm1", c_in, out)
    _conv(f"{p}.conv1", c_out, c_in, 3, out)
    _norm(f"{p}.norm2", c_out, out)
    _conv(f"{p}.conv2", c_out, c_out, 3, out)
    if c_in != c_out:
        _conv(f"{p}.nin_shortcut", c_out, c_in, 1, out)


def _ldm_mid(p, c, out):
    _ldm_res(f"{p}.block_1", c, c, out)
    _ldm_res(f"{p}.block_2", c, c, out)
    _norm(f"{p}.attn_1.norm", c, out)
    for name in ("q", "k", "v", "proj_out"):
        _conv(f"{p}.attn_1.{name}", c, c, 1, out)


def _ldm_vae_shapes():
    """ch 8, ch_mult (1, 2), 1 res block, 4 latent channels."""
    s = {}
    _conv("encoder.conv_in", 8, 3, 3, s)
    _ldm_res("encoder.down.0.block.0", 8, 8, s)
    _conv("encoder.down.0.downsample.conv", 8, 8, 3, s)
    _ldm_res("encoder.down.1.block.0", 8, 16, s)
    _ldm_mid("encoder.mid", 16, s)
    _norm("encoder.norm_out", 16, s)
    _conv("encoder.conv_out", 8, 16, 3, s)
    _conv("quant_conv", 8, 8, 1, s)
    _conv("post_quant_conv", 4, 4, 1, s)
    _conv("decoder.conv_in", 16, 4, 3, s)
    _ldm_mid("decoder.mid", 16, s)
    _ldm_res("decoder.up.1.block.0", 16, 16, s)
    _ldm_res("decoder.up.1.block.1", 16, 16, s)
    _conv("decoder.up.1.upsample.conv", 16, 16, 3, s)
    _ldm_res("decoder.up.0.block.0", 16, 8, s)
    _ldm_res("decoder.up.0.block.1", 8, 8, s)
    _norm("decoder.norm_out", 8, s)
    _conv("decoder.conv_out", 3, 8, 3, s)
    return s


TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64], layers_per_block=1, transformer_layers_per_block=1, attention_head_dim=2,
    cross_attention_dim=16, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32, norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.13025,
)


@pytest.fixture(scope="module")
def sgm_checkpoint(tmp_path_factory):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    state = {f"model.diffusion_model.{k}": torch.randn(s, generator=g) * 0.2 for k, s in _sgm_unet_shapes().items()}
    state.update({f"first_stage_model.{k}": torch.randn(s, generator=g) * 0.2 for k, s in _ldm_vae_shapes().items()})
    state["conditioner.embedders.0.model.proj"] = torch.zeros(2)  # present in the release, unused
    path = tmp_path_factory.mktemp("unclip") / "tiny-unclip.safetensors"
    save_file(state, str(path))
    return path


def test_unclip_conversion_matches_diffusers_single_file_loader(sgm_checkpoint, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet, vae = load_unclip_models(sgm_checkpoint, TINY_UNET, TINY_VAE)
    # Reference: diffusers' own converter of original checkpoints, from a local config (offline).
    UNet2DConditionModel(**TINY_UNET).save_config(tmp_path / "unet")
    AutoencoderKL(**TINY_VAE).save_config(tmp_path / "vae")
    ref_unet = UNet2DConditionModel.from_single_file(str(sgm_checkpoint), config=str(tmp_path), subfolder="unet",
                                                     local_files_only=True)
    ref_vae = AutoencoderKL.from_single_file(str(sgm_checkpoint), config=str(tmp_path), subfolder="vae",
                                             local_files_only=True)
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    added = {"text_embeds": torch.zeros(2, 0), "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0]] * 2)}
    with torch.no_grad():
        ours = unet(latents, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample
        theirs = ref_unet(latents, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        corner = latents[:, :, :4, :4]
        torch.testing.assert_close(vae.decode(corner).sample, ref_vae.decode(corner).sample)
        image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        torch.testing.assert_close(vae.encode(image).latent_dist.mean, ref_vae.encode(image).latent_dist.mean)
    assert ours.abs().sum() > 0  # random weights, so a zero map would mean nothing was loaded


def test_unclip_generator_samples_deterministically(sgm_checkpoint):
    unet, vae = load_unclip_models(sgm_checkpoint, TINY_UNET, TINY_VAE)
    generator = UnclipGenerator(unet, vae, image_size_px=32, guidance_scale=5.0)
    tokens = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    a = generator.generate(tokens, n_steps=2, seed=3)
    b = generator.generate(tokens, n_steps=2, seed=3)
    assert isinstance(generator, Generator)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, generator.generate(tokens, n_steps=2, seed=4))
    with pytest.raises(DecoderError, match=r"tokens: expected shape \(B, T, 16\)"):
        generator.generate(torch.randn(1, 5, 8), n_steps=1, seed=0)


def test_unclip_conversion_rejects_a_mismatched_layout(sgm_checkpoint):
    wrong = dict(TINY_UNET, layers_per_block=2)
    with pytest.raises(BundleError, match="keys do not match|no module"):
        load_unclip_models(sgm_checkpoint, wrong, TINY_VAE)
    with pytest.raises(BundleError, match="generative-models checkpoint"):
        load_unclip_models({"foo.weight": torch.zeros(1)}, TINY_UNET, TINY_VAE)


# --- Phantom generator and distillation, on a toy world of coloured squares. ---


def _toy_world(n=16, side=8, seed=0):
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(n, 3))
    images = np.broadcast_to(colours[:, None, None, :], (n, side, side, 3)).astype(np.uint8).copy()
    tokens = torch.from_numpy(np.repeat((colours / 255.0)[:, None, :], 4, axis=1)).float()  # (n, 4, 3)
    return images, tokens


SMALL = GeneratorConfig(image_size_px=8, phantom_train_steps=25, phantom_batch_size=8, phantom_lr=3e-3,
                        phantom_cross_dim=8)
TOY_CHANNELS = (8, 16)


def _fixed_loss(net, images, tokens):
    x = from_uint8(images, 8)
    with torch.no_grad():
        return float(v_loss(net, x, net.context(tokens), torch.Generator().manual_seed(99)))


def test_phantom_generator_training_lowers_the_loss():
    images, tokens = _toy_world()
    torch.manual_seed(0)
    before = _fixed_loss(PhantomGeneratorNet(4, 3, 8, 8, TOY_CHANNELS), images, tokens)
    net = train_phantom_generator(images, tokens, SMALL, seed=0, progress=False, channels=TOY_CHANNELS)
    assert _fixed_loss(net, images, tokens) < 0.8 * before


def test_phantom_generator_round_trip_and_checks(tmp_path):
    torch.manual_seed(0)
    net = PhantomGeneratorNet(4, 3, 8, 8, TOY_CHANNELS).eval()
    _, tokens = _toy_world()
    save_phantom_net(net, tmp_path / "gen")
    loaded = load_phantom_net(tmp_path / "gen")
    a = PhantomGenerator(net).generate(tokens[:2], n_steps=2, seed=5)
    np.testing.assert_array_equal(a, PhantomGenerator(loaded).generate(tokens[:2], n_steps=2, seed=5))
    assert a.shape == (2, 8, 8, 3) and a.dtype == np.uint8
    guided = PhantomGenerator(net, guidance_scale=3.0).generate(tokens[:2], n_steps=2, seed=5)
    assert guided.shape == a.shape
    with pytest.raises(DecoderError, match=r"tokens: expected shape \(B, 4, 3\)"):
        PhantomGenerator(net).generate(torch.zeros(1, 5, 3), n_steps=1, seed=0)
    with pytest.raises(DecoderError, match="n_steps: expected a positive integer"):
        PhantomGenerator(net).generate(tokens[:1], n_steps=0, seed=0)
    (tmp_path / "gen" / "config.json").write_text('{"_class_name": "Other", "_version": 1}')
    with pytest.raises(BundleError, match="_class_name/_version"):
        load_phantom_net(tmp_path / "gen")


def test_distillation_target_reproduces_two_teacher_steps():
    torch.manual_seed(0)
    teacher = PhantomGeneratorNet(4, 3, 8, 8, TOY_CHANNELS).eval()
    _, tokens = _toy_world(n=3)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 3, 8, 8, generator=g)
    t, t_mid, t_end = torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.75, 0.375, 0.125]), torch.tensor([0.5, 0.25, 0.0])
    v = distillation_target(teacher, z, t, t_mid, t_end, tokens)
    with torch.no_grad():
        z_end = _teacher_two_steps(teacher, z, t, t_mid, t_end, teacher.context(tokens))
    a_t, s_t = (w[:, None, None, None] for w in alpha_sigma(t))
    a_e, s_e = (w[:, None, None, None] for w in alpha_sigma(t_end))
    one_step = a_e * (a_t * z - s_t * v) + s_e * (s_t * z + a_t * v)  # DDIM t -> t_end with that v
    torch.testing.assert_close(one_step, z_end, rtol=1e-4, atol=1e-4)


def test_progressive_distillation_rounds_and_checks():
    torch.manual_seed(0)
    images, tokens = _toy_world()
    teacher = PhantomGeneratorNet(4, 3, 8, 8, TOY_CHANNELS).eval()
    student = progressive_distillation(teacher, images, tokens, teacher_steps=4, student_steps=2,
                                       iterations_per_round=2, seed=0, progress=False)
    changed = any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters(), strict=True))
    assert changed and student is not teacher
    with pytest.raises(DecoderError, match="power of two"):
        progressive_distillation(teacher, images, tokens, 6, 4, 1, progress=False)


# --- Low-level image and the 0.75 / 0.25 blend. ---


def test_blend_lowlevel_weights_and_resizes():
    recon = np.full((2, 8, 8, 3), 255, np.uint8)
    blurry = np.zeros((2, 4, 4, 3), np.uint8)
    mixed = blend_lowlevel(recon, blurry, 0.25)
    assert mixed.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(mixed, 0.75 * 255, atol=1)
    with pytest.raises(DecoderError, match=r"lowlevel_weight: expected a value in \[0, 1\]"):
        blend_lowlevel(recon, blurry, 1.5)
    with pytest.raises(DecoderError, match="expected 2 images"):
        blend_lowlevel(recon, blurry[:1])


def test_decode_lowlevel_uses_the_vae_scale(sgm_checkpoint):
    _, vae = load_unclip_models(sgm_checkpoint, TINY_UNET, TINY_VAE)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    images = decode_lowlevel(latents, vae)
    with torch.no_grad():
        expected = vae.decode(latents / 0.13025).sample
    assert images.shape == (1, 8, 8, 3)  # 2 levels: one x2 upsampling
    np.testing.assert_allclose(images.astype(float), ((expected.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy(),
                               atol=1)


def test_shipped_weights_are_found_before_the_cache(tmp_path, monkeypatch):
    from rtdecoder.config import load_config
    from rtdecoder.phantom import generator as phantom_unet

    config = load_config("phantom", overrides={"generator": {"cache_dir": str(tmp_path / "cache")}})
    name = f"phantom-{phantom_unet.phantom_cache_key(config)}"
    monkeypatch.setattr(phantom_unet, "SHIPPED_WEIGHTS_DIR", tmp_path / "shipped")
    assert phantom_unet.phantom_weights_folder(config, "student") == tmp_path / "cache" / name / "student"
    shipped = tmp_path / "shipped" / name / "student"
    shipped.mkdir(parents=True)
    (shipped / phantom_unet.WEIGHTS_NAME).write_bytes(b"")
    assert phantom_unet.phantom_weights_folder(config, "student") == shipped
    other = config.model_copy(update={"phantom": config.phantom.model_copy(update={"seed": 1})})
    assert phantom_unet.phantom_weights_folder(other, "student").parent.parent == tmp_path / "cache"
