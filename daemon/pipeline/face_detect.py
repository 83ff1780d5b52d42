"""Find the largest face in each picture, with OpenCV's Haar cascade: run by the KOHYA venv's python.

Standalone on purpose (the standard library and cv2 only, nothing of the daemon): the sd-scripts venv already
has opencv, the daemon's own venv does not, and the cascade files ship inside the opencv wheel (no download).

    python face_detect.py LIST.json        # or "-" (the default): the JSON list is read from stdin
    python face_detect.py --check          # is cv2 and its cascade here? exit 0 when yes

LIST.json is a JSON list of picture paths (upright: the daemon applies EXIF orientation before). Output, on
stdout, one JSON object:

    {"pictures": [{"width": W, "height": H, "face": {"x", "y", "w", "h"} | null, "error": str | null}, ...]}

in the order of the list, boxes in the picture's own pixels. Exit codes: 0 done (a picture that cannot be read
has its "error", the others are still answered), 2 bad input (usage, not a JSON list of strings), 3 cv2 is not
installed, 4 the cascade file is missing. On 2-4 the reason is the last line of stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CASCADE = "haarcascade_frontalface_default.xml"
# Detection runs on a copy whose longer side is at most this: a face worth cropping around is far larger than
# the cascade's 24 px window at this size, and detectMultiScale's time grows with the pixels.
MAX_SIDE = 640
# Haar cascade settings from OpenCV's face-detection tutorial: 10% scale steps; 5 neighbours drops most false hits.
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5
# A face smaller than this share of the copy's shorter side is a bystander, not the subject (a full-length photo
# still has its face above it: about 5% of the height).
MIN_FACE_SHARE = 0.04

EXIT_BAD_INPUT = 2
EXIT_NO_CV2 = 3
EXIT_NO_CASCADE = 4


def fail(code: int, message: str) -> None:
    print(f"face_detect: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def load_cv2():  # type: ignore[no-untyped-def]
    try:
        import cv2  # here, so that a missing cv2 is an answer, not a traceback
    except ImportError as exc:
        fail(EXIT_NO_CV2, f"OpenCV (cv2) is not installed in {sys.executable} ({exc}); install opencv-python "
                          "into that venv (sd-scripts' requirements include it).")
    return cv2


def cascade_path(cv2) -> str:  # type: ignore[no-untyped-def]
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = os.path.join(folder, CASCADE) if folder else ""
    if not path or not os.path.isfile(path):
        fail(EXIT_NO_CASCADE, f"OpenCV {cv2.__version__} has no {CASCADE} (looked in {folder}); reinstall "
                              "opencv-python, whose wheel ships the cascade files.")
    return path


def read_list(source: str) -> list[str]:
    try:
        if source == "-":
            data = json.load(sys.stdin)
        else:
            with open(source, encoding="utf-8") as fh:
                data = json.load(fh)
    except (OSError, ValueError) as exc:
        fail(EXIT_BAD_INPUT, f"cannot read the list of pictures from {source}: {exc}")
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        fail(EXIT_BAD_INPUT, "the input must be a JSON list of picture paths")
    return data


def detect(cv2, classifier, path: str) -> dict:  # type: ignore[no-untyped-def]
    gray = cv2.imread(path, cv2.IMREAD_GRAYSCALE) if os.path.isfile(path) else None
    if gray is None:
        return {"width": 0, "height": 0, "face": None, "error": "cannot be read as a picture"}
    height, width = gray.shape[:2]
    scale = min(1.0, MAX_SIDE / max(width, height))
    small = gray if scale == 1.0 else cv2.resize(
        gray, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    least = max(24, round(min(small.shape[:2]) * MIN_FACE_SHARE))
    found = ()
    # Equalised first (it evens out lighting, as OpenCV's tutorial does), then as it is: equalising a picture of a
    # face on a large flat background can also wash the face out (seen in the real-Easy-Diffusion check: the
    # astronaut at 12% of the shorter side was found only without it).
    for pass_image in (cv2.equalizeHist(small), small):
        found = classifier.detectMultiScale(pass_image, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS,
                                            minSize=(least, least))
        if len(found):
            break
    if len(found) == 0:
        return {"width": width, "height": height, "face": None, "error": None}
    x, y, w, h = max((tuple(int(v) for v in box) for box in found), key=lambda b: b[2] * b[3])
    back = 1.0 / scale
    face = {"x": round(x * back), "y": round(y * back), "w": round(w * back), "h": round(h * back)}
    face["w"] = min(face["w"], width - face["x"])
    face["h"] = min(face["h"], height - face["y"])
    return {"width": width, "height": height, "face": face, "error": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Find the largest face per picture (OpenCV Haar cascade).")
    parser.add_argument("list", nargs="?", default="-", help="JSON list of picture paths, or - for stdin")
    parser.add_argument("--check", action="store_true", help="only say whether detection can run here")
    args = parser.parse_args(argv)
    cv2 = load_cv2()
    path = cascade_path(cv2)
    if args.check:
        print(json.dumps({"available": True, "opencv": cv2.__version__, "cascade": path}))
        return 0
    pictures = read_list(args.list)
    classifier = cv2.CascadeClassifier(path)
    if classifier.empty():
        fail(EXIT_NO_CASCADE, f"OpenCV could not load {path}; reinstall opencv-python.")
    print(json.dumps({"pictures": [detect(cv2, classifier, p) for p in pictures]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
