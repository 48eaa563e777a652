"""Tests of the live decoder's retrieval candidates: an image folder or an embeddings file, cached by content."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from rtdecoder.bundle import SubjectBundle
from rtdecoder.compose import candidates_from_config
from rtdecoder.config import config_from_dict
from rtdecoder.decode.retrieval import CandidateBank
from rtdecoder.embedding.base import Embedding
from rtdecoder.embedding.cache import load_image_tokens, read_embeddings_file, write_embeddings_file
from rtdecoder.embedding.images import ImageFolder
from rtdecoder.errors import BundleError, ConfigError

TOKEN_DIM = 12


class QuadrantColourEmbedder:
    """Mean colour of each image quadrant (4 x RGB = 12 values) as one token; counts its calls."""

    name = "quadrant-colour[test]"
    n_tokens, token_dim = 1, TOKEN_DIM

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def embed(self, images: np.ndarray) -> Embedding:
        self.batch_sizes.append(len(images))
        half = images.shape[1] // 2
        quadrants = [images[:, :half, :half], images[:, :half, half:], images[:, half:, :half], images[:, half:, half:]]
        pooled = np.concatenate([q.reshape(len(images), -1, 3).mean(axis=1) for q in quadrants], axis=1)
        pooled = (pooled - 127.5).astype(np.float32)
        return Embedding(tokens=pooled[:, None, :].copy(), pooled=pooled)


def write_images(folder, stim_ids, seed=0) -> dict[str, np.ndarray]:
    """One small PNG per stim_id, four random quadrant colours each; returns the pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = {}
    for stim_id in stim_ids:
        colours = rng.integers(0, 256, size=(2, 2, 3), dtype=np.uint8)
        image = np.repeat(np.repeat(colours, 8, axis=0), 8, axis=1)  # 16 x 16 px
        Image.fromarray(image).save(folder / f"{stim_id}.png")
        pixels[stim_id] = image
    return pixels


def small_config(**candidates):
    return config_from_dict({
        "embedding": {"n_tokens": 1, "token_dim": TOKEN_DIM},
        "model": {"hidden_dim": 16, "n_blocks": 1, "n_tokens": 1, "token_dim": TOKEN_DIM, "use_prior": False},
        "candidates": candidates,
    })


def fake_bundle(config, embedding_name=QuadrantColourEmbedder.name) -> SubjectBundle:
    grid = np.ones((2, 2, 2), dtype=bool)
    stats = np.ones(8, dtype=np.float32)
    return SubjectBundle("sub-01", config, grid, np.eye(4), np.zeros((2, 2, 2)), stats, stats, stats,
                         np.zeros(8, dtype=np.int64), embedding_name=embedding_name)


def test_folder_tokens_are_cached_by_content(tmp_path) -> None:
    folder, cache = tmp_path / "images", tmp_path / "cache"
    write_images(folder, [f"img{i:02d}" for i in range(7)])
    embedder = QuadrantColourEmbedder()
    first = load_image_tokens(folder, embedder, cache, batch_size=3, progress=False)
    assert first.ids == [f"img{i:02d}" for i in range(7)] and first.token_shape == (1, TOKEN_DIM)
    assert embedder.batch_sizes == [3, 3, 1]  # embedded in batches of at most batch_size images
    # A new modification time alone keeps the entry: the key is the files' bytes, not their dates.
    os.utime(folder / "img03.png", ns=(1, 1))
    second = load_image_tokens(folder, embedder, cache, batch_size=3, progress=False)
    assert embedder.batch_sizes == [3, 3, 1]
    np.testing.assert_array_equal(second.take(range(7)), first.take(range(7)))
    # Other pixels in one file (same name, same size): a new entry, embedded again.
    Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8)).save(folder / "img03.png")
    third = load_image_tokens(folder, embedder, cache, batch_size=3, progress=False)
    assert len(embedder.batch_sizes) == 6
    changed = np.abs(third.take(range(7)) - first.take(range(7))).reshape(7, -1).max(axis=1) > 1e-3
    assert changed.tolist() == [False, False, False, True, False, False, False]
    np.testing.assert_allclose(third.tokens_of(["img03"])[0, 0], np.full(TOKEN_DIM, 127.5), rtol=1e-3)


