"""Dataset prep: pictures checked by name, made upright/RGB, scaled down with their shape kept, captioned."""

from __future__ import annotations

import contextlib
import io
import json
import random
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from daemon.config import Config
from daemon.errors import BadInput
from daemon.pipeline.buckets import bucket_counts, bucket_of, prep_size
from daemon.pipeline.dataset import (
    MAX_ASPECT,
    NAMES_FILE,
    ImageProblem,
    Upload,
    caption,
    check_count,
    check_image,
    check_images,
    display_name,
    fit_picture,
    jpeg_is_complete,
    prepare_images,
    read_uploads,
    upright_size,
    write_upload_names,
)
from tests.conftest import wait_for_state
from tests.helpers import REPO, picture_bytes


def save(path: Path, img: Image.Image, fmt: str = "PNG", **kw) -> Upload:
    img.save(path, format=fmt, **kw)
    return Upload(path, path.name)


@pytest.mark.parametrize(("fmt", "mode"), [("JPEG", "RGB"), ("PNG", "RGBA"), ("WEBP", "RGB")])
def test_exif_orientation_is_applied_and_the_shape_kept(tmp_path: Path, fmt: str, mode: str) -> None:
    img = Image.new(mode, (200, 100), (255, 255, 255))
    img.paste((0, 0, 255), (0, 0, 20, 100))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    up = save(tmp_path / f"r.{fmt.lower()}", img, fmt, exif=exif.tobytes(), quality=95)
    with Image.open(up.path) as opened:
        assert upright_size(opened) == (100, 200)  # from the header, before any decode
        out = fit_picture(opened, 64)
    # upright it is 100 wide, 200 tall; 20000 px > 64² so it is scaled down, keeping 1:2, never padded
    assert out.size == prep_size((100, 200), 64) and out.size[1] > out.size[0]
    assert abs(out.size[1] / out.size[0] - 2) < 0.1
    # after rotating clockwise, the left stripe is at the top
    top, bottom = out.getpixel((out.width // 2, 1)), out.getpixel((out.width // 2, out.height - 2))
    assert top[2] > 150 and top[0] < 100
    assert bottom[0] > 200  # white picture, not the stripe


def test_transparency_goes_onto_white_and_nothing_is_padded(tmp_path: Path) -> None:
    img = Image.new("RGBA", (100, 50), (0, 0, 0, 0))
    img.paste((200, 0, 0, 255), (0, 0, 10, 50))  # an opaque red stripe on the left edge
    img.save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as opened:
        out = fit_picture(opened, 512)
    assert out.mode == "RGB" and out.size == (100, 50)  # small pictures are never enlarged
    assert out.getpixel((50, 25)) == (255, 255, 255)  # transparent → white
    assert out.getpixel((2, 25)) == (200, 0, 0)  # the picture reaches the edge: no bars
    pal = Image.new("P", (80, 90))
    pal.info["transparency"] = 0
    assert fit_picture(pal, 512).getpixel((5, 5)) == (255, 255, 255)


def test_a_16_bit_grey_picture_is_scaled_to_8_bits_not_clipped_to_white(tmp_path: Path) -> None:
    import numpy as np  # the daemon's own dependency since the picture checks

    ramp = np.tile(np.linspace(0, 65535, 200).astype(np.uint16), (100, 1))  # black → white, left to right
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode.startswith("I")  # what Pillow makes of a 16-bit grey PNG
        out = fit_picture(opened, 512)
    grey = np.asarray(out.convert("L"), dtype=np.float64)
    assert abs(grey.mean() - 127.5) < 3  # convert("RGB") alone gives ~254: almost every value clips to white
    assert grey[:, 0].max() < 5 and grey[:, -1].min() > 250
    mid = Image.new("I", (10, 10), 200)  # 32-bit integer grey holding 8-bit values stays as it is
    assert fit_picture(mid, 512).getpixel((5, 5)) == (200, 200, 200)


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    [
        ((4000, 3000), 512, (512, 384)),  # kohya's own no-upscale rounding: one side on a multiple of 64
        ((3000, 4000), 512, (384, 512)),
        ((1920, 1080), 512, (682, 384)),
        ((400, 300), 512, (400, 300)),  # below resolution²: kept as it is, never enlarged
        ((2048, 2048), 512, (512, 512)),
        ((6000, 1000), 512, (1152, 192)),
    ],
)
def test_prep_size_keeps_the_shape_within_resolution_squared(size, resolution, expected) -> None:
    assert prep_size(size, resolution) == expected


def test_prep_size_and_buckets_agree_with_kohya_on_any_size() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        short = rng.randint(64, 3000)
        size = (short, rng.randint(short, int(short * MAX_ASPECT)))
        if rng.random() < 0.5:
            size = (size[1], size[0])
        for resolution in (256, 512, 768, 1024):
            out = prep_size(size, resolution)
            assert out[0] <= size[0] and out[1] <= size[1]  # never enlarged
            assert out[0] * out[1] <= resolution * resolution
            aspect = size[0] / size[1]
            assert abs(out[0] / out[1] - aspect) / aspect < 2 / min(out)  # the shape is kept to within ~a pixel
            # kohya puts our prepped picture in the bucket it would have chosen for the original
            assert bucket_of(out, resolution) == bucket_of(size, resolution)
            bucket = bucket_of(out, resolution)
            assert bucket[0] % 64 == 0 and bucket[1] % 64 == 0 and min(bucket) >= 64
            assert bucket[0] <= out[0] and bucket[1] <= out[1]


def test_bucket_counts_groups_by_shape() -> None:
    sizes = [(512, 384)] * 3 + [(384, 512)] * 2 + [(500, 500), (512, 512)]
    assert bucket_counts(sizes, 512) == {(512, 384): 3, (384, 512): 2, (448, 448): 1, (512, 512): 1}


def test_prepare_writes_our_names_captions_and_sizes(tmp_path: Path) -> None:
    ups = [
        save(tmp_path / "in0.png", Image.new("P", (80, 90))),
        save(tmp_path / "in1.jpg", Image.new("RGB", (1200, 800), (9, 99, 199)), "JPEG"),
        save(tmp_path / "in2.webp", Image.new("RGBA", (300, 1200), (0, 0, 0, 0)), "WEBP"),
    ]
    out = prepare_images(ups, tmp_path / "img", size=256, text=caption("ohwx", "woman"))
    assert [p.path.name for p in out] == ["001.png", "002.png", "003.png"]
    assert [p.size for p in out] == [(80, 90), prep_size((1200, 800), 256), prep_size((300, 1200), 256)]
    assert (tmp_path / "img" / "002.txt").read_text(encoding="utf-8") == "ohwx woman\n"
    for prepared in out:
        with Image.open(prepared.path) as img:
            assert img.size == prepared.size and img.mode == "RGB" and img.format == "PNG"
    with Image.open(out[1].path) as img:
        r, g, b = img.getpixel((img.width // 2, img.height // 2))
        assert abs(r - 9) < 6 and abs(g - 99) < 6 and abs(b - 199) < 6  # the draft decode kept the colour


def png_with_broken_pixels(path: Path) -> Path:
    """A PNG whose chunks (and CRCs) are fine but whose pixel data does not inflate: only a full decode sees it."""
    garbage = b"\x78\x9c" + bytes(range(7, 250))
    chunk = b"IDAT" + garbage
    head = Image.new("RGB", (100, 100))
    buf = io.BytesIO()
    head.save(buf, format="PNG")
    raw = buf.getvalue()
    start = raw.index(b"IDAT") - 4
    end = raw.index(b"IEND") - 4
    path.write_bytes(raw[:start] + struct.pack(">I", len(garbage)) + chunk
                     + struct.pack(">I", zlib.crc32(chunk)) + raw[end:])
    return path


def test_prepare_fails_naming_the_clients_file(tmp_path: Path) -> None:
    ups = [save(tmp_path / f"{i:03d}.upload", Image.new("RGB", (100, 100)), "PNG") for i in (1, 3)]
    broken = Upload(png_with_broken_pixels(tmp_path / "002.upload"), "holiday 2.png")
    check_image(broken)  # passes: the request-time check reads headers and chunks only
    with pytest.raises(ImageProblem) as info:
        prepare_images([ups[0], broken, ups[1]], tmp_path / "img", size=64, text="ohwx")
    assert "'holiday 2.png' is not a picture that can be read" in info.value.message
    assert info.value.key == "images"


@pytest.mark.parametrize("fmt", ["JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF"])
def test_the_picture_formats_people_save_are_read(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "x.upload"
    extra = {"save_all": True, "append_images": [Image.new("RGB", (96, 96))]} if fmt == "MPO" else {}
    Image.new("RGB", (96, 96), (10, 200, 30)).save(path, format=fmt, **extra)  # MPO: a phone's two-frame JPEG
    check_image(Upload(path, f"x.{fmt.lower()}"))
    prepared = prepare_images([Upload(path, "x")], tmp_path / "img", size=64, text="ohwx")
    assert prepared[0].path.is_file()


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "PCX", "TGA", "SGI", "PPM"])
def test_formats_outside_the_list_are_refused_by_name(tmp_path: Path, fmt: str) -> None:
    """Pillow reads them, but nobody trains on them: EPS is rendered by running Ghostscript on the file."""
    path = tmp_path / "x.upload"
    if fmt == "EPS":
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 120\nshowpage\n%%EOF\n")
        assert Image.open(path).format == "EPS"  # what Pillow alone would have opened (and rendered with gs)
    else:
        Image.new("RGB", (96, 96)).save(path, format=fmt)
    with pytest.raises(ImageProblem, match="is not a picture that can be read"):
        check_image(Upload(path, f"x.{fmt.lower()}"))


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
    cut_png = tmp_path / "cut.png"
    cut_png.write_bytes(tiny.path.read_bytes().replace(b"IEND", b"IEN")[:-30])
    with pytest.raises(BadInput, match=r"cut\.png"):
        check_image(Upload(cut_png, "cut.png"))


def jpeg_bytes(size: tuple[int, int] = (400, 300), **kw) -> bytes:
    img = Image.effect_noise(size, 60).convert("RGB")  # noise: scan data full of stuffed 0xFF bytes
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def with_thumbnail_segment(main: bytes) -> bytes:
    """A camera-style APP1 block holding a complete little JPEG (with its own SOS and EOI) before the picture."""
    thumb = jpeg_bytes((64, 48))
    body = b"Exif\x00\x00" + thumb
    return main[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + main[2:]


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_cut_short_is_refused_in_the_request(tmp_path: Path, progressive: bool) -> None:
    whole = with_thumbnail_segment(jpeg_bytes(progressive=progressive))
    path = tmp_path / "x.upload"
    path.write_bytes(whole)
    check_image(Upload(path, "ok.jpg"))
    path.write_bytes(whole + b"\x00\x00\x00\x18ftypmp42" + bytes(5000))  # a phone's motion-photo trailer
    check_image(Upload(path, "motion.jpg"))
    for cut in (0.95, 0.5, 0.1):
        # The thumbnail's own end marker is still there: only the segment walk tells them apart.
        path.write_bytes(whole[: int(len(whole) * cut)])
        with pytest.raises(ImageProblem, match=r"'half\.jpg' is not a picture that can be read"):
            check_image(Upload(path, "half.jpg"))


def test_jpeg_structure_walk() -> None:
    good = jpeg_bytes()
    assert jpeg_is_complete(good) and jpeg_is_complete(with_thumbnail_segment(good))
    assert not jpeg_is_complete(good[:-2])
    assert not jpeg_is_complete(b"\xff\xd8\xff\xe0\x00\x01")  # a length below 2
    assert not jpeg_is_complete(b"\xff\xd8" + b"\x00" * 20)  # no marker where one must be
    assert not jpeg_is_complete(b"\x89PNG\r\n\x1a\n")


def test_a_complete_jpeg_with_broken_scan_data_fails_in_prep_by_name(tmp_path: Path) -> None:
    data = bytearray(jpeg_bytes((640, 480)))
    sos = data.index(b"\xff\xda")
    for i in range(sos + 200, len(data) - 200, 7):  # garbage markers all through the scan
        data[i: i + 2] = b"\xff\xc4"
    path = tmp_path / "001.upload"
    path.write_bytes(bytes(data))
    check_image(Upload(path, "beach.jpg"))  # complete as far as the request-time check can see
    with pytest.raises(ImageProblem, match=r"'beach\.jpg' is not a picture that can be read"):
        prepare_images([Upload(path, "beach.jpg")], tmp_path / "img", size=256, text="t")


def test_check_images_reports_the_first_bad_file_in_upload_order(tmp_path: Path) -> None:
    good = [save(tmp_path / f"{i}.png", Image.new("RGB", (100, 100))) for i in range(6)]
    bad1, bad2 = tmp_path / "b1", tmp_path / "b2"
    bad1.write_bytes(b"nope")
    bad2.write_bytes(b"nope")
    uploads = [*good[:3], Upload(bad1, "first.png"), *good[3:], Upload(bad2, "second.png")]
    with pytest.raises(ImageProblem, match=r"first\.png"):
        check_images(uploads)
    check_images(good)


@pytest.mark.parametrize(("size", "ok"), [((64, 384), True), ((64, 385), False), ((12000, 64), False),
                                          ((1000, 6000), True), ((6001, 1000), False)])
def test_extreme_aspect_ratios_are_refused_by_name(tmp_path: Path, size: tuple[int, int], ok: bool) -> None:
    up = save(tmp_path / "strip.png", Image.new("L", size))
    if ok:
        check_image(Upload(up.path, "strip.png"))
        return
    with pytest.raises(ImageProblem) as info:
        check_image(Upload(up.path, "banner strip.png"))
    assert "'banner strip.png'" in info.value.message and "1:6" in info.value.message
    assert info.value.key == "images" and info.value.status == 400


def test_a_thin_tall_png_is_refused_before_any_decode(tmp_path: Path) -> None:
    """The 64×12000 PNG of the issue: refused from its header, in a fresh process that never grows."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (64, 12000), (10, 20, 30)).save(path, optimize=True)
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from daemon.pipeline.dataset import ImageProblem, Upload, check_image, prep_one, PrepTask
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            check_image(Upload(Path({str(path)!r}), "strip.png"))
        except ImageProblem as exc:
            print(exc.message)
        result = prep_one(PrepTask({str(path)!r}, {str(tmp_path / "out.png")!r}, "strip.png", 512, "x"))
        print(result.error)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    if sys.platform == "win32":
        pytest.skip("resource is POSIX-only")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    refused, refused_in_prep, grown_mb = done.stdout.strip().splitlines()
    assert "'strip.png' is 64×12000 pixels, more elongated than 1:6" in refused
    assert refused_in_prep == refused
    assert int(grown_mb) < 10  # a 12000² RGB canvas would be 432 MB; even a full decode 2.3 MB
    assert not (tmp_path / "out.png").exists()


def test_upload_names_survive_to_prep(tmp_path: Path) -> None:
    folder = tmp_path / "uploads"
    folder.mkdir()
    ups = [save(folder / f"{i:03d}.upload", Image.new("RGB", (70, 70))) for i in (2, 1, 10)]
    write_upload_names(folder, [Upload(u.path, f"Ünïcode {u.path.stem}.jpg") for u in ups])
    (folder / "stray.tmp").write_bytes(b"x")  # not an upload: ignored
    read = read_uploads(folder)
    assert [(u.path.name, u.client_name) for u in read] == [
        ("001.upload", "Ünïcode 001.jpg"), ("002.upload", "Ünïcode 002.jpg"), ("010.upload", "Ünïcode 010.jpg")]
    assert json.loads((folder / NAMES_FILE).read_text(encoding="utf-8"))["010.upload"] == "Ünïcode 010.jpg"
    (folder / NAMES_FILE).write_text("{broken", encoding="utf-8")
    assert [u.client_name for u in read_uploads(folder)] == ["001.upload", "002.upload", "010.upload"]


def test_prep_runs_in_worker_processes_from_a_thread(tmp_path: Path) -> None:
    """As the daemon calls it (asyncio.to_thread): no fork of the threaded process, results in order."""
    script = textwrap.dedent(f"""
        import asyncio, os
        from pathlib import Path
        from PIL import Image
        from daemon.pipeline import dataset
        root = Path({str(tmp_path)!r})
        ups = []
        for i in range(8):
            p = root / f"{{i:03d}}.upload"
            Image.new("RGB", (300 + 10 * i, 200)).save(p, format="JPEG")
            ups.append(dataset.Upload(p, f"c{{i}}.jpg"))
        async def main():
            return await asyncio.to_thread(dataset.prepare_images, ups, root / "img", size=256, text="t")
        out = asyncio.run(main())
        print([p.size for p in out])
        print(dataset._mp_context().get_start_method())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    sizes, method = done.stdout.strip().splitlines()
    assert sizes == str([prep_size((300 + 10 * i, 200), 256) for i in range(8)])
    assert method in ("forkserver", "spawn")


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


# ------------------------------------------------------------------------------- through the daemon
def form_with(pictures: dict[int, tuple[str, bytes]]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("name", "Shapes")
    form.add_field("trigger", "ohwx")
    for i in range(8):
        filename, data = pictures.get(i, (f"pic{i}.png", picture_bytes(i)))
        form.add_field("images", data, filename=filename, content_type="application/octet-stream")
    return form


async def test_an_extreme_aspect_ratio_is_a_400_naming_the_file(client: TestClient, config: Config) -> None:
    strip = io.BytesIO()
    Image.new("RGB", (64, 12000), (1, 2, 3)).save(strip, format="PNG", optimize=True)
    assert len(strip.getvalue()) < 20_000  # the 12 KB picture
    resp = await client.post("/train", data=form_with({5: ("long_strip.png", strip.getvalue())}))
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "'long_strip.png' is 64×12000 pixels, more elongated than 1:6."
    assert body["key"] == "images"
    assert (await (await client.get("/jobs")).json())["jobs"] == []
    assert not any((config.data_dir / "tmp").glob("*/*"))  # the upload is gone
    assert (await client.get("/health")).status == 200


async def test_a_picture_that_fails_the_full_decode_fails_the_job_by_its_name(client: TestClient,
                                                                              tmp_path: Path) -> None:
    broken = png_with_broken_pixels(tmp_path / "b.png").read_bytes()
    resp = await client.post("/train", data=form_with({3: ("Holiday_3.png", broken)}))
    assert resp.status == 202, await resp.text()  # the request-time check does not inflate pixel data
    job = await wait_for_state(client, (await resp.json())["job_id"], {"done", "error"})
    assert job["state"] == "error"
    assert job["error"]["kind"] == "bad_image"
    assert job["error"]["message"].startswith("'Holiday_3.png' is not a picture that can be read")
    assert "Remove or replace that picture" in job["error"]["hint"]


def test_prep_workers_end_when_the_daemon_is_killed(tmp_path: Path) -> None:
    """SIGKILL mid-prep: nothing closes the workers' queue, so they must notice the daemon is gone themselves."""
    if sys.platform == "win32":
        pytest.skip("SIGKILL is POSIX")
    script = textwrap.dedent("""
        import os, signal, time
        from daemon.pipeline.dataset import prep_pool
        pool = prep_pool(2)
        futures = [pool.submit(time.sleep, 60) for _ in range(2)]
        while len(pool._processes) < 2:
            time.sleep(0.05)
        print(*pool._processes, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == -9, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    workers = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):  # already gone: fine
            workers.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(workers, timeout=10)
    for proc in alive:  # only so a failure leaves nothing behind
        proc.kill()
    assert not alive, f"prep workers outlived the daemon: {[p.pid for p in alive]}"


def test_the_draft_decode_gives_the_picture_a_full_decode_would(tmp_path: Path) -> None:
    """Decoding at 1/4 scale from the DCT, then Lanczos, looks like Lanczos from the full decode."""
    from PIL import ImageChops, ImageDraw, ImageStat

    scene = Image.merge("RGB", [Image.linear_gradient("L").resize((2400, 1800)),
                                Image.radial_gradient("L").resize((2400, 1800)),
                                Image.linear_gradient("L").rotate(90).resize((2400, 1800))])
    draw = ImageDraw.Draw(scene)
    for i in range(12):  # hard edges, where a poor downscale would show
        draw.rectangle((150 * i, 100 + 90 * i, 150 * i + 120, 400 + 90 * i), fill=(20 * i, 255 - 20 * i, 90))
    path = tmp_path / "scene.jpg"
    scene.save(path, format="JPEG", quality=92)
    with Image.open(path) as img:
        fast = fit_picture(img, 512)
    with Image.open(path) as img:
        img.load()
        full = img.convert("RGB").resize(fast.size, Image.Resampling.LANCZOS)
    assert fast.size == (512, 384)
    diff = ImageStat.Stat(ImageChops.difference(fast, full))
    # Out of 255, per channel. A nearest-neighbour scale-down of the same picture is off by 0.26-0.35 on
    # average and by up to 39 at the edges.
    assert max(diff.mean) < 0.2
    assert max(high for _, high in diff.extrema) <= 16


def test_a_header_claiming_gigapixels_is_too_large_not_unreadable(tmp_path: Path) -> None:
    small = io.BytesIO()
    Image.new("L", (100, 100)).save(small, format="PNG")
    raw = bytearray(small.getvalue())
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4: ihdr + 12] = struct.pack(">II", 40000, 40000)  # 1.6 gigapixels claimed by the header
    raw[ihdr + 13 + 4: ihdr + 13 + 8] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr: ihdr + 17])))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageProblem, match=r"'bomb\.png' claims more pixels than any camera makes"):
        check_image(Upload(path, "bomb.png"))
    big = tmp_path / "big.png"
    raw[ihdr + 4: ihdr + 12] = struct.pack(">II", 10000, 9000)  # 90 MP: Pillow only warns; we refuse
    raw[ihdr + 13 + 4: ihdr + 13 + 8] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr: ihdr + 17])))
    big.write_bytes(bytes(raw))
    too_large = pytest.raises(ImageProblem, match=r"10000×9000 pixels, too large")
    with pytest.warns(Image.DecompressionBombWarning), too_large:
        check_image(Upload(big, "big.png"))
