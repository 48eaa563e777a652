"""The session journal: an append-only, crash-safe record of everything the session did.

Each record is a msgpack map framed as ``[length u32][body][crc32 u32]`` (little-endian) and is
flushed (and by default fsync'ed) before :meth:`Journal.append` returns, so a record is either
wholly on disk or detectably torn. Opening a journal reads every whole record back and cuts a
torn tail left by a crash (SIGKILL, power loss) so that appending can continue.

Records are plain maps with a ``kind``: ``run_start``, ``volume`` (motion, timing and the
preprocessed mask values, so the GLM can be rebuilt without the scanner files), ``missing``,
``beta``, ``published`` (the message body, so nothing published is lost or sent twice) and
``run_end``. numpy arrays are stored as raw little-endian bytes with dtype and shape.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from rtdecoder.errors import OrderError
from rtdecoder.publish.messages import pack_map, unpack_map

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<I")
_MAX_RECORD_BYTES = 1 << 30


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
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        good_end = 0
        if self.path.exists():
            with self.path.open("rb") as handle:
                data = handle.read()
            take = on_record if on_record is not None else self.records_.append
            for record, end in _iter_records(data):
                take(record)
                good_end = end
            self.torn_bytes_ = len(data) - good_end
            if self.torn_bytes_:
                logger.warning(
                    "%s: cut a torn last record (%d bytes) left by an interrupted write",
                    self.path, self.torn_bytes_,
                )
        self._file = self.path.open("r+b" if self.path.exists() else "w+b")
        self._file.truncate(good_end)
        self._file.seek(good_end)
        return self

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (thread-safe). ``record`` must have a ``kind``."""
        if self._file is None:
            raise OrderError(f"{self.path}: Journal.append called before open(); call open() first")
        if "kind" not in record:
            raise ValueError("journal record needs a 'kind'")
        body = pack_map(record)
        with self._lock:
            self._file.write(_HEADER.pack(len(body)) + body + _HEADER.pack(zlib.crc32(body)))
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (records already appended are on disk)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Journal:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The whole records of a journal, read-only (safe while a session is appending to it)."""
    path = Path(path)
    if not path.exists():
        return []
    return [record for record, _end in _iter_records(path.read_bytes())]


def _iter_records(data: bytes) -> Iterator[tuple[dict[str, Any], int]]:
    """Whole records and the offset after each; stops at the first torn or corrupt one."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        (length,) = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length + _HEADER.size
        if length > _MAX_RECORD_BYTES or end > len(data):
            return
        body = data[offset + _HEADER.size : offset + _HEADER.size + length]
        (crc,) = _HEADER.unpack_from(data, end - _HEADER.size)
        if zlib.crc32(body) != crc:
            return
        yield unpack_map(body), end
        offset = end
