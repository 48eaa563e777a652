"""Tests of top-k retrieval from a candidate bank and of the image metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rtdecoder.decode.image_metrics import pixcorr, reconstruction_metrics, ssim, two_way_identification
from rtdecoder.decode.retrieval import CandidateBank
from rtdecoder.embedding.base import Embedding
from rtdecoder.errors import BundleError, DecoderError


def test_top_k_ranks_by_cosine(rng):
    tokens = rng.normal(size=(10, 3, 4)).astype(np.float32)
    bank = CandidateBank([f"img{i}" for i in range(10)], tokens)
    query = torch.from_numpy(tokens[[7, 2]] * 3.0 + 0.01 * rng.normal(size=(2, 3, 4)).astype(np.float32))
    result = bank.top_k(query, k=3)
    assert result.indices[:, 0].tolist() == [7, 2]
    assert result.ids[0][0] == "img7"
    assert np.all(np.diff(result.scores, axis=1) <= 0) and result.scores[0, 0] == pytest.approx(1.0, abs=1e-3)
    flat = tokens.reshape(10, -1)
    expected = flat @ flat[7] / (np.linalg.norm(flat, axis=1) * np.linalg.norm(flat[7]))
    assert result.indices[0].tolist() == np.argsort(-expected)[:3].tolist()
    with pytest.raises(DecoderError, match=r"predicted tokens: expected shape \(B, 3, 4\)"):
        bank.top_k(torch.zeros(1, 3, 5), 1)
    with pytest.raises(DecoderError, match="k: expected 1..10"):
        bank.top_k(query, 11)


def test_shown_image_rank_among_all_candidates(rng):
    tokens = rng.normal(size=(10, 3, 4)).astype(np.float32)
    bank = CandidateBank([f"img{i}" for i in range(10)], tokens)
    query = torch.from_numpy(tokens[[7, 2]])
    flat = tokens.reshape(10, -1)
    cosine = flat @ flat[7] / (np.linalg.norm(flat, axis=1) * np.linalg.norm(flat[7]))
    order = np.argsort(-cosine)  # img7 first; the rank of img{order[4]} is 5, beyond k
    result = bank.top_k(query, k=2, shown_ids=[f"img{order[4]}", None])
    assert result.shown_ranks == [5, None]
    assert bank.top_k(query, k=1, shown_ids=["img7", "not-in-bank"]).shown_ranks == [1, None]
    assert bank.top_k(query, k=1).shown_ranks is None
    with pytest.raises(DecoderError, match="shown_ids: expected 2"):
        bank.top_k(query, 1, shown_ids=["img7"])


class _MeanColourEmbedder:
    name = "mean-colour"
    n_tokens, token_dim = 1, 3

    def __init__(self):
        self.calls = 0

    def embed(self, images):
        self.calls += 1
        pooled = images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32) - 127.5
        return Embedding(tokens=pooled[:, None, :].copy(), pooled=pooled)


def test_folder_bank_is_embedded_once_and_cached(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, colour in (("red.png", (255, 0, 0)), ("green.png", (0, 255, 0)), ("blue.jpg", (0, 0, 255))):
        Image.new("RGB", (20, 20), colour).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    embedder = _MeanColourEmbedder()
    bank = CandidateBank.from_folder(folder, embedder, tmp_path / "cache")
    again = CandidateBank.from_folder(folder, embedder, tmp_path / "cache")
    # ids are the file stems: a trial's stim_id names its image, so the shown image is found among them
    assert embedder.calls == 1 and bank.ids == again.ids == ["blue", "green", "red"]
    assert again.top_k(torch.tensor([[[100.0, -120.0, -120.0]]]), 1).ids == [["red"]]
    with pytest.raises(BundleError, match="expected a folder with image files"):
        CandidateBank.from_folder(tmp_path / "missing", embedder, tmp_path / "cache")


def test_two_way_identification_counts_wins():
    real = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    assert two_way_identification(real, real) == 1.0
    swapped = real[[1, 0, 2]]  # reconstructions 0 and 1 look like each other's image
    # rec 0 and 1 beat nobody (ties do not count); rec 2 beats both others.
    assert two_way_identification(real, swapped) == pytest.approx((0 + 0 + 1.0) / 3)
    with pytest.raises(DecoderError, match="two-way identification: features"):
        two_way_identification(real, real[:2])


def test_pixcorr_and_ssim(rng):
    real = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    assert pixcorr(real, real) == pytest.approx(1.0, abs=1e-5)
    assert ssim(real, real) == pytest.approx(1.0, abs=1e-5)
    inverted = 255 - real
    assert pixcorr(real, inverted) == pytest.approx(-1.0, abs=1e-5)
    noise = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    assert abs(pixcorr(real, noise)) < 0.2 and ssim(real, noise) < 0.5
    metrics = reconstruction_metrics(real, real, lambda im: im.reshape(len(im), -1).astype(float))
    assert metrics["two_way"] == 1.0
    with pytest.raises(DecoderError, match="recon: expected 2 images"):
        pixcorr(real, real[:1])
