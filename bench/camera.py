"""Camera-like JPEGs for the prep and upload benchmarks: 12 MP, quality 90, ~4-5 MB each.

Smooth gradients (the scene) plus grain at half resolution (sensor noise and texture): it compresses like a
photo, unlike flat colour (a few KB) or pure per-pixel noise (7+ MB).
"""

from __future__ import annotations

import io

from PIL import Image, ImageChops

CAMERA_SIZE = (4000, 3000)


def camera_jpeg(index: int, *, size: tuple[int, int] = CAMERA_SIZE, portrait: bool = False) -> bytes:
    width, height = (size[1], size[0]) if portrait else size
    ramps = [Image.linear_gradient("L"), Image.radial_gradient("L"), Image.linear_gradient("L").rotate(90)]
    # Rotate the channels per picture so the set is not 25 copies of one picture.
    ramps = ramps[index % 3:] + ramps[:index % 3]
    scene = Image.merge("RGB", [r.resize((width, height)) for r in ramps])
    grain = Image.effect_noise((width // 2, height // 2), 40).resize((width, height), Image.Resampling.BILINEAR)
    picture = ImageChops.add(scene, grain.convert("RGB"), scale=1.0, offset=-128)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
