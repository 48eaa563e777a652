"""The phantom world's stimuli: square natural-image crops cut from photos that ship with packages.

No data set is downloaded. The photos bundled with scikit-image, scikit-learn and matplotlib
(:data:`PHOTO_CATALOGUE`; synthetic, binary and text images such as ``chessboard``, ``horse``,
``text``, ``logo`` or ``page`` are left out on purpose) are cut into thousands of distinct crops
that vary in position, zoom and horizontal flip. Everything follows from ``seed``: the same seed
and size give the same crops, with the same ids, on any machine with the same photos.

A :class:`StimulusBank` keeps only the decoded photos and one :class:`StimulusRecord` per crop;
pixels are rendered on demand (about a millisecond per 224 px crop), so building 3000 crops takes
a second or two and costs no more memory than the photos.

Examples
--------
>>> bank = StimulusBank.build(60, size_px=64, seed=0)
>>> len(bank), bank.images([0, 1]).shape
(60, (2, 64, 64, 3))
>>> bank.index_of(bank.ids[5])
5
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rtdecoder.errors import DecoderError

logger = logging.getLogger(__name__)

#: Natural photos bundled with installed packages: (package, path inside it, photo name).
#: An allow-list rather than a folder scan, so that a package release that adds a synthetic
#: image cannot silently change the stimulus set. ``cell`` is left out too: most of its crops
#: are flat grey background.
PHOTO_CATALOGUE: tuple[tuple[str, str, str], ...] = (
    ("skimage", "data/astronaut.png", "astronaut"),
    ("skimage", "data/brick.png", "brick"),
    ("skimage", "data/camera.png", "camera"),
    ("skimage", "data/chelsea.png", "chelsea"),
    ("skimage", "data/clock_motion.png", "clock_motion"),
    ("skimage", "data/coffee.png", "coffee"),
    ("skimage", "data/coins.png", "coins"),
    ("skimage", "data/grass.png", "grass"),
    ("skimage", "data/gravel.png", "gravel"),
    ("skimage", "data/hubble_deep_field.jpg", "hubble_deep_field"),
    ("skimage", "data/ihc.png", "ihc"),
    ("skimage", "data/moon.png", "moon"),
    ("skimage", "data/motorcycle_left.png", "motorcycle_left"),
    ("skimage", "data/motorcycle_right.png", "motorcycle_right"),
    ("skimage", "data/retina.jpg", "retina"),
    ("skimage", "data/rocket.jpg", "rocket"),
    ("sklearn", "datasets/images/china.jpg", "china"),
    ("sklearn", "datasets/images/flower.jpg", "flower"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper"),
)

MIN_PHOTOS = 5
MIN_ZOOM = 0.35  # smallest crop side as a share of the photo's short side
MAX_ZOOM = 1.0
MIN_PHOTO_SIDE_PX = 128

# Crops are screened on small thumbnails of the photos: cheap, and enough to see duplicates and
# empty crops (the black surround of the retina photo, blank sky).
_THUMB_SHORT_SIDE_PX = 96
_FINGERPRINT_PX = 8
_MIN_CONTRAST = 6.0  # std of the grey thumbnail, 0..255 units
_MAX_DARK_SHARE = 0.4  # share of thumbnail pixels darker than _DARK_LEVEL
_DARK_LEVEL = 12
_DUPLICATE_RMS = 3.0  # thumbnails closer than this (0..255 units) count as the same crop
_MAX_TRIES = 200


@dataclass(frozen=True)
class StimulusRecord:
    """Where one stimulus comes from.

    Attributes
    ----------
    stim_id : str
        Stable id, ``"<photo>-<k>"`` with ``k`` the crop's number within its photo.
    photo : str
        Name of the source photo (see :data:`PHOTO_CATALOGUE`).
    x0_px, y0_px : float
        Top-left corner of the square crop box in the photo, pixels (column, row).
    side_px : float
        Edge of the crop box in photo pixels; the crop is resized to the bank's ``size_px``.
    flipped : bool
        Whether the crop is mirrored left-right after resizing.
    """

    stim_id: str
    photo: str
    x0_px: float
    y0_px: float
    side_px: float
    flipped: bool


def list_source_photos(
    catalogue: Sequence[tuple[str, str, str]] = PHOTO_CATALOGUE,
) -> list[Path]:
    """Find the bundled photos that are installed.

    Parameters
    ----------
    catalogue : sequence of (package, relative path, name)
        Where to look; the default is :data:`PHOTO_CATALOGUE`.

    Returns
    -------
    list of Path
        The photo files found, in catalogue order. A photo's name is the file's stem.

    Raises
    ------
    DecoderError
        If fewer than :data:`MIN_PHOTOS` are found.
    """
    found: list[Path] = []
    missing: list[str] = []
    for package, relative, _name in catalogue:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            missing.append(f"{package}/{relative}")
            continue
        root = Path(spec.origin).parent
        path = root / relative
        if not path.is_file() and package == "matplotlib":
            # matplotlib keeps sample_data outside the package on some installs
            import matplotlib

            path = Path(matplotlib.get_data_path()) / Path(relative).relative_to("mpl-data")
        if path.is_file():
            found.append(path)
        else:
            missing.append(f"{package}/{relative}")
    if missing:
        logger.debug("bundled photos not found: %s", ", ".join(missing))
    if len(found) < MIN_PHOTOS:
        raise DecoderError(
            f"stimulus photos: found {len(found)} bundled photos, expected at least {MIN_PHOTOS} "
            f"(missing: {', '.join(missing)}); install scikit-image, scikit-learn and matplotlib"
        )
    return found


class StimulusBank:
    """A deterministic set of square natural-image crops, rendered on demand.

    Build one with :meth:`build`; the constructor takes photos and records already drawn
    (for example, to rebuild a bank from an exported TSV).

    Parameters
    ----------
    photos : dict of str to ndarray of shape (H, W, 3), uint8
        Decoded source photos by name.
    records : list of StimulusRecord
        One per stimulus, in bank order.
    size_px : int
        Edge of every rendered crop, pixels.
    seed : int
        Seed the records were drawn from (kept for provenance).

    Attributes
    ----------
    ids : list of str
        Stimulus ids in bank order.
    records : list of StimulusRecord
    source_photos : list of str
        Names of the photos the crops are cut from, in catalogue order.
    size_px : int
    seed : int
    """

    def __init__(
        self,
        photos: dict[str, np.ndarray],
        records: list[StimulusRecord],
        size_px: int,
        seed: int,
    ) -> None:
        self._photos = {name: Image.fromarray(pixels) for name, pixels in photos.items()}
        self.records = list(records)
        self.ids = [record.stim_id for record in self.records]
        self.source_photos = list(photos)
        self.size_px = int(size_px)
        self.seed = int(seed)
        self._index = {stim_id: i for i, stim_id in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise DecoderError("stimulus bank: stim_id values must be unique")

    @classmethod
    def build(
        cls,
        n_stimuli: int,
        size_px: int = 224,
        seed: int = 0,
        photos: Sequence[Path] | None = None,
    ) -> StimulusBank:
        """Cut ``n_stimuli`` distinct crops from the bundled photos.

        Crops are shared out evenly between photos and interleaved (photo 0, photo 1, ...,
        photo 0, ...), so any leading slice of the bank covers every photo. Each photo's crops
        come from its own random stream, seeded by ``seed`` and the photo's name, so adding or
        removing another photo does not change them. Crops that are nearly uniform or mostly
        black, or that duplicate an earlier crop, are drawn again.

        Parameters
        ----------
        n_stimuli : int
            Number of crops, at least 1.
        size_px : int, default=224
            Edge of each rendered crop, pixels (at least 8).
        seed : int, default=0
            Seed of the crop positions, zooms and flips.
        photos : sequence of Path, optional
            Photo files to cut from; default :func:`list_source_photos`. Names are file stems.

        Returns
        -------
        StimulusBank

        Raises
        ------
        DecoderError
            If the arguments are out of range, fewer than :data:`MIN_PHOTOS` photos are given,
            a photo cannot be read, or distinct crops cannot be found.
        """
        if n_stimuli < 1:
            raise DecoderError(f"stimulus bank: n_stimuli must be >= 1 (got {n_stimuli})")
        if size_px < 8:
            raise DecoderError(f"stimulus bank: size_px must be >= 8 (got {size_px})")
        paths = list_source_photos() if photos is None else [Path(p) for p in photos]
        if len(paths) < MIN_PHOTOS:
            raise DecoderError(
                f"stimulus photos: got {len(paths)} photos, expected at least {MIN_PHOTOS}"
            )
        pixels = {path.stem: _read_photo(path) for path in paths}
        if len(pixels) != len(paths):
            raise DecoderError("stimulus photos: two photo files have the same name (file stem)")
        records = _draw_records(pixels, n_stimuli, seed)
        logger.info(
            "stimulus bank: %d crops of %d px from %d photos (seed %d)",
            len(records), size_px, len(pixels), seed,
        )
        return cls(pixels, records, size_px, seed)

    def __len__(self) -> int:
        return len(self.records)

    def index_of(self, stim_id: str) -> int:
        """Position of a stimulus id in the bank.

        Raises
        ------
        DecoderError
            If the id is not in the bank.
        """
        try:
            return self._index[stim_id]
        except KeyError:
            raise DecoderError(
                f"stimulus bank: stim_id {stim_id!r} not found among {len(self)} stimuli "
                f"(seed {self.seed})"
            ) from None

    def image(self, index: int) -> np.ndarray:
        """Render one crop.

        Parameters
        ----------
        index : int
            Position in the bank (negative counts from the end).

        Returns
        -------
        ndarray of shape (size_px, size_px, 3), uint8
        """
        if not -len(self) <= index < len(self):
            raise DecoderError(f"stimulus bank: index {index} out of range for {len(self)} stimuli")
        record = self.records[index]
        box = (
            record.x0_px,
            record.y0_px,
            record.x0_px + record.side_px,
            record.y0_px + record.side_px,
        )
        crop = self._photos[record.photo].resize(
            (self.size_px, self.size_px), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0
        )
        pixels = np.asarray(crop, dtype=np.uint8)
        if record.flipped:
            pixels = pixels[:, ::-1]
        return np.ascontiguousarray(pixels)

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Render several crops.

        Parameters
        ----------
        indices : sequence of int
            Positions in the bank.

        Returns
        -------
        ndarray of shape (N, size_px, size_px, 3), uint8
        """
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        out = np.empty((len(indices), self.size_px, self.size_px, 3), dtype=np.uint8)
        for row, index in enumerate(indices):
            out[row] = self.image(index)
        return out

    def digest(self, indices: Sequence[int] | np.ndarray | None = None) -> str:
        """SHA-256 of what the selected stimuli look like: ids, boxes, flips and size.

        Two banks with the same digest render the same pixels (given the same photos), so it
        is a safe key for caching anything computed from the images.

        Parameters
        ----------
        indices : sequence of int, optional
            Positions in the bank; default all, in bank order.

        Returns
        -------
        str
            64 hexadecimal characters.
        """
        chosen = range(len(self)) if indices is None else np.asarray(indices).reshape(-1)
        sha = hashlib.sha256(f"size_px={self.size_px}\n".encode())
        for i in chosen:
            r = self.records[int(i)]
            line = f"{r.stim_id}\t{r.photo}\t{r.x0_px:.6f}\t{r.y0_px:.6f}\t{r.side_px:.6f}\t{int(r.flipped)}\n"
            sha.update(line.encode())
        return sha.hexdigest()


