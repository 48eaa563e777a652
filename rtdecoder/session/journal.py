"""The session journal: an append-only, crash-safe record of everything the session did.

File format 2. The file starts with the 8 bytes ``RTDJRNL\\x02``; each record follows as::

    [mark "\\x93RJR"][length u32][crc32 of mark+length u32][body: length bytes][crc32 of body u32]

(little-endian). The body is a msgpack map. A record is flushed (and by default fsync'ed) before
:meth:`Journal.append` returns, so it is either wholly on disk or was still being written when the
process stopped.

Opening a journal tells the two kinds of unreadable bytes apart. A record that cannot be read
with no whole record after it is the torn tail of an interrupted write (SIGKILL, power loss): it
was never acknowledged, so nothing it held was published, and it is cut so that appending can
continue. Unreadable bytes *followed by* whole records are damage (a flipped bit, a bad sector,
an edit): cutting there would throw away records already acted on and make a resumed session
publish new messages under sequence numbers it has already used, so it is a
:class:`~rtdecoder.errors.JournalError` instead, and the file is left as it is. The record mark
and the checksummed length let a reader find the next whole record after damage quickly.

Format 1 journals (no file header; ``[length][body][crc32]`` records, rtdecoder 0.1 before the
format had a version) can still be read with :func:`read_records`, but not appended to.

Records are plain maps with a ``kind``: ``run_start``, ``volume`` (motion, timing and the
preprocessed mask values, so the GLM can be rebuilt without the scanner files), ``missing``,
``beta``, ``published`` (the message body, so nothing published is lost or sent twice) and
``run_end``. numpy arrays are stored as raw little-endian bytes with dtype and shape.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from rtdecoder_client.errors import ProtocolError as WireProtocolError
from rtdecoder_client.messages import pack_map, unpack_map

from rtdecoder.errors import JournalError, OrderError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
_FILE_MAGIC = b"RTDJRNL"
_FILE_HEADER = _FILE_MAGIC + bytes([FORMAT_VERSION])
_MARK = b"\x93RJR"
_HEAD = struct.Struct("<4sII")  # mark, body length, crc32 of mark + length
_LENGTH = struct.Struct("<I")
_CRC = struct.Struct("<I")
_MAX_RECORD_BYTES = 1 << 30
_RECOVERY = (
    "the file is left as it is; move it aside (keep it to look into) and start a new --session-dir: "
    "resuming on it would publish new messages under sequence numbers already used"
)


class Journal:
    """An append-only record file.

    Parameters
    ----------
    path : Path
        The journal file; created if absent.
    fsync : bool, default=True
        fsync after every record. Off only for benchmarks of the rest of the path.

    Attributes
    ----------
    records_ : list of dict
        The records found when the journal was opened (before any new append).
    torn_bytes_ : int
        Bytes cut from a torn tail when opening (0 after a clean stop).
    """

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.records_: list[dict[str, Any]] = []
        self.torn_bytes_ = 0
        self._file: BinaryIO | None = None
        self._lock = threading.Lock()

    def open(self, on_record: Callable[[dict[str, Any]], None] | None = None) -> Journal:
        """Read the existing records, cut a torn tail, and get ready to append.

        Parameters
        ----------
        on_record : callable, optional
            Called with each existing record in order, instead of keeping them in
            ``records_``: a long session's journal need not be held in memory at once.

        Raises
        ------
        JournalError
            When the file is damaged before its end (unreadable bytes followed by whole records),
            is a format 1 journal, or is not an rtdecoder journal. The file is not changed.
        """
        try:
            return self._open(on_record)
        except OSError as err:  # an unwritable, missing or wrong --session-dir
            raise JournalError(
                f"{self.path}: cannot open the session journal: {err.strerror or err}; expected a writable "
                "--session-dir (a folder, created if absent)"
            ) from None

    def _open(self, on_record: Callable[[dict[str, Any]], None] | None) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        take = on_record if on_record is not None else self.records_.append
        good_end = 0
        size = self.path.stat().st_size if self.path.exists() else 0
        if size:
            with _mapped(self.path) as view:
                if _format(view, self.path) == 1:
                    raise JournalError(
                        f"{self.path}: journal format 1 (from an older rtdecoder); this version appends only to "
                        f"format {FORMAT_VERSION}: finish that session with the version that started it, or move "
                        "the file aside and start a new --session-dir (read_records still reads it)"
                    )
                if len(view) >= len(_FILE_HEADER):
                    good_end = len(_FILE_HEADER)
                    for record, end in _records(view, self.path):
                        take(record)
                        good_end = end
            self.torn_bytes_ = size - good_end
            if self.torn_bytes_:
                logger.warning(
                    "%s: cut a torn last record (%d bytes from byte %d) left by an interrupted write",
                    self.path, self.torn_bytes_, good_end,
                )
        self._file = self.path.open("r+b" if self.path.exists() else "w+b")
        self._file.truncate(good_end)
        self._file.seek(good_end)
        if good_end == 0:  # a new file, or one whose header itself was being written
            self._file.write(_FILE_HEADER)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        return self

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (thread-safe). ``record`` must have a ``kind``."""
        if self._file is None:
            raise OrderError(f"{self.path}: Journal.append called before open(); call open() first")
        if "kind" not in record:
            raise ValueError("journal record needs a 'kind'")
        body = pack_map(record)
        length = _LENGTH.pack(len(body))
        frame = _HEAD.pack(_MARK, len(body), zlib.crc32(_MARK + length)) + body + _CRC.pack(zlib.crc32(body))
        with self._lock:
            try:
                self._file.write(frame)
                self._file.flush()
                if self.fsync:
                    os.fsync(self._file.fileno())
            except OSError as err:  # a full disk: nothing more can be recorded, so nothing more may be sent
                raise JournalError(
                    f"{self.path}: cannot write the session journal: {err.strerror or err}; free space (or fix "
                    "the folder), then start again on the same --session-dir to resume"
                ) from None

    def close(self) -> None:
        """Close the file (records already appended are on disk)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Journal:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The whole records of a journal one at a time, read-only (safe while a session is appending).

    The file is memory-mapped, not read into memory, so a long session's journal can be scanned
    (e.g. for the published messages a client asks to have resent) without holding it. A torn last
    record, such as one being written right now, is left out.

    Raises
    ------
    JournalError
        When the journal is damaged before its end, or is not an rtdecoder journal.
    """
    path = Path(path)
    if not path.exists() or not path.stat().st_size:
        return
    with _mapped(path) as view:
        reader = _records_v1(view, path) if _format(view, path) == 1 else _records(view, path)
        for record, _end in reader:
            yield record


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The whole records of a journal, read-only (safe while a session is appending to it).

    Raises
    ------
    JournalError
        As :func:`iter_records`.
    """
    return list(iter_records(path))


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap]:
    """A read-only memory map of a non-empty file: records are sliced from it, the file is never read whole."""
    with path.open("rb") as handle:
        view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield view
    finally:
        view.close()


def _format(view: mmap.mmap, path: Path) -> int:
    """The journal's format version (1 or 2) from its first bytes."""
    head = view[: len(_FILE_HEADER)]
    if _FILE_HEADER.startswith(head):
        return FORMAT_VERSION  # whole, or a header torn while the file was being created
    if head.startswith(_FILE_MAGIC):
        raise JournalError(
            f"{path}: journal format {head[len(_FILE_MAGIC)]}; this rtdecoder reads format {FORMAT_VERSION} "
            "(and 1): open it with the rtdecoder that wrote it"
        )
    if _v1_record_at(view, 0) is not None:
        return 1
    raise JournalError(
        f"{path}: not an rtdecoder journal (it starts with neither {_FILE_MAGIC.decode()} nor a format 1 record); "
        f"{_RECOVERY}"
    )


