"""Tests of ``rtdecoder evaluate``: the bundle's front end on a test session, retrieval, the live figures."""

from __future__ import annotations

import io
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.betas import find_runs, read_run_volumes
from rtdecoder.calibration.calibrate import calibrate
from rtdecoder.calibration.evaluate import (
    LiveBeta,
    LiveScorer,
    collect_stages,
    evaluate_session,
    format_live_table,
    format_table,
    live_figures,
    pooled_retrieval,
    replay_session,
    single_trial_retrieval,
)
from rtdecoder.cli import main
from rtdecoder.config import config_from_dict
from rtdecoder.decode.metrics import retrieval_top1
from rtdecoder.decode.protocol import Decoded
from rtdecoder.embedding.base import Embedding
from rtdecoder.embedding.cache import ImageTokens, write_embeddings_file
from rtdecoder.glm.events import write_events_tsv
from rtdecoder.glm.incremental import IncrementalGLM
from rtdecoder.phantom.scanner import volumes_from_array, write_run
from rtdecoder.phantom.world import PhantomWorld
from rtdecoder.preprocess.mask import OnlineNormaliser, VoxelMask
from rtdecoder.preprocess.motion import MotionCorrector
from rtdecoder.session.frontend import FrontEnd
from rtdecoder.session.journal import Journal
from rtdecoder.session.report import write_report

N_STIMULI = 30
TOKEN_DIM = 12
SUBJECT = 1
EMBEDDER = "test-embedder"


def tiny_config():
    return config_from_dict({
        "phantom": {"grid_shape": [24, 28, 23], "voxel_size_mm": [6.0, 6.0, 6.0], "n_voxels": 120,
                    "n_stimuli": N_STIMULI, "latent_dim": 6, "seed": 5, "n_subjects": 2, "image_size_px": 32,
                    "motion_drift_mm": 0.0, "motion_jump_per_min": 0.0, "snr": 3.0},
        "experiment": {"trials_per_run": 12, "runs_per_session": 2, "sessions_per_subject": 2,
                       "n_test_images": 4, "test_repeats": 2, "lead_out_s": 9.6},
        "embedding": {"n_tokens": 1, "token_dim": TOKEN_DIM},
        "preprocess": {"motion_n_samples": 2000},
        "glm": {"hrf": "library", "method": "lss"},
        "model": {"hidden_dim": 16, "n_blocks": 1, "n_tokens": 1, "token_dim": TOKEN_DIM, "clip_head_layers": 1,
                  "use_prior": False},
        "training": {"epochs": 2, "batch_size": 4, "mixed_precision": False},
    })


@pytest.fixture(scope="module")
def world():
    config = tiny_config()
    pooled = np.random.default_rng(2).normal(size=(N_STIMULI, TOKEN_DIM)).astype(np.float32)
    return config, PhantomWorld(config, progress=False,
                                embedding=Embedding(tokens=pooled[:, None, :].copy(), pooled=pooled))


def _write_session(world, root, session: int):
    for run in range(2):
        simulated = world.simulate_run(SUBJECT, session, run)
        run_dir = root / f"run-{run + 1:02d}"
        write_run(volumes_from_array(simulated.volumes, simulated.affine, simulated.tr_s, simulated.slice_times_s),
                  run_dir, format="nifti", speed=1e6, sleep=lambda _s: None, partial_write=False)
        write_events_tsv(simulated.trials, run_dir / "events.tsv")
    return root


@pytest.fixture(scope="module")
def sessions(world, tmp_path_factory):
    """Session 0 (calibration) and session 1 (test) of subject 1, one NIfTI per volume."""
    config, w = world
    root = tmp_path_factory.mktemp("sessions")
    return _write_session(w, root / "calibration", 0), _write_session(w, root / "test", 1)


@pytest.fixture(scope="module")
def bundle_dir(world, sessions, tmp_path_factory):
    config, w = world
    tokens = ImageTokens(list(w.bank.ids), w.embedding.tokens, EMBEDDER, "test bank")
    out = tmp_path_factory.mktemp("bundle") / "sub-02"
    calibrate(config, sessions[0], out, "sub-02", w.subject(SUBJECT).mask, images=tokens, progress=False)
    return out


# ----------------------------------------------------------------------------- the stages


