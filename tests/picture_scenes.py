"""Synthetic but photo-like pictures of "one person" for the picture-check tests and their calibration.

A scene: a lit background (gradient plus furniture-like shapes), a figure whose colours and proportions come
from the person's seed (hair, skin, clothes stay the same across that person's pictures; pose, framing, place
and light change), a soft lens blur and sensor grain. Edges are as soft as a real photo's, the grain as
fine, so the blur measure and the perceptual hash see what they would see in photos.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Person:
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    head: float  # head height relative to the figure


def person(seed: int) -> Person:
    rng = random.Random(seed)
    return Person(
        skin=(rng.randint(150, 235), rng.randint(110, 190), rng.randint(90, 160)),
        hair=(rng.randint(10, 120), rng.randint(10, 80), rng.randint(0, 60)),
        shirt=(rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)),
        head=rng.uniform(0.22, 0.3),
    )


def _background(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int]) -> None:
    width, height = size
    top = [rng.randint(40, 230) for _ in range(3)]
    bottom = [rng.randint(20, 200) for _ in range(3)]
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line([(0, y), (width, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    for _ in range(rng.randint(4, 9)):  # furniture, windows, plants
        x0, y0 = rng.uniform(-0.1, 0.9) * width, rng.uniform(0, 0.9) * height
        w, h = rng.uniform(0.05, 0.4) * width, rng.uniform(0.05, 0.5) * height
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        box = (x0, y0, x0 + w, y0 + h)
        (draw.rectangle if rng.random() < 0.6 else draw.ellipse)(box, fill=colour)
        for _ in range(rng.randint(0, 6)):  # texture: shelves, frames, stripes
            yy = rng.uniform(y0, y0 + h)
            draw.line([(x0, yy), (x0 + w, yy)], fill=tuple(max(0, c - 50) for c in colour), width=max(1, width // 400))


def _figure(draw: ImageDraw.ImageDraw, who: Person, box: Box) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    head_h = h * who.head
    cx = (x0 + x1) / 2
    draw.rounded_rectangle((x0, y0 + head_h * 0.9, x1, y1), radius=w * 0.25, fill=who.shirt)  # body
    head = (cx - head_h * 0.38, y0, cx + head_h * 0.38, y0 + head_h)
    draw.ellipse(head, fill=who.skin)
    draw.chord((head[0] - 2, head[1] - 4, head[2] + 2, head[3] - head_h * 0.3), 180, 360, fill=who.hair)
    eye_y = y0 + head_h * 0.5
    for dx in (-0.14, 0.14):
        ex = cx + dx * head_h
        draw.ellipse((ex - head_h * 0.05, eye_y - head_h * 0.03, ex + head_h * 0.05, eye_y + head_h * 0.03),
                     fill=(30, 20, 20))
    draw.arc((cx - head_h * 0.12, y0 + head_h * 0.62, cx + head_h * 0.12, y0 + head_h * 0.8), 20, 160,
             fill=(120, 40, 40), width=max(1, int(head_h * 0.02)))


def scene(who: Person, seed: int, size: tuple[int, int] = (1024, 768), *, grain: float = 5.0) -> Image.Image:
    """One photo of `who`: `seed` picks the place, the pose and the framing."""
    rng = random.Random(seed * 7919 + 17)
    width, height = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    _background(draw, rng, size)
    fig_h = rng.uniform(0.5, 1.3) * height  # from a full figure to a close-up cut off at the bottom
    fig_w = fig_h * rng.uniform(0.3, 0.42)
    x0 = rng.uniform(0.05, 0.95) * width - fig_w / 2
    y0 = rng.uniform(0.02, 0.3) * height
    _figure(draw, who, (x0, y0, x0 + fig_w, y0 + fig_h))
    img = img.filter(ImageFilter.GaussianBlur(0.6 * width / 1024))  # the lens: no edge is one pixel sharp
    noise = np.random.default_rng(seed).normal(0.0, grain, (height, width, 1))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def jpeg(img: Image.Image, quality: int = 90, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def blurred(img: Image.Image, radius_at_512: float) -> Image.Image:
    """Out of focus or shaken by `radius_at_512` pixels as seen at 512 px on the shorter side."""
    return img.filter(ImageFilter.GaussianBlur(radius_at_512 * min(img.size) / 512))


def bokeh(img: Image.Image, who: Person, seed: int) -> Image.Image:
    """A portrait: a sharp figure in front of a strongly blurred background."""
    rng = random.Random(seed)
    width, height = img.size
    back = img.filter(ImageFilter.GaussianBlur(6 * min(img.size) / 512))
    draw = ImageDraw.Draw(back)
    fig_h = 0.9 * height
    x0 = rng.uniform(0.3, 0.6) * width
    _figure(draw, who, (x0, 0.1 * height, x0 + fig_h * 0.4, 0.1 * height + fig_h))
    sharp = back.filter(ImageFilter.GaussianBlur(0.6 * width / 1024))
    noise = np.random.default_rng(seed).normal(0.0, 5.0, (height, width, 1))
    return Image.fromarray(np.clip(np.asarray(sharp, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
