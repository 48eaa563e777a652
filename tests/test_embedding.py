"""Tests of the image embedders and the embedding cache (rtdecoder.embedding)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rtdecoder.config import EmbeddingConfig
from rtdecoder.embedding.base import Embedder, Embedding, make_embedder, to_model_input
from rtdecoder.embedding.cache import EmbeddingCache
from rtdecoder.embedding.efficientnet import IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite0Embedder
from rtdecoder.embedding.openclip import (
    OpenCLIPEmbedder,
    openclip_token_grid,
    resolve_model_config,
)
from rtdecoder.errors import BundleError, ConfigError, DecoderError
from rtdecoder.phantom.stimuli import StimulusBank, list_source_photos

# torchvision's ImageNet-1k order: 281..285 are tabby, tiger cat, Persian, Siamese, Egyptian cat;
# 967 espresso, 968 cup, 504 coffee mug
CAT_CLASSES = range(281, 286)
COFFEE_CLASSES = {967, 968, 504}

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def _photo(name: str) -> np.ndarray:
    from PIL import Image

    path = next(p for p in list_source_photos() if p.stem == name)
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Embedder:
    return EfficientNetLite0Embedder(batch_size=8)


@pytest.fixture(scope="module")
def bank() -> StimulusBank:
    return StimulusBank.build(60, size_px=224, seed=1)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    """A random tiny OpenCLIP model saved as a full-CLIP safetensors file plus its JSON config."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    model = CLIP(**TINY_CLIP).eval()
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    config = folder / "tiny-vit.json"
    config.write_text(json.dumps(TINY_CLIP))
    return model, weights, config


# --- EfficientNet-Lite0 ---------------------------------------------------------------------


def test_efficientnet_is_the_pretrained_imagenet_model(effnet: EfficientNetLite0Embedder):
    cat = _photo("chelsea")[:, 75:375]  # square around the cat's head
    coffee = _photo("coffee")[:, 100:500]
    logits = effnet.class_logits(effnet.embed(np.stack([_resize(cat), _resize(coffee)])))
    assert int(np.argmax(logits[0])) in CAT_CLASSES
    assert COFFEE_CLASSES & set(np.argsort(logits[1])[-3:].tolist())


def test_efficientnet_same_photo_crops_are_closer(effnet: EfficientNetLite0Embedder, bank: StimulusBank):
    emb = effnet.embed(bank.images(range(38)))  # 2 crops of each of the 19 photos
    unit = emb.pooled / np.linalg.norm(emb.pooled, axis=1, keepdims=True)
    similarity = unit @ unit.T
    photos = np.array([r.photo for r in bank.records[:38]])
    same = (photos[:, None] == photos[None, :]) & ~np.eye(38, dtype=bool)
    different = photos[:, None] != photos[None, :]
    assert similarity[same].mean() > similarity[different].mean() + 0.2


def test_efficientnet_shapes_and_pooling(effnet: EfficientNetLite0Embedder, bank: StimulusBank):
    assert isinstance(effnet, Embedder)
    assert (effnet.n_tokens, effnet.token_dim) == (49, 1280)
    assert "efficientnet_lite0" in effnet.name and "range=zero_one" in effnet.name
    emb = effnet.embed(bank.images([0, 1, 2]))
    assert emb.tokens.shape == (3, 49, 1280) and emb.tokens.dtype == np.float32
    assert emb.pooled.shape == (3, 1280)
    np.testing.assert_allclose(emb.pooled, emb.tokens.mean(axis=1), rtol=1e-6)
    assert emb.tokens.min() >= 0.0 and emb.tokens.max() <= 6.0  # ReLU6 output
    # batching does not change the result
    one_by_one = np.concatenate([effnet.embed(bank.images([i])).tokens for i in range(3)])
    np.testing.assert_allclose(emb.tokens, one_by_one, atol=1e-4)


def test_efficientnet_resizes_other_sizes(effnet: EfficientNetLite0Embedder):
    small = StimulusBank.build(20, size_px=112, seed=1).images([0, 1])
    assert effnet.embed(small).tokens.shape == (2, 49, 1280)


def test_embedders_reject_a_batch_size_below_one(tmp_path: Path):
    with pytest.raises(DecoderError, match=r"EfficientNetLite0Embedder: batch_size must be >= 1 \(got 0\)"):
        EfficientNetLite0Embedder(batch_size=0)
    # checked before the architecture or weights are looked at
    with pytest.raises(DecoderError, match=r"OpenCLIPEmbedder: batch_size must be >= 1 \(got 0\)"):
        OpenCLIPEmbedder("ViT-B-32", tmp_path / "missing.safetensors", batch_size=0)


