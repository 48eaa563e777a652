"""Scoring a subject bundle on a recorded test session, and the live figures labs compare.

:func:`evaluate_session` is what ``rtdecoder evaluate`` runs:

1. **The live front end, offline.** Every run of the session (:func:`rtdecoder.calibration.betas.find_runs`:
   run folders or BIDS) is read volume by volume and fed, in index order, through a
   :class:`~rtdecoder.session.frontend.FrontEnd` built from the *bundle* as ``rtdecoder run``
   builds it (:func:`rtdecoder.session.frontend.build_run_frontend`, the runner's own construction):
   motion correction to the bundle's reference, the bundle's mask, percent signal change of the
   bundle's ``signal_mean``, the bundle's per-voxel HRFs, and the run config's ``glm`` section.
   Not the offline calibration path (:func:`~rtdecoder.calibration.betas.estimate_session_betas`):
   that one takes the test session's own motion reference (its first run's middle volume), its
   own ``signal_mean`` and its own HRF choice, none of which a live session has. The TR of each
   run is checked as the runner checks it (:func:`~rtdecoder.session.runner.run_tr_s`), the
   slice-time reference follows ``glm.slice_time_ref_s``, and a run is planned for the volumes on
   disk (as ``rtdecoder run --n-volumes``). Refinements are always computed
   (``glm.publish_refinements`` forced on): they do not change first or final betas, and the
   "slow" figure needs them.
2. **Retrieval with repeats averaged.** The test trials' final (end-of-run) betas are z-scored
   with the bundle's statistics, averaged by ``stim_id`` and decoded by the bundle's model; image
   (brain -> image) and brain (image -> brain) retrieval, top-1 and top-5, among the whole test
   set (one pool) and among random pools of a configured size (:func:`pooled_retrieval`; 300 and
   30 pools by default, as the field reports; all test images when fewer).
3. **Live figures** (:func:`live_figures`): single-trial retrieval at three moments of each
   trial, as real-time MindEye reports them:

   - ``fast``: the trial's first beta (released ``glm.beta_wait_s`` after onset, about 8 s; a run's first trials
     later, held back by ``glm.min_residual_dof``);
   - ``slow``: the latest beta at most ``slow_after_onset_s`` (default 29.5 s, real-time MindEye's
     "slow") after onset, refinements included; with ``slow_after_onset_s=None`` the trial's last
     refinement, the last beta before its regressor ends (about its duration + 32 s);
   - ``end_of_run``: the trial's final beta, fitted on the whole run.

   Each among two pools: the run's own images (its trials' distinct images, about 50-62 in an
   NSD-like run; scored run by run, pooled over trials) and the test set. "After onset" is the
   start of the beta's last volume minus the onset, ``tr_index * tr_s - onset_s`` (the report's
   beta readiness).
4. **Image metrics** of reconstructions (:mod:`rtdecoder.decode.image_metrics`) when a decoder
   with a generator is given: each averaged test image is retrieved and reconstructed by the
   decoder, and compared with the shown image (two-way identification, PixCorr, SSIM).

Every figure ranks as the live decoder does: by CSLS against the bundle's hubness reference when
``candidates.hubness_k`` is above 0 (:mod:`rtdecoder.decode.hubness`; the JSON's
``retrieval_scores`` says which), by plain cosine when it is 0.

Single-trial brain retrieval when an image has several trials in a pool (test images shown
three times): the competitors of trial ``j`` (image ``a``) are one trial of each other image, and
the figure is its expectation over which trial stands for each other image, computed exactly
(:func:`single_trial_retrieval`). Its chance level is ``1 / n_images``, as without repeats, where
it is the usual figure.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.hubness_reference import bundle_hubness_reference
from rtdecoder.config import RTDecoderConfig
from rtdecoder.decode.hubness import HubnessReference, scoring_name
from rtdecoder.embedding.cache import ImageTokens
from rtdecoder.errors import BundleError
from rtdecoder.glm.design import slice_time_ref_from
from rtdecoder.glm.incremental import TrialBeta
from rtdecoder.session.frontend import build_run_frontend

logger = logging.getLogger(__name__)

#: Real-time MindEye's "slow" decode: a beta from the volumes up to about 29.5 s after onset.
SLOW_AFTER_ONSET_S = 29.5
STAGES = ("fast", "slow", "end_of_run")
TOP_K = (1, 5)
DEFAULT_POOL_SIZE = 300
DEFAULT_N_POOLS = 30
EVALUATION_NAME = "evaluation.json"


# ----------------------------------------------------------------------------- betas as published


@dataclass(frozen=True)
class LiveBeta:
    """One beta of one trial, as the live session publishes it (a ``beta`` message).

    Attributes
    ----------
    run : str
        Run label.
    trial_id : str
    stim_id : str or None
        The image the trial showed.
    kind : {"first", "update", "final"}
        The first release, a refinement, or the end-of-run fit.
    after_onset_s : float
        Start of the beta's last volume minus the trial's onset, s (``tr_index * tr_s - onset_s``).
    beta : ndarray of shape (n_voxels,), float32, or None
        The beta map in GLM units (percent signal change); ``None`` when not published.
    """

    run: str
    trial_id: str
    stim_id: str | None
    kind: str
    after_onset_s: float
    beta: np.ndarray | None

    @classmethod
    def from_trial_beta(cls, run: str, beta: TrialBeta, stim_id: str | None, tr_s: float) -> LiveBeta:
        """From the GLM's :class:`~rtdecoder.glm.incremental.TrialBeta`."""
        kind = "final" if beta.is_final else ("update" if beta.is_update else "first")
        return cls(run, beta.trial_id, stim_id, kind, beta.tr_index * tr_s - beta.onset_s, beta.beta)

    @classmethod
    def from_message(cls, data: Mapping[str, Any], tr_s: float) -> LiveBeta:
        """From a ``beta`` message's data (the journal's or a subscriber's)."""
        kind = "final" if data.get("is_final") else ("update" if data.get("is_update") else "first")
        beta = data.get("beta")
        return cls(
            str(data.get("run")), str(data["trial_id"]), data.get("stim_id"), kind,
            float(data["tr_index"]) * tr_s - float(data["onset_s"]),
            None if beta is None else np.asarray(beta, dtype=np.float32),
        )


