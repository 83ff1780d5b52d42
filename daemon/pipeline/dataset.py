"""Turning the uploaded pictures into a kohya dataset folder: checked, upright, RGB, scaled down, captioned.

Each picture keeps its aspect ratio; kohya's buckets (see buckets.py) take care of the different shapes.
Two checks: a cheap one while the upload request is open (header, size rules, the file complete), and the full decode
in prep, which runs in worker processes so that it neither holds the daemon's GIL nor uses more than the cores.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
from PIL import Image, UnidentifiedImageError

from daemon.errors import BadInput
from daemon.pipeline.buckets import Size, prep_size
from daemon.pipeline.captions import caption_text
from daemon.pipeline.side_files import read_json_map, write_json_map

MIN_IMAGES = 8
MAX_IMAGES = 25
# Decompression bombs: a 25 MB PNG can claim gigapixels. 80 MP covers any real camera.
MAX_PIXELS = 80_000_000
MIN_SIDE = 64
# Longer side / shorter side. A 1:6 strip at 512 px is already 209×1254; beyond that a picture is a banner,
# not a character, and its bucket would be a sliver.
MAX_ASPECT = 6.0
# JPEG draft decoding (DCT scaling by 1/2, 1/4, 1/8) stops at a size this much larger than the target, so the
# final Lanczos step still has pixels to filter from.
DRAFT_GAP = 1.5
# Lanczos after a cheap integer reduce() down to 3x the target: the quality of a full Lanczos at a fraction of
# the cost (Pillow's `reducing_gap`).
REDUCING_GAP = 3.0
# zlib level 1 with the run-length strategy: ~4x faster than Pillow's default (level 6) on photos, for files
# ~10% larger; kohya reads every picture once (latents are cached).
PNG_OPTIONS: dict[str, int] = {"compress_level": 1, "compress_type": zlib.Z_RLE}
# A worker decodes one picture at a time (up to MAX_PIXELS x 4 bytes); more workers than this would only
# multiply that peak on a many-core machine for little gain over 25 pictures.
MAX_WORKERS = 8
# How often a prep worker checks that the daemon that started it still runs.
WATCH_INTERVAL_S = 0.5
UPLOAD_SUFFIX = ".upload"
NAMES_FILE = "names.json"


class ImageProblem(BadInput):
    """A picture that cannot be used; the message names the client's file."""


@dataclass(frozen=True)
class Upload:
    """A stored upload: our own file name on disk, the client's name only for messages."""

    path: Path
    client_name: str


def display_name(raw: str | None, index: int) -> str:
    """A file name safe to echo in an error message (never used as a path)."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:80]
    return name or f"image #{index + 1}"


def check_count(count: int) -> None:
    if count < MIN_IMAGES:
        raise BadInput(
            f"Only {count} image(s) were sent; a character LoRA needs {MIN_IMAGES} to {MAX_IMAGES} pictures.",
            key="images",
            hint="Add more pictures of the character from different angles and settings.",
        )
    if count > MAX_IMAGES:
        raise BadInput(
            f"{count} images were sent; at most {MAX_IMAGES} are accepted.",
            key="images",
            hint="Keep the best, most varied pictures.",
        )


# ------------------------------------------------------------------------------------------ names
def write_upload_names(folder: Path, uploads: Sequence[Upload]) -> None:
    """Remember the client's file names next to the uploads, so a job failing later can name the picture."""
    write_json_map(folder / NAMES_FILE, {u.path.name: u.client_name for u in uploads})


def read_uploads(folder: Path) -> list[Upload]:
    """The stored uploads in order, with the client's names where they were recorded."""
    names = read_json_map(folder / NAMES_FILE)
    files = sorted(p for p in folder.iterdir() if p.suffix == UPLOAD_SUFFIX and p.is_file())
    return [Upload(p, str(names.get(p.name) or p.name)) for p in files]


# ---------------------------------------------------------------------------------------- checking
# What pictures are read as: the formats cameras, phones, browsers and editors save (a phone's JPEG with MPF
# extensions opens as JPEG). Never all that Pillow knows: it renders an EPS by running Ghostscript on the file,
# a program with a long record of sandbox escapes, and it has decoders for dozens of rare formats nobody trains on.
PICTURE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