def _beta_message(trial_id: str, tr_index: int, kind: str, beta=None, onset_s: float = 3.2, stim_id: str = "x"):
    return {"run": "run-01", "trial_id": trial_id, "stim_id": stim_id, "onset_s": onset_s, "tr_index": tr_index,
            "is_update": kind == "update", "is_final": kind == "final",
            "beta": np.full(3, float(tr_index), np.float32) if beta is None else beta}


def test_stages_pick_the_first_the_slow_and_the_final_beta() -> None:
    tr_s = 1.6
    # trial a: first at volume 7 (8.0 s after onset), refinements to volume 24 (35.2 s), final at 40
    messages = [_beta_message("a", 7, "first")] + [_beta_message("a", i, "update") for i in range(8, 25)]
    # trial b starts later: first only, then its final (no refinement within its 29.5 s)
    messages += [_beta_message("b", 30, "first", onset_s=40.0), _beta_message("a", 40, "final"),
                 _beta_message("b", 40, "final", onset_s=40.0)]
    betas = [LiveBeta.from_message(m, tr_s) for m in messages]
    stages = collect_stages(betas).stages()
    by_trial = {stage: {b.trial_id: b for b in chosen} for stage, chosen in stages.items()}
    assert by_trial["fast"]["a"].kind == "first" and by_trial["fast"]["a"].after_onset_s == pytest.approx(8.0)
    # the latest beta at most 29.5 s after onset: volume 20 starts 32.0 - 3.2 = 28.8 s after it, 21 at 30.4 s
    assert by_trial["slow"]["a"].kind == "update" and by_trial["slow"]["a"].beta[0] == 20.0
    assert by_trial["slow"]["b"].kind == "first"  # nothing later within its window: the first stands
    assert by_trial["end_of_run"]["a"].kind == "final" and by_trial["end_of_run"]["a"].beta[0] == 40.0
    last = {b.trial_id: b for b in collect_stages(betas, slow_after_onset_s=None).stages()["slow"]}
    assert last["a"].beta[0] == 24.0  # without a window: the last refinement before the regressor ends
    assert [b.trial_id for b in stages["fast"]] == ["a", "b"]


class _IdentityModel(torch.nn.Module):
    """'Predicts' the beta itself as the one retrieval token, so rankings are set by the betas."""

    config = SimpleNamespace(n_tokens=1, token_dim=6)

    def forward(self, batch):
        (x,) = batch.values()
        return SimpleNamespace(clip_tokens=x[:, None, :])


def test_live_figures_from_beta_messages_with_known_rankings() -> None:
    ids = ["a", "b", "c", "d", "e", "f"]
    tokens = ImageTokens(ids, np.eye(6, dtype=np.float32)[:, None, :], "", "unit vectors")
    scorer = LiveScorer(_IdentityModel(), "sub", np.zeros(6), np.ones(6), tokens, test_ids=["a", "b", "e", "f"])
    e = np.eye(6, dtype=np.float32)
    shown = ["a", "b", "c", "d"]  # run-01; run-02 shows e and f
    nxt = {"a": "b", "b": "c", "c": "d", "d": "a", "e": "f", "f": "e"}
    messages = []
    for run, images in (("run-01", shown), ("run-02", ["e", "f"])):
        for n, image in enumerate(images):
            own, other = e[ids.index(image)], e[ids.index(nxt[image])]
            trial = {"run": run, "trial_id": f"{run}-{n}", "stim_id": image, "onset_s": 4.0 * n}
            # fast: the next image outranks the own one (rank 2 both ways); slow and final: exact
            messages.append(trial | {"tr_index": 5 + 3 * n, "is_update": False, "is_final": False,
                                     "beta": other + 0.5 * own})
            messages.append(trial | {"tr_index": 15 + 3 * n, "is_update": True, "is_final": False, "beta": own})
            messages.append(trial | {"tr_index": 40, "is_update": False, "is_final": True,
                                     "beta": own if n % 2 == 0 else other + 0.5 * own})
    stages = collect_stages([LiveBeta.from_message(m, 1.6) for m in messages]).stages()
    figures = live_figures(stages, scorer)
    fast, slow, end = figures["fast"], figures["slow"], figures["end_of_run"]
    assert fast["n_trials"] == slow["n_trials"] == end["n_trials"] == 6
    assert (fast["run"]["image_top1"], fast["run"]["image_top5"], fast["run"]["brain_top1"]) == (0.0, 1.0, 0.0)
    assert fast["run"]["n_runs"] == 2 and fast["run"]["pool_size_mean"] == 3.0  # pools of 4 and 2 images
    assert slow["run"]["image_top1"] == slow["run"]["brain_top1"] == 1.0
    assert slow["test_set"]["image_pool_size"] == 4 and slow["test_set"]["n_trials"] == 4  # a, b, e, f
    assert slow["test_set"]["image_top1"] == 1.0
    # end of run: trials 0 and 2 of each run exact, 1 and 3 outranked by the next image
    assert end["run"]["image_top1"] == pytest.approx(3 / 6, abs=1e-4)
    assert fast["after_onset_s_median"] < slow["after_onset_s_median"] <= 29.5