class StageSelector:
    """Keeps, per trial, the three betas the live figures score: ``fast``, ``slow`` and ``end_of_run``.

    Fed betas in publication order (:meth:`add`); holds at most three maps per trial, so that a
    whole session's refinements never need to be in memory at once.

    Parameters
    ----------
    slow_after_onset_s : float or None, default=29.5
        ``slow`` is the latest non-final beta at most this long after onset (the first beta when
        even that is later); ``None``: the latest non-final beta (the last refinement).
    """

    def __init__(self, slow_after_onset_s: float | None = SLOW_AFTER_ONSET_S) -> None:
        self.slow_after_onset_s = slow_after_onset_s
        self.n_updates = 0
        self._stages: dict[str, dict[tuple[str, str], LiveBeta]] = {stage: {} for stage in STAGES}

    def add(self, beta: LiveBeta) -> None:
        """Take one beta (any kind); betas of a trial must come in the order they were published."""
        key = (beta.run, beta.trial_id)
        if beta.kind == "final":
            self._stages["end_of_run"][key] = beta
            return
        if beta.kind == "first":
            self._stages["fast"].setdefault(key, beta)
        else:
            self.n_updates += 1
        slow = self._stages["slow"]
        current = slow.get(key)
        in_window = self.slow_after_onset_s is None or beta.after_onset_s <= self.slow_after_onset_s + 1e-9
        if current is None or (in_window and beta.after_onset_s >= current.after_onset_s):
            slow[key] = beta

    def stages(self) -> dict[str, list[LiveBeta]]:
        """Each stage's betas, one per trial, in the order trials were first seen."""
        return {stage: list(chosen.values()) for stage, chosen in self._stages.items()}


# ----------------------------------------------------------------------------- retrieval figures