def open_picture(path: Path | str) -> Image.Image:
    """Image.open limited to PICTURE_FORMATS: anything else raises UnidentifiedImageError (one of READ_ERRORS)."""
    return Image.open(path, formats=PICTURE_FORMATS)


def unreadable_problem(client_name: str, exc: BaseException) -> ImageProblem:
    if isinstance(exc, Image.DecompressionBombError):  # Pillow refuses headers claiming over ~179 MP
        return ImageProblem(
            f"'{client_name}' claims more pixels than any camera makes, too large to process.",
            key="images",
            hint="Scale it down below 80 megapixels.",
        )
    return ImageProblem(
        f"'{client_name}' is not a picture that can be read ({type(exc).__name__}).",
        key="images",
        hint="Use PNG, JPEG or WebP files.",
    )


# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose does).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright). JPEG and WebP carry it in the header; Pillow may decode a PNG to
    find its eXIf chunk."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: the picture is shown as stored, as Pillow's exif_transpose does
        return 1
    return value if value in UPRIGHT else 1


def upright_size(img: Image.Image) -> Size:
    """The picture's size once turned upright by its EXIF orientation."""
    width, height = img.size
    return (height, width) if orientation(img) in (5, 6, 7, 8) else (width, height)


def check_size(size: Size, client_name: str) -> None:
    """Refuse sizes that are too large, too small or too elongated: decided from the header alone (every
    check is the same for the picture turned by its EXIF orientation)."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageProblem(
            f"'{client_name}' is {width}×{height} pixels, too large to process.",
            key="images",
            hint="Scale it down below 80 megapixels.",
        )
    if min(width, height) < MIN_SIDE:
        raise ImageProblem(
            f"'{client_name}' is only {width}×{height} pixels; pictures need at least {MIN_SIDE} px a side.",
            key="images",
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageProblem(
            f"'{client_name}' is {width}×{height} pixels, more elongated than 1:{MAX_ASPECT:g}.",
            key="images",
            hint="Crop it closer to the character (at most six times as long as it is wide).",
        )


# Pillow's own bomb guard (a warning from 89 MP, an error from 179 MP) fires in Image.open, before our
# check_size; pictures over MAX_PIXELS are refused by check_size before anything is decoded either way.
READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def jpeg_is_complete(data: bytes | mmap.mmap) -> bool:
    """True when the JPEG's segments parse and its entropy-coded data runs to an end-of-image marker.

    Walks the marker segments by their lengths up to the first start-of-scan (so the complete JPEG thumbnail
    inside a camera's EXIF block is skipped, not mistaken for the picture), then looks for EOI after it:
    scan data never contains FF D9 (0xFF bytes are stuffed). A file cut short in transfer has none. Data after
    EOI (a phone's motion-photo trailer) is allowed.
    """
    if data[:2] != b"\xff\xd8":
        return False
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2:
            return False
        if marker == 0xDA:  # start of scan
            return data.rfind(b"\xff\xd9", pos + 2 + length) != -1  # from the end: EOI is normally last
        pos += 2 + length
    return False


def check_image(upload: Upload) -> None:
    """Raise ImageProblem naming the file unless it looks like a usable picture.

    Cheap on purpose (it runs while the upload request waits; see bench/upload_speed.py): the header, the size
    rules, and that the file is complete: a JPEG's structure to its end marker, a PNG's chunks and CRCs (no
    inflate). Decoding a 12 MP JPEG, even at 1/8 scale, still reads every entropy-coded byte (~30 ms of CPU a
    picture); that full decode happens in prep, which fails the job naming the file if it breaks there.
    """
    try:
        with open_picture(upload.path) as img:
            check_size(img.size, upload.client_name)
            if img.format == "JPEG":
                with upload.path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    complete = jpeg_is_complete(data)  # mapped, not read: the tail is all it touches
                if not complete:
                    raise OSError("the JPEG data is incomplete")
            elif img.format == "PNG":
                img.verify()
            else:
                img.load()  # WebP and the rest: no cheap structural check; they are rarely camera-sized
    except ImageProblem:
        raise
    except READ_ERRORS as exc:
        raise unreadable_problem(upload.client_name, exc) from exc


def check_images(uploads: Sequence[Upload]) -> None:
    """check_image for each upload, a few at a time (Pillow decodes without the GIL); the first bad one raises."""
    if not uploads:
        return
    with ThreadPoolExecutor(max_workers=prep_workers(len(uploads))) as pool:
        futures = [pool.submit(check_image, u) for u in uploads]
    for future in futures:  # in upload order, so the error names the first bad file
        future.result()


# -------------------------------------------------------------------------------------------- prep
def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


# Pillow's modes for grey with more than 8 bits (16-bit PNG/TIFF: "I;16"..., 32-bit integer "I", float "F")
_WIDE_GREY = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def eight_bit(img: Image.Image) -> Image.Image:
    """8-bit grey ("L") for a wider grey picture, scaled to its bit depth; any other picture as it is.

    Pillow's convert("RGB"/"L") clips such values instead of scaling them: a 16-bit PNG would turn almost white.
    The depth is read from the values: above 255 they are 16-bit, a float picture at most 1.0 is 0..1.
    """
    if img.mode not in _WIDE_GREY:
        return img
    _, high = img.getextrema()
    if img.mode == "F" and high <= 1.0:
        scale = 255.0
    elif high > 255:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return img.convert("F").point(lambda v: v * scale).convert("L")


def flatten_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent parts become white (kohya would otherwise see whatever colour hides under alpha 0)."""
    if _has_alpha(img):
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        canvas.alpha_composite(img.convert("RGBA"))
        return canvas.convert("RGB")
    return img.convert("RGB")


def fit_picture(img: Image.Image, resolution: int) -> Image.Image:
    """Upright (EXIF), RGB on white, scaled down (never up) to at most resolution² pixels, shape kept.

    Decodes `img` (raising Pillow's error if its data is broken). Memory: the decoded picture plus at most one
    converted copy of it (w × h, whatever the shape); turning and flattening happen after the scale-down.
    """
    turn = UPRIGHT.get(orientation(img)) if img.format == "JPEG" else None  # JPEG's EXIF is in the header
    if img.format == "JPEG":
        stored_target = _stored(prep_size(_turned(img.size, turn), resolution), turn)
        # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT: most of the speed-up for camera pictures.
        img.draft("RGB", (int(stored_target[0] * DRAFT_GAP), int(stored_target[1] * DRAFT_GAP)))
    # Decoded here, before anything that could swallow a decode error (a PNG's EXIF may follow its pixels).
    img.load()
    if img.format != "JPEG":
        turn = UPRIGHT.get(orientation(img))
        stored_target = _stored(prep_size(_turned(img.size, turn), resolution), turn)
    img = eight_bit(img)
    if _has_alpha(img):
        img = img.convert("RGBA")  # Pillow resizes RGBA with premultiplied alpha: no dark fringes
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != stored_target:
        img = img.resize(stored_target, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    if turn is not None:
        img = img.transpose(turn)
    return flatten_rgb(img)


def crop_upright(img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The part `box` (x, y, w, h, in upright pixels) of `img`, upright; decodes the whole picture."""
    img.load()
    turn = UPRIGHT.get(orientation(img))
    upright = img.transpose(turn) if turn is not None else img
    x, y, w, h = box
    part = upright.crop((x, y, x + w, y + h))
    # Pillow copies `info` (EXIF, XMP) into the crop: without it fit_picture does not turn the picture again
    part.info = {k: v for k, v in img.info.items() if k == "transparency"}
    return part


def _turned(size: Size, turn: Image.Transpose | None) -> Size:
    """The upright size of a picture stored as `size` that `turn` makes upright."""
    sideways = turn in (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                        Image.Transpose.ROTATE_90)
    return (size[1], size[0]) if sideways else size


def _stored(upright: Size, turn: Image.Transpose | None) -> Size:
    return _turned(upright, turn)  # a quarter turn swaps the sides both ways


@dataclass(frozen=True)
class PrepTask:
    source: str
    target: str
    client_name: str
    resolution: int
    caption: str
    crop: tuple[int, int, int, int] | None = None  # (x, y, w, h) in upright pixels: the face crop


@dataclass(frozen=True)
class PrepResult:
    size: Size  # as written
    error: str | None = None  # a sentence naming the picture when it could not be used


def prep_one(task: PrepTask) -> PrepResult:
    """One picture to `NNN.png` + `NNN.txt`. Top-level and picklable: it runs in a worker process."""
    try:
        with open_picture(task.source) as img:
            check_size(img.size, task.client_name)  # before any decode
            out = fit_picture(img if task.crop is None else crop_upright(img, task.crop), task.resolution)
    except ImageProblem as exc:
        return PrepResult((0, 0), exc.message)
    except READ_ERRORS as exc:
        return PrepResult((0, 0), unreadable_problem(task.client_name, exc).message)
    # Errors from here on (a full disk, ...) are not the picture's fault: they propagate as they are.
    out.save(task.target, format="PNG", **PNG_OPTIONS)
    Path(task.target).with_suffix(".txt").write_text(task.caption + "\n", encoding="utf-8")
    return PrepResult(out.size)


def prep_workers(jobs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, jobs, MAX_WORKERS))


def _mp_context() -> multiprocessing.context.BaseContext:
    """Never plain fork: the daemon has threads (asyncio.to_thread), and forking a threaded process can leave a
    lock held forever in the child.

    Where there is a fork server (Linux, macOS) workers fork from it: it starts once per daemon with only this
    module imported, so a pool starts in milliseconds. Spawn (Windows) starts a fresh interpreter per worker.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Instead of the default ['__main__']: the daemon's __main__ would import the whole web stack.
    context.set_forkserver_preload([__name__])
    return context


def prep_pool(jobs: int) -> ProcessPoolExecutor:
    """Worker processes for `jobs` pictures: no more than the cores, each ending itself if the daemon dies."""
    me = psutil.Process()
    return ProcessPoolExecutor(max_workers=prep_workers(jobs), mp_context=_mp_context(),
                               initializer=_watch_daemon, initargs=(me.pid, me.create_time()))


def _watch_daemon(pid: int, created: float) -> None:
    """Worker initializer. A pool's workers wait on a queue the daemon feeds; if the daemon is killed (SIGKILL,
    power cut) nothing ever closes it, so without this they would wait for ever."""

    def watch() -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            try:
                daemon = psutil.Process(pid)
                # The same process (not a reused pid), and not a killed one its parent has yet to reap.
                alive = daemon.create_time() == created and daemon.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                os._exit(1)

    threading.Thread(target=watch, name="watch-daemon", daemon=True).start()


def caption(trigger: str, class_token: str) -> str:
    """Trigger first, so kohya's keep_tokens=1 always keeps it in place."""
    return f"{trigger} {class_token}".strip()


@dataclass(frozen=True)
class PreparedImage:
    path: Path
    size: Size


def prepare_images(uploads: Sequence[Upload], image_dir: Path, *, size: int, text: str,
                   captions: Sequence[str] = (),
                   crops: Sequence[tuple[int, int, int, int] | None] | None = None) -> list[PreparedImage]:
    """Write `NNN.png` + `NNN.txt` per upload into `image_dir` (created), in worker processes.

    Each caption file is `text` (the fixed `<trigger> <class>`), then that upload's own part from `captions`
    (cleaned, aligned with `uploads`; none given = `text` alone). `crops`: per upload, the face crop box (upright
    x, y, w, h) applied before the scale-down, or None. Raises ImageProblem naming the first upload (in order)
    that cannot be decoded.
    """
    if captions and len(captions) != len(uploads):
        raise ValueError(f"{len(captions)} captions for {len(uploads)} uploads")
    own = list(captions) or [""] * len(uploads)
    image_dir.mkdir(parents=True, exist_ok=True)
    tasks = [
        PrepTask(str(u.path), str(image_dir / f"{i + 1:03d}.png"), u.client_name, size,
                 caption_text(text, own[i]), crops[i] if crops is not None and i < len(crops) else None)
        for i, u in enumerate(uploads)
    ]
    if not tasks:
        return []
    with prep_pool(len(tasks)) as pool:
        results = list(pool.map(prep_one, tasks))
    for result in results:
        if result.error is not None:
            raise ImageProblem(result.error, key="images", hint="Remove or replace that picture and start again.")
    return [PreparedImage(Path(t.target), r.size) for t, r in zip(tasks, results, strict=True)]