def test_efficientnet_rejects_bad_images(effnet: EfficientNetLite0Embedder):
    with pytest.raises(DecoderError, match=r"must be uint8 RGB \(got dtype float32\)"):
        effnet.embed(np.zeros((1, 224, 224, 3), dtype=np.float32))
    with pytest.raises(DecoderError, match=r"shape \(N, H, W, 3\)"):
        effnet.embed(np.zeros((224, 224, 3), dtype=np.uint8))


def test_efficientnet_missing_weights(tmp_path: Path):
    with pytest.raises(BundleError, match="efficientnet-lite0 weights file not found"):
        EfficientNetLite0Embedder(weights_path=tmp_path / "none.pth")


# --- image range ------------------------------------------------------------------------------


def test_image_range_conventions():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    x01 = images.transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    mean = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    zero_one = to_model_input(images, "zero_one", IMAGENET_MEAN, IMAGENET_STD, 8).numpy()
    np.testing.assert_allclose(zero_one, (x01 - mean) / std, atol=1e-5)
    # the MindEye2 reference: [0, 1] pixels fed to an embedder that maps [-1, 1] with (x + 1) / 2
    minus = to_model_input(images, "minus_one_one", IMAGENET_MEAN, IMAGENET_STD, 8).numpy()
    np.testing.assert_allclose(minus, ((x01 + 1.0) / 2.0 - mean) / std, atol=1e-5)


def test_image_range_is_part_of_the_name_and_output(effnet: EfficientNetLite0Embedder, bank: StimulusBank):
    other = EfficientNetLite0Embedder(image_range="minus_one_one")
    assert other.name != effnet.name and "range=minus_one_one" in other.name
    images = bank.images([0])
    assert not np.allclose(other.embed(images).tokens, effnet.embed(images).tokens)
    with pytest.raises(ConfigError, match="embedding.image_range: expected one of"):
        EfficientNetLite0Embedder(image_range="zero_255")


# --- make_embedder ----------------------------------------------------------------------------


def test_make_embedder_from_config():
    embedder = make_embedder(EmbeddingConfig())
    assert isinstance(embedder, EfficientNetLite0Embedder)
    with pytest.raises(ConfigError, match=r"embedding.n_tokens: efficientnet_lite0.* gives 49 \(config says 50\)"):
        make_embedder(EmbeddingConfig(n_tokens=50))
    with pytest.raises(ConfigError, match="embedding.weights_path: expected a local OpenCLIP weights file"):
        make_embedder(EmbeddingConfig(model="openclip", n_tokens=256, token_dim=1664))


def test_make_embedder_openclip_from_json_config(tiny_clip):
    _model, weights, config = tiny_clip
    settings = EmbeddingConfig(
        model="openclip", openclip_arch=str(config), weights_path=str(weights), n_tokens=4, token_dim=64
    )
    embedder = make_embedder(settings)
    assert isinstance(embedder, OpenCLIPEmbedder)
    assert "arch=tiny-vit" in embedder.name and "weights=tiny.safetensors" in embedder.name


# --- OpenCLIP ---------------------------------------------------------------------------------


def test_openclip_bigg_token_grid_without_building_it():
    config = resolve_model_config("ViT-bigG-14")
    assert openclip_token_grid(config) == (256, 1664)


def test_openclip_tokens_match_open_clip_forward(tiny_clip):
    model, weights, config = tiny_clip
    embedder = OpenCLIPEmbedder(str(config), weights, image_range="minus_one_one", batch_size=3)
    assert (embedder.n_tokens, embedder.token_dim) == (4, 64)
    images = np.random.default_rng(2).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    emb = embedder.embed(images)
    assert emb.tokens.shape == (5, 4, 64) and emb.pooled.shape == (5, 64)

    # reference: the saved model's own vision tower, on the MindEye2-convention input
    visual = model.visual
    x = to_model_input(images, "minus_one_one", embedder.mean, embedder.std, 64)
    visual.output_tokens = True
    try:
        with torch.no_grad():
            projected, tokens = visual(x)
    finally:
        visual.output_tokens = False
    np.testing.assert_allclose(emb.tokens, tokens.numpy(), atol=1e-5)
    # pooled is the unprojected CLS token after ln_post: projecting it gives CLIP's embedding
    np.testing.assert_allclose(emb.pooled @ visual.proj.detach().numpy(), projected.numpy(), atol=1e-5)
    # tokens come after ln_post: each token is layer-normalised (then scaled by ln_post's weight)
    with torch.no_grad():
        raw = (torch.from_numpy(emb.tokens) - visual.ln_post.bias) / visual.ln_post.weight
    np.testing.assert_allclose(raw.mean(-1).numpy(), 0.0, atol=1e-4)


