"""NIfTI as converters write it: SPM and dcm2niix names, runs numbered from 1, files without a TR,
sidecars with fields that cannot be used, and a 4D file that grows; read alone, by the clocked
collector and by the watcher thread."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rtdecoder.errors import VolumeError
from rtdecoder.ingest.nifti import parse_volume_name
from rtdecoder.ingest.ordering import RunNumbering, VolumeOrderer
from rtdecoder.ingest.readers import read_volume
from rtdecoder.ingest.watcher import FolderWatcher, VolumeCollector

SHAPE = (5, 4, 3)
AFFINE = np.diag([3.0, 3.0, 3.5, 1.0])


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


def _image(data: np.ndarray, tr_s: float | None) -> nib.Nifti1Image:
    """A NIfTI image whose header carries ``tr_s`` (s), or no TR at all (pixdim[4] 0, no time unit)."""
    image = nib.Nifti1Image(np.asarray(data, np.float32), AFFINE)
    if tr_s is None:
        image.header["pixdim"][4] = 0.0
    else:
        image.header.set_xyzt_units("mm", "sec")
        image.header["pixdim"][4] = tr_s
    return image


def _write(folder: Path, name: str, data: np.ndarray, tr_s: float | None = 1.5, sidecar: dict | None = None,
           staging: Path | None = None) -> Path:
    """Write one 3D file (and its sidecar first); with ``staging``, move it in whole, as an exporter does."""
    path = folder / name
    if sidecar is not None:
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
        (folder / f"{stem}.json").write_text(json.dumps(sidecar))
    if staging is None:
        nib.save(_image(data, tr_s), path)
    else:
        nib.save(_image(data, tr_s), staging / name)
        os.replace(staging / name, path)
    return path


def _volumes(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [rng.normal(size=SHAPE).astype(np.float32) for _ in range(n)]


def _drain(watcher: FolderWatcher, n: int, deadline_s: float = 10.0) -> list:
    volumes = []
    stop_at = time.monotonic() + deadline_s
    while len(volumes) < n and time.monotonic() < stop_at:
        volume = watcher.get(timeout_s=0.05)
        if volume is not None:
            volumes.append(volume)
    return volumes


# ------------------------------------------------------------------ names, read one at a time


@pytest.mark.parametrize(
    ("name", "scheme", "series", "number", "first_number"),
    [
        ("fanon-0007-00002-000002-01.nii", "spm", "fanon-0007", 2, 1),  # SPM12 with echo
        ("fanon-0007-00002-000002.nii", "spm", "fanon-0007", 2, 1),  # SPM without echo
        ("fanon-0007-00003-000003-02.nii", "spm", "fanon-0007-02", 3, 1),  # second echo: its own run
        ("sBJ01-0012-00001-000176-01-001.nii", "spm", "sBJ01-0012-001", 1, 1),  # one coil of a run
        ("ep2d_e2_i00005.nii.gz", "dcm2niix", "ep2d_e2", 5, 1),  # dcm2niix instance post-fix
        ("run_00007_e2.nii", "name", "run_e2", 7, None),  # dcm2niix echo post-fix is no volume number
        ("run_00007_ph.nii", "name", "run_ph", 7, None),
        ("vol_00001.nii.gz", "name", "vol", 1, None),
        ("vol0000.nii.gz", "name", "vol", 0, None),  # fslsplit
        ("run1_0007.nii", "name", "run1", 7, None),
        ("ep2d_bold_e1.nii", "none", "ep2d_bold_e1", None, None),
        ("anat.nii", "none", "anat", None, None),
    ],
)
def test_converter_names_are_recognised(name, scheme, series, number, first_number):
    parsed = parse_volume_name(name)
    assert (parsed.scheme, parsed.series, parsed.number, parsed.first_number) == (
        scheme, series, number, first_number,
    )


def test_spm_names_take_the_index_from_the_acquisition_field(tmp_path, rng):
    data = _volumes(rng, 3)
    paths = [_write(tmp_path, f"fanon-0007-{n:05d}-{n:06d}-01.nii", data[n - 1]) for n in (1, 2, 3)]
    second_echo = _write(tmp_path, "fanon-0007-00002-000002-02.nii", data[1])
    volumes = [read_volume(p) for p in paths]
    assert [v.index for v in volumes] == [0, 1, 2]  # not the echo number 1, not one TR late
    assert {v.series for v in volumes} == {"fanon-0007"}
    assert {v.index_source for v in volumes} == {"spm"}
    for volume, expected in zip(volumes, data, strict=True):
        np.testing.assert_array_equal(volume.data, expected)
    echo2 = read_volume(second_echo)
    assert (echo2.index, echo2.series) == (1, "fanon-0007-02")

    zero = _write(tmp_path, "fanon-0007-00000-000000-01.nii", data[0])
    with pytest.raises(VolumeError, match=r"fanon-0007-00000-000000-01\.nii: file name \(SPM acquisition number\): "
                                          r"expected a number >= 1"):
        read_volume(zero)


def test_dcm2niix_instance_and_echo_post_fixes(tmp_path, rng):
    data = _volumes(rng, 2)
    first = read_volume(_write(tmp_path, "ep2d_e1_i00001.nii", data[0]))
    assert (first.index, first.series, first.index_source) == (0, "ep2d_e1", "dcm2niix")
    numbering = RunNumbering()
    echo2 = [numbering.assign(read_volume(_write(tmp_path, f"bold_{n:05d}_e2.nii", data[n - 1]))) for n in (1, 2)]
    assert [(v.index, v.series) for v in echo2] == [(0, "bold_e2"), (1, "bold_e2")]


# ------------------------------------------------------------------ numbering base of a run


def test_run_numbered_from_one_is_not_shifted(tmp_path, rng, caplog):
    data = _volumes(rng, 4)
    paths = [_write(tmp_path, f"vol_{n:05d}.nii.gz", data[n - 1]) for n in (1, 2, 3, 4)]
    assert read_volume(paths[0]).index_source == "name"
    collector = VolumeCollector(clock=FakeClock())
    caplog.set_level(logging.INFO, logger="rtdecoder.ingest.ordering")
    taken = [v for p in (paths[2], paths[0], paths[3], paths[1]) for v in collector.file_changed(p)]
    assert collector.problems_ == []
    assert sorted(v.index for v in taken) == [0, 1, 2, 3]  # the lowest file present (00001) decided
    for volume in taken:
        np.testing.assert_array_equal(volume.data, data[volume.index])
    assert collector.numbering.base_of(taken[0]) == 1
    decided = [r for r in caplog.records if "numbers its files from 1" in r.getMessage()]
    assert len(decided) == 1 and decided[0].levelno == logging.INFO and "vol_00001.nii.gz" in decided[0].getMessage()


def test_run_numbered_from_zero_keeps_its_numbers(tmp_path, rng):
    data = _volumes(rng, 3)
    numbering = RunNumbering()
    # Read in name order, as calibration reads a run folder.
    volumes = [numbering.assign(read_volume(_write(tmp_path, f"vol{n:04d}.nii.gz", data[n]))) for n in range(3)]
    assert [v.index for v in volumes] == [0, 1, 2]
    assert numbering.base_of(volumes[0]) == 0
    assert numbering.assign(volumes[1]).index == 1  # assigning twice changes nothing


def test_run_starting_at_another_number_is_refused_with_a_fix(tmp_path, rng):
    data = _volumes(rng, 3)
    paths = [_write(tmp_path, f"run_{n:04d}.nii", data[n - 5]) for n in (5, 6, 7)]
    problems = []
    collector = VolumeCollector(clock=FakeClock(), on_problem=problems.append)
    assert collector.file_changed(paths[1]) == []
    error = str(problems[0].error)
    assert problems[0].path == paths[1]
    assert "run_0006.nii: file name (number at the end): expected the run's first file numbered 0 or 1" in error
    assert "lowest of series 'run' is 5, run_0005.nii" in error
    assert "rename the files" in error and "AcquisitionNumber" in error

    # The same files with sidecars that number them are taken.
    for n, path in zip((5, 6, 7), paths, strict=True):
        (tmp_path / f"{path.name[:-4]}.json").write_text(json.dumps({"AcquisitionNumber": n - 4}))
    collector = VolumeCollector(clock=FakeClock())
    taken = [v for p in paths for v in collector.file_changed(p)]
    assert [(v.index, v.index_source) for v in taken] == [(0, "sidecar"), (1, "sidecar"), (2, "sidecar")]


def test_file_before_the_runs_first_is_taken_once_the_first_comes(tmp_path, rng):
    data = _volumes(rng, 2)
    problems = []
    collector = VolumeCollector(clock=FakeClock(), on_problem=problems.append)
    second = _write(tmp_path, "vol_00002.nii", data[1])
    assert collector.file_changed(second) == [] and len(problems) == 1
    first = _write(tmp_path, "vol_00001.nii", data[0])
    assert [v.index for v in collector.file_changed(first)] == [0]
    assert [v.index for v in collector.retry_pending()] == [1]
    assert collector.pending_paths == []


def test_sidecar_copied_beside_every_volume_falls_back_to_the_names(tmp_path, rng, caplog):
    data = _volumes(rng, 3)
    series_sidecar = {"RepetitionTime": 2.0, "AcquisitionNumber": 1}  # the 4D file's, copied to each 3D
    paths = [_write(tmp_path, f"vol{n:04d}.nii", data[n], sidecar=series_sidecar) for n in range(3)]
    collector = VolumeCollector(clock=FakeClock())
    taken = [v for p in paths for v in collector.file_changed(p)]
    assert [v.index for v in taken] == [0, 1, 2]
    assert {v.tr_s for v in taken} == {2.0}
    assert caplog.text.count("do not number its volumes") == 1


# ------------------------------------------------------------------ TR


def test_file_without_tr_takes_the_runs_tr(tmp_path, rng):
    data = _volumes(rng, 2)
    bare = _write(tmp_path, "vol_0000.nii", data[0], tr_s=None)
    with pytest.raises(VolumeError, match=r"vol_0000\.nii: pixdim\[4\]: expected the TR .*--tr-s.*scanner\.tr_s"):
        read_volume(bare)
    volume = read_volume(bare, default_tr_s=1.25)
    assert (volume.tr_s, volume.tr_source) == (1.25, "default")
    np.testing.assert_array_equal(volume.data, data[0])

    # What the file says wins over the run's TR.
    with_header = read_volume(_write(tmp_path, "vol_0001.nii", data[1], tr_s=2.0), default_tr_s=1.25)
    assert (with_header.tr_s, with_header.tr_source) == (2.0, "header")
    with_sidecar = read_volume(
        _write(tmp_path, "vol_0002.nii", data[1], tr_s=None, sidecar={"RepetitionTime": 0.8}), default_tr_s=1.25
    )
    assert (with_sidecar.tr_s, with_sidecar.tr_source) == (0.8, "sidecar")
    with pytest.raises(ValueError, match="default_tr_s: expected the run's TR in seconds > 0"):
        read_volume(bare, default_tr_s=0.0)


def test_broken_repetition_time_is_an_error_only_when_the_header_has_none(tmp_path, rng, caplog):
    data = _volumes(rng, 1)[0]
    kept = read_volume(_write(tmp_path, "a_0000.nii", data, tr_s=1.5, sidecar={"RepetitionTime": "1.5 s"}))
    assert (kept.tr_s, kept.tr_source) == (1.5, "header")
    assert "a_0000.nii: sidecar RepetitionTime: expected the TR as a number of seconds > 0 (got '1.5 s')" in caplog.text
    broken = _write(tmp_path, "b_0000.nii", data, tr_s=None, sidecar={"RepetitionTime": "1.5 s"})
    with pytest.raises(VolumeError, match=r"b_0000\.nii: sidecar RepetitionTime: expected the TR as a number of "
                                          r"seconds > 0 \(got '1\.5 s'\), and the header has no TR"):
        read_volume(broken, default_tr_s=1.5)


# ------------------------------------------------------------------ optional sidecar fields


def test_unusable_optional_sidecar_fields_warn_once_and_keep_the_volume(tmp_path, rng, caplog):
    data = _volumes(rng, 3)
    sidecar = {
        "RepetitionTime": 1.5,
        "AcquisitionDateTime": "yesterday",
        "SliceTiming": [],
        "AcquisitionNumber": "first",
    }
    paths = [_write(tmp_path, f"vol_{n:04d}.nii", data[n], sidecar=sidecar) for n in range(3)]
    collector = VolumeCollector(clock=FakeClock())
    caplog.set_level(logging.WARNING)
    taken = [v for p in paths for v in collector.file_changed(p)]
    assert collector.problems_ == []
    assert [v.index for v in taken] == [0, 1, 2]  # from the names
    assert all(v.times.acquired_s is None and v.slice_times_s is None for v in taken)
    for field, expected in [
        ("AcquisitionDateTime", "expected ISO 8601"),
        ("SliceTiming", "expected a list of 3 slice times in s"),
        ("AcquisitionNumber", "expected an integer >= 1"),
    ]:
        said = [r.getMessage() for r in caplog.records if f"sidecar {field}:" in r.getMessage()]
        assert len(said) == 1, field  # once per run and field, not at every volume
        assert "vol_0000.nii" in said[0] and expected in said[0]


def test_dicom_style_date_and_other_slice_timing_problems(tmp_path, rng, caplog):
    data = _volumes(rng, 1)[0]
    dicom_date = read_volume(
        _write(tmp_path, "d_0000.nii", data, sidecar={"AcquisitionDateTime": "20230101120000.000000"})
    )
    assert dicom_date.times.acquired_s == pytest.approx(datetime(2023, 1, 1, 12).timestamp())

    image = _image(data, 1.5)
    image.header.set_dim_info(slice=2)
    image.header["slice_code"] = 1  # sequential increasing
    image.header["slice_duration"] = 0.5
    image.header["slice_start"], image.header["slice_end"] = 0, 2
    nib.save(image, tmp_path / "s_0000.nii")
    (tmp_path / "s_0000.json").write_text(json.dumps({"SliceTiming": [0.0, 0.5]}))  # 2 of 3 slices
    volume = read_volume(tmp_path / "s_0000.nii")
    np.testing.assert_allclose(volume.slice_times_s, [0.0, 0.5, 1.0])  # the header's
    assert "s_0000.nii: sidecar SliceTiming: expected 3 values, one per slice" in caplog.text

    (tmp_path / "t_0000.json").write_text(json.dumps({"SliceTiming": [0.0, 0.5, 1.0], "SliceEncodingDirection": "j"}))
    nib.save(_image(data, 1.5), tmp_path / "t_0000.nii")
    assert read_volume(tmp_path / "t_0000.nii").slice_times_s is None
    assert "t_0000.nii: sidecar SliceEncodingDirection: expected 'k' or 'k-'" in caplog.text


# ------------------------------------------------------------------ the watcher thread, end to end


def test_watcher_orders_spm_and_one_based_runs_without_a_shift(tmp_path, rng):
    watched, staging = tmp_path / "export", tmp_path / "staging"
    watched.mkdir()
    staging.mkdir()
    spm = _volumes(rng, 5)
    one_based = _volumes(rng, 5)
    order = [int(i) for i in rng.permutation(5)]
    with FolderWatcher(watched, watch_mode="polling", poll_interval_s=0.01) as watcher:
        for i in order:
            _write(watched, f"fanon-0007-{i + 1:05d}-{i + 1:06d}-01.nii", spm[i], staging=staging)
        # The run numbered from 1 arrives first file first, then shuffled.
        for i in [0] + [int(j) + 1 for j in rng.permutation(4)]:
            _write(watched, f"vol_{i + 1:05d}.nii.gz", one_based[i], staging=staging)
        volumes = _drain(watcher, 10)
    assert watcher.problems.empty()
    for series, expected in [("fanon-0007", spm), ("vol", one_based)]:
        orderer = VolumeOrderer(first_index=0, missing_wait_s=60.0)
        released = [item for v in volumes if v.series == series for item in orderer.push(v)]
        assert [v.index for v in released] == [0, 1, 2, 3, 4], series
        for volume in released:
            np.testing.assert_array_equal(volume.data, expected[volume.index])
        assert orderer.n_missing_ == 0 and orderer.n_duplicates_ == 0


def test_watcher_gives_files_without_tr_the_runs_tr(tmp_path, rng):
    data = _volumes(rng, 2)
    with FolderWatcher(tmp_path, watch_mode="polling", poll_interval_s=0.01, default_tr_s=1.6) as watcher:
        for n in (1, 2):
            _write(tmp_path, f"vol_{n:03d}.nii", data[n - 1], tr_s=None)
        volumes = _drain(watcher, 2)
    assert watcher.problems.empty()
    assert sorted((v.index, v.tr_s, v.tr_source) for v in volumes) == [(0, 1.6, "default"), (1, 1.6, "default")]


def test_growing_4d_file_without_tr_through_the_watcher(tmp_path, rng):
    data = rng.normal(size=(*SHAPE, 4)).astype(np.float32)
    full = tmp_path / "full.nii"
    nib.save(_image(data, tr_s=None), full)
    raw = full.read_bytes()
    volume_bytes = int(np.prod(SHAPE)) * 4
    header_bytes = len(raw) - 4 * volume_bytes
    watched = tmp_path / "export"
    watched.mkdir()
    bold = watched / "ep2d_bold_s005.nii"  # dicm2nii's name for a run: the number is the series
    with FolderWatcher(watched, watch_mode="polling", poll_interval_s=0.01, default_tr_s=2.0) as watcher:
        with open(bold, "wb") as handle:
            handle.write(raw[: header_bytes + volume_bytes + 7])  # second volume partly appended
            handle.flush()
            first = _drain(watcher, 1)
            handle.write(raw[header_bytes + volume_bytes + 7:])
        rest = _drain(watcher, 3)
    assert watcher.problems.empty()
    volumes = first + rest
    assert [v.index for v in volumes] == [0, 1, 2, 3]
    assert {(v.series, v.index_source, v.tr_source, v.tr_s) for v in volumes} == {
        ("ep2d_bold_s005", "volume", "default", 2.0)
    }
    for volume in volumes:
        np.testing.assert_array_equal(volume.data, data[..., volume.index])


# ------------------------------------------------------------------ a real dcm2niix conversion


def test_real_dcm2niix_run_split_into_3d_files_with_the_series_sidecar_copied(real_dicom_dir, tmp_path, caplog):
    ref = real_dicom_dir / "prisma-mosaic-dcmqa" / "Ref"
    image = nib.load(ref / "2_ep2d_Asc.nii")
    sidecar = json.loads((ref / "2_ep2d_Asc.json").read_text())
    stored = np.asanyarray(image.dataobj).astype(image.get_data_dtype())  # int16, no scaling in this file

    whole = [read_volume(ref / "2_ep2d_Asc.nii", index_hint=t) for t in range(image.shape[3])]
    assert {(v.index_source, v.tr_source) for v in whole} == {("volume", "sidecar")}

    # dcm2niix -f %p_%5r would name them so; the 4D file's sidecar (AcquisitionNumber 1) copied beside each.
    for t in range(image.shape[3]):
        name = f"ep2d_Asc_{t + 1:05d}"
        nib.save(nib.Nifti1Image(stored[..., t], image.affine, image.header), tmp_path / f"{name}.nii")
        (tmp_path / f"{name}.json").write_text(json.dumps(sidecar))
    collector = VolumeCollector(clock=FakeClock())
    taken = [v for t in range(image.shape[3]) for v in collector.file_changed(tmp_path / f"ep2d_Asc_{t + 1:05d}.nii")]
    assert collector.problems_ == []
    assert [v.index for v in taken] == list(range(image.shape[3]))
    assert caplog.text.count("do not number its volumes") == 1
    for volume, expected in zip(taken, whole, strict=True):
        np.testing.assert_array_equal(volume.data, expected.data)
        assert (volume.tr_s, volume.tr_source) == (pytest.approx(sidecar["RepetitionTime"]), "sidecar")
        np.testing.assert_allclose(volume.slice_times_s, sidecar["SliceTiming"])


def test_runs_in_one_folder_keep_their_own_base(tmp_path, rng):
    data = _volumes(rng, 1)[0]
    numbering = RunNumbering(look_in_folder=False)
    late = _write(tmp_path, "b_0002.nii", data)
    with pytest.raises(VolumeError, match=r"b_0002\.nii: file name .*lowest of series 'b' is 2, b_0002\.nii"):
        numbering.assign(read_volume(late))
    a0, b1 = (numbering.assign(read_volume(_write(tmp_path, name, data))) for name in ("a_0000.nii", "b_0001.nii"))
    assert (a0.index, numbering.base_of(a0)) == (0, 0)
    assert (b1.index, numbering.base_of(b1)) == (0, 1)
    assert numbering.assign(read_volume(late)).index == 1
    with pytest.raises(VolumeError, match=r"b_0000\.nii: file name .*expected a number >= 1, .*decided from b_0001"):
        numbering.assign(read_volume(_write(tmp_path, "b_0000.nii", data)))
