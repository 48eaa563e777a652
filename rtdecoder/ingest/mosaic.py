"""Siemens classic MOSAIC: un-tile one 2D image into a volume, with geometry and slice timing.

A VB/VD/VE scanner exports each volume as one single-frame DICOM whose image is a square grid of
tiles, one slice per tile, row by row; tiles past the slice count are blank. What the standard
DICOM attributes cannot say lives in Siemens' private "CSA image header" (0029,1010), an
``SV10`` binary table of named string values:

- ``NumberOfImagesInMosaic``: how many tiles hold slices;
- ``SliceNormalVector``: the direction in which tiles advance (LPS). It equals the cross product
  of the row and column directions for the default F>>H tile order and is its opposite for H>>F;
- ``MosaicRefAcqTimes``: acquisition time of each tile's slice in ms from the volume start.

``ImagePositionPatient`` of a mosaic describes a slice the size of the whole mosaic, centred on
the first tile's slice, so the first tile's corner is shifted by half the size difference.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from rtdecoder.errors import VolumeError
from rtdecoder.ingest.dicom_fields import (
    check_direction_cosines,
    get_bytes,
    get_integer,
    get_number,
    get_numbers,
    get_strings,
    label,
)

CSA_IMAGE_HEADER_TAG = 0x00291010
CSA_SERIES_HEADER_TAG = 0x00291020
_CSA_TAG_HEADER = struct.Struct("<64si4siii")  # name, vm, vr, syngodt, n_items, marker
_CSA_ITEM_HEADER = struct.Struct("<4i")  # the second value is the item's length in bytes
_ASCCONV_REVERSED = re.compile(rb"sSliceArray\.ucImageNumb(?:Sag|Cor|Tra)\s*=\s*(?:0x)?1\b")

# Patient-based LPS (DICOM) to RAS+ (NIfTI, nibabel).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class MosaicLayout:
    """How one series' mosaics map onto its volumes; the same for every volume of a series.

    Attributes
    ----------
    n_slices : int
        Tiles that hold a slice (``NumberOfImagesInMosaic``).
    tile_rows, tile_cols : int
        Size of one tile (one slice) in pixels.
    affine : ndarray of shape (4, 4)
        Voxel-to-world RAS+ mm transform of the un-tiled volume, axes (column, row, tile).
    slice_times_s : ndarray of shape (n_slices,) or None
        Acquisition time of each tile's slice from the volume start, s.
    tile_order : {"FH", "HF"}
        "FH" when tiles advance along row x column direction (Siemens default), else "HF".
    """

    n_slices: int
    tile_rows: int
    tile_cols: int
    affine: np.ndarray
    slice_times_s: np.ndarray | None
    tile_order: str


def parse_csa_header(raw: bytes, source: str | Path = "<bytes>") -> dict[str, list[str]]:
    """Decode a Siemens CSA header in the ``SV10`` layout into named string values.

    Parameters
    ----------
    raw : bytes
        The value of (0029,1010) or (0029,1020).
    source : str or Path
        Names the file in error messages.

    Returns
    -------
    dict of str to list of str
        Each tag's non-empty items, as the stripped strings stored in the header.

    Raises
    ------
    VolumeError
        When the bytes are not an ``SV10`` header or end inside it.

    Examples
    --------
    >>> parse_csa_header(b"not a header")
    Traceback (most recent call last):
    ...
    rtdecoder.errors.VolumeError: <bytes>: CSA header (0029,1010): expected the 'SV10' layout (starts b'not ')
    """
    if raw[:4] != b"SV10":
        raise VolumeError(
            f"{source}: CSA header (0029,1010): expected the 'SV10' layout (starts {raw[:4]!r})"
        )
    try:
        (n_tags,) = struct.unpack_from("<I", raw, 8)
        if n_tags > (len(raw) - 16) // _CSA_TAG_HEADER.size:
            raise struct.error(f"{n_tags} tags cannot fit in {len(raw)} bytes")
        offset = 16
        tags: dict[str, list[str]] = {}
        for _ in range(n_tags):
            name, _vm, _vr, _dt, n_items, _marker = _CSA_TAG_HEADER.unpack_from(raw, offset)
            offset += _CSA_TAG_HEADER.size
            items = []
            for _ in range(n_items):
                item_len = _CSA_ITEM_HEADER.unpack_from(raw, offset)[1]
                offset += _CSA_ITEM_HEADER.size
                if item_len < 0 or offset + item_len > len(raw):
                    raise struct.error("item runs past the end")
                text = raw[offset : offset + item_len].split(b"\0", 1)[0].decode("latin-1").strip()
                if text:
                    items.append(text)
                offset += (item_len + 3) // 4 * 4  # items are padded to 4 bytes
            tags[name.split(b"\0", 1)[0].decode("latin-1")] = items
    except struct.error as err:
        raise VolumeError(f"{source}: CSA header (0029,1010): truncated or corrupt ({err})") from None
    return tags


def is_mosaic(ds: Dataset, source: str | Path = "<dataset>") -> bool:
    """Whether a single-frame DICOM dataset is a Siemens MOSAIC (by its ImageType).

    Raises
    ------
    VolumeError
        When ``ImageType`` cannot be decoded.
    """
    return "MOSAIC" in [v.upper() for v in get_strings(ds, "ImageType", source)]


def mosaic_layout(ds: Dataset, source: str | Path) -> MosaicLayout:
    """Read the tile count, tile order, affine and slice timing of a mosaic.

    Parameters
    ----------
    ds : pydicom Dataset
        The mosaic's header (pixel data not needed).
    source : str or Path
        Names the file in error messages.

    Returns
    -------
    MosaicLayout

    Raises
    ------
    VolumeError
        When the CSA header or a geometry attribute is missing or inconsistent.
    """
    raw_csa = get_bytes(ds, CSA_IMAGE_HEADER_TAG, source, "CSA image header")
    if raw_csa is None:
        raise VolumeError(f"{source}: (0029,1010) CSA image header: missing; a mosaic needs it")
    csa = parse_csa_header(raw_csa, source)
    n_slices = _csa_int(csa, "NumberOfImagesInMosaic", source)
    rows, cols = _required_integer(ds, "Rows", source), _required_integer(ds, "Columns", source)
    if n_slices < 1 or n_slices > rows * cols:
        raise VolumeError(
            f"{source}: CSA NumberOfImagesInMosaic: expected 1 to Rows x Columns ({rows * cols}) slices "
            f"(got {n_slices})"
        )
    n_across = int(np.ceil(np.sqrt(n_slices)))
    if rows % n_across or cols % n_across:
        raise VolumeError(
            f"{source}: NumberOfImagesInMosaic: {n_slices} slices need a {n_across}x{n_across} "
            f"grid, which does not divide the {rows}x{cols} image"
        )
    tile_rows, tile_cols = rows // n_across, cols // n_across

    orientation = _required_numbers(ds, "ImageOrientationPatient", 6, source)
    check_direction_cosines(orientation, source, label("ImageOrientationPatient"))
    row_dir, col_dir = orientation[:3], orientation[3:]  # LPS; along columns, along rows
    row_spacing_mm, col_spacing_mm = (float(v) for v in _required_numbers(ds, "PixelSpacing", 2, source, positive=True))
    stack_dir = np.cross(row_dir, col_dir)
    normal = _slice_normal(ds, csa, stack_dir, source)
    tile_order = "FH" if float(normal @ stack_dir) > 0 else "HF"
    slice_spacing_mm = get_number(ds, "SpacingBetweenSlices", source) or _required_numbers(
        ds, "SliceThickness", 1, source
    )[0]
    if not slice_spacing_mm > 0:
        raise VolumeError(
            f"{source}: {label('SpacingBetweenSlices')} / {label('SliceThickness')}: expected a slice spacing "
            f"> 0 mm (got {slice_spacing_mm})"
        )
    slice_spacing_mm = float(slice_spacing_mm)

    # IPP describes a slice as large as the mosaic, centred like the real one.
    mosaic_corner = _required_numbers(ds, "ImagePositionPatient", 3, source)
    first_corner = (
        mosaic_corner
        + row_dir * col_spacing_mm * (cols - tile_cols) / 2
        + col_dir * row_spacing_mm * (rows - tile_rows) / 2
    )
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing_mm
    affine_lps[:3, 1] = col_dir * row_spacing_mm
    affine_lps[:3, 2] = normal * slice_spacing_mm
    affine_lps[:3, 3] = first_corner

    slice_times_s = None
    if csa.get("MosaicRefAcqTimes"):
        slice_times_s = _csa_numbers(csa, "MosaicRefAcqTimes", source) / 1000.0
        if slice_times_s.shape != (n_slices,):
            raise VolumeError(
                f"{source}: CSA MosaicRefAcqTimes: expected {n_slices} values "
                f"(got {slice_times_s.size})"
            )
    return MosaicLayout(
        n_slices=n_slices,
        tile_rows=tile_rows,
        tile_cols=tile_cols,
        affine=LPS_TO_RAS @ affine_lps,
        slice_times_s=slice_times_s,
        tile_order=tile_order,
    )


def untile_mosaic(pixels: np.ndarray, layout: MosaicLayout, dtype: np.dtype = np.float32) -> np.ndarray:
    """Cut a mosaic into its slices, dropping blank tiles, converting in the same pass.

    Parameters
    ----------
    pixels : ndarray of shape (rows, cols)
        The mosaic image as stored (row-major).
    layout : MosaicLayout
    dtype : numpy dtype, default=float32
        Type of the returned volume.

    Returns
    -------
    ndarray of shape (tile_cols, tile_rows, n_slices)
        Axes (column, row, tile), matching ``layout.affine``; C-contiguous.

    Examples
    --------
    >>> layout = MosaicLayout(3, 1, 2, np.eye(4), None, "FH")  # 3 slices of 1 x 2 in a 2 x 2 grid
    >>> untile_mosaic(np.array([[1, 2, 3, 4], [5, 6, 0, 0]]), layout)[:, 0, :]
    array([[1., 3., 5.],
           [2., 4., 6.]], dtype=float32)
    """
    n_down = pixels.shape[0] // layout.tile_rows
    n_across = pixels.shape[1] // layout.tile_cols
    tiles = pixels.reshape(n_down, layout.tile_rows, n_across, layout.tile_cols)
    volume = np.empty((layout.tile_cols, layout.tile_rows, layout.n_slices), dtype=dtype)
    n_full_rows, n_last = divmod(layout.n_slices, n_across)
    # Whole rows of tiles: (n_full_rows, tile_rows, n_across, tile_cols) -> (tile_cols, tile_rows,
    # n_full_rows, n_across), written through a view that splits the slice axis.
    full = volume[:, :, : n_full_rows * n_across].reshape(
        layout.tile_cols, layout.tile_rows, n_full_rows, n_across
    )
    np.copyto(full, tiles[:n_full_rows].transpose(3, 1, 0, 2), casting="unsafe")
    if n_last:
        # The partly filled last row: (tile_rows, n_last, tile_cols) -> (tile_cols, tile_rows, n_last)
        last = tiles[n_full_rows, :, :n_last, :].transpose(2, 0, 1)
        np.copyto(volume[:, :, n_full_rows * n_across :], last, casting="unsafe")
    return volume


def _slice_normal(
    ds: Dataset, csa: dict[str, list[str]], stack_dir: np.ndarray, source: str | Path
) -> np.ndarray:
    """Unit vector (LPS) in which tiles advance: the CSA's, else the protocol's flag."""
    values = csa.get("SliceNormalVector")
    if values:
        normal = _csa_numbers(csa, "SliceNormalVector", source)
        length = float(np.linalg.norm(normal))
        if normal.shape != (3,) or abs(length - 1.0) > 1e-3:
            raise VolumeError(f"{source}: CSA SliceNormalVector: expected a unit 3-vector (got {values})")
        if abs(abs(float(normal @ stack_dir)) - 1.0) > 1e-3:
            raise VolumeError(
                f"{source}: CSA SliceNormalVector: expected it perpendicular to the image plane "
                f"of ImageOrientationPatient (got {values})"
            )
        return normal / length
    # Without the vector, the protocol (ascconv) says whether the image numbering is reversed.
    series_header = get_bytes(ds, CSA_SERIES_HEADER_TAG, source, "CSA series header") or b""
    return -stack_dir if _ASCCONV_REVERSED.search(series_header) else stack_dir


def _csa_int(csa: dict[str, list[str]], name: str, source: str | Path) -> int:
    values = csa.get(name)
    if not values:
        raise VolumeError(f"{source}: CSA image header: {name} missing or empty")
    try:
        number = float(values[0])
        if not number.is_integer():
            raise ValueError(values[0])
        return int(number)
    except (ValueError, OverflowError):
        raise VolumeError(f"{source}: CSA {name}: expected an integer (got {values[0]!r})") from None


def _csa_numbers(csa: dict[str, list[str]], name: str, source: str | Path) -> np.ndarray:
    try:
        numbers = np.array([float(v) for v in csa[name]], dtype=float)
    except (ValueError, OverflowError):
        numbers = np.array([np.nan])
    if not np.all(np.isfinite(numbers)):
        raise VolumeError(f"{source}: CSA {name}: expected finite numbers (got {csa[name][:8]})")
    return numbers


def _required_numbers(ds: Dataset, keyword: str, count: int, source: str | Path, positive: bool = False) -> np.ndarray:
    value = get_numbers(ds, keyword, source, count=count, positive=positive)
    if value is None:
        raise VolumeError(f"{source}: {label(keyword)}: missing; needed for the volume's geometry")
    return value


def _required_integer(ds: Dataset, keyword: str, source: str | Path) -> int:
    value = get_integer(ds, keyword, source, minimum=1)
    if value is None:
        raise VolumeError(f"{source}: {label(keyword)}: missing; needed for the volume's geometry")
    return value
