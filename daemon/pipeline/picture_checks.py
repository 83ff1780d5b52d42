"""Warnings about a set of training pictures, before the start: never blocking, each with what to do.

Per picture: `duplicate` (near the same photo as another: a perceptual hash), `small` (fewer pixels than the
training resolution: kohya's no-upscale buckets train it at its own small size), `blurry` (variance of the
Laplacian), `unreadable` (POST /train would refuse it). For the set: `same_shape` (a mild note) and `alike`
(most pictures near each other). The thresholds were measured: tests/fixtures/picture_checks/TABLE.md.

measure_picture decodes (the only I/O); everything after it is pure over the measures.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from daemon.pipeline.buckets import Size, bucket_of, prep_size
from daemon.pipeline.dataset import (
    DRAFT_GAP,
    READ_ERRORS,
    REDUCING_GAP,
    UPRIGHT,
    ImageProblem,
    check_size,
    eight_bit,
    open_picture,
    orientation,
    unreadable_problem,
    upright_size,
)

# Hamming distance between two 64-bit pHashes at or below which two pictures are "the same photo" (re-saved,
# resized, recoloured or cropped by 5%: measured 0-10) rather than two photos of one person (measured 18-40).
DUPLICATE_DISTANCE = 12
# Two pictures this near are "alike" (the same place, pose and framing); `alike` when most pairs are.
ALIKE_DISTANCE = 20
ALIKE_SHARE = 0.5
# A picture is `small` when it has fewer than this share of resolution² pixels: its bucket then loses more
# than one 64 px step on each side (448×448 is 77% of 512²).
SMALL_SHARE = 0.75
# The 90th-percentile tile's variance of the Laplacian (gray, at the size kohya trains at) below which a
# picture is `blurry`: measured 107-15723 for in-focus pictures, 4-67 once blurred by 2 px (at 512 px) or more.
BLUR_THRESHOLD = 80.0
# Sharpness is judged on the sharpest parts: a portrait's blurred background must not make it "blurry".
BLUR_GRID = 6
BLUR_PERCENTILE = 90
# `same_shape` only says something for a set big enough to choose crops from.
SAME_SHAPE_MIN = 4
SAME_SHAPE_TOLERANCE = 0.02


@dataclass(frozen=True)
class Warning:
    code: str
    message: str
    hint: str
    others: tuple[int, ...] = ()  # for `duplicate`: the indexes of the pictures it is near

    def to_json(self) -> dict[str, object]:
        body = asdict(self)
        body["others"] = list(self.others)
        return body


@dataclass(frozen=True)
class Measure:
    """What the checks need from one picture; `problem` set (and the rest empty) when it cannot be read."""

    name: str
    size: Size | None = None  # upright, as the user sees it
    phash: imagehash.ImageHash | None = None
    sharpness: float | None = None
    problem: str | None = None


@dataclass(frozen=True)
class PictureReport:
    index: int
    name: str
    size: Size | None
    warnings: list[Warning] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "name": self.name,
                "width": self.size[0] if self.size else None, "height": self.size[1] if self.size else None,
                "warnings": [w.to_json() for w in self.warnings]}


@dataclass(frozen=True)
class Report:
    pictures: list[PictureReport]
    set: list[Warning]

    def to_json(self) -> dict[str, object]:
        return {"pictures": [p.to_json() for p in self.pictures],
                "set": [{"code": w.code, "message": w.message, "hint": w.hint} for w in self.set]}


# ------------------------------------------------------------------------------------------ measuring
def gray_at_training_size(img: Image.Image, resolution: int) -> Image.Image:
    """Upright grayscale at the size prep writes (never enlarged): the blur number then means the same for a
    phone's 12 MP and a 1 MP crop. JPEGs decode at 1/2..1/8 scale straight from the DCT (draft)."""
    upright = upright_size(img)
    turn = UPRIGHT.get(orientation(img))
    target = prep_size(upright, resolution)
    stored = (target[1], target[0]) if upright != img.size else target
    if img.format == "JPEG":
        img.draft("L", (int(stored[0] * DRAFT_GAP), int(stored[1] * DRAFT_GAP)))
    gray = eight_bit(img).convert("L")
    if gray.size != stored:
        gray = gray.resize(stored, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    return gray.transpose(turn) if turn is not None else gray


def sharpness(gray: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian (OpenCV's ksize=1 kernel), per tile of a BLUR_GRID² grid; the
    BLUR_PERCENTILE-th tile's value. A uniform picture (no edges anywhere) is 0."""
    g = np.asarray(gray, dtype=np.float32)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    rows = np.array_split(np.arange(lap.shape[0]), min(BLUR_GRID, lap.shape[0]))
    cols = np.array_split(np.arange(lap.shape[1]), min(BLUR_GRID, lap.shape[1]))
    tiles = [float(lap[r[0]:r[-1] + 1, c[0]:c[-1] + 1].var()) for r in rows for c in cols]
    return float(np.percentile(tiles, BLUR_PERCENTILE))


def measure_picture(path: Path, name: str, resolution: int) -> Measure:
    """Decode once and measure; never raises for a bad picture (its problem is the sentence /train would say)."""
    try:
        with open_picture(path) as img:
            size = upright_size(img)
            check_size(size, name)  # refuses a bomb before any decode
            gray = gray_at_training_size(img, resolution)
    except ImageProblem as exc:
        return Measure(name, problem=exc.message)
    except READ_ERRORS as exc:
        return Measure(name, problem=unreadable_problem(name, exc).message)
    return Measure(name, size=size, phash=imagehash.phash(gray), sharpness=sharpness(gray))


def measure_pictures(items: Sequence[tuple[Path, str]], resolution: int, workers: int) -> list[Measure]:
    """measure_picture for each, a few at a time: Pillow decodes and numpy computes without the GIL."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        return list(pool.map(lambda item: measure_picture(item[0], item[1], resolution), items))


# ------------------------------------------------------------------------------------------- deciding
def small_warning(m: Measure, resolution: int) -> Warning | None:
    if m.size is None or m.size[0] * m.size[1] >= SMALL_SHARE * resolution * resolution:
        return None
    width, height = m.size
    bucket = bucket_of(m.size, resolution)
    return Warning(
        "small",
        f"'{m.name}' is only {width}×{height} pixels, fewer than the {resolution}×{resolution} the LoRA trains at: "
        f"kohya does not enlarge it, it trains it at {bucket[0]}×{bucket[1]}, so it teaches little detail.",
        f"Use a larger original of this picture (at least {resolution}×{resolution} pixels, or a crop of a "
        "larger photo), or remove it if the set has enough others.",
    )


def blurry_warning(m: Measure) -> Warning | None:
    if m.sharpness is None or m.sharpness >= BLUR_THRESHOLD:
        return None
    return Warning(
        "blurry",
        f"'{m.name}' looks blurry (sharpness {m.sharpness:.0f}, below {BLUR_THRESHOLD:.0f}): "
        "the LoRA learns the blur along with the character.",
        "Replace it with a sharp photo of the same view, or remove it; keep it only if it shows something "
        "no other picture does.",
    )


def unreadable_warning(m: Measure) -> Warning | None:
    if m.problem is None:
        return None
    return Warning("unreadable", m.problem, "Remove or replace this picture: starting would be refused with it.")


def distances(measures: Sequence[Measure]) -> dict[tuple[int, int], int]:
    """Hamming distance of every pair (i < j) of readable pictures."""
    hashed = [(i, m.phash) for i, m in enumerate(measures) if m.phash is not None]
    return {(i, j): int(a - b) for (i, a), (j, b) in itertools.combinations(hashed, 2)}


def duplicate_warnings(measures: Sequence[Measure], pairs: dict[tuple[int, int], int]) -> dict[int, Warning]:
    near: dict[int, list[int]] = {}
    for (i, j), d in pairs.items():
        if d <= DUPLICATE_DISTANCE:
            near.setdefault(i, []).append(j)
            near.setdefault(j, []).append(i)
    result = {}
    for i, others in near.items():
        others.sort()
        names = ", ".join(f"'{measures[j].name}'" for j in others[:3]) + (" …" if len(others) > 3 else "")
        result[i] = Warning(
            "duplicate",
            f"'{measures[i].name}' is nearly the same picture as {names}: the LoRA sees that view "
            f"{len(others) + 1} times as often as the others and copies it.",
            "Keep the best one of them and remove the others, or replace them with different views "
            "(another angle, place, light or outfit).",
            tuple(others),
        )
    return result


def same_shape_warning(measures: Sequence[Measure]) -> Warning | None:
    sizes = [m.size for m in measures if m.size is not None]
    if len(sizes) < SAME_SHAPE_MIN:
        return None
    aspects = [w / h for w, h in sizes]
    if max(aspects) > min(aspects) * (1 + SAME_SHAPE_TOLERANCE):
        return None
    width, height = sizes[0]
    ratio = math.gcd(width, height)
    shape = f"{width // ratio}:{height // ratio}" if max(width, height) // ratio <= 32 else f"{aspects[0]:.2f}:1"
    return Warning(
        "same_shape",
        f"All {len(sizes)} pictures have the same shape ({shape}). That is fine for training; it often means "
        "they were all framed the same way.",
        "If they are all the same framing, mix in close-ups, half and full figures: the LoRA then draws the "
        "character at any distance.",
    )


def alike_warning(pairs: dict[tuple[int, int], int], readable: int) -> Warning | None:
    if readable < 3 or not pairs:
        return None
    near = sum(1 for d in pairs.values() if d <= ALIKE_DISTANCE)
    if near <= ALIKE_SHARE * len(pairs):
        return None
    return Warning(
        "alike",
        f"Most of the pictures look alike ({near} of {len(pairs)} pairs are near each other): the LoRA learns "
        "that one scene, not the character.",
        "Use pictures with different backgrounds, poses, distances, light and clothes; the character is what "
        "they should have in common.",
    )


def check(measures: Sequence[Measure], resolution: int) -> Report:
    """All warnings, per picture (in upload order) and for the set. Pure."""
    pairs = distances(measures)
    duplicates = duplicate_warnings(measures, pairs)
    pictures = []
    for index, m in enumerate(measures):
        found = [unreadable_warning(m), duplicates.get(index), small_warning(m, resolution), blurry_warning(m)]
        pictures.append(PictureReport(index, m.name, m.size, [w for w in found if w is not None]))
    readable = sum(1 for m in measures if m.problem is None)
    found_set = [alike_warning(pairs, readable), same_shape_warning(measures)]
    return Report(pictures, [w for w in found_set if w is not None])


def check_pictures(items: Sequence[tuple[Path, str]], resolution: int, *, workers: int = 2) -> Report:
    return check(measure_pictures(items, resolution, workers), resolution)
