"""Tests of NSD-shaped schedules, slice timing and events files."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from rtdecoder.config import config_from_dict
from rtdecoder.errors import ConfigError
from rtdecoder.glm.events import EventsFileError, read_events_tsv, write_events_tsv
from rtdecoder.phantom.schedule import build_schedule, run_n_volumes, slice_times_s


def small_config(**experiment):
    exp = {"trials_per_run": 10, "runs_per_session": 3, "sessions_per_subject": 2,
           "n_test_images": 5, "test_repeats": 3}
    exp.update(experiment)
    return config_from_dict({"phantom": {"n_stimuli": 80, "seed": 5}, "experiment": exp})


def all_trials(schedule):
    return [t for session in schedule.runs for run in session for t in run]


def test_trials_follow_nsd_design() -> None:
    config = small_config()
    schedule = build_schedule(config, 0)
    trials = all_trials(schedule)
    assert schedule.n_sessions == 2 and schedule.runs_per_session == 3 and len(trials) == 60
    counts = collections.Counter(t.stim_index for t in trials)
    assert all(counts[i] == 3 for i in range(5))                 # shared test set, 3 repeats
    assert max(counts[i] for i in counts if i >= 5) <= 3          # training images up to 3 times
    assert all(t.is_test == (t.stim_index < 5) for t in trials)
    run = schedule.run(1, 2)
    np.testing.assert_allclose(np.diff([t.onset_s for t in run]), 4.0)
    assert run[0].onset_s == pytest.approx(config.experiment.lead_in_s)
    assert all(t.duration_s == 3.0 for t in run)
    assert run[0].trial_id == "sub-01_ses-02_run-03_trial-001" and run[0].stim_id.startswith("stim-")
    order = [t.stim_index for t in trials]
    assert all(a != b for a, b in zip(order, order[1:], strict=False))


def test_schedule_is_seeded_and_subjects_differ() -> None:
    config = small_config()
    first = all_trials(build_schedule(config, 0))
    assert first == all_trials(build_schedule(config, 0))
    other = all_trials(build_schedule(config, 1))
    train = lambda trials: {t.stim_index for t in trials if not t.is_test}  # noqa: E731
    assert train(first) != train(other)
    assert {t.stim_index for t in first if t.is_test} == {t.stim_index for t in other if t.is_test}


def test_schedule_uses_given_stimulus_ids() -> None:
    ids = [f"img{i}" for i in range(80)]
    trial = build_schedule(small_config(), 0, ids).run(0, 0)[0]
    assert trial.stim_id == ids[trial.stim_index]
    with pytest.raises(ConfigError, match="stim_ids: expected phantom.n_stimuli = 80"):
        build_schedule(small_config(), 0, ids[:3])


def test_too_many_test_presentations_is_an_error() -> None:
    with pytest.raises(ConfigError, match="experiment.n_test_images: 30 x test_repeats 3"):
        build_schedule(small_config(n_test_images=30), 0)


def test_run_length_and_slice_times() -> None:
    assert run_n_volumes(small_config().experiment, 1.6) == 36      # (4.8 + 40 + 12.8) s / 1.6 s
    np.testing.assert_allclose(slice_times_s(4, 2.0), [1.0, 0.0, 1.5, 0.5])   # Siemens, even count
    np.testing.assert_allclose(slice_times_s(3, 1.5, "ascending"), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(slice_times_s(3, 1.5, "descending"), [1.0, 0.5, 0.0])
    with pytest.raises(ConfigError, match="scanner.slice_order"):
        slice_times_s(3, 1.5, "spiral")


def test_events_round_trip(tmp_path) -> None:
    trials = build_schedule(small_config(), 0).run(0, 1)
    path = tmp_path / "run_events.tsv"
    write_events_tsv(trials, path)
    header = path.read_text().splitlines()[0].split("\t")
    assert header[:2] == ["onset", "duration"] and "trial_type" in header and "stim_id" in header
    assert read_events_tsv(path) == trials


def test_events_errors_name_file_and_column(tmp_path) -> None:
    path = tmp_path / "bad_events.tsv"
    path.write_text("duration\ttrial_type\n3.0\ttrain\n")
    with pytest.raises(EventsFileError, match=r"bad_events.tsv: column 'onset' missing"):
        read_events_tsv(path)
    trials = build_schedule(small_config(), 0).run(0, 0)
    write_events_tsv(trials, path)
    lines = path.read_text().splitlines()
    lines[2] = "soon" + lines[2][lines[2].index("\t"):]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EventsFileError, match=r"bad_events.tsv: line 3: column 'onset': expected a number"):
        read_events_tsv(path)
