"""The export-folder watcher: the clocked core without threads, then real threads on a tmp folder."""

from __future__ import annotations

import shutil
import time

import nibabel as nib
import numpy as np
import pytest

from rtdecoder.config import IngestConfig
from rtdecoder.errors import IncompleteVolumeError, OrderError, VolumeError
from rtdecoder.ingest.ordering import VolumeOrderer
from rtdecoder.ingest.watcher import FolderWatcher, VolumeCollector, is_volume_file


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def skyra_files(real_dicom_dir):
    return sorted((real_dicom_dir / "skyra-mosaic-rtcloud").glob("001_*.dcm"))


def test_file_complete_on_second_look_keeps_first_seen_time(skyra_files, tmp_path):
    clock = FakeClock()
    collector = VolumeCollector(incomplete_timeout_s=5.0, clock=clock)
    raw = skyra_files[3].read_bytes()
    target = tmp_path / skyra_files[3].name
    target.write_bytes(raw[: len(raw) // 2])

    assert collector.file_changed(target) == []
    assert collector.pending_paths == [target]
    clock.now_s += 1.0
    assert collector.retry_pending() == []
    target.write_bytes(raw)
    clock.now_s += 0.5
    (volume,) = collector.file_changed(target)
    assert volume.index == 2
    assert volume.times.seen_s == 1_000.0
    assert volume.times.complete_s == 1_001.5
    assert collector.pending_paths == [] and collector.problems_ == []
    assert collector.file_changed(target) == []  # touched again after it was taken


def test_incomplete_file_is_reported_after_the_timeout_and_not_lost(skyra_files, tmp_path, caplog):
    clock = FakeClock()
    problems = []
    collector = VolumeCollector(incomplete_timeout_s=5.0, clock=clock, on_problem=problems.append)
    raw = skyra_files[5].read_bytes()
    target = tmp_path / skyra_files[5].name
    target.write_bytes(raw[:1000])
    collector.file_changed(target)
    clock.now_s += 4.9
    collector.retry_pending()
    assert problems == []
    clock.now_s += 0.2
    collector.retry_pending()
    collector.retry_pending()  # reported once, not on every look
    assert len(problems) == 1
    assert problems[0].path == target and problems[0].seen_s == 1_000.0
    assert isinstance(problems[0].error, IncompleteVolumeError)
    assert "cannot take" in caplog.text and "not complete yet" in caplog.text

    target.write_bytes(raw)  # the exporter finally finishes it
    (volume,) = collector.file_changed(target)
    assert volume.index == 4 and volume.times.seen_s == 1_000.0


def test_unreadable_file_is_reported_at_once_and_side_files_ignored(tmp_path):
    problems = []
    collector = VolumeCollector(clock=FakeClock(), on_problem=problems.append)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"z" * 300)
    sidecar = tmp_path / "vol_0001.json"
    sidecar.write_text("{")
    assert collector.file_changed(junk) == [] and collector.file_changed(sidecar) == []
    assert [type(p.error) for p in problems] == [VolumeError]
    assert "not a DICOM file" in str(problems[0].error)
    assert not is_volume_file(tmp_path / ".vol.dcm.swp") and is_volume_file(tmp_path / "IM-0001-0001")
    assert collector.file_changed(tmp_path / "gone.dcm") == []  # vanished: nothing to report
    assert len(problems) == 1


def test_growing_4d_nifti_yields_each_volume_once(tmp_path, rng):
    data = rng.normal(size=(4, 3, 2, 5)).astype(np.float32)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_xyzt_units("mm", "sec")
    image.header["pixdim"][4] = 2.0
    full = tmp_path / "full.nii"
    nib.save(image, full)
    raw = full.read_bytes()
    volume_bytes = 4 * 3 * 2 * 4
    header_bytes = len(raw) - 5 * volume_bytes
    watched = tmp_path / "watched"
    watched.mkdir()
    bold = watched / "bold.nii"
    clock = FakeClock()
    collector = VolumeCollector(incomplete_timeout_s=1.0, clock=clock)

    bold.write_bytes(raw[: header_bytes + volume_bytes + 10])
    assert [v.index for v in collector.file_changed(bold)] == [0]
    clock.now_s += 10.0  # a long wait for the next append is normal, not a problem
    assert collector.file_changed(bold) == [] and collector.problems_ == []
    bold.write_bytes(raw[: header_bytes + 4 * volume_bytes])
    taken = collector.file_changed(bold)
    assert [v.index for v in taken] == [1, 2, 3]
    np.testing.assert_array_equal(taken[2].data, data[..., 3])
    assert all(v.times.seen_s == 1_010.0 for v in taken)
    bold.write_bytes(raw)
    assert [v.index for v in collector.file_changed(bold)] == [4]
    assert collector.problems_ == []


def _drain(watcher: FolderWatcher, n: int, deadline_s: float = 10.0) -> list:
    volumes = []
    stop_at = time.monotonic() + deadline_s
    while len(volumes) < n and time.monotonic() < stop_at:
        volume = watcher.get(timeout_s=0.1)
        if volume is not None:
            volumes.append(volume)
    return volumes


@pytest.mark.parametrize("watch_mode", ["polling", "inotify"])
def test_watcher_thread_end_to_end(skyra_files, tmp_path, rng, watch_mode):
    config = IngestConfig(watch_mode=watch_mode, poll_interval_s=0.01, incomplete_timeout_s=5.0)
    files = [skyra_files[i] for i in rng.permutation(len(skyra_files))]  # shuffled arrival
    partial_raw = files[0].read_bytes()
    with FolderWatcher.from_config(tmp_path, config) as watcher:
        with open(tmp_path / files[0].name, "wb") as handle:  # seen half written first
            handle.write(partial_raw[: len(partial_raw) // 3])
            handle.flush()
            time.sleep(0.05)
            handle.write(partial_raw[len(partial_raw) // 3 :])
        for path in files[1:]:
            shutil.copyfile(path, tmp_path / path.name)
        volumes = _drain(watcher, len(files))
    assert len(volumes) == len(files)
    assert sorted(v.source.name for v in volumes) == sorted(p.name for p in files)
    assert all(v.times.seen_s <= v.times.complete_s for v in volumes)
    assert watcher.problems.empty()

    orderer = VolumeOrderer(first_index=0, missing_wait_s=60.0)
    released = [item for volume in volumes for item in orderer.push(volume)]
    assert [v.index for v in released] == list(range(10))
    assert orderer.n_duplicates_ == 1  # 001_000013_000000.dcm repeats acquisition 10


def test_watcher_reports_a_file_that_never_completes(skyra_files, tmp_path):
    raw = skyra_files[2].read_bytes()
    with FolderWatcher(tmp_path, watch_mode="polling", poll_interval_s=0.01, incomplete_timeout_s=0.2) as watcher:
        (tmp_path / "stuck.dcm").write_bytes(raw[:5000])
        problem = watcher.problems.get(timeout=5.0)
    assert problem.path.name == "stuck.dcm"
    assert isinstance(problem.error, IncompleteVolumeError)
    assert problem.reported_s - problem.seen_s >= 0.2


def test_watcher_lifecycle_errors(tmp_path):
    with pytest.raises(VolumeError, match=r"absent: export folder: expected an existing directory"):
        FolderWatcher(tmp_path / "absent").start()
    watcher = FolderWatcher(tmp_path, watch_mode="polling").start()
    with pytest.raises(OrderError, match="already started; call stop"):
        watcher.start()
    watcher.stop()
    watcher.stop()
    assert list(watcher) == []
    with pytest.raises(ValueError, match="watch_mode must be 'inotify' or 'polling'"):
        FolderWatcher(tmp_path, watch_mode="smb").start()


def test_existing_files_are_taken_only_when_asked(skyra_files, tmp_path):
    shutil.copyfile(skyra_files[1], tmp_path / skyra_files[1].name)
    with FolderWatcher(tmp_path, watch_mode="polling", poll_interval_s=0.01) as watcher:
        assert watcher.get(timeout_s=0.2) is None
    with FolderWatcher(tmp_path, watch_mode="polling", poll_interval_s=0.01, include_existing=True) as watcher:
        assert watcher.get(timeout_s=5.0).index == 0


def test_events_files_left_in_the_export_folder_are_not_volumes(tmp_path) -> None:
    from rtdecoder.ingest.watcher import FolderWatcher, is_volume_file

    assert not is_volume_file(tmp_path / "events.tsv") and not is_volume_file(tmp_path / "sub-01_run-01_events.tsv")
    (tmp_path / "events.tsv").write_text("onset\tduration\n1.0\t3.0\n")
    with FolderWatcher(tmp_path, watch_mode="polling", include_existing=True) as watcher:
        assert watcher.get(timeout_s=0.3) is None
        assert watcher.problems.empty()
