"""The paced export: spacing on a fake clock, files seen before they are complete, injected
faults, NIfTI 3D and growing 4D, real-folder replay and the ``phantom scan`` command."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from rtdecoder.cli import main
from rtdecoder.errors import ConfigError, VolumeError
from rtdecoder.ingest.volume import Volume
from rtdecoder.phantom.scanner import FaultPlan, PacedWriter, replay_dicom_folder, write_run

PAUSE_S = 0.004
WALL_START_S = 1_780_000_000.0


class FakeClock:
    """A clock that only moves when slept on; calls ``on_pause(path)`` during partial writes."""

    def __init__(self) -> None:
        self.now_s = 100.0
        self.sleeps: list[tuple[float, float]] = []  # (time asleep from, seconds)
        self.on_pause = None

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.sleeps.append((self.now_s, seconds))
        if seconds == PAUSE_S and self.on_pause is not None:
            self.on_pause()
        self.now_s += seconds


def make_volumes(rng, n: int, shape=(4, 5, 3), tr_s: float = 1.6) -> list[Volume]:
    affine = np.diag([3.0, 3.0, 3.5, 1.0])
    affine[:3, 3] = (-6.0, -8.0, -4.0)
    return [
        Volume(
            data=rng.uniform(200.0, 1200.0, size=shape).astype(np.float32), affine=affine,
            tr_s=tr_s, index=i, slice_times_s=np.array([0.0, 1.0, 0.5])[: shape[2]] * tr_s,
        )
        for i in range(n)
    ]


def run(volumes, out_dir, clock: FakeClock, **kwargs):
    return write_run(
        volumes, out_dir, clock=clock, sleep=clock.sleep, wall_clock=lambda: WALL_START_S,
        partial_pause_s=PAUSE_S, **kwargs,
    )


def stored_volume(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_writes_in_order_at_the_tr(rng, tmp_path):
    clock = FakeClock()
    volumes = make_volumes(rng, 4)
    deliveries = run(volumes, tmp_path, clock, format="mosaic", speed=2.0)

    assert [d.volume_index for d in deliveries] == [0, 1, 2, 3]
    assert [d.path.name for d in deliveries] == [f"001_000001_00000{i}.dcm" for i in (1, 2, 3, 4)]
    np.testing.assert_allclose([d.due_s for d in deliveries], 100.0 + 0.8 * np.arange(1, 5))
    # each slot wait ends exactly at the slot's end; only partial-write pauses come between
    slot_waits = [(start, s) for start, s in clock.sleeps if s != PAUSE_S]
    np.testing.assert_allclose([start + s for start, s in slot_waits], 100.0 + 0.8 * np.arange(1, 5))
    acquired = [pydicom.dcmread(d.path, stop_before_pixels=True).AcquisitionTime for d in deliveries]
    assert acquired == sorted(acquired) and len(set(acquired)) == 4
    scaling_tol = (1000.0 * 2) / 65535  # default scaling spans twice the first volume's range
    for d, volume in zip(deliveries, volumes, strict=True):
        mosaic = stored_volume(d.path)
        # a RAS-ordered grid is stored Siemens-style: rows run right to left, columns A to P
        np.testing.assert_allclose(mosaic[:5, :4].T, volume.data[::-1, ::-1, 0], atol=scaling_tol)


def test_a_polling_reader_sees_a_short_file_first(rng, tmp_path):
    clock = FakeClock()
    seen: list[tuple[str, int, int]] = []

    def poll() -> None:
        newest = max(tmp_path.glob("*.dcm"), key=lambda p: p.stat().st_mtime_ns)
        ds = pydicom.dcmread(newest)
        seen.append((newest.name, len(ds.PixelData), ds.Rows * ds.Columns * 2))

    clock.on_pause = poll
    deliveries = run(make_volumes(rng, 2), tmp_path, clock, format="mosaic")
    assert [name for name, _, _ in seen] == [d.path.name for d in deliveries]
    assert all(0 < got < expected for _, got, expected in seen)
    for d in deliveries:
        ds = pydicom.dcmread(d.path)
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2


def test_without_partial_writes_files_appear_complete(rng, tmp_path):
    clock = FakeClock()
    deliveries = run(make_volumes(rng, 2), tmp_path, clock, format="enhanced", partial_write=False)
    assert all(s != PAUSE_S for _, s in clock.sleeps)
    assert sorted(p.name for p in tmp_path.iterdir()) == [d.path.name for d in deliveries]
    assert pydicom.dcmread(deliveries[1].path).NumberOfFrames == 3


def test_faults_drop_duplicate_swap_truncate(rng, tmp_path):
    clock = FakeClock()
    faults = FaultPlan(drop={1}, duplicate={2}, swap=((4, 3),), truncate={5})
    deliveries = run(make_volumes(rng, 7), tmp_path, clock, format="mosaic", faults=faults)

    assert [d.volume_index for d in deliveries] == [0, 2, 2, 4, 3, 5, 6]
    assert [d.complete for d in deliveries] == [True] * 5 + [False, True]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "001_000001_000002.dcm" not in names and len(names) == 6
    # the swapped pair is written in the later one's slot, later one first
    assert deliveries[3].due_s == deliveries[4].due_s == pytest.approx(100.0 + 5 * 1.6)
    truncated = pydicom.dcmread(tmp_path / "001_000001_000006.dcm")
    assert len(truncated.PixelData) < truncated.Rows * truncated.Columns * 2
    assert pydicom.dcmread(tmp_path / "001_000001_000005.dcm").AcquisitionNumber == 5


def test_swap_pairs_must_be_disjoint():
    with pytest.raises(ConfigError, match="faults.swap: expected disjoint pairs"):
        FaultPlan(swap=((1, 2), (2, 3)))


def test_nifti_3d_files_with_sidecars(rng, tmp_path):
    clock = FakeClock()
    volumes = make_volumes(rng, 3)
    run(volumes, tmp_path, clock, format="nifti")
    for volume in volumes:
        image = nib.load(tmp_path / f"vol_{volume.index:05d}.nii")
        np.testing.assert_array_equal(np.asarray(image.dataobj), volume.data)
        np.testing.assert_allclose(image.affine, volume.affine, atol=1e-4)
        sidecar = json.loads((tmp_path / f"vol_{volume.index:05d}.json").read_text())
        assert sidecar["RepetitionTime"] == pytest.approx(1.6)
        np.testing.assert_allclose(sidecar["SliceTiming"], volume.slice_times_s)
    assert not list(tmp_path.glob(".*.part"))


def test_growing_4d_nifti(rng, tmp_path):
    clock = FakeClock()
    volumes = make_volumes(rng, 3)
    seen: list[tuple[int, int]] = []

    def poll() -> None:
        path = tmp_path / "bold.nii"
        header = nib.Nifti1Header.from_fileobj(open(path, "rb"))
        seen.append((int(header["dim"][4]), path.stat().st_size))

    clock.on_pause = poll
    run(volumes, tmp_path, clock, format="nifti4d")
    volume_bytes = 4 * 5 * 3 * 4
    assert [n for n, _ in seen] == [1, 2, 3]  # the header already counts the volume being appended
    assert all(size < 352 + n * volume_bytes for n, size in seen)
    image = nib.load(tmp_path / "bold.nii")
    assert image.shape == (4, 5, 3, 3)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.stack([v.data for v in volumes], axis=-1))
    assert image.header.get_zooms()[3] == pytest.approx(1.6)
    assert json.loads((tmp_path / "bold.json").read_text())["RepetitionTime"] == pytest.approx(1.6)


def test_growing_4d_refuses_faults(rng, tmp_path):
    with pytest.raises(ConfigError, match="faults: a growing 4D NIfTI"):
        run(make_volumes(rng, 2), tmp_path, FakeClock(), format="nifti4d", faults=FaultPlan(drop={0}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"format": "analyze"}, "format: expected one of"), ({"speed": 0.0}, r"speed: expected a factor > 0")],
)
def test_bad_options(rng, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        run(make_volumes(rng, 1), tmp_path, FakeClock(), **kwargs)


def test_writer_needs_start(tmp_path):
    from rtdecoder.errors import OrderError

    with pytest.raises(OrderError, match="call start"):
        PacedWriter(tmp_path, 1.0).wait_for_slot(0)


def test_replay_real_skyra_folder(real_dicom_dir, tmp_path):
    source = real_dicom_dir / "skyra-mosaic-rtcloud"
    clock = FakeClock()
    seen: list[int] = []
    clock.on_pause = lambda: seen.append(
        len(pydicom.dcmread(max(tmp_path.glob("*.dcm"), key=lambda p: p.stat().st_mtime_ns)).PixelData)
    )
    deliveries = replay_dicom_folder(
        source, tmp_path, speed=3.0, clock=clock, sleep=clock.sleep, partial_pause_s=PAUSE_S
    )

    assert len(deliveries) == 11  # the truncated copy of volume 5 is skipped
    acquisition = [pydicom.dcmread(d.path, stop_before_pixels=True).AcquisitionNumber for d in deliveries]
    assert acquisition == sorted(acquisition) and acquisition[0] == 1 and acquisition[-1] == 10
    np.testing.assert_allclose(np.diff([d.due_s for d in deliveries]), 0.5)
    for d in deliveries:
        assert d.path.read_bytes() == (source / d.path.name).read_bytes()
    assert not (tmp_path / "truncated_001_000013_000005.dcm").exists()
    assert len(seen) == 11 and all(n < 384 * 384 * 2 for n in seen)


def test_replay_of_a_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan")
    with pytest.raises(VolumeError, match="expected complete DICOM volumes, found none"):
        replay_dicom_folder(tmp_path, tmp_path / "out", clock=FakeClock(), sleep=lambda s: None)


def test_cli_scan_replays_a_folder(real_dicom_dir, tmp_path):
    source = real_dicom_dir / "prisma-mosaic-dcmqa" / "ep2d_Asc_2"
    assert main(["phantom", "scan", "--out", str(tmp_path), "--replay", str(source), "--speed", "1000"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.dcm")) == sorted(p.name for p in source.glob("*.dcm"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--speed", "0"], "--speed must be > 0"),
        (["--replay", "no-such-folder"], "no-such-folder: expected a folder of DICOM files"),
    ],
)
def test_cli_scan_bad_arguments(tmp_path, capsys, args, message):
    assert main(["phantom", "scan", "--out", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
