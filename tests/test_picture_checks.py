"""Picture warnings (pure part + the decode): each code fires on the pictures it is for, and only on those."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from daemon.pipeline import picture_checks as pc
from tests.picture_scenes import blurred, bokeh, jpeg, person, scene

RES = 512


def write(folder: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = folder / name
    path.write_bytes(data)
    return path, name


def codes(report: pc.Report) -> list[list[str]]:
    return [[w.code for w in p.warnings] for p in report.pictures]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Six different photos of one person and one of another: the varied set every check must leave alone."""
    me = person(1)
    return [scene(me, k, (1024, 768)) for k in range(6)] + [scene(person(2), 50, (768, 1024))]


def test_a_varied_sharp_set_gets_no_warning(tmp_path: Path, photos: list[Image.Image]) -> None:
    items = [write(tmp_path, f"p{i}.jpg", jpeg(im)) for i, im in enumerate(photos)]
    report = pc.check_pictures(items, RES)
    assert codes(report) == [[] for _ in photos]
    assert report.set == []
    assert [p.size for p in report.pictures] == [im.size for im in photos]


def test_near_duplicates_name_each_other(tmp_path: Path, photos: list[Image.Image]) -> None:
    base = photos[0]
    w, h = base.size
    items = [write(tmp_path, f"p{i}.jpg", jpeg(im)) for i, im in enumerate(photos[:4])]
    items.append(write(tmp_path, "resaved.jpg", jpeg(base.resize((w // 2, h // 2)), 60)))  # re-saved smaller
    items.append(write(tmp_path, "cropped.png", _png(base.crop((25, 19, w - 25, h - 19)))))  # 5% crop
    report = pc.check_pictures(items, RES)
    dup = {p.index: next(w for w in p.warnings if w.code == "duplicate") for p in report.pictures
           if any(w.code == "duplicate" for w in p.warnings)}
    assert sorted(dup) == [0, 4, 5]
    assert dup[0].others == (4, 5) and dup[4].others == (0, 5) and dup[5].others == (0, 4)
    assert "'resaved.jpg'" in dup[0].message and "'cropped.png'" in dup[0].message
    assert "3 times" in dup[0].message and "remove" in dup[0].hint


def test_the_duplicate_threshold_separates_copies_from_other_photos(photos: list[Image.Image]) -> None:
    hashes = [pc.imagehash.phash(pc.gray_at_training_size(_reopen(im), RES)) for im in photos[:6]]
    nearest_other = min(a - b for i, a in enumerate(hashes) for b in hashes[i + 1:])
    assert nearest_other > pc.DUPLICATE_DISTANCE  # two photos of one person are never "duplicates"


def test_small_pictures_are_judged_by_their_pixels_at_the_training_resolution(tmp_path: Path,
                                                                              photos: list[Image.Image]) -> None:
    items = [
        write(tmp_path, "small.jpg", jpeg(photos[0].resize((400, 300)))),  # 120k px < 0.75 × 512²
        write(tmp_path, "enough.jpg", jpeg(photos[1].resize((640, 480)))),  # 307k px: fine at 512
        write(tmp_path, "narrow.jpg", jpeg(photos[2].crop((0, 0, 420, 768)))),  # shorter side 420, 322k px: fine
    ]
    report = pc.check_pictures(items, RES)
    assert codes(report) == [["small"], [], []]
    small = report.pictures[0].warnings[0]
    assert "400×300" in small.message and "384×256" in small.message  # the bucket kohya trains it in
    assert "at least 512×512" in small.hint
    assert codes(pc.check_pictures(items, 768)) == [["small"], ["small"], ["small"]]  # SDXL-ish resolution


def test_blurry_pictures_are_flagged_and_sharp_ones_with_a_soft_background_are_not(
        tmp_path: Path, photos: list[Image.Image]) -> None:
    items = [
        write(tmp_path, "sharp.jpg", jpeg(photos[0])),
        write(tmp_path, "soft.jpg", jpeg(blurred(photos[1], 2.0))),
        write(tmp_path, "very-soft.jpg", jpeg(blurred(photos[2], 3.0))),
        write(tmp_path, "portrait.jpg", jpeg(bokeh(photos[3], person(1), 3))),
    ]
    report = pc.check_pictures(items, RES)
    assert codes(report) == [[], ["blurry"], ["blurry"], []]
    assert "'soft.jpg' looks blurry" in report.pictures[1].warnings[0].message


def test_blur_is_measured_at_the_training_size_whatever_the_camera(photos: list[Image.Image]) -> None:
    big = scene(person(1), 3, (3000, 2250))
    small = big.resize((1024, 768), Image.Resampling.LANCZOS)
    sharp_big, sharp_small = (pc.sharpness(pc.gray_at_training_size(_reopen(im), RES)) for im in (big, small))
    assert sharp_big > pc.BLUR_THRESHOLD and sharp_small > pc.BLUR_THRESHOLD
    soft_big = pc.sharpness(pc.gray_at_training_size(_reopen(blurred(big, 2.0)), RES))
    assert soft_big < pc.BLUR_THRESHOLD


def test_exif_orientation_is_respected(tmp_path: Path, photos: list[Image.Image]) -> None:
    upright = photos[0]
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90° clockwise to show"
    items = [write(tmp_path, "upright.jpg", jpeg(upright)), write(tmp_path, "turned.jpg", jpeg(stored, exif=exif))]
    report = pc.check_pictures(items, RES)
    assert report.pictures[1].size == upright.size
    assert codes(report) == [["duplicate"], ["duplicate"]]  # the same picture once both are upright


def test_unreadable_pictures_get_their_own_warning_and_never_raise(tmp_path: Path, photos: list[Image.Image]) -> None:
    whole = jpeg(photos[0])
    items = [
        write(tmp_path, "text.jpg", b"not a picture at all"),
        write(tmp_path, "cut.jpg", whole[: len(whole) // 2]),
        write(tmp_path, "tiny.png", _png(Image.new("RGB", (40, 40), "red"))),
        write(tmp_path, "ok.jpg", whole),
    ]
    report = pc.check_pictures(items, RES)
    assert codes(report) == [["unreadable"], ["unreadable"], ["unreadable"], []]
    assert "'text.jpg' is not a picture that can be read" in report.pictures[0].warnings[0].message
    assert "'tiny.png' is only 40×40 pixels" in report.pictures[2].warnings[0].message
    assert report.pictures[0].size is None and report.pictures[0].to_json()["width"] is None


def test_same_shape_is_a_note_only_for_a_set_of_one_shape(photos: list[Image.Image]) -> None:
    four = [pc.Measure(f"{i}", size=(4000, 3000)) for i in range(3)] + [pc.Measure("x", size=(2000, 1500))]
    (note,) = [w for w in pc.check(four, RES).set if w.code == "same_shape"]
    assert "All 4 pictures have the same shape (4:3)" in note.message and "fine" in note.message
    mixed = [*four, pc.Measure("p", size=(3000, 4000))]
    assert pc.check(mixed, RES).set == []
    assert pc.check(four[:3], RES).set == []  # three pictures: too few to say anything about framing


def test_alike_when_most_pairs_are_near_each_other(tmp_path: Path, photos: list[Image.Image]) -> None:
    base = photos[0]
    w, h = base.size
    # one scene, five slightly different framings and exposures: not duplicates, but one picture really
    crops = [base.crop((dx, dy, w - 60 + dx, h - 45 + dy)) for dx, dy in ((0, 0), (60, 0), (0, 45), (60, 45), (30, 22))]
    items = [write(tmp_path, f"c{i}.jpg", jpeg(im)) for i, im in enumerate(crops)]
    report = pc.check_pictures(items, RES)
    assert [w.code for w in report.set] == ["alike", "same_shape"]
    assert "Most of the pictures look alike" in report.set[0].message
    varied = [write(tmp_path, f"v{i}.jpg", jpeg(im)) for i, im in enumerate(photos[:5])]
    assert [w.code for w in pc.check_pictures(varied, RES).set] == ["same_shape"]


def test_the_json_shape(tmp_path: Path, photos: list[Image.Image]) -> None:
    items = [write(tmp_path, "a.jpg", jpeg(photos[0])), write(tmp_path, "b.jpg", jpeg(photos[0]))]
    body = pc.check_pictures(items, RES).to_json()
    assert body["set"] == []
    first = body["pictures"][0]
    assert first == {"index": 0, "name": "a.jpg", "width": 1024, "height": 768, "warnings": [
        {"code": "duplicate", "message": first["warnings"][0]["message"], "hint": first["warnings"][0]["hint"],
         "others": [1]}]}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _reopen(img: Image.Image) -> Image.Image:
    return Image.open(io.BytesIO(jpeg(img)))
