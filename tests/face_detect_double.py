"""Test double of daemon/pipeline/face_detect.py: the same command line, input checks, JSON and exit codes, no OpenCV.

The daemon runs it with the kohya python (the test venv's), pointed at it by `kohya.face_detect_script`. The "face"
is the bounding box of the pure red pixels (R > 200, G and B < 60) in each picture, so a test draws its face where
it wants it (Pillow reads the pictures). Knobs (environment):

- FACE_DOUBLE_MODE: "ok" (default); "no_cv2" (exit 3 and the real script's sentence, also for --check); "hang"
  (starts a child that sleeps, then sleeps itself: for the daemon's timeout and tree kill); "crash" (a traceback,
  exit 1); "garbage" (exit 0 printing something that is not the JSON).
- FACE_DOUBLE_PIDS: a file where "hang" writes its pid and its child's, one per line.
- FACE_DOUBLE_SECONDS: sleep this long before answering in "ok" mode (to watch a request in flight).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image


def fail(code: int, message: str) -> None:
    print(f"face_detect: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def red_box(path: str) -> dict:
    if not os.path.isfile(path):
        return {"width": 0, "height": 0, "face": None, "error": "cannot be read as a picture"}
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except OSError:
        return {"width": 0, "height": 0, "face": None, "error": "cannot be read as a picture"}
    pixels = np.asarray(rgb).astype(int)
    mask = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    ys, xs = np.nonzero(mask)
    width, height = rgb.size
    face = None
    if len(xs):
        x, y = int(xs.min()), int(ys.min())
        face = {"x": x, "y": y, "w": int(xs.max()) - x + 1, "h": int(ys.max()) - y + 1}
    return {"width": width, "height": height, "face": face, "error": None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("list", nargs="?", default="-")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    mode = os.environ.get("FACE_DOUBLE_MODE", "ok")
    if mode == "no_cv2":
        fail(3, f"OpenCV (cv2) is not installed in {sys.executable} (No module named 'cv2'); install opencv-python "
                "into that venv (sd-scripts' requirements include it).")
    if args.check:
        print(json.dumps({"available": True, "opencv": "double", "cascade": "red pixels"}))
        return 0
    if mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        if pids := os.environ.get("FACE_DOUBLE_PIDS"):
            with open(pids, "w", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n{child.pid}\n")
        time.sleep(600)
    if mode == "crash":
        raise RuntimeError("the face double crashed as asked")
    if mode == "garbage":
        print("this is not JSON")
        return 0
    try:
        if args.list == "-":
            data = json.load(sys.stdin)
        else:
            with open(args.list, encoding="utf-8") as fh:
                data = json.load(fh)
    except (OSError, ValueError) as exc:
        fail(2, f"cannot read the list of pictures from {args.list}: {exc}")
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        fail(2, "the input must be a JSON list of picture paths")
    time.sleep(float(os.environ.get("FACE_DOUBLE_SECONDS", "0")))
    print(json.dumps({"pictures": [red_box(p) for p in data]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
