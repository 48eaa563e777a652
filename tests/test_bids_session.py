"""BIDS sessions as calibration input: names, run discovery, entity rules, and betas equal to run folders'."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from test_calibrate import small_config, tiny_world, write_two_runs

from rtdecoder.calibration.betas import estimate_session_betas, find_runs
from rtdecoder.calibration.bids import parse_bids_name
from rtdecoder.errors import BundleError
from rtdecoder.glm.events import read_events_tsv

STEM = "sub-08_ses-01_task-phantom"
# lexicographic order would put run-10 first: the runs must come in run-number order
RUN_NUMBERS = (9, 10)


def test_bids_names_are_split_into_entities_suffix_and_extension() -> None:
    name = parse_bids_name("sub-08_ses-01_task-nsd_acq-mb4_run-10_echo-2_bold.nii.gz")
    assert name.entities == {"sub": "08", "ses": "01", "task": "nsd", "acq": "mb4", "run": "10", "echo": "2"}
    assert (name.suffix, name.extension) == ("bold", ".nii.gz")
    assert name.stem == "sub-08_ses-01_task-nsd_acq-mb4_run-10_echo-2"
    folder = parse_bids_name("sub-08_ses-01_run-01")
    assert folder.entities == {"sub": "08", "ses": "01", "run": "01"}
    assert folder.suffix is None and folder.extension == ""
    for not_bids in ("events.tsv", "vol_00001.nii", "run-01_", "sub-08__bold.nii", "sub-08_sub-09_bold.nii",
                     ".sub-08_bold.nii", "sub-08_ses-0.1_bold.nii", "bold.nii.gz"):
        assert parse_bids_name(not_bids) is None, not_bids


def test_stim_file_names_the_trial_by_the_files_stem(tmp_path) -> None:
    path = tmp_path / "sub-08_task-x_events.tsv"
    path.write_text(
        "onset\tduration\tstim_file\tstim_id\n"
        "1.0\t3.0\timages/nsd_00123.png\tn/a\n"
        "5.0\t3.0\tstimuli\\\\shared.v2.jpg\t\n"
        "9.0\t3.0\tn/a\tn/a\n"
        "13.0\t3.0\timages/other.png\tkept-id\n"
    )
    assert [t.stim_id for t in read_events_tsv(path)] == ["nsd_00123", "shared.v2", None, "kept-id"]


# ---------------------------------------------------------------- discovery on placeholder files


def _events(path, rows=1) -> None:
    path.write_text("onset\tduration\n" + "".join(f"{4 * i + 1}\t1\n" for i in range(rows)))


def _bold(func, stem) -> None:
    (func / f"{stem}_bold.nii.gz").write_bytes(b"not read by find_runs")


def _func(tmp_path, sub="sub-08", ses="ses-01"):
    func = tmp_path / sub / ses / "func"
    func.mkdir(parents=True)
    return func


def test_runs_are_found_from_session_func_or_subject_folder_in_run_order(tmp_path) -> None:
    func = _func(tmp_path)
    for run in (2, 10, 1):
        _bold(func, f"{STEM}_run-{run}")
        _events(func / f"{STEM}_run-{run}_events.tsv", rows=run)
    _bold(func, "sub-08_ses-01_task-rest")  # no events: not a calibration run
    (func / f"{STEM}_run-1_bold.json").write_text("{}")
    (tmp_path / "sub-08" / "truth").mkdir()
    for folder in (func, func.parent, tmp_path / "sub-08"):
        runs = find_runs(folder)
        assert [r.label for r in runs] == [f"{STEM}_run-{n}" for n in (1, 2, 10)], folder
        assert [len(r.trials) for r in runs] == [1, 2, 10]
        assert runs[0].volume_paths == [func / f"{STEM}_run-1_bold.nii.gz"] and runs[0].directory == func
        assert runs[0].sidecar_path == func / f"{STEM}_run-1_bold.json" and runs[1].sidecar_path is None
        assert runs[2].entities == {"sub": "08", "ses": "01", "task": "phantom", "run": "10"}
        assert runs[2].events_path == func / f"{STEM}_run-10_events.tsv"


def test_a_folder_of_volumes_named_like_the_run_is_a_run(tmp_path) -> None:
    func = _func(tmp_path)
    for run, name in ((1, f"{STEM}_run-01"), (2, f"{STEM}_run-02_bold")):
        (func / name).mkdir()
        for index in range(3):
            (func / name / f"vol_{index:05d}.nii").write_bytes(b"")
        (func / name / "vol_00000.json").write_text("{}")
        _events(func / f"{STEM}_run-{run:02d}_events.tsv")
    runs = find_runs(func.parent)
    assert [r.directory.name for r in runs] == [f"{STEM}_run-01", f"{STEM}_run-02_bold"]
    assert [p.name for p in runs[0].volume_paths] == ["vol_00000.nii", "vol_00001.nii", "vol_00002.nii"]


def test_several_tasks_are_an_error_unless_one_is_selected(tmp_path) -> None:
    func = _func(tmp_path)
    for task in ("nsd", "floc"):
        for run in (1, 2):
            _bold(func, f"sub-08_ses-01_task-{task}_run-{run}")
            _events(func / f"sub-08_ses-01_task-{task}_run-{run}_events.tsv")
    with pytest.raises(BundleError, match=r"func: task: runs of 2 tasks \(task-floc, task-nsd\); expected one task"):
        find_runs(func)
    runs = find_runs(func, select={"task": "nsd"})
    assert [r.label for r in runs] == ["sub-08_ses-01_task-nsd_run-1", "sub-08_ses-01_task-nsd_run-2"]
    with pytest.raises(BundleError, match=r"select: task: expected runs with task-retino \(found task-floc, task-n"):
        find_runs(func, select={"task": "retino"})


def test_multi_echo_is_refused_unless_one_echo_is_selected(tmp_path) -> None:
    func = _func(tmp_path)
    for run in (1, 2):
        _events(func / f"{STEM}_run-{run}_events.tsv")  # BIDS inheritance: one events file for every echo
        for echo in (1, 2, 3):
            _bold(func, f"{STEM}_run-{run}_echo-{echo}")
    with pytest.raises(BundleError, match=r"echo: multi-echo runs \(echo-1, echo-2, echo-3\); expected one echo"):
        find_runs(func)
    runs = find_runs(func, select={"echo": 2})
    assert [r.volume_paths[0].name for r in runs] == [f"{STEM}_run-{n}_echo-2_bold.nii.gz" for n in (1, 2)]
    assert runs[0].events_path.name == f"{STEM}_run-1_events.tsv"


def test_ambiguous_or_incomplete_sessions_name_the_problem(tmp_path) -> None:
    func = _func(tmp_path / "acq")
    for acq in ("mb4", "mb8"):
        _bold(func, f"{STEM}_acq-{acq}_run-1")
        _events(func / f"{STEM}_acq-{acq}_run-1_events.tsv")
    with pytest.raises(BundleError, match=r"acq: runs differ in acq \(acq-mb4, acq-mb8\); expected one acq"):
        find_runs(func)
    assert len(find_runs(func, select={"acquisition": "mb8"})) == 1  # the long name works too

    func = _func(tmp_path / "orphan")
    _bold(func, f"{STEM}_run-1")
    _events(func / f"{STEM}_run-1_events.tsv")
    _events(func / f"{STEM}_run-2_events.tsv")
    with pytest.raises(BundleError, match=rf"{STEM}_run-2_events\.tsv: no data for these events; expected "):
        find_runs(func)

    func = _func(tmp_path / "twice")
    _bold(func, f"{STEM}_run-1")
    (func / f"{STEM}_run-01").mkdir()
    _events(func / f"{STEM}_run-1_events.tsv")
    with pytest.raises(BundleError, match=r"run: .* is the same run; expected one 4D"):
        find_runs(func)

    func = _func(tmp_path / "index")
    _bold(func, f"{STEM}_run-a")
    _events(func / f"{STEM}_run-a_events.tsv")
    with pytest.raises(BundleError, match=r"run: expected a non-negative integer index, e.g. run-01 \(got run-a\)"):
        find_runs(func)

    subject = tmp_path / "sessions" / "sub-08"
    for ses in ("ses-01", "ses-02"):
        _func(tmp_path / "sessions", ses=ses)
    with pytest.raises(BundleError, match=r"sub-08: --session: a subject folder with 2 sessions \(ses-01, ses-02\)"):
        find_runs(subject)

    legacy = tmp_path / "legacy" / "run-01"
    legacy.mkdir(parents=True)
    (legacy / "vol_00000.nii").write_bytes(b"")
    _events(legacy / "events.tsv")
    with pytest.raises(BundleError, match=r"select: BIDS entities \{'task': 'nsd'\} given, but the session is run"):
        find_runs(legacy.parent, select={"task": "nsd"})

    with pytest.raises(BundleError, match=r"expected run folders .*, or a BIDS session .*\(found none\)"):
        find_runs(_func(tmp_path / "empty"))


# ---------------------------------------------------------------- the same data in three layouts


def _write_events_with_stim_file(trials, path) -> None:
    """BIDS events naming each image by file (``stim_file``), without a ``stim_id`` column."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["onset", "duration", "trial_type", "stim_file", "stim_index", "trial_id", "is_test"])
        for t in trials:
            writer.writerow([f"{t.onset_s:.3f}", f"{t.duration_s:.3f}", "test" if t.is_test else "train",
                             f"images/{t.stim_id}.png", t.stim_index, t.trial_id, str(t.is_test).lower()])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Two phantom runs written as run folders, as BIDS 4D files, and as BIDS folders of volumes.

    The 4D files hold the same float32 voxels as the run folders' one-NIfTI-per-volume files, and
    their sidecars the same (rounded) TR and slice times. The folders of volumes are the run
    folders' files with the slice times taken out of the volumes' sidecars and put in the run's
    ``_bold.json`` instead.
    """
    config = small_config()
    world = tiny_world(config)
    root = tmp_path_factory.mktemp("layouts")
    truth = write_two_runs(world, root / "runs")
    func_4d = root / "bids4d" / "sub-08" / "ses-01" / "func"
    func_vols = root / "bidsvols" / "sub-08" / "ses-01" / "func"
    func_4d.mkdir(parents=True)
    func_vols.mkdir(parents=True)
    for number, simulated in zip(RUN_NUMBERS, truth, strict=True):
        stem = f"{STEM}_run-{number}"
        legacy = root / "runs" / f"run-{RUN_NUMBERS.index(number) + 1:02d}"
        image = nib.Nifti1Image(np.asarray(simulated.volumes, dtype=np.float32), simulated.affine)
        image.set_sform(simulated.affine, code=1)
        image.set_qform(simulated.affine, code=1)
        image.header.set_xyzt_units("mm", "sec")
        image.to_filename(func_4d / f"{stem}_bold.nii.gz")
        sidecar = {"RepetitionTime": simulated.tr_s, "SliceEncodingDirection": "k",
                   "SliceTiming": [round(float(t), 6) for t in simulated.slice_times_s]}
        for func in (func_4d, func_vols):
            (func / f"{stem}_bold.json").write_text(json.dumps(sidecar))
        shutil.copy(legacy / "events.tsv", func_4d / f"{stem}_events.tsv")
        _write_events_with_stim_file(simulated.trials, func_vols / f"{stem}_events.tsv")
        shutil.copytree(legacy, func_vols / stem, ignore=shutil.ignore_patterns("events.tsv"))
        for path in (func_vols / stem).glob("*.json"):
            payload = json.loads(path.read_text())
            del payload["SliceTiming"], payload["SliceEncodingDirection"]
            path.write_text(json.dumps(payload))
    return config, world, root, truth


def test_a_bids_session_in_either_layout_gives_the_run_folders_betas(layouts) -> None:
    config, world, root, truth = layouts
    mask = world.subject(1).mask
    expected = estimate_session_betas(root / "runs", config, mask, progress=False)
    for session in (root / "bids4d" / "sub-08", root / "bidsvols" / "sub-08" / "ses-01" / "func"):
        got = estimate_session_betas(session, config, mask, progress=False)
        labels = [f"{STEM}_run-{n}" for n in RUN_NUMBERS]
        assert got.run_labels == [labels[0]] * 12 + [labels[1]] * 12, session
        assert [t.trial_id for t in got.trials] == [t.trial_id for t in expected.trials]
        assert [t.stim_id for t in got.trials] == [t.stim_id for t in expected.trials]
        # the slice times, from the 4D files' sidecars or the folders' run sidecars, are the volumes'
        assert list(got.slice_time_ref_s.values()) == pytest.approx(list(expected.slice_time_ref_s.values()))
        assert list(expected.slice_time_ref_s.values())[0] > 0.5
        np.testing.assert_array_equal(got.hrf_index, expected.hrf_index)
        np.testing.assert_allclose(got.betas, expected.betas, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.signal_mean, expected.signal_mean, rtol=1e-6)