def test_folder_cache_entry_is_an_embeddings_file(tmp_path) -> None:
    from safetensors.numpy import load_file

    folder = tmp_path / "images"
    write_images(folder, ["b", "a", "c"])
    embedder = QuadrantColourEmbedder()
    tokens = load_image_tokens(folder, embedder, tmp_path / "cache", ids=["c", "a"], progress=False)
    assert tokens.ids == ["a", "c"] and tokens.source == str(folder)  # only the ids asked for
    entry = next((tmp_path / "cache").glob("*.safetensors"))
    stored = load_file(str(entry))  # written block by block, yet a valid safetensors file
    assert stored["tokens"].shape == (2, 1, TOKEN_DIM) and stored["pooled"].shape == (2, TOKEN_DIM)
    folder_images = ImageFolder(folder)  # what was embedded: the images resized to 224 px
    expected = embedder.embed(folder_images.images(folder_images.rows(["a", "c"]))).tokens
    np.testing.assert_allclose(read_embeddings_file(entry).take([0, 1]), expected, rtol=1e-3, atol=0.05)
    with pytest.raises(BundleError, match=r"images: no image file for stim_id 'z'"):
        load_image_tokens(folder, embedder, tmp_path / "cache", ids=["a", "z"], progress=False)


def test_candidates_from_a_configured_folder(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "candidates"
    pixels = write_images(folder, ["shown", "other", "third"], seed=3)
    (folder / "notes.txt").write_text("not an image")
    (folder / "._shown.png").write_bytes(b"macOS resource fork, not an image")
    embedder = QuadrantColourEmbedder()
    monkeypatch.setattr("rtdecoder.embedding.base.make_embedder", lambda config, device="cpu": embedder)
    config = small_config(images_dir=str(folder), embed_batch_size=2)
    config = config.model_copy(update={"embedding": config.embedding.model_copy(
        update={"cache_dir": str(tmp_path / "cache")})})
    bank = candidates_from_config(config, fake_bundle(config), progress=False)
    assert bank.ids == ["other", "shown", "third"] and embedder.batch_sizes == [2, 1]
    query = torch.from_numpy(embedder.embed(pixels["shown"][None]).tokens)
    result = bank.top_k(query, 1, shown_ids=["shown"])
    assert result.ids == [["shown"]] and result.shown_ranks == [1]  # the trial's stim_id is a candidate id
    candidates_from_config(config, fake_bundle(config), progress=False)
    assert embedder.batch_sizes == [2, 1, 1]  # the second start reads the cache (the 1 is the query above)
    with pytest.raises(BundleError, match=r"embedding.name: bundle predicts 'another-embedder'"):
        candidates_from_config(config, fake_bundle(config, "another-embedder"), progress=False)


def test_candidates_from_an_embeddings_file(tmp_path) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(300, 1, TOKEN_DIM)).astype(np.float32)
    ids = [f"nsd{i:05d}" for i in range(300)]
    path = write_embeddings_file(tmp_path / "lab.safetensors", ids, tokens, QuadrantColourEmbedder.name,
                                 storage_dtype="float32")
    read = read_embeddings_file(path)
    assert isinstance(read.tokens, np.memmap) and read.ids == ids  # rows are read on demand
    config = small_config(embeddings_file=str(path))
    bank = candidates_from_config(config, fake_bundle(config))
    assert len(bank) == 300 and bank.ids[:2] == ["nsd00000", "nsd00001"]
    result = bank.top_k(torch.from_numpy(tokens[[123]]), 3)
    assert result.ids[0][0] == "nsd00123" and result.scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_embeddings_file_of_another_embedder_or_shape_is_rejected(tmp_path) -> None:
    tokens = np.zeros((4, 1, TOKEN_DIM), dtype=np.float32)
    ids = ["a", "b", "c", "d"]
    other = write_embeddings_file(tmp_path / "other.safetensors", ids, tokens, "openclip[ViT-bigG-14]")
    config = small_config(embeddings_file=str(other))
    with pytest.raises(BundleError, match=rf"{other}: embedder: expected 'quadrant-colour\[test\]' .*bundle sub-01"):
        candidates_from_config(config, fake_bundle(config))
    wide = write_embeddings_file(tmp_path / "wide.safetensors", ids, np.zeros((4, 2, TOKEN_DIM), np.float32),
                                 QuadrantColourEmbedder.name)
    config = small_config(embeddings_file=str(wide))
    with pytest.raises(BundleError, match=rf"{wide}: tokens: expected shape \(n, 1, 12\) .*\(got \(4, 2, 12\)\)"):
        candidates_from_config(config, fake_bundle(config))


