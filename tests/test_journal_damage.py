"""The journal tells a torn last record (cut, appending continues) from damage before the end (an error)."""

from __future__ import annotations

import struct
import zlib

import pytest
from rtdecoder_client.messages import pack_map

from rtdecoder.errors import DecoderError, JournalError
from rtdecoder.session.journal import Journal, iter_records, read_records


def _published_journal(path, n: int = 10, pad_bytes: int = 2000) -> list[int]:
    """A journal of ``n`` published messages; returns each record's start offset."""
    starts = []
    with Journal(path, fsync=False) as journal:
        for seq in range(n):
            starts.append(path.stat().st_size)
            journal.append({"kind": "published", "message": {"seq": seq, "pad": b"\x01" * pad_bytes}})
    return starts


def _flip(path, offset: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("where", ["body", "length", "mark", "body_crc"])
def test_damage_in_the_middle_is_an_error_and_the_file_is_kept(tmp_path, where: str) -> None:
    path = tmp_path / "journal.bin"
    starts = _published_journal(path)
    record = starts[4]
    offset = {"body": record + 12 + 500, "length": record + 5, "mark": record + 1,
              "body_crc": starts[5] - 2}[where]
    damaged = _flip(path, offset)
    with pytest.raises(JournalError) as caught:
        Journal(path).open()
    message = str(caught.value)
    assert str(path) in message and f"damaged at byte {record}" in message and "record 4" in message
    assert "new --session-dir" in message and "sequence numbers" in message
    assert path.read_bytes() == damaged  # nothing cut: the records after the damage are still there
    with pytest.raises(JournalError, match="damaged at byte"):
        read_records(path)
    assert isinstance(caught.value, DecoderError)


def test_published_sequence_numbers_are_not_reused_after_damage(tmp_path) -> None:
    """What used to happen: the flip cut 5 records, and a resume would have numbered from 4 again."""
    path = tmp_path / "journal.bin"
    starts = _published_journal(path)
    _flip(path, starts[3] + 100)
    seen: list[int] = []
    with pytest.raises(JournalError):
        Journal(path).open(on_record=lambda r: seen.append(r["message"]["seq"]))
    assert seen == [0, 1, 2]
    assert path.stat().st_size > starts[9]  # the file still holds seq 9: no resume can take 3..9 again


@pytest.mark.parametrize("cut_bytes", [1, 7, 12, 13, 900, 2000])
def test_a_torn_last_record_is_still_cut(tmp_path, cut_bytes: int) -> None:
    path = tmp_path / "journal.bin"
    starts = _published_journal(path)
    path.write_bytes(path.read_bytes()[:-cut_bytes])
    torn_size = path.stat().st_size - starts[9]
    with Journal(path) as journal:
        assert [r["message"]["seq"] for r in journal.records_] == list(range(9))
        assert journal.torn_bytes_ == torn_size
        journal.append({"kind": "published", "message": {"seq": 9}})
    assert [r["message"]["seq"] for r in read_records(path)] == list(range(10))


def test_a_zero_filled_tail_after_a_crash_is_torn(tmp_path) -> None:
    path = tmp_path / "journal.bin"
    _published_journal(path, n=3)
    with path.open("ab") as handle:
        handle.write(b"\x00" * 4096)  # blocks allocated but never written before the power went
    with Journal(path) as journal:
        assert len(journal.records_) == 3 and journal.torn_bytes_ == 4096


def test_a_new_journal_whose_header_was_torn_starts_again(tmp_path) -> None:
    path = tmp_path / "journal.bin"
    path.write_bytes(b"RTDJ")
    with Journal(path) as journal:
        assert journal.records_ == [] and journal.torn_bytes_ == 4
        journal.append({"kind": "x"})
    assert read_records(path) == [{"kind": "x"}]


def test_iter_records_streams(tmp_path) -> None:
    path = tmp_path / "journal.bin"
    _published_journal(path, n=5)
    records = iter_records(path)
    assert next(records)["message"]["seq"] == 0
    records.close()
    assert [r["message"]["seq"] for r in iter_records(path)] == list(range(5))
    assert list(iter_records(tmp_path / "absent.bin")) == []


def _v1_frame(record: dict) -> bytes:
    body = pack_map(record)
    return struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))


def test_format_1_journals_are_read_but_not_appended_to(tmp_path) -> None:
    path = tmp_path / "journal.bin"
    path.write_bytes(_v1_frame({"kind": "session_start", "session": "abc"}) + _v1_frame({"kind": "run_end"}))
    assert [r["kind"] for r in read_records(path)] == ["session_start", "run_end"]
    before = path.read_bytes()
    with pytest.raises(JournalError, match="journal format 1.*new --session-dir"):
        Journal(path).open()
    assert path.read_bytes() == before


def test_other_files_and_versions_are_refused_by_name(tmp_path) -> None:
    path = tmp_path / "journal.bin"
    path.write_bytes(b"RTDJRNL\x07" + b"\x00" * 40)
    with pytest.raises(JournalError, match=f"{path}: journal format 7"):
        Journal(path).open()
    path.write_bytes(b"this is not a journal at all")
    with pytest.raises(JournalError, match="not an rtdecoder journal"):
        read_records(path)
