"""Picture sizes and kohya's aspect-ratio buckets: how big prep makes each picture, which bucket kohya puts it in.

Pure. The bucket rules are those of sd-scripts 48d368fa `library/train_util.py:BucketManager.select_bucket`
with `bucket_no_upscale` (the mode our dataset TOML asks for): a picture larger than resolution² is scaled
down, keeping its aspect ratio, so that one side lands on a multiple of the bucket step; its bucket is then
its size rounded down to that step on both sides (kohya crops the rest). A smaller picture is never scaled up.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

Size = tuple[int, int]

BUCKET_STEP = 64  # kohya's bucket_reso_steps; SD1.x needs a multiple of 64


def _round_to_steps(x: float, step: int) -> int:
    rounded = int(x + 0.5)
    return rounded - rounded % step


def _kohya_resized_size(size: Size, max_area: int, step: int) -> Size:
    """The size kohya scales a picture of more than `max_area` pixels to (no-upscale mode)."""
    width, height = size
    aspect = width / height
    resized_width = math.sqrt(max_area * aspect)
    resized_height = max_area / resized_width
    # Round either the width or the height to the step, whichever keeps the aspect ratio better.
    w_rounded = _round_to_steps(resized_width, step)
    h_in_w = _round_to_steps(w_rounded / aspect, step)
    h_rounded = _round_to_steps(resized_height, step)
    w_in_h = _round_to_steps(h_rounded * aspect, step)
    if h_in_w and abs(w_rounded / h_in_w - aspect) < abs(w_in_h / h_rounded - aspect):
        return w_rounded, int(w_rounded / aspect + 0.5)
    return int(h_rounded * aspect + 0.5), h_rounded


def bucket_of(size: Size, resolution: int, step: int = BUCKET_STEP) -> Size:
    """The bucket (width, height) kohya assigns to a picture of `size` at `resolution` with bucket_no_upscale."""
    width, height = size
    if width * height > resolution * resolution:
        width, height = _kohya_resized_size(size, resolution * resolution, step)
    return width - width % step, height - height % step


def prep_size(size: Size, resolution: int, step: int = BUCKET_STEP) -> Size:
    """The size prep writes a picture at: never larger than it was, at most resolution² pixels.

    For a large picture this is the size kohya itself would scale it to, so kohya keeps our pixels as they
    are and crops at most one bucket step off one side.
    """
    width, height = size
    max_area = resolution * resolution
    if width * height <= max_area:
        return width, height
    width, height = _kohya_resized_size(size, max_area, step)
    # kohya's rounding can overshoot the area by a pixel row; trim the side that is not on the step.
    while width * height > max_area:
        if height % step:
            height -= 1
        else:
            width -= 1
    return width, height


def bucket_counts(sizes: Iterable[Size], resolution: int, step: int = BUCKET_STEP) -> dict[Size, int]:
    """How many of the pictures (sizes as prep wrote them) fall into each bucket."""
    return dict(Counter(bucket_of(size, resolution, step) for size in sizes))