def test_malformed_embeddings_files_name_the_field(tmp_path) -> None:
    from safetensors.numpy import save_file

    tokens = {"tokens": np.zeros((2, 1, TOKEN_DIM), dtype=np.float32)}
    no_ids = tmp_path / "no_ids.safetensors"
    save_file(tokens, str(no_ids), metadata={"embedder": "x"})
    with pytest.raises(BundleError, match=rf"{no_ids}: ids: expected a JSON list"):
        read_embeddings_file(no_ids)
    short = tmp_path / "short.safetensors"
    save_file(tokens, str(short), metadata={"embedder": "x", "ids": '["only-one"]'})
    with pytest.raises(BundleError, match=rf"{short}: ids: expected 2 ids"):
        read_embeddings_file(short)
    anonymous = tmp_path / "anonymous.safetensors"
    save_file(tokens, str(anonymous), metadata={"ids": '["a", "b"]'})
    with pytest.raises(BundleError, match=rf"{anonymous}: embedder: missing"):
        read_embeddings_file(anonymous)
    no_tokens = tmp_path / "no_tokens.safetensors"
    save_file({"pooled": np.zeros((2, TOKEN_DIM), np.float32)}, str(no_tokens), metadata={"embedder": "x"})
    with pytest.raises(BundleError, match=rf"{no_tokens}: tokens: missing"):
        read_embeddings_file(no_tokens)
    with pytest.raises(BundleError, match="ids: expected unique"):
        write_embeddings_file(tmp_path / "dup.safetensors", ["a", "a"], tokens["tokens"], "x")


def test_candidates_config_names_one_source(tmp_path) -> None:
    with pytest.raises(ConfigError, match="candidates: set images_dir or embeddings_file, not both"):
        small_config(images_dir="a", embeddings_file="b")
    config = small_config()
    with pytest.raises(ConfigError, match="candidates: expected images_dir .* or embeddings_file"):
        candidates_from_config(config, fake_bundle(config))
    with pytest.raises(BundleError, match="expected a folder with image files or a .safetensors embeddings file"):
        load_image_tokens(tmp_path / "absent")


def test_phantom_decoder_takes_the_configured_candidates(tmp_path) -> None:
    from rtdecoder.phantom.decoding import phantom_candidates

    path = write_embeddings_file(tmp_path / "lab.safetensors", ["x", "y"], np.ones((2, 1, TOKEN_DIM), np.float32),
                                 QuadrantColourEmbedder.name)
    config = small_config(embeddings_file=str(path))
    assert phantom_candidates(config, fake_bundle(config)).ids == ["x", "y"]


def test_candidate_bank_from_a_memory_map_matches_the_array(tmp_path, rng) -> None:
    tokens = rng.normal(size=(600, 2, 5)).astype(np.float32)  # more rows than one normalisation block
    path = write_embeddings_file(tmp_path / "t.safetensors", [str(i) for i in range(600)], tokens, "e",
                                 storage_dtype="float32")
    mapped = CandidateBank.from_embeddings_file(path, embedding_name="e", token_shape=(2, 5))
    direct = CandidateBank([str(i) for i in range(600)], tokens)
    query = torch.from_numpy(tokens[[5, 599]])
    assert mapped.top_k(query, 4).ids == direct.top_k(query, 4).ids
    np.testing.assert_allclose(mapped.top_k(query, 4).scores, direct.top_k(query, 4).scores, atol=1e-6)