def _unit_rows(x: np.ndarray) -> np.ndarray:
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def _penalties(
    hubness: HubnessReference | None, predicted: np.ndarray, images: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(image penalties, query penalties) as float64 rows; zeros without a hubness reference."""
    if hubness is None:
        return np.zeros(len(images)), np.zeros(len(predicted))
    return (hubness.image_penalty(images).astype(np.float64), hubness.query_penalty(predicted).astype(np.float64))


def pooled_retrieval(
    predicted: np.ndarray,
    targets: np.ndarray,
    pool_size: int = DEFAULT_POOL_SIZE,
    n_pools: int = DEFAULT_N_POOLS,
    seed: int = 0,
    top_k: Sequence[int] = TOP_K,
    hubness: HubnessReference | None = None,
) -> dict[str, Any]:
    """Image and brain retrieval top-k among random pools, one prediction per image.

    The pools are drawn as :func:`rtdecoder.decode.metrics.retrieval_top1` draws them (same seed,
    same pools), so top-1 equals its figures.

    Parameters
    ----------
    predicted, targets : ndarray of shape (n, T, D)
        Predicted tokens (e.g. of averaged repeats) and the true image tokens, row for row.
    pool_size : int, default=300
        Images per pool; all ``n`` (one pool) when ``n <= pool_size``.
    n_pools : int, default=30
    seed : int, default=0
    top_k : sequence of int, default=(1, 5)
    hubness : HubnessReference, optional
        Scores by CSLS against it (:mod:`rtdecoder.decode.hubness`); ``None``: plain cosine.

    Returns
    -------
    dict
        ``image_top{k}`` (brain -> image: the trial's image among the pool's images) and
        ``brain_top{k}`` (image -> brain: the image's prediction among the pool's predictions),
        fractions; ``pool_size``, ``n_pools``, ``chance_top1``, ``n_images``.

    Examples
    --------
    >>> x = np.eye(6, dtype=np.float32)[:, None, :]
    >>> pooled_retrieval(x, x, pool_size=4, n_pools=2)["image_top1"]
    1.0
    """
    n = len(predicted)
    if n < 2:
        return {"n_images": n, "note": "fewer than 2 test images; not evaluated"}
    p, t = _unit_rows(predicted), _unit_rows(targets)
    image_penalty, query_penalty = _penalties(hubness, predicted, targets)
    if pool_size >= n:
        pool_size, n_pools = n, 1
    rng = np.random.default_rng(seed)
    hits: dict[str, list[float]] = {f"{d}_top{k}": [] for d in ("image", "brain") for k in top_k}
    for _ in range(n_pools):
        idx = rng.choice(n, size=pool_size, replace=False)
        # rows predictions, columns images
        sim = p[idx] @ t[idx].T - image_penalty[None, idx] - query_penalty[idx, None]
        own = np.diag(sim)
        image_rank = 1 + (sim > own[:, None]).sum(axis=1)
        brain_rank = 1 + (sim > own[None, :]).sum(axis=0)
        for k in top_k:
            hits[f"image_top{k}"].append(float(np.mean(image_rank <= k)))
            hits[f"brain_top{k}"].append(float(np.mean(brain_rank <= k)))
    result: dict[str, Any] = {key: round(float(np.mean(values)), 4) for key, values in hits.items()}
    return result | {"pool_size": pool_size, "n_pools": n_pools, "chance_top1": round(1.0 / pool_size, 4),
                     "n_images": n}


def single_trial_retrieval(
    predicted: np.ndarray,
    trial_images: Sequence[str],
    candidate_ids: Sequence[str],
    candidate_tokens: np.ndarray,
    top_k: Sequence[int] = TOP_K,
    hubness: HubnessReference | None = None,
) -> dict[str, Any]:
    """Retrieval of single trials among a pool of images, both ways, repeats allowed.

    Image retrieval (brain -> image): the rank of trial ``j``'s image among all ``candidate_ids``
    by cosine with its prediction. Brain retrieval (image -> brain): for trial ``j`` of image
    ``a``, the rank of its prediction, scored against image ``a``, among one trial of each other
    image that has trials here; when images have several trials, the figure is the expectation
    over which trial stands for each other image, computed exactly (per other image, the share of
    its trials that beat trial ``j``; top-k is the chance that fewer than ``k`` do). Without
    repeats this is the usual figure.

    Parameters
    ----------
    predicted : ndarray of shape (n_trials, T, D)
        Predicted tokens of single trials.
    trial_images : sequence of str, length n_trials
        Each trial's image; every one among ``candidate_ids``.
    candidate_ids : sequence of str
        The pool's images (unique).
    candidate_tokens : ndarray of shape (n_candidates, T, D)
        Their tokens, row for row.
    top_k : sequence of int, default=(1, 5)
    hubness : HubnessReference, optional
        Scores by CSLS against it (:mod:`rtdecoder.decode.hubness`); ``None``: plain cosine.

    Returns
    -------
    dict
        ``image_top{k}``, ``brain_top{k}`` (fractions, means over trials), ``n_trials``,
        ``image_pool_size`` (candidates), ``brain_pool_size`` (images with trials here),
        ``chance_image_top1``, ``chance_brain_top1``.

    Examples
    --------
    >>> tokens = np.eye(3, dtype=np.float32)[:, None, :]
    >>> result = single_trial_retrieval(tokens[[0, 1, 2, 0]], ["a", "b", "c", "a"], ["a", "b", "c"], tokens)
    >>> result["image_top1"], result["brain_top1"]
    (1.0, 1.0)
    """
    trial_images = [str(s) for s in trial_images]
    row_of = {str(c): i for i, c in enumerate(candidate_ids)}
    n = len(trial_images)
    if n == 0:
        return {"n_trials": 0, "image_pool_size": len(row_of), "note": "no trial to score"}
    own_row = np.array([row_of[s] for s in trial_images])
    p, c = _unit_rows(predicted), _unit_rows(candidate_tokens)
    image_penalty, query_penalty = _penalties(hubness, predicted, candidate_tokens)
    sim = p @ c.T - image_penalty[None, :] - query_penalty[:, None]  # (n_trials, n_candidates)
    own = sim[np.arange(n), own_row]
    image_rank = 1 + (sim > own[:, None]).sum(axis=1)
    result: dict[str, Any] = {f"image_top{k}": round(float(np.mean(image_rank <= k)), 4) for k in top_k}

    # Brain direction: the images with trials here, and each trial's image among them.
    images, image_of_trial = np.unique(own_row, return_inverse=True)
    n_images = images.size
    if n_images >= 2:
        # beats[j, m]: trial m's prediction scores trial j's image higher than trial j does
        beats = sim[:, own_row].T > own[:, None]  # (j, m): sim[m, own_row[j]] > own[j]
        members = np.zeros((n, n_images))
        members[np.arange(n), image_of_trial] = 1.0
        share = (beats @ members) / members.sum(axis=0)  # (j, image): share of its trials beating j
        share[np.arange(n), image_of_trial] = 0.0  # the own image is no competitor
        k_max = max(top_k)
        # Poisson-binomial over the other images: P(exactly c of them beat trial j), c < k_max.
        dist = np.zeros((n, k_max))
        dist[:, 0] = 1.0
        for column in share.T:
            shifted = np.zeros_like(dist)
            shifted[:, 1:] = dist[:, :-1] * column[:, None]
            dist = dist * (1.0 - column[:, None]) + shifted
        for k in top_k:
            result[f"brain_top{k}"] = round(float(np.mean(dist[:, :k].sum(axis=1))), 4)
    return result | {
        "n_trials": n, "image_pool_size": len(row_of), "brain_pool_size": int(n_images),
        "chance_image_top1": round(1.0 / len(row_of), 4),
        "chance_brain_top1": round(1.0 / n_images, 4) if n_images else None,
    }


class LiveScorer:
    """Beta maps -> the bundle's predicted retrieval tokens, with the image tokens to score them against.

    Parameters
    ----------
    model : MindEye2
        The bundle's model.
    subject_id : str
        Its adapter.
    beta_mean, beta_std : ndarray of shape (n_voxels,)
        The bundle's z-scoring statistics (raw betas are z-scored as the live decoder does).
    tokens : ImageTokens
        Tokens of the shown images, by stim_id.
    test_ids : sequence of str, optional
        The test set's images (the pool "among the test set"); default none.
    hubness : HubnessReference, optional
        Scores by CSLS against it, as the live decoder ranks (``None``: plain cosine).
    """

    def __init__(
        self, model: Any, subject_id: str, beta_mean: np.ndarray, beta_std: np.ndarray, tokens: ImageTokens,
        test_ids: Sequence[str] | None = None, hubness: HubnessReference | None = None,
    ) -> None:
        self.model = model
        self.subject_id = subject_id
        self.beta_mean = np.asarray(beta_mean, dtype=np.float32)
        self.beta_std = np.asarray(beta_std, dtype=np.float32)
        self.tokens = tokens
        self.test_ids = [str(s) for s in test_ids] if test_ids is not None else []
        self.hubness = hubness

    @classmethod
    def from_bundle(
        cls, bundle: SubjectBundle, tokens: ImageTokens, test_ids: Sequence[str] | None = None, device: str = "cpu",
        hubness_k: int | None = None,
    ) -> LiveScorer:
        """The bundle's model and statistics; ``test_ids`` default: the calibration session's test images.
        ``hubness_k`` (``candidates.hubness_k``; default the bundle config's) above 0 scores by CSLS
        against the bundle's hubness reference, as the live decoder ranks; 0 by plain cosine."""
        if tokens.embedding_name:
            bundle.check_embedding(tokens.embedding_name)
        if test_ids is None:
            test_ids = calibration_test_ids(bundle)
        model = bundle.load_model(device)
        k = bundle.config.candidates.hubness_k if hubness_k is None else hubness_k
        hubness = bundle_hubness_reference(bundle, model, k, tokens)
        return cls(model, bundle.subject_id, bundle.beta_mean, bundle.beta_std, tokens, test_ids, hubness)

    def predict(self, betas: np.ndarray) -> np.ndarray:
        """Predicted retrieval tokens of raw beta maps (n, n_voxels) -> (n, T, D), float32."""
        from rtdecoder.calibration.calibrate import predict_clip_tokens

        z = (np.asarray(betas, dtype=np.float32) - self.beta_mean) / self.beta_std
        return predict_clip_tokens(self.model, self.subject_id, z)


def calibration_test_ids(bundle: SubjectBundle) -> list[str]:
    """The test images (``is_test``) of the bundle's calibration session, from its ``betas/trials.tsv``."""
    return calibration_stim_ids(bundle, test=True) or []


def calibration_stim_ids(bundle: SubjectBundle, test: bool) -> list[str] | None:
    """The calibration session's test (or training) images, from ``betas/trials.tsv``; None without it."""
    path = bundle.directory / "betas" / "trials.tsv" if bundle.directory is not None else None
    if path is None or not path.is_file():
        return None
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return sorted({row["stim_id"] for row in rows if (row.get("is_test") == "true") == test and row.get("stim_id")})


def live_figures(
    stages: Mapping[str, Sequence[LiveBeta]],
    scorer: LiveScorer,
    test_ids: Sequence[str] | None = None,
    top_k: Sequence[int] = TOP_K,
) -> dict[str, Any]:
    """Single-trial retrieval at each stage, among each run's images and among the test set.

    Parameters
    ----------
    stages : mapping of str to sequence of LiveBeta
        One beta per trial and stage (:meth:`StageSelector.stages`).
    scorer : LiveScorer
    test_ids : sequence of str, optional
        The test set; default ``scorer.test_ids``. Trials showing one of them are scored among all
        of them (those with tokens).
    top_k : sequence of int, default=(1, 5)

    Returns
    -------
    dict
        Per stage: ``n_trials`` (scored: a finite beta map and an image with tokens),
        ``after_onset_s_median``, ``run`` (trial-weighted means over the runs' pools, with
        ``n_runs`` and the pools' ``pool_size_mean`` / ``_min`` / ``_max``) and ``test_set``
        (:func:`single_trial_retrieval`); ``note`` when nothing could be scored.
    """
    test_ids = [s for s in (scorer.test_ids if test_ids is None else test_ids) if s in scorer.tokens]
    test_set = set(test_ids)
    figures: dict[str, Any] = {}
    for stage in STAGES:
        usable = [b for b in stages.get(stage, ()) if b.beta is not None and b.stim_id and b.stim_id in scorer.tokens
                  and np.all(np.isfinite(b.beta))]
        if not usable:
            figures[stage] = {"n_trials": 0, "note": "no scorable beta (no beta maps, images or trials)"}
            continue
        predicted = scorer.predict(np.stack([b.beta for b in usable]))
        entry: dict[str, Any] = {
            "n_trials": len(usable),
            "after_onset_s_median": round(float(np.median([b.after_onset_s for b in usable])), 2),
        }
        per_run = []
        for run in dict.fromkeys(b.run for b in usable):
            rows = [i for i, b in enumerate(usable) if b.run == run]
            ids = sorted({usable[i].stim_id for i in rows})
            if len(ids) >= 2:
                per_run.append(single_trial_retrieval(predicted[rows], [usable[i].stim_id for i in rows], ids,
                                                      scorer.tokens.tokens_of(ids), top_k, scorer.hubness))
        entry["run"] = _trial_weighted(per_run)
        rows = [i for i, b in enumerate(usable) if b.stim_id in test_set]
        if rows and len(test_ids) >= 2:
            entry["test_set"] = single_trial_retrieval(
                predicted[rows], [usable[i].stim_id for i in rows], test_ids, scorer.tokens.tokens_of(test_ids), top_k,
                scorer.hubness,
            )
        else:
            entry["test_set"] = {"n_trials": len(rows), "note": "no test-set trial, or fewer than 2 test images"}
        figures[stage] = entry
    return figures


def _trial_weighted(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over runs weighted by each run's scored trials (= the mean over all trials)."""
    if not per_run:
        return {"n_trials": 0, "note": "no run with 2 or more images"}
    weights = np.array([r["n_trials"] for r in per_run], dtype=np.float64)
    keys = [k for k in per_run[0] if k.startswith(("image_top", "brain_top")) and all(k in r for r in per_run)]
    out: dict[str, Any] = {k: round(float(np.average([r[k] for r in per_run], weights=weights)), 4) for k in keys}
    sizes = [r["image_pool_size"] for r in per_run]
    return out | {
        "n_trials": int(weights.sum()), "n_runs": len(per_run), "pool_size_mean": round(float(np.mean(sizes)), 1),
        "pool_size_min": int(min(sizes)), "pool_size_max": int(max(sizes)),
        "chance_top1": round(float(np.average([1.0 / s for s in sizes], weights=weights)), 4),
    }


# ----------------------------------------------------------------------------- the live front end, offline


@dataclass
class RunReplay:
    """One run of a test session after the bundle's front end.

    Attributes
    ----------
    run : str
        Run label (its folder name, or the BIDS run name).
    tr_s : float
        TR, s.
    slice_time_ref_s : float
        The GLM's slice-time reference, s.
    trials : list of Trial
    n_volumes : int
        Volumes planned (the highest index on disk + 1).
    n_missing : int
        Volumes absent on disk (left out of the GLM).
    motion_params : ndarray of shape (n_volumes, 6)
        Each volume's rigid motion to the *bundle's* reference (mm, radians); NaN rows: missing.
    fd_mm : ndarray of shape (n_volumes,)
        Framewise displacement, mm (NaN: missing).
    """

    run: str
    tr_s: float
    slice_time_ref_s: float
    trials: list
    n_volumes: int
    n_missing: int = 0
    motion_params: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))
    fd_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))


