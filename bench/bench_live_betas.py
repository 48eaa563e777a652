"""Live betas, as the GLM releases them and corrected four ways: measured on the development subject.

A live beta (the first release ``glm.beta_wait_s`` after onset, and each refinement) is fitted on
the run so far. This bench replays the calibration session through the bundle's live front end,
measures how far its training trials' live betas are from their final betas (z-scored with the
bundle's statistics), per stage (whole TRs after onset): the variance of that error and its
correlation, over voxels, with the mean error of the other trials' live betas of the same volume
(an error they share). It then scores the live figures of an unseen session with the live betas:

- ``as_is``: plain LSS (``glm.live_contrast: false``);
- ``per_stage`` / ``per_voxel``: times ``a[s]`` / ``a[s, v]``, the least-squares slope of the final
  beta on the live beta over the calibration's training trials (one per stage / per voxel too);
- ``stage_zscore``: divided by the live betas' std at that stage;
- each of these also with the hubness reference of its stage (``*_stage_reference``: the model's
  predictions of the calibration's training trials at that stage instead of their final betas);
- ``live_contrast``: the GLM's LSS contrasts ``b_j - b_others`` + the bundle's mean beta
  (``glm.live_contrast: true``; :mod:`rtdecoder.glm.incremental`).

Development protocol: the pretrained model of ``bench_calibration.py``'s cache (its seven
subjects include ``sub-07`` in pretraining; only the shared backbone carries that), a fresh
``sub-07`` adapter calibrated on its session 0 with the preset's recipe (then: ``live_contrast``
off) and one seed (bundle ``bundle-dev07`` in the cache), scored on its session 1. ``--subject 8
--bundle B`` scores a held-out bundle the same way (after the choice).

Prints a table and writes ``bench/results/live-betas-<subject>.json``; about 16 minutes for the
calibration, then 2::

    python bench/bench_live_betas.py [--subject 7] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from bench_calibration import HELD_OUT, _with_glm, _write_session, held_out_session_dirs

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.betas import estimate_session_betas
from rtdecoder.calibration.calibrate import calibrate, predict_clip_tokens
from rtdecoder.calibration.dataset import subject_id
from rtdecoder.calibration.evaluate import (
    LiveBeta,
    LiveScorer,
    StageSelector,
    calibration_test_ids,
    live_figures,
    replay_session,
)
from rtdecoder.config import load_config
from rtdecoder.decode.hubness import HubnessReference
from rtdecoder.phantom.decoding import phantom_image_tokens
from rtdecoder.phantom.world import PhantomWorld

logger = logging.getLogger("bench_live_betas")

#: Live betas a stage needs for its own coefficients.
MIN_BETAS_PER_STAGE = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="phantom")
    parser.add_argument("--work", default="rtdecoder-cache/bench-calibration", help="bench_calibration.py's cache")
    parser.add_argument("--subject", type=int, default=7, help="phantom subject, 1-based (7: the development one)")
    parser.add_argument("--bundle", help="score this bundle (default: calibrate bundle-dev<NN> on session 0)")
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    config = load_config(args.config)
    world = PhantomWorld(config, progress=False)
    tokens = phantom_image_tokens(config, world=world)
    index = args.subject - 1
    sid = subject_id(index)
    work = Path(args.work)
    runs = list(range(config.experiment.runs_per_session))
    started = time.perf_counter()
    if index == HELD_OUT:  # bench_calibration.py's volumes of the held-out subject
        session_dirs = held_out_session_dirs(config, world, work, runs)[:2]
    else:
        session_dirs = [work / f"volumes-live-betas-{sid}" / f"session-{k}" for k in (0, 1)]
        for k, session_dir in enumerate(session_dirs):
            _write_session(world, session_dir, index, k, runs)
    seconds = {"volumes": time.perf_counter() - started}

    if args.bundle:
        bundle_dir = Path(args.bundle)
    else:
        bundle_dir = work / f"bundle-dev{args.subject:02d}"
        if not (bundle_dir / "metadata.json").is_file():
            single = _with_glm(config, {"live_contrast": False})
            single = single.model_copy(update={"training": single.training.model_copy(update={"ensemble_size": 1})})
            started = time.perf_counter()
            session = estimate_session_betas(session_dirs[0], single, world.subject(index).mask, progress=True)
            calibrate(single, session_dirs[0], bundle_dir, sid, world.subject(index).mask,
                      pretrained_dir=work / "pretrained" / "model", session=session, images=tokens)
            seconds["calibration"] = time.perf_counter() - started
    bundle = SubjectBundle.load(bundle_dir)
    # Plain LSS live betas (the corrections start from them) and the GLM's live contrasts.
    plain = _with_glm(bundle.config, {"live_contrast": False})
    contrast_config = _with_glm(bundle.config, {"live_contrast": True})

    # The calibration session's live betas of its training trials, with their final betas.
    started = time.perf_counter()
    test_ids = set(calibration_test_ids(bundle))
    live: list[LiveBeta] = []
    final: dict[tuple[str, str], np.ndarray] = {}

    def take_calibration(beta: LiveBeta) -> None:
        if beta.stim_id is None or beta.stim_id in test_ids or beta.beta is None or not np.all(np.isfinite(beta.beta)):
            return
        if beta.kind == "final":
            final[(beta.run, beta.trial_id)] = beta.beta
        else:
            live.append(beta)

    replays = replay_session(plain, bundle, session_dirs[0], take_calibration, progress=True)
    tr_s = replays[0].tr_s
    calibration_onsets = {(r.run, t.trial_id): t.onset_s for r in replays for t in r.trials}
    seconds["replay_calibration"] = time.perf_counter() - started
    live = [b for b in live if (b.run, b.trial_id) in final]
    stage = np.array([int(b.after_onset_s // tr_s) for b in live])
    z_live = np.stack([_z(bundle, b.beta) for b in live])
    z_final = np.stack([_z(bundle, final[(b.run, b.trial_id)]) for b in live])
    per_voxel, per_stage, stage_std = {}, {}, {}
    for s in np.unique(stage):
        rows = stage == s
        if rows.sum() < MIN_BETAS_PER_STAGE:  # too few for per-voxel fits; _shrunk uses the nearest stage
            continue
        stage_std[int(s)] = 1.0 / np.maximum(z_live[rows].std(0), 1e-6)
        per_voxel[int(s)] = (z_final[rows] * z_live[rows]).sum(0) / np.maximum((z_live[rows] ** 2).sum(0), 1e-12)
        per_stage[int(s)] = float((z_final[rows] * z_live[rows]).sum() / (z_live[rows] ** 2).sum())
    # Diagnosis: how much of a live beta's error (against its final beta) the other trials' live
    # betas of the same volume share, per stage: correlation with their mean error, over voxels.
    errors = z_live - z_final
    by_volume: dict[tuple[str, int], list[int]] = {}
    for i, b in enumerate(live):
        by_volume.setdefault((b.run, int(round((b.after_onset_s + calibration_onsets[(b.run, b.trial_id)]) / tr_s))),
                             []).append(i)
    others_error = np.full_like(errors, np.nan)
    for rows in by_volume.values():
        if len(rows) > 1:
            total = errors[rows].sum(0)
            others_error[rows] = (total[None, :] - errors[rows]) / (len(rows) - 1)
    shared = {}
    for s in per_stage:
        rows = (stage == s) & np.isfinite(others_error[:, 0])
        e, o = errors[rows] - errors[rows].mean(0), others_error[rows] - others_error[rows].mean(0)
        shared[s] = float(np.median((e * o).sum(0) / np.sqrt((e * e).sum(0) * (o * o).sum(0))))
    fitted = {
        "error_var_and_shared_corr": {str(s): [round(float(errors[stage == s].var()), 3), round(shared[s], 3)]
                                      for s in per_stage},
        "n_live_betas": len(live), "n_trials": len(final),
        "stages": {str(s): {"after_onset_s": [s * tr_s, (s + 1) * tr_s], "n": int((stage == s).sum()),
                            "a_scalar": round(per_stage[s], 3),
                            "a_voxel_median": round(float(np.median(per_voxel[s])), 3),
                            "a_voxel_iqr": [round(float(q), 3) for q in np.percentile(per_voxel[s], [25, 75])]}
                   for s in sorted(per_stage)},
        "stages_skipped": {str(s): int((stage == s).sum()) for s in np.unique(stage) if int(s) not in per_stage},
    }

    # The hubness reference of each stage: the model's predictions of the calibration's training
    # trials at that stage (first release; latest beta by 29.5 s) instead of their final betas.
    model = bundle.load_model()
    k = bundle.config.candidates.hubness_k
    calibration_stages = StageSelector()
    for b in live:
        calibration_stages.add(b)
    train_ids = sorted({b.stim_id for b in live if b.stim_id in tokens})
    train_tokens = tokens.tokens_of(train_ids)

    def stage_references(transform: dict | None) -> dict:
        refs = {}
        for name, chosen in calibration_stages.stages().items():
            if name == "end_of_run" or not chosen:
                continue
            shrunk = [_shrunk(bundle, b, transform, tr_s) if transform else b for b in chosen]
            z = np.stack([_z(bundle, b.beta) for b in shrunk])
            refs[name] = HubnessReference.from_predictions(predict_clip_tokens(model, bundle.subject_id, z),
                                                           train_tokens, k)
        return refs

    # The unseen session, scored with the live betas as they are and as predicted.
    started = time.perf_counter()
    betas: list[LiveBeta] = []
    replays = replay_session(plain, bundle, session_dirs[1], betas.append, progress=True)
    seconds["replay_test"] = time.perf_counter() - started
    trial_test = {t.stim_id for r in replays for t in r.trials if t.is_test and t.stim_id}
    scorer = LiveScorer.from_bundle(bundle, tokens, sorted(s for s in trial_test if s in tokens))
    final_reference = scorer.hubness
    # The same session through a front end whose live betas are LSS contrasts (glm.live_contrast).
    contrast_betas: list[LiveBeta] = []
    replay_session(contrast_config, bundle, session_dirs[1], contrast_betas.append)
    started = time.perf_counter()
    results = {}
    transforms = {"as_is": None, "per_stage": per_stage, "per_voxel": per_voxel, "stage_zscore": stage_std}
    for name, transform in transforms.items():
        selector = StageSelector()
        for b in betas:
            selector.add(b if transform is None or b.kind == "final" else _shrunk(bundle, b, transform, tr_s))
        scorer.hubness = final_reference
        results[name] = live_figures(selector.stages(), scorer)
        if k:
            figures = dict(results[name])
            for stage, reference in stage_references(transform).items():
                scorer.hubness = reference
                figures[stage] = live_figures({stage: selector.stages()[stage]}, scorer)[stage]
            results[f"{name}_stage_reference"] = figures
    selector = StageSelector()
    for b in contrast_betas:
        selector.add(b)
    scorer.hubness = final_reference
    results["live_contrast"] = live_figures(selector.stages(), scorer)
    seconds["scoring"] = time.perf_counter() - started
    payload = {"benchmark": "live_betas", "subject": sid, "bundle": str(bundle_dir), "fitted": fitted,
               "live": results, "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    out = Path(args.out or f"bench/results/live-betas-{sid}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{sid}: {len(live)} live betas of {len(final)} training trials; per stage (TRs after onset): a, error "
          "variance, error's correlation with the other trials' mean error at the same volume:")
    print(", ".join(f"{s}: {v['a_scalar']}, {fitted['error_var_and_shared_corr'][s][0]}, "
                    f"{fitted['error_var_and_shared_corr'][s][1]}" for s, v in fitted["stages"].items()))
    print("| live betas | fast, run | slow, run | end, run | fast, test set | slow, test set | end, test set |")
    print("|---|---|---|---|---|---|---|")
    for name, figures in results.items():
        cells = [_pair(figures[st].get(pool, {})) for pool in ("run", "test_set")
                 for st in ("fast", "slow", "end_of_run")]
        print(f"| {name} | " + " | ".join(cells) + " |")


def _z(bundle: SubjectBundle, beta: np.ndarray) -> np.ndarray:
    return ((beta - bundle.beta_mean) / bundle.beta_std).astype(np.float32)


def _shrunk(bundle: SubjectBundle, beta: LiveBeta, transform: dict, tr_s: float) -> LiveBeta:
    stage = int(beta.after_onset_s // tr_s)
    s = min(transform, key=lambda fitted: abs(fitted - stage))
    z = _z(bundle, beta.beta) * transform[s]
    raw = (z * bundle.beta_std + bundle.beta_mean).astype(np.float32)
    return LiveBeta(beta.run, beta.trial_id, beta.stim_id, beta.kind, beta.after_onset_s, raw)


def _pair(figures: dict) -> str:
    if "image_top1" not in figures:
        return "-"
    return f"{100 * figures['image_top1']:.1f} / {100 * figures['brain_top1']:.1f}"


if __name__ == "__main__":
    main()
