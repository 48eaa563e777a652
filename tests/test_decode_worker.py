"""The decode thread's reconstruction policy: skip only when betas of later volumes pile up."""

from __future__ import annotations

import numpy as np
from rtdecoder_client.messages import Message

from rtdecoder.config import SessionConfig
from rtdecoder.decode.protocol import Decoded
from rtdecoder.session.decode_worker import DecodeJob, DecodeWorker


class _Decoder:
    def retrieve(self, beta, top_k, shown_id=None) -> Decoded:
        return Decoded(["c0", "c1"], [0.5, 0.2], 1.0, n_candidates=2, shown_rank=1)

    def reconstruct(self, decoded, seed) -> bytes:
        return b"\x89PNG fake"


def _decode_queued(tr_indices: list[int]) -> list[str]:
    """Queue one beta per entry (released by that volume) before the thread starts; their reconstructions."""
    published: list[dict] = []

    def publish(topic, data, t):
        published.append(data)
        return Message(topic, "s", len(published) - 1, t, data)

    worker = DecodeWorker(_Decoder(), SessionConfig(reconstruct=True, max_decode_backlog=1), publish)
    for n, tr_index in enumerate(tr_indices):
        worker.put(DecodeJob("run-01", f"t{n:02d}", "c0", np.zeros(3, np.float32), n, {}, tr_index=tr_index))
    worker.start()
    worker.drain()
    worker.stop()
    return [data["reconstruction"] for data in published]


def test_a_burst_released_by_one_volume_is_reconstructed_whole() -> None:
    # A run's first six trials, held back by glm.min_residual_dof, come out of volume 30 together.
    # Counting them as a backlog (as before) skipped the first four reconstructions.
    assert _decode_queued([30] * 6) == ["done"] * 6


def test_betas_of_later_volumes_waiting_skip_reconstructions() -> None:
    # A decoder that fell behind: four volumes' betas wait. The oldest skip until at most
    # max_decode_backlog (1) later betas wait behind.
    assert _decode_queued([30, 31, 32, 33]) == ["skipped_backlog", "skipped_backlog", "done", "done"]
    # Unknown volumes (-1) count as later ones.
    assert _decode_queued([-1, -1, -1]) == ["skipped_backlog", "done", "done"]