def replay_session(
    config: RTDecoderConfig,
    bundle: SubjectBundle,
    session_dir: str | Path,
    on_beta: Callable[[LiveBeta], None],
    select: Mapping[str, str | int] | None = None,
    progress: bool = False,
) -> list[RunReplay]:
    """Feed a recorded session through the bundle's live front end, run by run; betas go to ``on_beta``.

    Every beta the live session would publish (first releases, refinements, and at the run's end
    the final betas, except those of trials starting after the last volume) is passed to
    ``on_beta`` in publication order, with refinements on whatever ``glm.publish_refinements``
    says.

    Parameters
    ----------
    config : RTDecoderConfig
        The run config (checked against the bundle's where the bundle governs).
    bundle : SubjectBundle
    session_dir : str or Path
        Run folders or a BIDS session (:func:`rtdecoder.calibration.betas.find_runs`).
    on_beta : callable
        Called with each :class:`LiveBeta`.
    select : mapping, optional
        BIDS entity values the runs must have.
    progress : bool, default=False
        A tqdm bar over volumes.

    Returns
    -------
    list of RunReplay
    """
    from tqdm.auto import tqdm

    from rtdecoder.calibration.betas import find_runs, read_run_volumes, run_slice_times_s
    from rtdecoder.session.runner import RunPlan, SessionGeometry, run_tr_s

    bundle.check_run_config(config)
    geometry = SessionGeometry.from_bundle(bundle)
    runs = find_runs(session_dir, select)
    replays = []
    n_files = None if len(runs[0].volume_paths) == 1 else sum(len(r.volume_paths) for r in runs)
    with tqdm(total=n_files, desc="test volumes", unit="vol", disable=not progress) as bar:
        for run in runs:
            volumes = read_run_volumes(run, config.scanner.tr_s)
            first = volumes[0]
            geometry.check_volume(first)
            tr_s, _ = run_tr_s(first, RunPlan(run.label), config, bundle)
            times_s, source = run_slice_times_s(run, volumes)
            slice_ref_s = slice_time_ref_from(config.glm.slice_time_ref_s, times_s, tr_s, source=source)
            n_volumes = volumes[-1].index + 1
            frontend = build_run_frontend(config, geometry, run.trials, tr_s, n_volumes, slice_ref_s,
                                       publish_refinements=True)
            stim_of = {t.trial_id: t.stim_id for t in run.trials}
            replay = RunReplay(run.label, tr_s, slice_ref_s, list(run.trials), n_volumes,
                               motion_params=np.full((n_volumes, 6), np.nan), fd_mm=np.full(n_volumes, np.nan))
            by_index = {v.index: v for v in volumes}
            del volumes
            for tr_index in range(n_volumes):
                volume = by_index.pop(tr_index, None)
                if volume is None:
                    frontend.missing(tr_index)
                    replay.n_missing += 1
                    continue
                processed = frontend.process(volume)
                if processed.motion is not None:
                    replay.motion_params[tr_index] = processed.motion.params
                    replay.fd_mm[tr_index] = processed.motion.fd_mm
                else:
                    replay.motion_params[tr_index] = 0.0
                    replay.fd_mm[tr_index] = 0.0
                for beta in processed.betas:
                    on_beta(LiveBeta.from_trial_beta(run.label, beta, stim_of.get(beta.trial_id), tr_s))
                bar.update(1)
            last_time_s = (n_volumes - 1) * tr_s
            for beta in frontend.finish():
                if beta.onset_s <= last_time_s:  # as the runner: no final beta for a trial after the last volume
                    on_beta(LiveBeta.from_trial_beta(run.label, beta, stim_of.get(beta.trial_id), tr_s))
            replays.append(replay)
    return replays


