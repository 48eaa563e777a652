"""Releasing volumes in acquisition order: shuffles, duplicates and volumes that never come."""

from __future__ import annotations

import numpy as np
import pytest

from rtdecoder.errors import OrderError
from rtdecoder.ingest.ordering import MissingVolume, VolumeOrderer
from rtdecoder.ingest.volume import Volume


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def _volume(index: int, series: str = "run1") -> Volume:
    return Volume(
        data=np.full((2, 2, 2), index, np.float32), affine=np.eye(4), tr_s=1.5, index=index, series=series
    )


def _indices(items) -> list:
    return [("missing", item.index) if isinstance(item, MissingVolume) else item.index for item in items]


def test_shuffled_arrivals_come_out_in_order(rng):
    clock = FakeClock()
    orderer = VolumeOrderer(first_index=0, missing_wait_s=4.0, clock=clock)
    released = []
    for index in rng.permutation(20):
        clock.now_s += 0.1
        released += orderer.push(_volume(int(index)))
    assert _indices(released) == list(range(20))
    assert orderer.n_held == 0
    assert all(item.data[0, 0, 0] == item.index for item in released)


def test_duplicates_are_dropped_and_logged(caplog):
    orderer = VolumeOrderer(first_index=0, missing_wait_s=4.0, clock=FakeClock())
    assert _indices(orderer.push(_volume(0))) == [0]
    assert orderer.push(_volume(2)) == []
    assert orderer.push(_volume(0)) == []  # already released
    assert orderer.push(_volume(2)) == []  # already held
    assert _indices(orderer.push(_volume(1))) == [1, 2]
    assert orderer.n_duplicates_ == 2
    assert "dropping volume 0" in caplog.text and "already held" in caplog.text


def test_dropped_volume_is_declared_after_the_wait_not_before():
    clock = FakeClock()
    orderer = VolumeOrderer(first_index=10, missing_wait_s=4.0, clock=clock)
    assert _indices(orderer.push(_volume(10))) == [10]
    clock.now_s += 1.0
    assert orderer.push(_volume(12)) == []  # 11 is late, not yet missing
    clock.now_s += 1.0
    assert orderer.push(_volume(13)) == []
    clock.now_s += 2.9
    assert orderer.poll() == []
    clock.now_s += 0.2  # 4.1 s after 12 arrived
    released = orderer.poll()
    assert _indices(released) == [("missing", 11), 12, 13]
    assert released[0] == MissingVolume(index=11, series="run1", declared_s=clock.now_s)
    # Later volumes keep their own index: no shift.
    assert _indices(orderer.push(_volume(14))) == [14]
    # A volume arriving after being declared missing is dropped, never slotted in late.
    assert orderer.push(_volume(11)) == []
    assert orderer.n_missing_ == 1


def test_several_missing_in_a_row_and_flush_at_run_end():
    clock = FakeClock()
    orderer = VolumeOrderer(first_index=0, missing_wait_s=2.0, clock=clock)
    orderer.push(_volume(0))
    orderer.push(_volume(3))
    clock.now_s += 1.0
    orderer.push(_volume(6))
    clock.now_s += 1.5  # 2.5 s after 3 arrived, 1.5 s after 6
    assert _indices(orderer.poll()) == [("missing", 1), ("missing", 2), 3]
    clock.now_s += 0.5
    assert _indices(orderer.push(_volume(8))) == [("missing", 4), ("missing", 5), 6]
    assert _indices(orderer.flush()) == [("missing", 7), 8]
    assert orderer.next_index_ == 9


def test_other_series_and_bad_arguments_are_refused():
    orderer = VolumeOrderer(missing_wait_s=1.0, clock=FakeClock())
    orderer.push(_volume(0, series="run1"))
    with pytest.raises(OrderError, match="series 'run2' differs from this run's 'run1'"):
        orderer.push(_volume(1, series="run2"))
    with pytest.raises(ValueError, match="missing_wait_s must be >= 0"):
        VolumeOrderer(missing_wait_s=-1.0)
    with pytest.raises(ValueError, match="first_index must be >= 0"):
        VolumeOrderer(first_index=-2)


def test_real_skyra_run_in_shuffled_order_with_duplicate_and_drop(real_dicom_dir, rng):
    from rtdecoder.ingest.readers import read_volume

    folder = real_dicom_dir / "skyra-mosaic-rtcloud"
    # 001_000013_000000.dcm repeats acquisition 10, so it is a real duplicate.
    files = [p for p in sorted(folder.glob("001_*.dcm")) if not p.name.endswith("000004.dcm")]
    clock = FakeClock()
    orderer = VolumeOrderer(first_index=0, missing_wait_s=3.0, clock=clock)
    released = []
    for index in rng.permutation(len(files)):
        clock.now_s += 0.2  # the whole burst arrives within missing_wait_s
        released += orderer.push(read_volume(files[index]))
    clock.now_s += 3.0
    released += orderer.poll()
    assert _indices(released) == [0, 1, 2, ("missing", 3), 4, 5, 6, 7, 8, 9]
    assert orderer.n_duplicates_ == 1
