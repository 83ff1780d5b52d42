"""Benchmark: what the face crop adds to prep, for 25 camera JPEGs (12 MP) with a real face in each.

Baseline in the same run: prep without the crop. Measured: finding the faces (the daemon's upright copies plus
face_detect.py in the kohya venv, OpenCV's Haar cascade) and prep with the crops (it decodes each picture whole
before cropping, where plain prep decodes JPEGs at 1/2-1/8 scale). Each picture is a camera-like JPEG with the
public-domain astronaut portrait (tests/fixtures/face_crop) pasted in at 1200 px, somewhere else in each.

    eval "$(bash /work/shared/harness/real_kohya.sh env)"   # or any python with opencv as --python
    python bench/face_crop_speed.py --python "$KH_PY" [--images 25] [--resolution 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.camera import camera_jpeg
from daemon.config import parse_config
from daemon.pipeline.dataset import Upload, prep_workers, prepare_images
from daemon.pipeline.faces import find_faces

PORTRAIT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "face_crop" / "astronaut.jpg"


def photo(index: int) -> bytes:
    base = Image.open(io.BytesIO(camera_jpeg(index)))
    face = Image.open(PORTRAIT).resize((1200, 1200))
    base.paste(face, (200 + 120 * index % 2400, 100 + 60 * index % 1600))
    buf = io.BytesIO()
    base.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=os.environ.get("KH_PY") or sys.executable, help="a python with opencv")
    parser.add_argument("--images", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="face-bench-"))
    try:
        config = parse_config({"data_dir": str(root / "data"), "token": "x" * 32, "kohya": {"python": args.python}},
                              base_dir=root)
        src = root / "uploads"
        src.mkdir()
        uploads = []
        for i in range(args.images):
            path = src / f"{i + 1:03d}.upload"
            path.write_bytes(photo(i))
            uploads.append(Upload(path, f"IMG_{i:04d}.jpg"))
        print(f"{args.images} JPEGs 4000x3000 with a face; {os.cpu_count()} cores, {prep_workers(args.images)} prep "
              f"workers, resolution {args.resolution}; finder python {args.python}")
        plain_s, find_s, crop_s = [], [], []
        found = 0
        for r in range(args.repeat):
            start = time.perf_counter()
            prepare_images(uploads, root / f"plain{r}", size=args.resolution, text="ohwx woman")
            plain_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = asyncio.run(find_faces(config, [u.path for u in uploads], root / f"faces{r}",
                                            min_side=args.resolution))
            find_s.append(time.perf_counter() - start)
            if not result.available:
                raise SystemExit(f"the face finder cannot run: {result.problem}")
            crops = [(c.x, c.y, c.w, c.h) if (c := p.crop) else None for p in result.pictures]
            found = sum(c is not None for c in crops)
            start = time.perf_counter()
            prepare_images(uploads, root / f"crop{r}", size=args.resolution, text="ohwx woman", crops=crops)
            crop_s.append(time.perf_counter() - start)
        med = statistics.median
        runs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"prep, whole pictures (baseline) : median {med(plain_s):6.2f} s  (runs: {runs(plain_s)})")
        print(f"finding the faces               : median {med(find_s):6.2f} s  (runs: {runs(find_s)}); "
              f"{found}/{args.images} faces found")
        print(f"prep with the crops             : median {med(crop_s):6.2f} s  (runs: {runs(crop_s)})")
        extra = med(find_s) + med(crop_s) - med(plain_s)
        print(f"the face crop adds              : {extra:6.2f} s to prep "
              f"({extra / args.images * 1000:.0f} ms a picture)")
        if hasattr(os, "getloadavg"):
            print(f"load average                    : {os.getloadavg()[0]:.2f} (1 min) at the end")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
