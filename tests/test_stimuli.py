"""Tests of the phantom stimulus bank (rtdecoder.phantom.stimuli)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from rtdecoder.cli import main
from rtdecoder.errors import DecoderError
from rtdecoder.phantom.stimuli import (
    MIN_PHOTOS,
    StimulusBank,
    StimulusRecord,
    export_stimuli,
    list_source_photos,
    write_contact_sheet,
)


@pytest.fixture(scope="module")
def small_bank() -> StimulusBank:
    return StimulusBank.build(120, size_px=48, seed=7)


def test_source_photos_are_natural_and_named():
    photos = list_source_photos()
    names = [p.stem for p in photos]
    assert len(photos) >= 15
    assert {"astronaut", "coffee", "chelsea", "china", "flower"} <= set(names)
    # synthetic, binary or text images must never be used
    assert not {"chessboard_GRAY", "chessboard_RGB", "text", "logo", "page", "horse", "phantom"} & set(names)


def test_3000_crops_are_distinct_and_cover_every_photo():
    bank = StimulusBank.build(3000, size_px=24, seed=0)
    assert len(bank) == 3000 and len(set(bank.ids)) == 3000
    pixels = bank.images(range(len(bank)))
    assert pixels.shape == (3000, 24, 24, 3) and pixels.dtype == np.uint8
    digests = {hashlib.sha256(img.tobytes()).hexdigest() for img in pixels}
    assert len(digests) == 3000
    photos = [r.photo for r in bank.records]
    assert set(photos) == set(bank.source_photos)
    counts = np.unique(photos, return_counts=True)[1]
    assert counts.max() - counts.min() <= 1
    # interleaved: the first len(source_photos) stimuli come from different photos
    assert len(set(photos[: len(bank.source_photos)])) == len(bank.source_photos)


def test_build_is_deterministic_from_the_seed():
    a = StimulusBank.build(60, size_px=32, seed=3)
    b = StimulusBank.build(60, size_px=32, seed=3)
    c = StimulusBank.build(60, size_px=32, seed=4)
    assert a.records == b.records
    np.testing.assert_array_equal(a.images([0, 17, 59]), b.images([0, 17, 59]))
    assert a.ids == c.ids  # ids name the photo and crop number, not the box
    assert a.records != c.records
    assert a.digest() == b.digest() != c.digest()


def test_records_lie_inside_their_photos_and_vary(small_bank: StimulusBank):
    from PIL import Image

    sizes = {path.stem: Image.open(path).size for path in list_source_photos()}
    for r in small_bank.records:
        width, height = sizes[r.photo]
        assert r.x0_px >= 0 and r.y0_px >= 0
        assert r.x0_px + r.side_px <= width + 1e-3 and r.y0_px + r.side_px <= height + 1e-3
        assert r.stim_id.startswith(f"{r.photo}-")
    flips = [r.flipped for r in small_bank.records]
    assert 0.25 < np.mean(flips) < 0.75
    zooms = [r.side_px / min(sizes[r.photo]) for r in small_bank.records]
    assert min(zooms) < 0.5 and max(zooms) > 0.8


def test_image_and_images_agree(small_bank: StimulusBank):
    one = small_bank.image(5)
    assert one.shape == (48, 48, 3) and one.dtype == np.uint8
    many = small_bank.images(np.array([5, 6, 5]))
    np.testing.assert_array_equal(many[0], one)
    np.testing.assert_array_equal(many[2], one)
    np.testing.assert_array_equal(small_bank.image(-1), small_bank.image(len(small_bank) - 1))


def test_flip_mirrors_the_same_box():
    rgb = np.random.default_rng(0).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    plain = StimulusRecord("x-0000", "x", 4.0, 2.0, 40.0, False)
    mirrored = StimulusRecord("x-0001", "x", 4.0, 2.0, 40.0, True)
    bank = StimulusBank({"x": rgb}, [plain, mirrored], size_px=20, seed=0)
    np.testing.assert_array_equal(bank.image(1), bank.image(0)[:, ::-1])


def test_index_of(small_bank: StimulusBank):
    for i in (0, 33, len(small_bank) - 1):
        assert small_bank.index_of(small_bank.ids[i]) == i
    with pytest.raises(DecoderError, match="stim_id 'nope-0001' not found"):
        small_bank.index_of("nope-0001")
    with pytest.raises(DecoderError, match="index 120 out of range"):
        small_bank.image(120)


def test_too_few_photos_is_a_clear_error(tmp_path: Path):
    photos = list_source_photos()[: MIN_PHOTOS - 2]
    with pytest.raises(DecoderError, match=f"expected at least {MIN_PHOTOS}"):
        StimulusBank.build(10, photos=photos)
    with pytest.raises(DecoderError, match="found 0 bundled photos, expected at least"):
        list_source_photos([("skimage", "data/no_such_photo.png", "none")])


def test_bad_arguments_and_unreadable_photo(tmp_path: Path):
    with pytest.raises(DecoderError, match="n_stimuli must be >= 1"):
        StimulusBank.build(0)
    with pytest.raises(DecoderError, match="size_px must be >= 8"):
        StimulusBank.build(10, size_px=4)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DecoderError, match="broken.png: cannot read stimulus photo"):
        StimulusBank.build(10, photos=[*list_source_photos()[:5], broken])


def test_digest_depends_on_selection_and_size(small_bank: StimulusBank):
    assert small_bank.digest() == small_bank.digest(range(len(small_bank)))
    assert small_bank.digest([0, 1]) != small_bank.digest([1, 0])
    resized = StimulusBank.build(120, size_px=64, seed=7)
    assert resized.records == small_bank.records
    assert resized.digest() != small_bank.digest()


def test_contact_sheet_and_export(small_bank: StimulusBank, tmp_path: Path):
    from PIL import Image

    sheet = write_contact_sheet(small_bank, tmp_path / "sheet.png", indices=range(12), columns=5, tile_px=32)
    assert Image.open(sheet).size == (5 * 32, 3 * (32 + 12))
    tsv = export_stimuli(small_bank, tmp_path / "crops", indices=[3, 4])
    rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
    assert [row["stim_id"] for row in rows] == small_bank.ids[3:5]
    assert rows[0]["photo"] == small_bank.records[3].photo
    saved = np.asarray(Image.open(tmp_path / "crops" / f"{small_bank.ids[3]}.png"))
    np.testing.assert_array_equal(saved, small_bank.image(3))


def test_cli_phantom_stimuli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    status = main([
        "phantom", "stimuli", "--n-stimuli", "40", "--size-px", "32",
        "--sheet", str(tmp_path / "s.png"), "--sheet-count", "8",
        "--out-dir", str(tmp_path / "crops"), "--count", "3",
    ])
    assert status == 0
    assert (tmp_path / "s.png").is_file()
    assert len(list((tmp_path / "crops").glob("*.png"))) == 3
    assert "40 stimuli from" in capsys.readouterr().out
    assert main(["phantom", "stimuli"]) == 1
    assert "give --sheet PNG and/or --out-dir" in capsys.readouterr().err
