"""The face crop through the daemon: POST /pictures/faces, the /config/test row, and prep cropping the training
pictures, with the face finder's test double (tests/face_detect_double.py: the face is the red square a test draws)
run by the kohya python as a real subprocess; and every way the finder can fail (no OpenCV, a crash, garbage, a
hang past the time limit): the job then trains on the whole pictures and says so."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from daemon.config import Config
from daemon.pipeline import faces
from tests.conftest import wait_for_state
from tests.helpers import REPO, free_port, make_config

DOUBLE = REPO / "tests" / "face_detect_double.py"


def face_config(tmp_path: Path, **kohya: Any) -> Config:
    return make_config(tmp_path, port=free_port(), kohya={"face_detect_script": str(DOUBLE), **kohya})


@pytest.fixture
async def face_client(tmp_path: Path, start_daemon) -> TestClient:
    return await start_daemon(face_config(tmp_path))


def photo(size: tuple[int, int], face: tuple[int, int, int] | None, *, fmt: str = "PNG",
          orientation: int | None = None) -> bytes:
    """A grey picture of `size` (as stored) with a red square (x, y, side) as its face."""
    img = Image.new("RGB", size, (90, 110, 130))
    if face is not None:
        x, y, side = face
        img.paste((255, 0, 0), (x, y, x + side, y + side))
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, format=fmt, exif=exif.tobytes(), quality=95)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def faces_form(pictures: list[bytes], **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    for i, data in enumerate(pictures):
        form.add_field("images", data, filename=f"p{i}.png", content_type="image/png")
    return form


# ------------------------------------------------------------------------------------------- the API
async def test_faces_api_answers_face_and_crop_per_picture(face_client: TestClient, tmp_path: Path) -> None:
    pictures = [photo((1200, 900), (500, 200, 100)), photo((800, 600), None), b"not a picture at all"]
    resp = await face_client.post("/pictures/faces", data=faces_form(pictures))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["available"] is True and body["problem"] is None
    first, second, third = body["pictures"]
    assert [p["index"] for p in body["pictures"]] == [0, 1, 2]
    assert (first["width"], first["height"]) == (1200, 900)
    # found in a copy scaled to 640² pixels, then scaled back: within a pixel or two of the square drawn
    assert all(abs(a - b) <= 2 for a, b in zip((first["face"][k] for k in "xywh"), (500, 200, 100, 100), strict=True))
    crop = first["crop"]
    assert crop["w"] == crop["h"] == 512  # 3 face heights (300) is below the training resolution: 512
    assert crop["x"] <= 500 and crop["x"] + crop["w"] >= 600 and crop["y"] <= 200 and crop["y"] + crop["h"] >= 300
    assert second == {"index": 1, "width": 800, "height": 600, "face": None, "crop": None}
    assert third == {"index": 2, "width": 0, "height": 0, "face": None, "crop": None}
    assert list((tmp_path / "data" / "tmp").iterdir()) == []


async def test_faces_api_boxes_are_upright_for_a_sideways_jpeg(face_client: TestClient) -> None:
    # Stored 600 wide x 800 high with orientation 6 (turn 90° clockwise to view): upright it is 800x600. The
    # square stored at (100, 50) lands at upright x = 800 - 50 - 60 = 690, y = 100.
    data = photo((600, 800), (100, 50, 60), fmt="JPEG", orientation=6)
    body = await (await face_client.post("/pictures/faces", data=faces_form([data]))).json()
    pic = body["pictures"][0]
    assert (pic["width"], pic["height"]) == (800, 600)
    assert abs(pic["face"]["x"] - 690) <= 3 and abs(pic["face"]["y"] - 100) <= 3, pic["face"]


async def test_faces_api_follows_the_resolution_asked(face_client: TestClient) -> None:
    data = photo((2000, 1500), (900, 500, 100))
    body = await (await face_client.post("/pictures/faces?resolution=1024", data=faces_form([data]))).json()
    assert body["pictures"][0]["crop"]["w"] == 1024


async def test_faces_api_refuses_bad_requests_and_keeps_nothing(face_client: TestClient, tmp_path: Path) -> None:
    pic = photo((400, 300), None)
    cases = [
        (await face_client.post("/pictures/faces?resolution=abc", data=faces_form([pic])), "resolution"),
        (await face_client.post("/pictures/faces?resolution=99999", data=faces_form([pic])), "resolution"),
        (await face_client.post("/pictures/faces", data=faces_form([pic], name="x")), "name"),
        (await face_client.post("/pictures/faces", data=faces_form([])), None),
    ]
    for resp, key in cases:
        assert resp.status == 400, await resp.text()
        body = await resp.json()
        assert body["error"] and (key is None or body["key"] == key), body
    unauthorised = await face_client.post("/pictures/faces", data=faces_form([pic]), headers={"Authorization": ""})
    assert unauthorised.status == 401
    assert (await unauthorised.json())["error"]
    foreign = await face_client.post("/pictures/faces", data=faces_form([pic]), headers={"Origin": "http://evil.test"})
    assert foreign.status == 403
    assert not (tmp_path / "data" / "tmp").exists() or list((tmp_path / "data" / "tmp").iterdir()) == []


@pytest.mark.parametrize(("mode", "why"), [
    ("no_cv2", "OpenCV (cv2) is not installed"),
    ("crash", "RuntimeError: the face double crashed as asked"),
    ("garbage", "not the JSON it should print"),
])
async def test_faces_api_says_why_the_finder_failed(face_client: TestClient, monkeypatch, mode: str, why: str) -> None:
    monkeypatch.setenv("FACE_DOUBLE_MODE", mode)
    resp = await face_client.post("/pictures/faces", data=faces_form([photo((640, 480), (10, 10, 50))]))
    assert resp.status == 200
    body = await resp.json()
    assert body["available"] is False and why in body["problem"]
    assert body["pictures"] == [{"index": 0, "width": 640, "height": 480, "face": None, "crop": None}]


async def test_a_hanging_finder_is_killed_as_a_tree_at_its_time_limit(face_client: TestClient, monkeypatch,
                                                                      tmp_path: Path) -> None:
    pids = tmp_path / "pids.txt"
    monkeypatch.setenv("FACE_DOUBLE_MODE", "hang")
    monkeypatch.setenv("FACE_DOUBLE_PIDS", str(pids))
    monkeypatch.setattr(faces, "DETECT_TIMEOUT_S", 3.0)
    started = time.monotonic()
    body = await (await face_client.post("/pictures/faces", data=faces_form([photo((640, 480), None)]))).json()
    assert time.monotonic() - started < 20
    assert body["available"] is False and "did not finish within 3 s" in body["problem"]
    for pid in map(int, pids.read_text().split()):  # the finder and the child it started
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


# ------------------------------------------------------------------------------------------ readiness
async def test_config_test_has_a_face_crop_row_that_never_blocks(face_client: TestClient, monkeypatch) -> None:
    body = await (await face_client.post("/config/test")).json()
    assert body["face_crop"]["ok"] is True and "face crop available" in body["face_crop"]["detail"]
    ready = body["ready"]
    monkeypatch.setenv("FACE_DOUBLE_MODE", "no_cv2")
    body = await (await face_client.post("/config/test")).json()
    row = body["face_crop"]
    assert row["ok"] is False and "OpenCV (cv2) is not installed" in row["detail"] and row["fix"]
    assert body["ready"] == ready and "face_crop" not in {c["name"] for c in body["checks"]}


async def test_config_test_face_row_without_the_finder_script(start_daemon, tmp_path: Path) -> None:
    client = await start_daemon(face_config(tmp_path, face_detect_script=str(tmp_path / "nowhere.py")))
    row = (await (await client.post("/config/test")).json())["face_crop"]
    assert row["ok"] is False and "nowhere.py does not exist" in row["detail"]


# ------------------------------------------------------------------------------------------------ prep
def job_form(pictures: list[bytes], params: dict[str, Any]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("name", "Face Hero")
    form.add_field("trigger", "ohwx")
    form.add_field("params", json.dumps({"epochs": 1, "repeats": 1, "save_every_n_epochs": 0, **params}))
    for i, data in enumerate(pictures):
        form.add_field("images", data, filename=f"face{i}.png", content_type="image/png")
    return form


FACE = (700, 300, 120)  # the red square in a 1600x1200 picture


def job_pictures() -> list[bytes]:
    return [photo((1600, 1200), FACE) for _ in range(6)] + [photo((1600, 1200), None) for _ in range(2)]


async def run_job(client: TestClient, params: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/train", data=job_form(job_pictures(), params))
    assert resp.status == 202, await resp.text()
    job = await wait_for_state(client, (await resp.json())["job_id"], {"done", "error"}, timeout=60)
    assert job["state"] == "done", job["error"]
    return job


def prepared(config: Config, job: dict[str, Any]) -> list[Image.Image]:
    folder = config.jobs_dir / job["id"] / "dataset" / "img"
    return [Image.open(p) for p in sorted(folder.glob("*.png"))]


def red_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    red = img.convert("RGB").split()[0].point(lambda v: 255 if v > 200 else 0)
    return red.getbbox()


async def test_prep_crops_the_training_pictures_around_the_face(start_daemon, tmp_path: Path) -> None:
    config = face_config(tmp_path)
    client = await start_daemon(config)
    job = await run_job(client, {"face_crop": True})
    assert job["params"]["face_crop"] is True
    pics = prepared(config, job)
    assert len(pics) == 8
    for img in pics[:6]:
        # the crop: 3 face heights (360) raised to the training resolution (512); already at 512², not scaled
        assert img.size == (512, 512)
        box = red_box(img)
        assert box is not None
        left, top, right, bottom = box
        assert right - left == 120 and bottom - top == 120  # the face at its own pixels: cropped, not scaled
        # centred across, its centre at 40% of the height
        assert abs((left + right) / 2 - 256) <= 1 and abs((top + bottom) / 2 - 0.4 * 512) <= 1
    for img in pics[6:]:
        assert img.size == (512, 384)  # the whole 1600x1200 picture at 512² pixels, as without the crop
    logs = "\n".join(job["logs"])
    assert logs.count("face found: cropped to 512×512") == 6
    assert logs.count("no face: whole picture") == 2
    assert "face crop: face0.png: face found: cropped to 512×512 at (504, 155) of its 1600×1200" in logs
    assert not (config.jobs_dir / job["id"] / "faces").exists()  # the copies are removed


async def test_without_face_crop_nothing_is_detected_or_cropped(start_daemon, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FACE_DOUBLE_MODE", "crash")  # would say so in the log if it ran
    config = face_config(tmp_path)
    client = await start_daemon(config)
    job = await run_job(client, {})
    assert job["params"]["face_crop"] is False
    assert all(img.size == (512, 384) for img in prepared(config, job))
    assert not any("face crop" in line for line in job["logs"])


@pytest.mark.parametrize(("mode", "why"), [
    ("no_cv2", "OpenCV (cv2) is not installed"),
    ("crash", "the face double crashed as asked"),
    ("hang", "did not finish within 2 s"),
])
async def test_a_failing_finder_never_fails_the_job(start_daemon, tmp_path: Path, monkeypatch, mode: str,
                                                    why: str) -> None:
    monkeypatch.setenv("FACE_DOUBLE_MODE", mode)
    monkeypatch.setattr(faces, "DETECT_TIMEOUT_S", 2.0)
    config = face_config(tmp_path)
    client = await start_daemon(config)
    job = await run_job(client, {"face_crop": True})
    assert all(img.size == (512, 384) for img in prepared(config, job))  # whole pictures
    lines = [line for line in job["logs"] if line.startswith("face crop:")]
    assert len(lines) == 1 and why in lines[0] and lines[0].endswith("The pictures are used whole."), lines


async def test_face_crop_must_be_true_or_false(start_daemon, tmp_path: Path) -> None:
    client = await start_daemon(face_config(tmp_path))
    resp = await client.post("/train", data=job_form(job_pictures(), {"face_crop": "yes"}))
    assert resp.status == 400
    body = await resp.json()
    assert body["key"] == "face_crop" and "true or false" in body["error"]


# ------------------------------------------------------------------------- the real finder, when at hand
async def test_faces_api_with_the_real_opencv_finder(start_daemon, tmp_path: Path) -> None:
    """The daemon's own face_detect.py run by a python with OpenCV (the kohya venv's: KH_PY) on a real photograph."""
    from tests.test_face_crop import CV2_PYTHON, FIXTURES

    if CV2_PYTHON is None:
        pytest.skip("no python with OpenCV: set KH_PY to the kohya venv's python")
    client = await start_daemon(make_config(tmp_path, port=free_port(), kohya={"python": CV2_PYTHON}))
    pictures = [(FIXTURES / name).read_bytes() for name in ("astronaut.jpg", "coffee.jpg")]
    body = await (await client.post("/pictures/faces", data=faces_form(pictures))).json()
    assert body["available"] is True, body
    astronaut, coffee = body["pictures"]
    face = astronaut["face"]
    assert 150 <= face["x"] <= 210 and 40 <= face["y"] <= 100 and 70 <= face["w"] <= 140, face
    # 3 face heights is below 512, and the picture is 512 a side: the crop is the whole square
    assert astronaut["crop"] == {"x": 0, "y": 0, "w": 512, "h": 512}
    assert coffee["face"] is None and coffee["crop"] is None
    # trained at 256 px, the crop is 3 face heights, around the face, inside the picture
    body = await (await client.post("/pictures/faces?resolution=256", data=faces_form(pictures[:1]))).json()
    crop = body["pictures"][0]["crop"]
    assert crop["w"] == crop["h"] == round(face["h"] * 3) and crop["x"] <= face["x"] and crop["y"] <= face["y"]
    assert crop["x"] + crop["w"] >= face["x"] + face["w"] and crop["y"] + crop["h"] >= face["y"] + face["h"]
    row = (await (await client.post("/config/test")).json())["face_crop"]
    assert row["ok"] is True and "OpenCV 4." in row["detail"]


async def test_copies_that_cannot_be_written_are_an_answer_not_an_error(tmp_path: Path) -> None:
    """The working folder cannot be made (its parent is a file): the pictures are used whole, and why is said."""
    config = face_config(tmp_path)
    source = tmp_path / "p.png"
    source.write_bytes(photo((640, 480), (100, 100, 50)))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = await faces.find_faces(config, [source], blocker / "faces", min_side=512)
    assert result.available is False and "working copies could not be written" in (result.problem or "")
    assert result.pictures == [faces.PictureFace(0, 0, None, None)]
