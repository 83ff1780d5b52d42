"""Dataset prep: pictures checked by name, made upright/RGB/square, captioned trigger-first."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from daemon.errors import BadInput
from daemon.pipeline.dataset import Upload, caption, check_count, check_image, display_name, prepare_images, square_rgb


def save(path: Path, img: Image.Image, fmt: str = "PNG", **kw) -> Upload:
    img.save(path, format=fmt, **kw)
    return Upload(path, path.name)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 100))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    up = save(tmp_path / "r.jpg", img, "JPEG", exif=exif.tobytes(), quality=95)
    with Image.open(up.path) as opened:
        out = square_rgb(opened, 64)
    # after rotating clockwise, the left stripe is at the top
    top = out.getpixel((32, 3))  # the 20 px stripe becomes the top 6 rows of 64; unrotated this is white padding
    assert top[2] > 150 and top[0] < 100


def test_transparency_goes_onto_white_and_is_centred(tmp_path: Path) -> None:
    img = Image.new("RGBA", (100, 50), (0, 0, 0, 0))
    out = square_rgb(img, 64)
    assert out.mode == "RGB" and out.size == (64, 64)
    assert out.getpixel((32, 32)) == (255, 255, 255)
    solid = square_rgb(Image.new("RGB", (100, 50), (10, 200, 10)), 64)
    assert solid.getpixel((32, 2)) == (255, 255, 255)  # padding above
    assert solid.getpixel((32, 32))[1] > 150  # the picture in the middle


def test_prepare_writes_our_names_and_captions(tmp_path: Path) -> None:
    ups = [save(tmp_path / f"../{i}.png".replace("../", f"in{i}_"), Image.new("P", (80, 90))) for i in range(3)]
    out = prepare_images(ups, tmp_path / "img", size=64, text=caption("ohwx", "woman"))
    assert [p.name for p in out] == ["001.png", "002.png", "003.png"]
    assert (tmp_path / "img" / "002.txt").read_text(encoding="utf-8") == "ohwx woman\n"
    with Image.open(out[0]) as img:
        assert img.size == (64, 64) and img.mode == "RGB"


def test_check_image_names_the_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.upload"
    bad.write_bytes(b"GIF89a broken")
    with pytest.raises(BadInput) as info:
        check_image(Upload(bad, "holiday.gif"))
    assert "holiday.gif" in info.value.message and info.value.key == "images"
    tiny = save(tmp_path / "t.png", Image.new("RGB", (20, 20)))
    with pytest.raises(BadInput, match="at least"):
        check_image(Upload(tiny.path, "tiny.png"))
    truncated = tmp_path / "cut.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(buf, format="JPEG")
    truncated.write_bytes(buf.getvalue()[:200])
    with pytest.raises(BadInput, match=r"cut\.jpg"):
        check_image(Upload(truncated, "cut.jpg"))


@pytest.mark.parametrize(("count", "ok"), [(7, False), (8, True), (25, True), (26, False)])
def test_count_limits(count: int, ok: bool) -> None:
    if ok:
        check_count(count)
    else:
        with pytest.raises(BadInput):
            check_count(count)


def test_display_name_strips_paths_and_control_chars() -> None:
    assert display_name("C:\\Users\\me\\pic.png", 0) == "pic.png"
    assert display_name("../../etc/passwd", 0) == "passwd"
    assert display_name("a\x00b\nc.png", 0) == "abc.png"
    assert display_name(None, 4) == "image #5"
