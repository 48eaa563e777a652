"""The crash-safe journal: records come back whole, a torn tail is cut, appending continues."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from rtdecoder.errors import OrderError
from rtdecoder.session.journal import Journal, read_records


def test_records_round_trip_with_arrays(tmp_path) -> None:
    path = tmp_path / "journal.bin"
    values = np.linspace(0, 1, 5, dtype=np.float32)
    with Journal(path) as journal:
        journal.append({"kind": "volume", "tr_index": 0, "values": values})
        journal.append({"kind": "missing", "tr_index": 1})
    reopened = Journal(path).open()
    assert [r["kind"] for r in reopened.records_] == ["volume", "missing"]
    np.testing.assert_array_equal(reopened.records_[0]["values"], values)
    assert reopened.torn_bytes_ == 0
    reopened.close()


def test_torn_tail_is_cut_and_appending_continues(tmp_path) -> None:
    path = tmp_path / "journal.bin"
    with Journal(path) as journal:
        for i in range(3):
            journal.append({"kind": "beta", "i": i})
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # the last record lost its tail mid-write
    with Journal(path) as journal:
        assert [r["i"] for r in journal.records_] == [0, 1]
        assert journal.torn_bytes_ > 0
        journal.append({"kind": "beta", "i": 2})
    assert [r["i"] for r in Journal(path).open().records_] == [0, 1, 2]


def test_corrupt_record_stops_reading_there(tmp_path) -> None:
    path = tmp_path / "journal.bin"
    with Journal(path) as journal:
        journal.append({"kind": "a"})
        journal.append({"kind": "b"})
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF
    path.write_bytes(bytes(data))
    assert [r["kind"] for r in Journal(path).open().records_] == ["a"]


def test_append_before_open_says_what_to_call(tmp_path) -> None:
    with pytest.raises(OrderError, match="call open\\(\\) first"):
        Journal(tmp_path / "j").append({"kind": "x"})


def test_survives_sigkill_mid_stream(tmp_path) -> None:
    path = tmp_path / "journal.bin"
    writer = (
        "import sys, numpy as np\n"
        "from rtdecoder.session.journal import Journal\n"
        "j = Journal(sys.argv[1]).open()\n"
        "i = 0\n"
        "while True:\n"
        "    j.append({'kind': 'volume', 'i': i, 'values': np.zeros(20000, np.float32)})\n"
        "    i += 1\n"
        "    if i == 50: print('ready', flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    records = Journal(path).open().records_
    assert len(records) >= 50
    assert [r["i"] for r in records] == list(range(len(records)))


def test_reading_while_appending_does_not_cut_the_file(tmp_path) -> None:
    from rtdecoder.session.journal import read_records

    path = tmp_path / "journal.bin"
    journal = Journal(path).open()
    journal.append({"kind": "a"})
    with path.open("ab") as handle:  # a record caught half-written by a reader
        handle.write(b"\x10\x00\x00\x00\x81")
    size = path.stat().st_size
    assert [r["kind"] for r in read_records(path)] == ["a"]
    assert path.stat().st_size == size
    journal.close()


def test_open_can_stream_records_instead_of_keeping_them(tmp_path) -> None:
    path = tmp_path / "journal.bin"
    with Journal(path, fsync=False) as journal:
        for i in range(3):
            journal.append({"kind": "x", "i": i})
    seen = []
    journal = Journal(path, fsync=False).open(on_record=seen.append)
    assert journal.records_ == []
    journal.append({"kind": "x", "i": 3})
    journal.close()
    assert [r["i"] for r in seen] == [0, 1, 2]
    assert [r["i"] for r in read_records(path)] == [0, 1, 2, 3]
