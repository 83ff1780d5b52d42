"""Where to crop a picture around its face: head and shoulders, square, inside the picture. Pure.

The same function serves the tab's preview (POST /pictures/faces) and prep, so the user sees the crop that
training gets. Boxes are in the picture's upright pixels (EXIF orientation applied).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from daemon.pipeline.buckets import Size

# The crop's side is this many face heights: the Haar box covers brows to chin, so 3x leaves the hair above and
# the shoulders below (a head-and-shoulders portrait), enough context for the LoRA to learn more than a mask.
MARGIN = 3.0
# The face sits a little above the crop's centre, as in a portrait: its centre at 40% of the height from the top.
FACE_CENTRE_Y = 0.4


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Box | None:
        """A box from the detector's JSON; None for null or anything that is not a box of positive size."""
        if not isinstance(data, dict):
            return None
        values = [data.get(k) for k in ("x", "y", "w", "h")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return None
        box = cls(*values)  # type: ignore[arg-type]
        return box if box.w > 0 and box.h > 0 and box.x >= 0 and box.y >= 0 else None

    def scaled(self, sx: float, sy: float) -> Box:
        return Box(round(self.x * sx), round(self.y * sy), max(1, round(self.w * sx)), max(1, round(self.h * sy)))


def crop_box(face: Box, size: Size, *, min_side: int, margin: float = MARGIN) -> Box:
    """The square crop around `face` in a picture of `size`.

    Its side is `margin` face heights, but at least `min_side` (the training resolution: a smaller crop would be
    scaled up by kohya) and at most the picture's shorter side; it is moved, never shrunk, to stay inside the
    picture. A face larger than the picture allows gets the largest square that holds it best.
    """
    width, height = size
    side = round(max(face.w, face.h) * margin)
    side = max(side, min_side)
    side = min(side, width, height)
    centre_x = face.x + face.w / 2
    centre_y = face.y + face.h / 2
    x = round(centre_x - side / 2)
    y = round(centre_y - side * FACE_CENTRE_Y)
    x = min(max(0, x), width - side)
    y = min(max(0, y), height - side)
    return Box(x, y, side, side)


def clamp_face(face: Box, size: Size) -> Box | None:
    """`face` cut to the picture (a detector rounding past the edge); None when nothing of it is inside."""
    width, height = size
    x, y = min(face.x, width), min(face.y, height)
    w, h = min(face.w, width - x), min(face.h, height - y)
    return Box(x, y, w, h) if w > 0 and h > 0 else None
