"""Tests of the live decoder's retrieval: z-scoring with the bundle's statistics, the ranking and
the shown image's rank."""

from __future__ import annotations

import numpy as np
import torch

from rtdecoder.config import ModelConfig
from rtdecoder.decode.live import LiveDecoder
from rtdecoder.decode.model import MindEye2
from rtdecoder.decode.retrieval import CandidateBank
from rtdecoder.engines.torch_backend import TorchEngine

N_VOXELS = 12


def test_retrieve_ranks_the_bank_from_the_z_scored_beta(rng):
    torch.manual_seed(0)
    config = ModelConfig(hidden_dim=32, n_blocks=1, dropout=0.0, n_tokens=4, token_dim=16, prior_dim=16,
                         prior_depth=1, prior_heads=2, prior_timesteps=10)
    engine = TorchEngine(MindEye2(config, {"sub-01": N_VOXELS}), "sub-01")
    ids = [f"c{i}" for i in range(6)]
    bank = CandidateBank(ids, rng.normal(size=(6, 4, 16)).astype(np.float32))
    mean, std = rng.normal(size=N_VOXELS).astype(np.float32), rng.uniform(0.5, 2, N_VOXELS).astype(np.float32)
    decoder = LiveDecoder(engine, bank, None, mean, std, prior_steps=2, generator_steps=1)
    beta = rng.normal(size=N_VOXELS).astype(np.float32)

    decoded = decoder.retrieve(beta, top_k=3, shown_id="c4")

    tokens = engine.encode(torch.from_numpy(((beta - mean) / std)[None])).clip_tokens
    expected = bank.top_k(tokens, k=6)
    assert decoded.ids == expected.ids[0][:3]
    assert decoded.n_candidates == 6
    assert decoded.shown_rank == expected.ids[0].index("c4") + 1
    assert decoder.retrieve(beta, top_k=3).shown_rank is None
