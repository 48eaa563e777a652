"""Tests of the hubness correction of retrieval (CSLS): a planted hub is demoted, scores stay cosines,
and every scorer of the project ranks as a brute-force CSLS does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdecoder.calibration.calibrate import retrieval_evaluation
from rtdecoder.calibration.evaluate import pooled_retrieval, single_trial_retrieval
from rtdecoder.decode.hubness import HubnessReference, mean_top_k_cosine, unit_rows
from rtdecoder.decode.metrics import candidate_ranks, retrieval_top1
from rtdecoder.decode.retrieval import CandidateBank
from rtdecoder.errors import ConfigError, DecoderError

N_TOKENS, TOKEN_DIM = 4, 16


def hub_world(rng, n_candidates=200, n_reference=300, bias=1.5, noise=0.6):
    """Candidate images, one of them (row 0) lying along the direction every prediction leans to.

    Predictions of an image are its unit vector + ``bias`` x the hub direction + noise: the hub is
    close to all of them, as a hub is in a real embedding space.
    """
    flat = N_TOKENS * TOKEN_DIM
    images = rng.normal(size=(n_candidates, flat))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    hub = rng.normal(size=flat)
    hub /= np.linalg.norm(hub)
    images[0] = hub

    def predict(unit_images):
        return unit_images + bias * hub + noise * rng.normal(size=unit_images.shape) / np.sqrt(flat)

    reference_images = rng.normal(size=(n_reference, flat))
    reference_images /= np.linalg.norm(reference_images, axis=1, keepdims=True)
    shape = (-1, N_TOKENS, TOKEN_DIM)
    queries = predict(images)  # one query per image, the hub's included
    return (images.reshape(shape).astype(np.float32), queries.reshape(shape).astype(np.float32),
            predict(reference_images).reshape(shape).astype(np.float32),
            reference_images.reshape(shape).astype(np.float32))


def brute_csls(queries, images, reference_predictions, reference_images, k):
    q, c = unit_rows(queries).double().numpy(), unit_rows(images).double().numpy()
    rp, ri = unit_rows(reference_predictions).double().numpy(), unit_rows(reference_images).double().numpy()
    r_pred = np.sort(c @ rp.T, axis=1)[:, -k:].mean(axis=1)
    r_image = np.sort(q @ ri.T, axis=1)[:, -k:].mean(axis=1)
    return 2 * q @ c.T - r_pred[None, :] - r_image[:, None]


def test_a_planted_hub_is_demoted_and_the_scores_stay_cosines(rng) -> None:
    images, queries, reference_predictions, reference_images = hub_world(rng)
    ids = [f"img{i}" for i in range(len(images))]
    bank = CandidateBank(ids, images)
    own = ids
    plain = bank.top_k(torch.from_numpy(queries), k=3, shown_ids=own)
    assert np.mean(plain.indices[:, 0] == 0) > 0.5, "the planted hub should win most queries by plain cosine"
    plain_hits = np.mean(np.array(plain.shown_ranks) == 1)

    bank.correct_hubness(HubnessReference.from_predictions(reference_predictions, reference_images, k=10))
    corrected = bank.top_k(torch.from_numpy(queries), k=3, shown_ids=own)
    assert np.mean(corrected.indices[:, 0] == 0) < 0.1
    assert np.mean(np.array(corrected.shown_ranks) == 1) > plain_hits + 0.3
    # the scores reported are the chosen candidates' cosines, whatever ranked them
    cosine = unit_rows(queries) @ unit_rows(images).T
    np.testing.assert_allclose(corrected.scores, np.take_along_axis(cosine.numpy(), corrected.indices, 1), atol=1e-5)
    # the ranking and the shown ranks are those of CSLS
    csls = brute_csls(queries, images, reference_predictions, reference_images, 10)
    np.testing.assert_array_equal(corrected.indices[:, 0], csls.argmax(axis=1))
    expected_ranks = 1 + (csls > np.diag(csls)[:, None]).sum(axis=1)
    assert corrected.shown_ranks == expected_ranks.tolist()

    bank.correct_hubness(None)  # plain cosine again, exactly as a bank never corrected
    again = bank.top_k(torch.from_numpy(queries), k=3, shown_ids=own)
    np.testing.assert_array_equal(again.indices, plain.indices)
    assert again.shown_ranks == plain.shown_ranks


def test_every_scorer_ranks_as_brute_force_csls(rng) -> None:
    images, queries, reference_predictions, reference_images = hub_world(rng, n_candidates=40, noise=3.0)
    targets = images  # row i of queries is the prediction of targets[i]
    k = 5
    reference = HubnessReference.from_predictions(reference_predictions, reference_images, k)
    csls = brute_csls(queries, targets, reference_predictions, reference_images, k)
    truth = np.arange(len(targets))
    image_top1 = float(np.mean(csls.argmax(axis=1) == truth))
    brain_top1 = float(np.mean(csls.argmax(axis=0) == truth))
    assert image_top1 != float(np.mean((unit_rows(queries) @ unit_rows(targets).T).numpy().argmax(1) == truth))

    scores = retrieval_top1(queries, targets, pool_size=len(targets), image_penalty=reference.image_penalty(targets),
                            query_penalty=reference.query_penalty(queries))
    assert (scores.image, scores.brain) == pytest.approx((image_top1, brain_top1))
    evaluation = retrieval_evaluation(queries, targets, hubness=reference)
    assert evaluation["scores"] == "csls k=5"
    assert (evaluation["image_top1"], evaluation["brain_top1"]) == pytest.approx((image_top1, brain_top1), abs=1e-4)
    pooled = pooled_retrieval(queries, targets, pool_size=len(targets), n_pools=1, hubness=reference)
    assert (pooled["image_top1"], pooled["brain_top1"]) == pytest.approx((image_top1, brain_top1), abs=1e-4)
    ids = [f"img{i}" for i in range(len(targets))]
    single = single_trial_retrieval(queries, ids, ids, targets, hubness=reference)
    assert (single["image_top1"], single["brain_top1"]) == pytest.approx((image_top1, brain_top1), abs=1e-4)

    ranks = candidate_ranks(queries, images, truth, image_penalty=reference.image_penalty(images))
    np.testing.assert_array_equal(ranks, 1 + (csls > np.diag(csls)[:, None]).sum(axis=1))


def test_mean_top_k_cosine_and_its_errors(rng) -> None:
    reference = unit_rows(np.eye(3))
    assert mean_top_k_cosine(np.array([[2.0, 0.0, 0.0]]), reference, 2).tolist() == [0.5]
    assert mean_top_k_cosine(np.array([[1.0, 1.0, 0.0]]), reference, 10).tolist() == pytest.approx([2 ** -0.5 * 2 / 3])
    with pytest.raises(ConfigError, match="k: expected >= 1"):
        mean_top_k_cosine(np.ones((1, 3)), reference, 0)
    with pytest.raises(ConfigError, match="queries have 4 values per row, the reference 3"):
        mean_top_k_cosine(np.ones((1, 4)), reference, 1)
    bank = CandidateBank(["a", "b"], rng.normal(size=(2, 2, 3)).astype(np.float32))
    with pytest.raises(DecoderError, match="hubness reference has 3 values per prediction, the candidates 6"):
        bank.correct_hubness(HubnessReference.from_predictions(np.ones((4, 3)), None, 2))
    with pytest.raises(ConfigError, match="penalty: expected shape"):
        retrieval_top1(np.ones((3, 2)), np.ones((3, 2)), image_penalty=np.zeros(2))