def test_single_trial_brain_retrieval_with_repeats_is_the_exact_expectation(rng) -> None:
    ids = ["a", "b", "c", "d"]
    tokens = rng.normal(size=(4, 2, 5)).astype(np.float32)
    trial_images = ["a", "a", "b", "b", "b", "c", "d"]
    predicted = tokens[[ids.index(s) for s in trial_images]] + rng.normal(0, 1.5, (7, 2, 5)).astype(np.float32)
    result = single_trial_retrieval(predicted, trial_images, ids, tokens, top_k=(1, 2))
    # brute force: every choice of one trial per other image, each equally likely
    unit = lambda x: x.reshape(len(x), -1) / np.linalg.norm(x.reshape(len(x), -1), axis=1, keepdims=True)  # noqa: E731
    sim = unit(predicted) @ unit(tokens).T
    groups = {image: [j for j, s in enumerate(trial_images) if s == image] for image in ids}
    top1, top2 = [], []
    for j, image in enumerate(trial_images):
        column = ids.index(image)
        others = [groups[o] for o in ids if o != image]
        ranks = [1 + sum(sim[k, column] > sim[j, column] for k in choice) for choice in itertools.product(*others)]
        top1.append(np.mean(np.array(ranks) <= 1))
        top2.append(np.mean(np.array(ranks) <= 2))
    assert result["brain_top1"] == pytest.approx(np.mean(top1), abs=1e-4)
    assert result["brain_top2"] == pytest.approx(np.mean(top2), abs=1e-4)
    image_rank = 1 + (sim > sim[np.arange(7), [ids.index(s) for s in trial_images]][:, None]).sum(axis=1)
    assert result["image_top1"] == pytest.approx(np.mean(image_rank == 1), abs=1e-4)
    assert result["brain_pool_size"] == result["image_pool_size"] == 4


def test_pooled_retrieval_top1_equals_retrieval_top1(rng) -> None:
    predicted, targets = rng.normal(size=(2, 25, 3, 4)).astype(np.float32)
    targets = targets + predicted
    scores = retrieval_top1(predicted, targets, pool_size=10, n_pools=4, seed=3)
    result = pooled_retrieval(predicted, targets, pool_size=10, n_pools=4, seed=3)
    assert result["image_top1"] == pytest.approx(scores.image, abs=1e-4)
    assert result["brain_top1"] == pytest.approx(scores.brain, abs=1e-4)
    assert result["image_top5"] >= result["image_top1"] and result["pool_size"] == 10


# ----------------------------------------------------------------------------- the bundle's front end