def test_openclip_accepts_a_vision_only_torch_file(tiny_clip, tmp_path: Path):
    model, weights, _config = tiny_clip
    vision_only = tmp_path / "visual.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.visual.state_dict().items()}}, vision_only)
    images = np.random.default_rng(3).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    a = OpenCLIPEmbedder("tiny", weights, model_config=TINY_CLIP).embed(images)
    b = OpenCLIPEmbedder("tiny", vision_only, model_config=TINY_CLIP).embed(images)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_openclip_errors(tiny_clip, tmp_path: Path):
    _model, weights, _config = tiny_clip
    with pytest.raises(BundleError, match="OpenCLIP weights file not found"):
        OpenCLIPEmbedder("ViT-bigG-14", tmp_path / "missing.safetensors")
    wider = json.loads(json.dumps(TINY_CLIP))
    wider["vision_cfg"]["width"] = 96
    with pytest.raises(BundleError, match=r"tiny.safetensors: weights do not fit OpenCLIP .* shape mismatches"):
        OpenCLIPEmbedder("wider", weights, model_config=wider)
    deeper = json.loads(json.dumps(TINY_CLIP))
    deeper["vision_cfg"]["layers"] = 3
    with pytest.raises(BundleError, match=r"1\d missing keys \['transformer.resblocks.2"):
        OpenCLIPEmbedder("deeper", weights, model_config=deeper)
    with pytest.raises(ConfigError, match="unknown OpenCLIP architecture 'ViT-Nope'"):
        OpenCLIPEmbedder("ViT-Nope", weights)
    with pytest.raises(ConfigError, match="names a remote or schema source"):
        OpenCLIPEmbedder("hf-hub:laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", weights)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 32)
    with pytest.raises(BundleError, match="garbage.safetensors: cannot read OpenCLIP weights"):
        OpenCLIPEmbedder("tiny", garbage, model_config=TINY_CLIP)


# --- cache ------------------------------------------------------------------------------------


def test_cache_second_call_loads_from_disk(effnet, bank: StimulusBank, tmp_path: Path, monkeypatch):
    cache = EmbeddingCache(tmp_path / "cache")
    indices = [4, 0, 9, 13, 2]
    first = cache.get_or_compute(effnet, bank, indices, batch_size=2, progress=False)
    path = cache.path_for(effnet, bank, indices)
    assert path.is_file() and first.tokens.shape == (5, 49, 1280) and first.tokens.dtype == np.float32
    direct = effnet.embed(bank.images(indices))
    np.testing.assert_allclose(first.tokens, direct.tokens, rtol=2e-3, atol=2e-3)  # float16 storage

    def must_not_run(images: np.ndarray) -> Embedding:
        raise AssertionError("the model ran although the embeddings were cached")

    monkeypatch.setattr(effnet, "embed", must_not_run)
    second = cache.get_or_compute(effnet, bank, indices, progress=False)
    np.testing.assert_array_equal(second.tokens, first.tokens)
    np.testing.assert_array_equal(second.pooled, first.pooled)
    # another selection or order is another entry, and so would need the model
    assert cache.path_for(effnet, bank, [0, 4, 9, 13, 2]) != path
    with pytest.raises(AssertionError, match="the model ran"):
        cache.get_or_compute(effnet, bank, [0, 4], progress=False)


def test_cache_float32_and_whole_bank(tiny_clip, tmp_path: Path):
    _model, weights, config = tiny_clip
    embedder = OpenCLIPEmbedder(str(config), weights)
    small = StimulusBank.build(25, size_px=64, seed=2)
    cache = EmbeddingCache(tmp_path, storage_dtype="float32")
    emb = cache.get_or_compute(embedder, small, progress=False)
    np.testing.assert_array_equal(emb.tokens, embedder.embed(small.images(range(25))).tokens)
    assert cache.path_for(embedder, small).is_file()
    assert cache.path_for(embedder, small) != cache.path_for(embedder, StimulusBank.build(25, 64, seed=3))


def test_cache_rejects_a_file_that_does_not_match(tiny_clip, tmp_path: Path):
    from safetensors.numpy import save_file

    _model, weights, config = tiny_clip
    embedder = OpenCLIPEmbedder(str(config), weights)
    small = StimulusBank.build(20, size_px=64, seed=2)
    cache = EmbeddingCache(tmp_path)
    path = cache.path_for(embedder, small, [0, 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"tokens": np.zeros((2, 4, 64), np.float16), "pooled": np.zeros((2, 64), np.float16)},
        str(path),
        metadata={"format": "rtdecoder-embedding-cache/1", "embedder": "something else"},
    )
    with pytest.raises(BundleError, match=r"embedder: expected 'openclip\[.*delete the file"):
        cache.get_or_compute(embedder, small, [0, 1], progress=False)
    with pytest.raises(DecoderError, match="storage_dtype must be"):
        EmbeddingCache(tmp_path, storage_dtype="int8")


def _resize(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC))