def _records(view: mmap.mmap, path: Path) -> Iterator[tuple[dict[str, Any], int]]:
    """Format 2 records and the offset after each; stops at a torn tail, raises on damage."""
    offset = len(_FILE_HEADER)
    index = 0
    while offset < len(view):
        found = _record_at(view, offset)
        if isinstance(found, str):
            following = _next_record(view, offset + 1)
            if following is None:
                return  # a torn tail: nothing whole comes after it
            raise JournalError(
                f"{path}: damaged at byte {offset} (record {index}: {found}), with whole records after it from "
                f"byte {following} to {len(view)}; this is not an interrupted write: {_RECOVERY}"
            )
        body_start, end = found
        try:
            record = unpack_map(view[body_start : end - _CRC.size])
        except WireProtocolError as err:  # the checksum matched: written so, not damaged afterwards
            raise JournalError(f"{path}: record {index} at byte {offset} is not a record map: {err}") from None
        if not isinstance(record, dict):
            raise JournalError(f"{path}: record {index} at byte {offset} is not a record map")
        yield record, end
        offset = end
        index += 1


def _record_at(view: mmap.mmap, offset: int) -> tuple[int, int] | str:
    """``(body_start, end)`` of the whole format 2 record at ``offset``, or what is wrong with it."""
    if offset + _HEAD.size > len(view):
        return "header cut off at the end of the file"
    mark, length, head_crc = _HEAD.unpack_from(view, offset)
    if mark != _MARK:
        return "no record mark"
    if zlib.crc32(view[offset : offset + 8]) != head_crc or length > _MAX_RECORD_BYTES:
        return "header checksum mismatch"
    body_start = offset + _HEAD.size
    end = body_start + length + _CRC.size
    if end > len(view):
        return f"body of {length} bytes cut off at the end of the file"
    (body_crc,) = _CRC.unpack_from(view, end - _CRC.size)
    if zlib.crc32(view[body_start : end - _CRC.size]) != body_crc:
        return "body checksum mismatch"
    return body_start, end


def _next_record(view: mmap.mmap, start: int) -> int | None:
    """Offset of the first whole format 2 record at or after ``start``, if any."""
    position = view.find(_MARK, start)
    while position != -1:
        if not isinstance(_record_at(view, position), str):
            return position
        position = view.find(_MARK, position + 1)
    return None


def _v1_record_at(view: mmap.mmap, offset: int) -> int | None:
    """End of the whole format 1 record ``[length][body][crc32]`` at ``offset``, if there is one."""
    if offset + _LENGTH.size > len(view):
        return None
    (length,) = _LENGTH.unpack_from(view, offset)
    end = offset + _LENGTH.size + length + _CRC.size
    if length > _MAX_RECORD_BYTES or end > len(view):
        return None
    (crc,) = _CRC.unpack_from(view, end - _CRC.size)
    return end if zlib.crc32(view[offset + _LENGTH.size : end - _CRC.size]) == crc else None


def _records_v1(view: mmap.mmap, path: Path) -> Iterator[tuple[dict[str, Any], int]]:
    """Format 1 records up to the first one that cannot be read (format 1 cannot tell why)."""
    offset = 0
    while (end := _v1_record_at(view, offset)) is not None:
        try:
            record = unpack_map(view[offset + _LENGTH.size : end - _CRC.size])
        except WireProtocolError as err:
            raise JournalError(f"{path}: format 1 record at byte {offset} is not a record map: {err}") from None
        yield record, end
        offset = end
    if offset < len(view):
        logger.warning("%s: format 1 journal: stopped at byte %d of %d (unreadable from there)",
                       path, offset, len(view))
