"""Checked access to DICOM header values, and a minimal walker over raw sequence bytes.

pydicom converts an element's bytes only when its value is first used, so a malformed value
(``PixelSpacing`` of ``3Q0\\3.0``, an unknown VR after a flipped byte, a binary value of the wrong
length) raises whatever pydicom or Python raises at that moment: ``ValueError``,
``NotImplementedError``, ``TypeError``... The getters here turn every such failure, and every
value of the wrong count, sign or finiteness, into a :class:`VolumeError` that names the file,
the keyword with its tag, where it sits (inside which functional group), and what was expected.

:class:`RawWalker` reads the items of an encoded sequence (explicit or implicit VR, either byte
order, defined or undefined lengths) without building pydicom datasets, for the fast path of the
enhanced reader. It raises :class:`MalformedBytesError` for anything it does not expect; callers then
fall back to pydicom, which reports the problem precisely.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from rtdecoder.errors import VolumeError

ITEM_TAG = 0xFFFEE000
ITEM_END_TAG = 0xFFFEE00D
SEQUENCE_END_TAG = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
# Explicit VR elements whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_REPR_CHARS = 60  # how much of a bad value an error message quotes


class MalformedBytesError(Exception):
    """Raw element bytes do not parse as the fast path expects (internal; never leaves a reader)."""


def tag_text(tag: int) -> str:
    """``(gggg,eeee)`` of a tag.

    >>> tag_text(0x00280030)
    '(0028,0030)'
    """
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def label(keyword: str, where: str = "") -> str:
    """``where`` + keyword + tag, the way error messages name an attribute.

    >>> label("PixelSpacing", "PixelMeasuresSequence > ")
    'PixelMeasuresSequence > PixelSpacing (0028,0030)'
    """
    tag = tag_for_keyword(keyword)
    return f"{where}{keyword} {tag_text(tag)}" if tag is not None else f"{where}{keyword}"


def _quoted(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_CHARS else text[: _REPR_CHARS - 3] + "..."


def get_value(ds: Dataset, keyword: str, source: str | Path, where: str = "") -> Any:
    """The converted value of ``keyword`` in ``ds``, or ``None`` when absent.

    Parameters
    ----------
    ds : pydicom Dataset
    keyword : str
        DICOM keyword (``"PixelSpacing"``).
    source : str or Path
        Names the file in error messages.
    where : str, default=""
        Path of sequences leading to ``ds``, for messages (``"SharedFunctionalGroupsSequence >
        PixelMeasuresSequence > "``).

    Raises
    ------
    VolumeError
        When pydicom cannot decode the element's bytes (its conversion raised).
    """
    try:
        return ds.get(keyword)
    except Exception as err:  # pydicom's lazy conversion raises many types for bad bytes
        raise VolumeError(
            f"{source}: {label(keyword, where)}: cannot decode the value ({type(err).__name__}: {err})"
        ) from None


def is_empty(value: Any) -> bool:
    """Whether a converted value is absent or empty (pydicom gives ``None`` or ``""``)."""
    if value is None:
        return True
    if isinstance(value, str | bytes):
        return len(value) == 0
    return False


def values_of(value: Any) -> list:
    """A converted value as a list of its values (one, or a MultiValue's)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def get_numbers(
    ds: Dataset,
    keyword: str,
    source: str | Path,
    count: int | None = None,
    where: str = "",
    positive: bool = False,
) -> np.ndarray | None:
    """The values of a numeric attribute as float64, checked; ``None`` when absent or empty.

    Parameters
    ----------
    ds, keyword, source, where
        As for :func:`get_value`.
    count : int, optional
        The number of values required (the VM), e.g. 2 for ``PixelSpacing``.
    positive : bool, default=False
        Require every value > 0.

    Returns
    -------
    ndarray of shape (n,), float64, or None

    Raises
    ------
    VolumeError
        When the value cannot be decoded, is not numeric, not finite, of the wrong count or
        (with ``positive``) not > 0.
    """
    value = get_value(ds, keyword, source, where)
    if is_empty(value):
        return None
    items = values_of(value)
    expected = f"{count} finite numbers" if count is not None else "finite numbers"
    if positive:
        expected += " > 0"
    try:
        numbers = np.array([float(v) for v in items], dtype=float)
    except (TypeError, ValueError, OverflowError):
        raise VolumeError(f"{source}: {label(keyword, where)}: expected {expected} (got {_quoted(value)})") from None
    if (
        (count is not None and numbers.size != count)
        or not np.all(np.isfinite(numbers))
        or (positive and not np.all(numbers > 0))
    ):
        raise VolumeError(f"{source}: {label(keyword, where)}: expected {expected} (got {_quoted(value)})")
    return numbers


def get_number(
    ds: Dataset, keyword: str, source: str | Path, where: str = "", positive: bool = False
) -> float | None:
    """One finite number (checked like :func:`get_numbers` with ``count=1``), or ``None``."""
    numbers = get_numbers(ds, keyword, source, count=1, where=where, positive=positive)
    return None if numbers is None else float(numbers[0])


def get_integer(
    ds: Dataset, keyword: str, source: str | Path, where: str = "", minimum: int | None = None
) -> int | None:
    """One integer value (IS, US, UL...), at least ``minimum`` when given; ``None`` when absent.

    Raises
    ------
    VolumeError
        When the value is not a single integer, or is below ``minimum``.
    """
    value = get_value(ds, keyword, source, where)
    if is_empty(value):
        return None
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    items = values_of(value)
    try:
        if len(items) != 1:
            raise ValueError("several values")
        number = float(items[0])
        if not number.is_integer():
            raise ValueError("not integral")
        result = int(number)
    except (TypeError, ValueError, OverflowError):
        raise VolumeError(f"{source}: {label(keyword, where)}: expected {expected} (got {_quoted(value)})") from None
    if minimum is not None and result < minimum:
        raise VolumeError(f"{source}: {label(keyword, where)}: expected {expected} (got {result})")
    return result


def get_text(ds: Dataset, keyword: str, source: str | Path, where: str = "") -> str | None:
    """A single text value (DT, DA, TM, UI, CS...) as ``str``; ``None`` when absent or empty.

    Raises
    ------
    VolumeError
        When the value cannot be decoded or holds several values.
    """
    value = get_value(ds, keyword, source, where)
    if is_empty(value):
        return None
    items = values_of(value)
    if len(items) != 1:
        raise VolumeError(f"{source}: {label(keyword, where)}: expected one value (got {_quoted(value)})")
    return str(items[0])


def get_strings(ds: Dataset, keyword: str, source: str | Path, where: str = "") -> list[str]:
    """The values of a multi-valued text attribute (``ImageType``) as strings; ``[]`` when absent."""
    value = get_value(ds, keyword, source, where)
    if is_empty(value):
        return []
    return [str(v) for v in values_of(value)]


def get_bytes(ds: Dataset, tag: int, source: str | Path, name: str) -> bytes | None:
    """The raw bytes of a binary (OB/UN) element by tag, ``None`` when absent.

    Raises
    ------
    VolumeError
        When the element cannot be read or does not hold bytes (its VR was changed).
    """
    if tag not in ds:
        return None
    try:
        value = ds[tag].value
    except Exception as err:  # a deferred read or a conversion can fail on a corrupt file
        raise VolumeError(
            f"{source}: {tag_text(tag)} {name}: cannot read the value ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(value, bytes | bytearray):
        raise VolumeError(f"{source}: {tag_text(tag)} {name}: expected bytes (VR OB/UN), got {type(value).__name__}")
    return bytes(value)


def first_item(holder: Dataset, keyword: str, source: str | Path, where: str = "") -> Dataset | None:
    """The first item of a sequence attribute; ``None`` when absent or empty.

    Raises
    ------
    VolumeError
        When the attribute is not a sequence of datasets.
    """
    value = get_value(holder, keyword, source, where)
    if is_empty(value):
        return None
    if not isinstance(value, Sequence):
        raise VolumeError(f"{source}: {label(keyword, where)}: expected a sequence (VR SQ), got {_quoted(value)}")
    if len(value) == 0:
        return None
    item = value[0]
    if not isinstance(item, Dataset):
        raise VolumeError(f"{source}: {label(keyword, where)}: expected sequence items, got {_quoted(item)}")
    return item


def get_items(ds: Dataset, keyword: str, source: str | Path) -> list[Dataset]:
    """All items of a sequence attribute; ``[]`` when absent.

    Raises
    ------
    VolumeError
        When the attribute is not a sequence of datasets.
    """
    value = get_value(ds, keyword, source)
    if is_empty(value):
        return []
    if not isinstance(value, Sequence) or not all(isinstance(item, Dataset) for item in value):
        raise VolumeError(f"{source}: {label(keyword)}: expected a sequence of items (VR SQ)")
    return list(value)


def check_direction_cosines(orientation: np.ndarray, source: str | Path, name: str) -> None:
    """Require two orthogonal unit vectors in ``ImageOrientationPatient``'s six values.

    Raises
    ------
    VolumeError
        When a direction is not of unit length or the two are not perpendicular (to 1e-3).
    """
    row_dir, col_dir = orientation[:3], orientation[3:]
    lengths = (float(np.linalg.norm(row_dir)), float(np.linalg.norm(col_dir)))
    if max(abs(n - 1.0) for n in lengths) > 1e-3 or abs(float(row_dir @ col_dir)) > 1e-3:
        raise VolumeError(
            f"{source}: {name}: expected two perpendicular unit direction cosines "
            f"(got lengths {lengths[0]:.4g}, {lengths[1]:.4g} and dot product {float(row_dir @ col_dir):.4g})"
        )


# --------------------------------------------------------------------------------------------
# Raw sequence bytes


RawElement = tuple[bytes | None, int, int]  # (explicit VR or None, value offset, value length)
RawItem = dict[int, "RawElement | list[RawItem]"]


class RawWalker:
    """Walk encoded data elements in a byte buffer, the way PS3.5 section 7 lays them out.

    Parameters
    ----------
    buffer : bytes
    little_endian, implicit_vr : bool
        The transfer syntax of the data set the bytes come from.
    sequences : frozenset of int
        Tags to parse as sequences when their length is defined; others are skipped by their
        length (undefined-length elements are always parsed as sequences, as PS3.5 7.5 requires).
    """

    def __init__(
        self, buffer: bytes | memoryview, little_endian: bool, implicit_vr: bool, sequences: frozenset[int]
    ) -> None:
        self.buffer = buffer
        self.implicit_vr = implicit_vr
        self.sequences = sequences
        order = "<" if little_endian else ">"
        self._tag_length = struct.Struct(order + "HHI")  # tag, 4-byte length (implicit VR, items)
        self._explicit = struct.Struct(order + "HH2sH")  # tag, VR, 2-byte length
        self._long_length = struct.Struct(order + "I")

    def element(self, pos: int) -> tuple[int, bytes | None, int, int]:
        """Header of the element at ``pos``: (tag, VR or None, length, value offset)."""
        buffer = self.buffer
        if pos + 8 > len(buffer):
            raise MalformedBytesError(f"element header at byte {pos} runs past the end")
        group, elem, length = self._tag_length.unpack_from(buffer, pos)
        tag = group << 16 | elem
        if self.implicit_vr or group == 0xFFFE:  # items and delimiters carry no VR
            return tag, None, length, pos + 8
        _, _, vr, length = self._explicit.unpack_from(buffer, pos)
        if vr in _LONG_VRS:
            if pos + 12 > len(buffer):
                raise MalformedBytesError(f"element header at byte {pos} runs past the end")
            return tag, vr, self._long_length.unpack_from(buffer, pos + 8)[0], pos + 12
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise MalformedBytesError(f"unknown VR {vr!r} at byte {pos}")
        return tag, vr, length, pos + 8

    def items(self, pos: int, length: int) -> tuple[list[RawItem], int]:
        """The items of a sequence value starting at ``pos``; returns them and the end offset."""
        undefined = length == UNDEFINED_LENGTH
        end = len(self.buffer) if undefined else pos + length
        if end > len(self.buffer):
            raise MalformedBytesError("sequence runs past the end")
        items: list[RawItem] = []
        while pos < end:
            tag, _, item_length, value_pos = self.element(pos)
            if tag == SEQUENCE_END_TAG and undefined:
                return items, value_pos
            if tag != ITEM_TAG:
                raise MalformedBytesError(f"expected an item tag at byte {pos}, got {tag_text(tag)}")
            item, pos = self.dataset(value_pos, item_length)
            items.append(item)
        if undefined or pos != end:
            raise MalformedBytesError("sequence ends inside an item, or without its delimiter")
        return items, end

    def dataset(self, pos: int, length: int) -> tuple[RawItem, int]:
        """The elements of one item starting at ``pos``; returns them and the end offset."""
        undefined = length == UNDEFINED_LENGTH
        end = len(self.buffer) if undefined else pos + length
        if end > len(self.buffer):
            raise MalformedBytesError("item runs past the end")
        elements: RawItem = {}
        while pos < end:
            tag, vr, value_length, value_pos = self.element(pos)
            if tag == ITEM_END_TAG and undefined:
                return elements, value_pos
            if tag >> 16 == 0xFFFE:
                raise MalformedBytesError(f"delimiter {tag_text(tag)} inside an item at byte {pos}")
            if value_length == UNDEFINED_LENGTH or vr == b"SQ" or (vr is None and tag in self.sequences):
                if tag in self.sequences or value_length == UNDEFINED_LENGTH:
                    elements[tag], pos = self.items(value_pos, value_length)
                    continue
            if value_pos + value_length > end:
                raise MalformedBytesError(f"element {tag_text(tag)} runs past the end of its item")
            elements[tag] = (vr, value_pos, value_length)
            pos = value_pos + value_length
        if undefined or pos != end:
            raise MalformedBytesError("item ends inside an element, or without its delimiter")
        return elements, end

    def text(self, element: RawElement | list, vr: bytes) -> str:
        """An element's value decoded as pydicom decodes text VRs (ISO 8859-1), padding kept.

        Raises
        ------
        MalformedBytesError
            When the element is a sequence, or its explicit VR is not ``vr``.
        """
        if isinstance(element, list):
            raise MalformedBytesError(f"a sequence where a {vr!r} value was expected")
        found_vr, pos, length = element
        if found_vr is not None and found_vr != vr:
            raise MalformedBytesError(f"VR {found_vr!r} where {vr!r} was expected")
        return str(self.buffer[pos : pos + length], "iso8859")


def parse_decimal(text: str) -> float:
    """A DS component the way pydicom converts it, only for plain decimal numbers.

    Anything else (empty, ``nan``, ``inf``, underscores, letters) raises :class:`MalformedBytesError`,
    so a caller falls back to pydicom for the exact conversion and its error.
    """
    stripped = text.strip(" ")
    if not stripped or not _is_plain_decimal(stripped):
        raise MalformedBytesError(f"not a plain decimal: {text!r}")
    value = float(stripped)
    if not math.isfinite(value):
        raise MalformedBytesError(f"not finite: {text!r}")
    return value


def _is_plain_decimal(text: str) -> bool:
    body = text[1:] if text[0] in "+-" else text
    mantissa, marker, exponent = body.replace("E", "e").partition("e")
    if marker:
        exponent = exponent[1:] if exponent[:1] in ("+", "-") else exponent
        if not exponent.isascii() or not exponent.isdigit():
            return False
    whole, _, fraction = mantissa.partition(".")
    if not (whole or fraction):
        return False
    return all(not part or (part.isascii() and part.isdigit()) for part in (whole, fraction))
