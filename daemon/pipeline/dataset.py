"""Turning the uploaded pictures into a kohya dataset folder: checked, upright, RGB, square, captioned."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.errors import BadInput

MIN_IMAGES = 8
MAX_IMAGES = 25
# Decompression bombs: a 25 MB PNG can claim gigapixels. 80 MP covers any real camera.
MAX_PIXELS = 80_000_000
MIN_SIDE = 64


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


def check_image(upload: Upload) -> None:
    """Raise BadInput naming the file unless it decodes as a usable picture."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(upload.path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise BadInput(
                        f"'{upload.client_name}' is {width}×{height} pixels, too large to process.",
                        key="images",
                        hint="Scale it down below 80 megapixels.",
                    )
                img.load()
    except BadInput:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadInput(
            f"'{upload.client_name}' is not a picture that can be read ({type(exc).__name__}).",
            key="images",
            hint="Use PNG, JPEG or WebP files.",
        ) from exc
    if min(width, height) < MIN_SIDE:
        raise BadInput(
            f"'{upload.client_name}' is only {width}×{height} pixels; pictures need at least {MIN_SIDE} px a side.",
            key="images",
        )


def square_rgb(img: Image.Image, size: int) -> Image.Image:
    """Upright (EXIF), RGB on white, centred on a square canvas, resized to `size`.

    Padding instead of cropping keeps the whole character in frame; kohya then needs no buckets.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        img = canvas.convert("RGB")
    else:
        img = img.convert("RGB")
    side = max(img.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def caption(trigger: str, class_token: str) -> str:
    """Trigger first, so kohya's keep_tokens=1 always keeps it in place."""
    return f"{trigger} {class_token}".strip()


def prepare_images(uploads: Sequence[Upload], image_dir: Path, *, size: int, text: str) -> list[Path]:
    """Write `NNN.png` + `NNN.txt` per upload into `image_dir` (created); returns the image paths."""
    image_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for index, upload in enumerate(uploads):
        with Image.open(upload.path) as img:
            out = square_rgb(img, size)
        target = image_dir / f"{index + 1:03d}.png"
        out.save(target, format="PNG")
        target.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        written.append(target)
    return written