# ----------------------------------------------------------------------------- the whole evaluation


def evaluate_session(
    config: RTDecoderConfig,
    bundle: SubjectBundle,
    session_dir: str | Path,
    tokens: ImageTokens,
    select: Mapping[str, str | int] | None = None,
    pool_size: int = DEFAULT_POOL_SIZE,
    n_pools: int = DEFAULT_N_POOLS,
    slow_after_onset_s: float | None = SLOW_AFTER_ONSET_S,
    decoder: Any | None = None,
    seen_image: Callable[[str], np.ndarray | None] | None = None,
    features: Callable[[np.ndarray], np.ndarray] | None = None,
    max_reconstructions: int = 100,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score a bundle on a recorded test session through its live front end (see the module notes).

    Parameters
    ----------
    config : RTDecoderConfig
        The run config (e.g. ``bundle.config``).
    bundle : SubjectBundle
    session_dir : str or Path
        The test session: run folders or BIDS, with ``events.tsv`` naming each trial's ``stim_id``
        and ``is_test``.
    tokens : ImageTokens
        Tokens of the session's images by stim_id (trials whose image is absent are not scored).
    select : mapping, optional
        BIDS entity values the runs must have.
    pool_size, n_pools : int, default=300, 30
        The random pools of the averaged retrieval (besides the whole test set).
    slow_after_onset_s : float or None, default=29.5
        The "slow" stage (:class:`StageSelector`).
    decoder : BetaDecoder, optional
        With a generator: reconstructions of the averaged test images, scored against
        ``seen_image``. Without one, no image metrics.
    seen_image : callable, optional
        ``seen_image(stim_id)`` -> the shown image, uint8 (H, W, 3), or ``None``.
    features : callable, optional
        uint8 (N, H, W, 3) -> (N, F) features for two-way identification; default the
        configured embedder's pooled features.
    max_reconstructions : int, default=100
        Test images reconstructed at most (the first by stim_id).
    out_dir : str or Path, optional
        Writes ``evaluation.json`` there.
    progress : bool, default=False

    Returns
    -------
    dict
        The JSON (see ``docs/calibration.md``, "Live figures").
    """
    import json

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    selector = StageSelector(slow_after_onset_s)
    finals: list[LiveBeta] = []

    def take(beta: LiveBeta) -> None:
        selector.add(beta)
        if beta.kind == "final":
            finals.append(beta)

    replays = replay_session(config, bundle, session_dir, take, select=select, progress=progress)
    seconds["front_end"] = time.perf_counter() - started

    trials = [(replay.run, t) for replay in replays for t in replay.trials]
    test_trials = [(run, t) for run, t in trials if t.is_test and t.stim_id]
    test_source = "is_test trials"
    if not test_trials:
        # A session held out entirely (no trial marked): every trial with an image is a test trial.
        test_trials = [(run, t) for run, t in trials if t.stim_id]
        test_source = "every trial with an image (no trial has is_test)"
    is_test_trial = {(run, t.trial_id) for run, t in test_trials}
    test_ids = sorted({t.stim_id for _, t in test_trials if t.stim_id in tokens})
    scorer = LiveScorer.from_bundle(bundle, tokens, test_ids, hubness_k=config.candidates.hubness_k)

    started = time.perf_counter()
    averaged = [b for b in finals if (b.run, b.trial_id) in is_test_trial and b.stim_id in tokens
                and b.beta is not None and np.all(np.isfinite(b.beta))]
    retrieval: dict[str, Any] = {"n_test_trials": len(averaged)}
    mean_betas = np.zeros((0, bundle.n_voxels), np.float32)
    image_ids: list[str] = []
    if averaged:
        from rtdecoder.decode.metrics import mean_over_repeats

        ids, mean_betas = mean_over_repeats(np.stack([b.beta for b in averaged]), [b.stim_id for b in averaged])
        image_ids = [str(i) for i in ids]
        predicted = scorer.predict(mean_betas)
        targets = tokens.tokens_of(image_ids)
        retrieval["test_set"] = pooled_retrieval(predicted, targets, len(image_ids), 1, hubness=scorer.hubness)
        retrieval["pool"] = pooled_retrieval(predicted, targets, pool_size, n_pools, hubness=scorer.hubness)
    live = live_figures(selector.stages(), scorer, test_ids)
    seconds["scoring"] = time.perf_counter() - started

    image_metrics: dict[str, Any] = {"note": "no generator (reconstruction off, or --no-reconstruct)"}
    if decoder is not None and image_ids:
        started = time.perf_counter()
        image_metrics = reconstruction_figures(decoder, mean_betas, image_ids, seen_image, features or
                                               _embedder_features(config), max_reconstructions)
        image_metrics["generator"] = config.generator.kind
        seconds["reconstruction"] = time.perf_counter() - started

    trained = calibration_stim_ids(bundle, test=False)
    trained = None if trained is None else set(trained)
    motion = np.concatenate([r.motion_params for r in replays])
    translation_mm = np.linalg.norm(motion[:, :3], axis=1)
    fd = np.concatenate([r.fd_mm for r in replays])
    result: dict[str, Any] = {
        "bundle": str(bundle.directory) if bundle.directory is not None else None,
        "subject_id": bundle.subject_id,
        "session": str(session_dir),
        "n_runs": len(replays),
        "runs": [r.run for r in replays],
        "n_trials": len(trials),
        "n_test_trials": len(test_trials),
        "n_test_images": len(test_ids),
        "test_set": test_source,
        # trials whose image the bundle was trained on (its calibration's training images): they
        # flatter the figures "among the run's images" (None: the bundle has no betas/trials.tsv)
        "n_trials_with_calibration_training_images": None if trained is None else sum(
            t.stim_id in trained for _, t in trials),
        "front_end": {
            "reference": "the bundle's motion reference (as rtdecoder run)",
            "signal_mean": "the bundle's", "hrf": "the bundle's" if config.glm.hrf == "library" else config.glm.hrf,
            "tr_s": replays[0].tr_s if replays else None,
            "n_missing_volumes": int(sum(r.n_missing for r in replays)),
            "translation_to_reference_mm_median": _rounded(np.nanmedian(translation_mm)),
            "translation_to_reference_mm_max": _rounded(np.nanmax(translation_mm)),
            "fd_mm_median": _rounded(np.nanmedian(fd)),
            "refinements": selector.n_updates,
            "slow_after_onset_s": slow_after_onset_s,
        },
        "retrieval_scores": scoring_name(scorer.hubness),
        "retrieval": retrieval,
        "live": live,
        "image_metrics": image_metrics,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / EVALUATION_NAME).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _rounded(value: float) -> float | None:
    return round(float(value), 3) if np.isfinite(value) else None


def _embedder_features(config: RTDecoderConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Pooled features of the configured embedder (EfficientNet-Lite0 in the phantom world)."""
    from rtdecoder.embedding.base import make_embedder

    embedder = make_embedder(config.embedding)
    return lambda images: embedder.embed(images).pooled


def reconstruction_figures(
    decoder: Any,
    betas: np.ndarray,
    stim_ids: Sequence[str],
    seen_image: Callable[[str], np.ndarray | None] | None,
    features: Callable[[np.ndarray], np.ndarray],
    max_images: int = 100,
) -> dict[str, Any]:
    """Reconstruct averaged test betas with the live decoder and score them against the shown images.

    Parameters
    ----------
    decoder : BetaDecoder
        ``retrieve`` then ``reconstruct`` (seed = the image's position), as the live session does.
    betas : ndarray of shape (n_images, n_voxels)
        Raw (GLM-unit) betas, repeats averaged; the decoder z-scores.
    stim_ids : sequence of str
        Their images.
    seen_image : callable or None
        The shown image of a stim_id (uint8 H x W x 3) or ``None``; images without one are skipped.
    features : callable
        uint8 (N, H, W, 3) -> (N, F), for two-way identification.
    max_images : int, default=100

    Returns
    -------
    dict
        ``n_images``, ``two_way``, ``pixcorr``, ``ssim``
        (:func:`rtdecoder.decode.image_metrics.reconstruction_metrics`); or a ``note``.
    """
    import io

    from PIL import Image

    from rtdecoder.decode.image_metrics import reconstruction_metrics

    if seen_image is None:
        return {"note": "no shown images (--images is an embeddings file): reconstructions not scored"}
    real, recon = [], []
    for row, (beta, stim_id) in enumerate(zip(betas, stim_ids, strict=True)):
        if len(real) >= max_images:
            break
        shown = seen_image(stim_id)
        if shown is None:
            continue
        decoded = decoder.retrieve(beta, 1, stim_id)
        with Image.open(io.BytesIO(decoder.reconstruct(decoded, seed=row))) as image:
            recon.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        real.append(np.asarray(shown, dtype=np.uint8))
    if len(real) < 2:
        return {"n_images": len(real), "note": "fewer than 2 reconstructions with a shown image; not scored"}
    # the metrics take one array per side: shown images are brought to the first one's size
    height, width = real[0].shape[:2]
    real = [r if r.shape[:2] == (height, width) else
            np.asarray(Image.fromarray(r).resize((width, height), Image.BILINEAR)) for r in real]
    metrics = reconstruction_metrics(np.stack(real), np.stack(recon), features)
    return {"n_images": len(real)} | {k: round(float(v), 4) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- the table


def format_table(result: Mapping[str, Any]) -> str:
    """The evaluation as the table ``rtdecoder evaluate`` prints."""
    lines = []
    front = result["front_end"]
    lines.append(
        f"{result['subject_id']} on {result['session']}: {result['n_runs']} runs, {result['n_trials']} trials, "
        f"test set {result['n_test_images']} images ({result['n_test_trials']} trials: {result['test_set']})"
    )
    if result.get("n_trials_with_calibration_training_images"):
        lines.append(f"{result['n_trials_with_calibration_training_images']} trials show images the bundle was "
                     "trained on (they count in the pools of the run's images)")
    lines.append(
        "front end: the bundle's reference, statistics and HRFs; translation to the reference median "
        f"{_fmt(front['translation_to_reference_mm_median'], 'mm')}, "
        f"max {_fmt(front['translation_to_reference_mm_max'], 'mm')}; {front['n_missing_volumes']} missing volumes"
    )
    retrieval = result["retrieval"]
    if "retrieval_scores" in result:
        lines.append(f"retrieval scores: {result['retrieval_scores']} (candidates.hubness_k; cosine when 0)")
    lines.append("")
    lines.append(f"{'retrieval, repeats averaged (final betas)':<42} image top-1  image top-5  brain top-1  "
                 "brain top-5   chance")
    for name, label in (("test_set", "among the test set"), ("pool", "among pools")):
        figures = retrieval.get(name)
        if not figures or "image_top1" not in figures:
            lines.append(f"  {label:<40} {(figures or {}).get('note', 'not evaluated')}")
            continue
        lines.append(f"  {label + ' of ' + str(figures['pool_size']) + _pools(figures):<40} "
                     + _row(figures, "image_top1", "image_top5", "brain_top1", "brain_top5") +
                     f" {100 * figures['chance_top1']:>7.2f}%")
    lines.append("")
    lines.append(format_live_table(result["live"]))
    metrics = result.get("image_metrics") or {}
    lines.append("")
    if "two_way" in metrics:
        lines.append(f"reconstructions ({metrics['n_images']} test images, generator {metrics.get('generator', '?')}): "
                     f"two-way {100 * metrics['two_way']:.1f}%, PixCorr {metrics['pixcorr']:.3f}, "
                     f"SSIM {metrics['ssim']:.3f}")
    else:
        lines.append(f"reconstructions: {metrics.get('note', 'none')}")
    return "\n".join(lines)


def live_pool_labels(live: Mapping[str, Any]) -> tuple[str, str]:
    """What each pool of :func:`live_figures` ranks among, as words: (run's images, test set).

    In the test set the two directions rank among different pools: a trial's prediction among
    every test image (image retrieval), a test image among the test images with trials at that
    stage (brain retrieval, often far fewer), so the label names both sizes.
    """
    run_pool = next((live[s]["run"] for s in STAGES if "pool_size_mean" in live.get(s, {}).get("run", {})), {})
    test_pool = next((live[s]["test_set"] for s in STAGES if "image_pool_size" in live.get(s, {}).get("test_set", {})),
                     {})
    run_label = f"among the run's images (~{run_pool.get('pool_size_mean', '?')})"
    test_label = (f"among the test set (image: {test_pool.get('image_pool_size', '?')} candidates, "
                  f"brain: {test_pool.get('brain_pool_size', '?')} images with trials)")
    return run_label, test_label


def format_live_table(live: Mapping[str, Any]) -> str:
    """The live figures as a table: one row per stage, image / brain top-1 and top-5 in each pool."""
    run_label, test_label = live_pool_labels(live)
    lines = [
        "live figures, single trials (image top-1 / top-5, brain top-1 / top-5)",
        f"  {'stage':<11} {'after onset':>11} {'trials':>7}   {run_label:<36} {test_label}",
    ]
    for stage in STAGES:
        entry = live.get(stage, {})
        if not entry.get("n_trials"):
            lines.append(f"  {stage:<11} {'-':>11} {0:>7}   {entry.get('note', '')}")
            continue
        cells = []
        for pool in ("run", "test_set"):
            figures = entry.get(pool, {})
            cells.append(" / ".join(f"{100 * figures[k]:5.1f}" if k in figures else "   - " for k in
                                    ("image_top1", "image_top5", "brain_top1", "brain_top5")))
        lines.append(f"  {stage:<11} {entry['after_onset_s_median']:>9.1f} s {entry['n_trials']:>7}   "
                     f"{cells[0]:<36} {cells[1]}")
    return "\n".join(lines)


def _row(figures: Mapping[str, Any], *keys: str) -> str:
    return " ".join(f"{100 * figures[k]:>11.1f}%" for k in keys)


def _pools(figures: Mapping[str, Any]) -> str:
    return f" (x{figures['n_pools']})" if figures.get("n_pools", 1) > 1 else ""


def _fmt(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.2f} {unit}"


def session_images(
    config: RTDecoderConfig, session_dir: str | Path, images: str | Path, select: Mapping[str, str] | None = None,
    progress: bool = True,
) -> tuple[ImageTokens, Callable[[str], np.ndarray | None] | None]:
    """The tokens of a test session's images and a source of the shown images, as ``calibrate`` finds them.

    Parameters
    ----------
    config : RTDecoderConfig
        ``embedding`` (the embedder of a folder and its cache) and ``model`` (the token shape).
    session_dir : str or Path
        The test session (its trials' stim_ids are the images needed).
    images : str or Path
        A folder of ``<stim_id>.<ext>`` files (embedded with the configured embedder, cached; also
        the shown images for the image metrics), or an embeddings file (tokens only).
    select : mapping, optional
        BIDS entity values the runs must have.
    progress : bool, default=True

    Returns
    -------
    tokens : ImageTokens
    seen_image : callable or None
        ``seen_image(stim_id)`` for a folder; ``None`` for an embeddings file.
    """
    from rtdecoder.calibration.betas import find_runs
    from rtdecoder.calibration.calibrate import stimulus_tokens

    needed = sorted({t.stim_id for run in find_runs(session_dir, select) for t in run.trials if t.stim_id})
    if not needed:
        raise BundleError(f"{session_dir}: events.tsv: stim_id: expected the image of each trial (none has one)")
    tokens = stimulus_tokens(config, needed, images, progress=progress)
    if Path(images).is_dir():
        from rtdecoder.view.images import folder_image_source

        return tokens, folder_image_source(images)
    return tokens, None


def collect_stages(betas: Iterable[LiveBeta], slow_after_onset_s: float | None = SLOW_AFTER_ONSET_S) -> StageSelector:
    """A :class:`StageSelector` fed ``betas`` in order."""
    selector = StageSelector(slow_after_onset_s)
    for beta in betas:
        selector.add(beta)
    return selector
