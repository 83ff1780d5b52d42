"""The face crop's pure parts (crop box, boxes back in the picture's pixels, log lines) and the REAL face finder
(daemon/pipeline/face_detect.py with OpenCV) on a real photograph, when a python with cv2 is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from daemon.pipeline.face_crop import MARGIN, Box, clamp_face, crop_box
from daemon.pipeline.faces import BUNDLED_SCRIPT, FaceResult, PictureFace, crop_lines, picture_faces
from tests.helpers import REPO

FIXTURES = REPO / "tests" / "fixtures" / "face_crop"


def test_crop_is_a_square_of_margin_face_heights_with_the_face_above_centre() -> None:
    face = Box(900, 600, 200, 200)
    crop = crop_box(face, (2000, 3000), min_side=512)
    assert crop.w == crop.h == round(200 * MARGIN) == 600
    assert crop.x + crop.w / 2 == face.x + face.w / 2  # centred across
    assert crop.y == 700 - 240  # the face's centre at 40% of the crop's height: room for the shoulders below


def test_crop_is_never_smaller_than_the_training_resolution_when_the_picture_allows() -> None:
    crop = crop_box(Box(500, 500, 60, 60), (2000, 2000), min_side=768)
    assert (crop.w, crop.h) == (768, 768)
    small = crop_box(Box(100, 100, 60, 60), (400, 300), min_side=768)  # the picture does not allow: its shorter side
    assert (small.w, small.h) == (300, 300)


def test_crop_moves_inside_the_picture_instead_of_shrinking() -> None:
    top_left = crop_box(Box(0, 0, 100, 100), (1000, 800), min_side=512)
    assert (top_left.x, top_left.y, top_left.w) == (0, 0, 512)
    bottom_right = crop_box(Box(950, 750, 50, 50), (1000, 800), min_side=512)
    assert (bottom_right.x + bottom_right.w, bottom_right.y + bottom_right.h) == (1000, 800)


def test_a_face_filling_the_picture_gets_the_largest_square() -> None:
    crop = crop_box(Box(0, 0, 640, 480), (640, 480), min_side=512)
    assert (crop.w, crop.h) == (480, 480) and 0 <= crop.x <= 160 and crop.y == 0


def test_boxes_from_the_detector_are_checked() -> None:
    assert Box.from_json({"x": 1, "y": 2, "w": 3, "h": 4}) == Box(1, 2, 3, 4)
    for bad in (None, [], {"x": 1}, {"x": 1, "y": 2, "w": 0, "h": 4}, {"x": -1, "y": 2, "w": 3, "h": 4},
                {"x": True, "y": 2, "w": 3, "h": 4}, {"x": 1.5, "y": 2, "w": 3, "h": 4}):
        assert Box.from_json(bad) is None, bad
    assert clamp_face(Box(90, 90, 20, 20), (100, 100)) == Box(90, 90, 10, 10)
    assert clamp_face(Box(100, 10, 20, 20), (100, 100)) is None


def test_boxes_are_scaled_back_from_the_copy_to_the_picture() -> None:
    sizes = [((4000, 3000), (739, 554)), None, ((800, 600), (800, 600))]
    answers = [{"face": {"x": 300, "y": 100, "w": 100, "h": 100}}, {"face": None}, {"face": None}]
    faces = picture_faces(sizes, answers, min_side=512)
    first = faces[0]
    assert first.face == Box(round(300 * 4000 / 739), round(100 * 3000 / 554), round(100 * 4000 / 739),
                             round(100 * 3000 / 554))
    assert first.crop is not None and first.crop.w == round(first.face.h * MARGIN)
    assert faces[1] == PictureFace(0, 0, None, None)  # unreadable: no size, no crop
    assert faces[2] == PictureFace(800, 600, None, None)
    assert faces[0].to_json(0)["crop"] == first.crop.to_json()


def test_log_lines_say_per_picture_what_was_done_or_why_nothing_was() -> None:
    result = FaceResult(True, None, [PictureFace(800, 600, Box(1, 2, 3, 4), Box(0, 0, 512, 512)),
                                     PictureFace(800, 600, None, None)])
    assert crop_lines(["a.jpg", "b.jpg"], result) == [
        "face crop: a.jpg: face found: cropped to 512×512 at (0, 0) of its 800×600",
        "face crop: b.jpg: no face: whole picture",
    ]
    failed = FaceResult(False, "Faces could not be found: OpenCV (cv2) is not installed.", [])
    assert crop_lines(["a.jpg"], failed) == [
        "face crop: Faces could not be found: OpenCV (cv2) is not installed. The pictures are used whole."]


# ------------------------------------------------------------------------------------ the real face finder
def _python_with_cv2() -> str | None:
    for python in (os.environ.get("KH_PY"), sys.executable):
        if python and subprocess.run([python, "-c", "import cv2"], capture_output=True).returncode == 0:
            return python
    return None


CV2_PYTHON = _python_with_cv2()
needs_cv2 = pytest.mark.skipif(CV2_PYTHON is None, reason="no python with OpenCV: set KH_PY to the kohya venv's "
                               "python (eval \"$(bash /work/shared/harness/real_kohya.sh env)\")")


@needs_cv2
def test_real_face_finder_finds_the_astronauts_face_and_none_in_the_coffee(tmp_path: Path) -> None:
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([str(FIXTURES / "astronaut.jpg"), str(FIXTURES / "coffee.jpg"),
                                   str(tmp_path / "missing.png")]), encoding="utf-8")
    done = subprocess.run([CV2_PYTHON, str(BUNDLED_SCRIPT), str(listing)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    astronaut, coffee, missing = json.loads(done.stdout)["pictures"]
    assert (astronaut["width"], astronaut["height"]) == (512, 512)
    face = astronaut["face"]
    # Eileen Collins' face in skimage's astronaut.png: around x 170-280, y 50-180 (the helmet is to her right)
    assert 150 <= face["x"] <= 210 and 40 <= face["y"] <= 100 and 70 <= face["w"] <= 140, face
    assert coffee == {"width": 600, "height": 400, "face": None, "error": None}
    assert missing["face"] is None and missing["error"]


@needs_cv2
def test_real_face_finder_finds_a_face_that_equalising_washes_out(tmp_path: Path) -> None:
    """Seen in the real Easy Diffusion check: the astronaut pasted on a large flat background, through the daemon's
    own upright copy (1024×768 → 704×528), was missed when the cascade saw only the equalised picture."""
    from daemon.pipeline import faces

    canvas = Image.new("RGB", (1024, 768), (90, 110, 130))
    with Image.open(FIXTURES / "astronaut.jpg") as astronaut:
        canvas.paste(astronaut, (400, 200))
    canvas.save(tmp_path / "wide.jpg", quality=92)
    assert faces.write_upright_copy(tmp_path / "wide.jpg", tmp_path / "copy.png") == ((1024, 768), (704, 528))
    done = subprocess.run([CV2_PYTHON, str(BUNDLED_SCRIPT), "-"], input=json.dumps([str(tmp_path / "copy.png")]),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    face = json.loads(done.stdout)["pictures"][0]["face"]
    # her face: x 176-272, y 65-161 in the 512² original, pasted at (400, 200), then scaled by 704/1024
    assert face is not None
    assert 370 <= face["x"] <= 420 and 160 <= face["y"] <= 200 and 50 <= face["w"] <= 100, face


@needs_cv2
def test_real_face_finder_check_and_bad_input(tmp_path: Path) -> None:
    check = subprocess.run([CV2_PYTHON, str(BUNDLED_SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and json.loads(check.stdout)["available"] is True
    bad = subprocess.run([CV2_PYTHON, str(BUNDLED_SCRIPT), "-"], input='{"not": "a list"}', capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "JSON list of picture paths" in bad.stderr


def test_face_finder_without_cv2_says_so_with_exit_3(tmp_path: Path) -> None:
    """Run by a python that cannot import cv2 (a folder shadowing it with a broken module)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "cv2.py").write_text("raise ImportError('No module named cv2 (shadowed by the test)')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow)}
    done = subprocess.run([sys.executable, str(BUNDLED_SCRIPT), "--check"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 3
    assert "OpenCV (cv2) is not installed" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