def write_contact_sheet(
    bank: StimulusBank,
    path: str | Path,
    indices: Sequence[int] | None = None,
    columns: int = 10,
    tile_px: int = 112,
) -> Path:
    """Save a grid of crops with their ids as a PNG, to look at the stimuli.

    Parameters
    ----------
    bank : StimulusBank
    path : str or Path
        PNG file to write (its folder is created).
    indices : sequence of int, optional
        Which crops, in order; default the first 100.
    columns : int, default=10
        Tiles per row.
    tile_px : int, default=112
        Edge of each tile, pixels; a 12 px caption strip is added below it.

    Returns
    -------
    Path
        The file written.
    """
    indices = list(range(min(100, len(bank)))) if indices is None else [int(i) for i in indices]
    if not indices:
        raise DecoderError("contact sheet: no stimuli selected")
    if columns < 1 or tile_px < 8:
        raise DecoderError(f"contact sheet: columns >= 1 and tile_px >= 8 expected (got {columns}, {tile_px})")
    caption_px = 12
    rows = -(-len(indices) // columns)
    sheet = Image.new("RGB", (columns * tile_px, rows * (tile_px + caption_px)), "white")
    draw = ImageDraw.Draw(sheet)
    for slot, index in enumerate(indices):
        x, y = (slot % columns) * tile_px, (slot // columns) * (tile_px + caption_px)
        tile = Image.fromarray(bank.image(index)).resize((tile_px, tile_px), Image.Resampling.BILINEAR)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + tile_px), bank.ids[index], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def export_stimuli(
    bank: StimulusBank, out_dir: str | Path, indices: Sequence[int] | None = None
) -> Path:
    """Write crops as ``<stim_id>.png`` plus ``stimuli.tsv`` describing each one.

    Parameters
    ----------
    bank : StimulusBank
    out_dir : str or Path
        Folder to write into (created if needed).
    indices : sequence of int, optional
        Which crops; default all.

    Returns
    -------
    Path
        The TSV file, with columns ``index, stim_id, photo, x0_px, y0_px, side_px, flipped,
        size_px, seed``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = range(len(bank)) if indices is None else [int(i) for i in indices]
    tsv_path = out_dir / "stimuli.tsv"
    with tsv_path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(
            ["index", "stim_id", "photo", "x0_px", "y0_px", "side_px", "flipped", "size_px", "seed"]
        )
        for index in indices:
            r = bank.records[index]
            Image.fromarray(bank.image(index)).save(out_dir / f"{r.stim_id}.png")
            writer.writerow(
                [index, r.stim_id, r.photo, f"{r.x0_px:.3f}", f"{r.y0_px:.3f}",
                 f"{r.side_px:.3f}", int(r.flipped), bank.size_px, bank.seed]
            )
    return tsv_path


def _read_photo(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError) as err:
        raise DecoderError(f"{path}: cannot read stimulus photo: {err}") from None
    if min(rgb.size) < MIN_PHOTO_SIDE_PX:
        raise DecoderError(
            f"{path}: stimulus photo is {rgb.size[0]}x{rgb.size[1]} px; "
            f"expected both sides >= {MIN_PHOTO_SIDE_PX} px"
        )
    return np.asarray(rgb, dtype=np.uint8)


def _draw_records(
    photos: dict[str, np.ndarray], n_stimuli: int, seed: int
) -> list[StimulusRecord]:
    names = list(photos)
    base, extra = divmod(n_stimuli, len(names))
    counts = [base + (k < extra) for k in range(len(names))]
    width = max(4, len(str(max(counts))))
    thumbs = {name: _thumbnail(photos[name]) for name in names}
    per_photo: list[list[StimulusRecord]] = []
    # fingerprints of every accepted crop, all photos: a stereo pair (motorcycle_left/right)
    # can give near-identical crops from two different photos
    kept = _FingerprintSet(n_stimuli, 3 * _FINGERPRINT_PX**2)
    for name, count in zip(names, counts, strict=True):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        height_px, width_px = photos[name].shape[:2]
        thumb, scale = thumbs[name]
        records: list[StimulusRecord] = []
        for k in range(count):
            for _attempt in range(_MAX_TRIES):
                record = _random_record(rng, f"{name}-{k:0{width}d}", name, width_px, height_px)
                fingerprint = _fingerprint(thumb, scale, record)
                if _is_usable(fingerprint) and not kept.has_near(fingerprint, _DUPLICATE_RMS):
                    break
            else:
                raise DecoderError(
                    f"stimulus photos: {name}: no distinct, non-empty crop found for "
                    f"{name}-{k:0{width}d} after {_MAX_TRIES} draws; ask for fewer stimuli"
                )
            kept.add(fingerprint)
            records.append(record)
        per_photo.append(records)
    longest = max(counts)
    return [recs[k] for k in range(longest) for recs in per_photo if k < len(recs)]


def _random_record(
    rng: np.random.Generator, stim_id: str, photo: str, width_px: int, height_px: int
) -> StimulusRecord:
    # log-uniform zoom so that close-ups and wide views are equally common
    zoom = float(np.exp(rng.uniform(np.log(MIN_ZOOM), np.log(MAX_ZOOM))))
    side = zoom * min(width_px, height_px)
    x0 = float(rng.uniform(0.0, width_px - side))
    y0 = float(rng.uniform(0.0, height_px - side))
    flipped = bool(rng.random() < 0.5)
    return StimulusRecord(stim_id, photo, round(x0, 3), round(y0, 3), round(side, 3), flipped)


def _thumbnail(pixels: np.ndarray) -> tuple[Image.Image, float]:
    img = Image.fromarray(pixels)
    scale = _THUMB_SHORT_SIDE_PX / min(img.size)
    size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
    return img.resize(size, Image.Resampling.BOX), scale


def _fingerprint(thumb: Image.Image, scale: float, record: StimulusRecord) -> np.ndarray:
    # rounding of the thumbnail size can put the far edge a fraction of a pixel outside
    width_px, height_px = thumb.size
    box = (
        min(record.x0_px * scale, width_px - 1.0),
        min(record.y0_px * scale, height_px - 1.0),
        min((record.x0_px + record.side_px) * scale, float(width_px)),
        min((record.y0_px + record.side_px) * scale, float(height_px)),
    )
    small = thumb.resize((_FINGERPRINT_PX, _FINGERPRINT_PX), Image.Resampling.BOX, box=box)
    pixels = np.asarray(small, dtype=np.float32)
    if record.flipped:
        pixels = pixels[:, ::-1]
    return pixels.reshape(-1)


def _is_usable(fingerprint: np.ndarray) -> bool:
    rgb = fingerprint.reshape(-1, 3)
    grey = rgb.mean(axis=1)
    dark_share = float(np.mean(rgb.max(axis=1) < _DARK_LEVEL))
    return float(grey.std()) >= _MIN_CONTRAST and dark_share <= _MAX_DARK_SHARE


class _FingerprintSet:
    """Accepted fingerprints in a preallocated array, for nearest-distance queries."""

    def __init__(self, capacity: int, dim: int) -> None:
        self._prints = np.empty((capacity, dim), dtype=np.float64)
        self._sq_norms = np.empty(capacity, dtype=np.float64)
        self._count = 0

    def add(self, fingerprint: np.ndarray) -> None:
        self._prints[self._count] = fingerprint
        self._sq_norms[self._count] = fingerprint @ fingerprint
        self._count += 1

    def has_near(self, fingerprint: np.ndarray, rms_limit: float) -> bool:
        if self._count == 0:
            return False
        prints = self._prints[: self._count]
        sq_dist = self._sq_norms[: self._count] - 2.0 * (prints @ fingerprint) + fingerprint @ fingerprint
        return bool(sq_dist.min() < rms_limit**2 * fingerprint.size)