def test_evaluate_uses_the_bundles_reference_not_the_sessions_own(world, sessions) -> None:
    """The test session's middle volume differs from the bundle's reference by a known 3 mm shift."""
    config, w = world
    runs = find_runs(sessions[1])
    volumes = read_run_volumes(runs[0])
    middle = volumes[len(volumes) // 2]
    mask = VoxelMask(w.subject(SUBJECT).mask, middle.affine)
    shift_mm = 3.0  # half a 6 mm voxel along the first axis
    reference = ndimage.shift(middle.data.astype(np.float32), (shift_mm / 6.0, 0.0, 0.0), order=1, mode="nearest")
    hrf_index = np.random.default_rng(4).integers(0, 20, mask.n_voxels).astype(np.int32)
    signal_mean = middle.data[mask.grid].astype(np.float32)
    bundle = SubjectBundle(subject_id="sub-02", config=config, mask=mask.grid, affine=mask.affine,
                           reference=reference, signal_mean=signal_mean, beta_mean=np.zeros(mask.n_voxels, np.float32),
                           beta_std=np.ones(mask.n_voxels, np.float32), hrf_index=hrf_index)
    betas: list[LiveBeta] = []
    replays = replay_session(config, bundle, sessions[1], betas.append)
    translation_mm = np.linalg.norm(replays[0].motion_params[:, :3], axis=1)
    assert np.median(translation_mm) == pytest.approx(shift_mm, abs=0.5)  # measured to the bundle's reference

    def frontend_betas(reference_volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        motion = MotionCorrector(10, 0.005, 2000).set_reference(reference_volume, mask.affine)
        baseline = signal_mean.astype(np.float64)  # as the runner's SessionGeometry holds it
        normaliser = OnlineNormaliser.from_stats(baseline, baseline / 100.0)
        glm = IncrementalGLM.from_config(config.glm, runs[0].trials, middle.tr_s, len(volumes),
                                         slice_times_s=volumes[0].slice_times_s, hrf_per_voxel=hrf_index)
        frontend = FrontEnd(mask, glm, normaliser, motion).start()
        first = [b.beta for v in volumes for b in frontend.process(v).betas if not b.is_update]
        return np.stack(first), np.stack([b.beta for b in frontend.finish()])

    expected_first, expected_final = frontend_betas(bundle.reference)
    run1 = [b for b in betas if b.run == "run-01"]
    np.testing.assert_allclose(np.stack([b.beta for b in run1 if b.kind == "first"]), expected_first, atol=1e-5)
    np.testing.assert_allclose(np.stack([b.beta for b in run1 if b.kind == "final"]), expected_final, atol=1e-5)
    _, own_reference_final = frontend_betas(middle.data.astype(np.float32))
    assert np.abs(own_reference_final - expected_final).max() > 100 * np.abs(
        np.stack([b.beta for b in run1 if b.kind == "final"]) - expected_final).max()
    assert {b.kind for b in run1} == {"first", "update", "final"}


# ----------------------------------------------------------------------------- the whole evaluation


class _GreyDecoder:
    """Retrieves nothing in particular; reconstructs a flat image whose colour follows the beta's mean."""

    def retrieve(self, beta, top_k, shown_id=None):
        return Decoded([], [], 0.0, state=float(np.mean(beta)))

    def reconstruct(self, decoded, seed):
        from PIL import Image

        buffer = io.BytesIO()
        level = int(np.clip(128 + 40 * decoded.state, 0, 255))
        Image.fromarray(np.full((16, 16, 3), (level, 255 - level, 60), np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()


def _features(images: np.ndarray) -> np.ndarray:
    """A 4 x 4 x 3 sample of each image, whatever its size."""
    rows, cols = (np.linspace(0, n - 1, 4).astype(int) for n in images.shape[1:3])
    return images[:, rows][:, :, cols].reshape(len(images), -1).astype(np.float64)


def test_evaluate_on_a_tiny_bundle_gives_the_table_and_json(world, sessions, bundle_dir, tmp_path) -> None:
    config, w = world
    bundle = SubjectBundle.load(bundle_dir)
    tokens = ImageTokens(list(w.bank.ids), w.embedding.tokens, EMBEDDER, "test bank")
    bank = w.bank
    result = evaluate_session(config, bundle, sessions[1], tokens, pool_size=3, n_pools=2, decoder=_GreyDecoder(),
                              seen_image=lambda s: bank.image(bank.index_of(s)), features=_features,
                              out_dir=tmp_path)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["n_runs"] == 2 and saved["n_trials"] == 24 and saved["test_set"] == "is_test trials"
    retrieval = saved["retrieval"]
    assert retrieval["test_set"]["pool_size"] == saved["n_test_images"] >= 2
    assert retrieval["pool"]["pool_size"] == min(3, saved["n_test_images"])
    for name in ("test_set", "pool"):
        assert {"image_top1", "image_top5", "brain_top1", "brain_top5", "chance_top1"} <= set(retrieval[name])
    for stage in ("fast", "slow", "end_of_run"):
        entry = saved["live"][stage]
        assert entry["n_trials"] == 24
        assert {"image_top1", "image_top5", "brain_top1", "brain_top5", "pool_size_mean"} <= set(entry["run"])
        assert entry["run"]["n_runs"] == 2 and entry["test_set"]["image_pool_size"] == saved["n_test_images"]
    assert saved["live"]["fast"]["after_onset_s_median"] < saved["live"]["slow"]["after_onset_s_median"] <= 29.5
    assert saved["front_end"]["refinements"] > 0 and saved["front_end"]["translation_to_reference_mm_max"] < 1.0
    assert {"two_way", "pixcorr", "ssim"} <= set(saved["image_metrics"])
    assert saved["image_metrics"]["n_images"] == saved["n_test_images"]
    table = format_table(result)
    assert "among the test set" in table and "live figures" in table and "end_of_run" in table
    assert "two-way" in table


def test_evaluate_command(world, sessions, bundle_dir, tmp_path, capsys) -> None:
    _, w = world
    embeddings = write_embeddings_file(tmp_path / "images.safetensors", list(w.bank.ids), w.embedding.tokens,
                                       EMBEDDER, storage_dtype="float32")
    out = tmp_path / "out"
    code = main(["evaluate", "--bundle", str(bundle_dir), "--session", str(sessions[1]), "--images",
                 str(embeddings), "--out", str(out), "--no-reconstruct", "--no-progress", "--slow-s", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "live figures" in printed and "among pools" in printed
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["front_end"]["slow_after_onset_s"] is None and "note" in saved["image_metrics"]
    assert main(["evaluate", "--bundle", str(bundle_dir), "--session", str(sessions[1]), "--pool-size", "1"]) == 1


def test_report_scores_the_journaled_betas(world, bundle_dir, tmp_path) -> None:
    """The demo's report: live figures from a journal's beta messages, as live_figures gives them."""
    from rtdecoder_client.messages import Message

    _, w = world
    bundle = SubjectBundle.load(bundle_dir)
    tokens = ImageTokens(list(w.bank.ids), w.embedding.tokens, EMBEDDER, "test bank")
    scorer = LiveScorer.from_bundle(bundle, tokens)
    assert scorer.test_ids  # the calibration session's test images
    rng = np.random.default_rng(0)
    ids = [scorer.test_ids[0], scorer.test_ids[1], w.bank.ids[10], w.bank.ids[11]]
    data = []
    for n, stim_id in enumerate(ids):
        trial = {"run": "run-01", "trial_id": f"t{n}", "trial_index": n, "stim_id": stim_id, "onset_s": 4.0 * n,
                 "n_volumes_used": 10}
        for tr_index, kind in ((6 + 3 * n, "first"), (12 + 3 * n, "update"), (50, "final")):
            data.append(trial | {"tr_index": tr_index, "is_update": kind == "update", "is_final": kind == "final",
                                 "beta": rng.normal(size=bundle.n_voxels).astype(np.float32)})
    session_dir = tmp_path / "session"
    session_dir.mkdir()
    with Journal(session_dir / "journal.bin", fsync=False).open() as journal:
        for seq, fields in enumerate(data):
            message = Message("beta", "s1", seq, {"published": float(seq)}, fields)
            journal.append({"kind": "published", "message": message.to_dict()})
    figures = write_report(session_dir, "run-01", tmp_path / "report.html", 1.6, live=scorer)
    expected = live_figures(collect_stages([LiveBeta.from_message(d, 1.6) for d in data]).stages(), scorer)
    assert figures["live"] == expected
    assert figures["live"]["slow"]["run"]["n_trials"] == 4 and figures["live"]["fast"]["test_set"]["n_trials"] == 2
    page = (tmp_path / "report.html").read_text()
    assert "Live figures" in page
    test_set = figures["live"]["fast"]["test_set"]
    assert f"image: {test_set['image_pool_size']} candidates, brain: {test_set['brain_pool_size']} images" in page


def test_live_table_names_the_pool_of_each_direction() -> None:
    """In the test set, image retrieval ranks among every test image and brain retrieval among the
    test images with trials here: a table that gave one size for both read as if brain retrieval
    (41.7% among 22 in a demo run) beat image retrieval (8.3% among 300) fivefold."""
    scores = {"image_top1": 0.083, "image_top5": 0.25, "brain_top1": 0.417, "brain_top5": 0.79}
    entry = {"n_trials": 62, "after_onset_s_median": 8.8,
             "run": scores | {"pool_size_mean": 60.0},
             "test_set": scores | {"n_trials": 24, "image_pool_size": 300, "brain_pool_size": 22}}
    table = format_live_table({stage: entry for stage in ("fast", "slow", "end_of_run")})
    header = table.splitlines()[1]
    assert "among the run's images (~60.0)" in header
    assert "image: 300 candidates, brain: 22 images with trials" in header
