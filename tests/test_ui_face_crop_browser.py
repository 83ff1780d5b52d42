"""The tab's "Crop around the face" in a real headless Chromium against the real daemon, whose face finder is the
test double (tests/face_detect_double.py: the face is a red square) run by the kohya python: the checkbox, the crop
frames over the thumbnails, the "no face" note, and the job's params.face_crop reaching prep."""

# ruff: noqa: F811 — pytest fixtures (page, browser) are imported and then named as parameters
from __future__ import annotations

import base64
import io
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from tests.helpers import KOHYA_DOUBLE, REPO
from tests.test_ui_plugin_browser import (  # noqa: F401
    DaemonProcess,
    Env,
    artifacts_dir,
    browser,
    daemon_json,
    drop_images,
    installed_ed,
    make_ed_root,
    open_tab,
    page,
    wait_job_done,
)

DOUBLE = REPO / "tests" / "face_detect_double.py"


@pytest.fixture(scope="module")
def face_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """An install whose daemon finds faces with the double."""
    tmp = tmp_path_factory.mktemp("ui-face")
    (tmp / "workspace").mkdir()
    kohya = {"python": sys.executable, "script_path": str(KOHYA_DOUBLE), "workspace": str(tmp / "workspace"),
             "face_detect_script": str(DOUBLE)}
    with installed_ed(tmp, {"allow_cpu": True, "kohya": kohya}) as env:
        yield env


def face_payload(count: int, *, with_face: bool, start: int = 0, size: tuple[int, int] = (400, 300),
                 face: tuple[int, int, int] = (150, 60, 40)) -> list[dict[str, str]]:
    """Pictures of `size`; with a face: a red square (x, y, side)."""
    files = []
    for i in range(start, start + count):
        img = Image.new("RGB", size, (40 + 9 * i, 120, 160))
        if with_face:
            x, y, side = face
            img.paste((255, 0, 0), (x, y, x + side, y + side))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        files.append({"name": f"face-{i:02d}.png", "b64": base64.b64encode(buf.getvalue()).decode()})
    return files


def frames(pg: Any) -> list[dict[str, Any]]:
    return pg.evaluate("""() => Array.from(document.querySelectorAll('[data-clora=thumb]')).map((t) => {
        const f = t.querySelector('[data-clora=crop-frame]')
        const pic = t.querySelector('.clora-thumb-pic').getBoundingClientRect()
        const r = f && f.getBoundingClientRect()
        return {frame: !!f, none: !!t.querySelector('[data-clora=crop-none]'),
                left: r ? (r.left - pic.left) / pic.width : null, width: r ? r.width / pic.width : null,
                top: r ? (r.top - pic.top) / pic.height : null, height: r ? r.height / pic.height : null}
    })""")


def test_face_crop_frames_the_faces_and_the_job_crops(face_env: Env, page: Any) -> None:
    env = face_env
    faces_requests: list[str] = []
    page.on("request", lambda req: faces_requests.append(req.url) if "/pictures/faces" in req.url else None)
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    box = page.locator("[data-clora=face-crop]")
    assert box.is_enabled() and not box.is_checked()  # available, off by default
    assert "head and shoulders" in page.inner_text("[data-clora=face-crop-note]")
    drop_images(page, face_payload(6, with_face=True) + face_payload(2, with_face=False, start=6))
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 8")
    assert faces_requests == []  # nothing is asked while the crop is off
    assert all(not f["frame"] and not f["none"] for f in frames(page))

    box.check()
    page.wait_for_function("document.querySelectorAll('[data-clora=crop-frame]').length === 6", timeout=30000)
    shown = frames(page)
    assert [f["frame"] for f in shown] == [True] * 6 + [False] * 2
    assert [f["none"] for f in shown] == [False] * 6 + [True] * 2
    assert page.locator("[data-clora=crop-none]").first.inner_text() == "no face: whole picture"
    # the daemon's crop: the picture's shorter side (300 < 512), face centred across -> (20, 0, 300, 300); the
    # square thumbnail shows the 400x300 picture covered (x from 50 to 350), so the frame spans it fully in height
    for f in shown[:6]:
        assert abs(f["top"]) < 0.02 and abs(f["height"] - 1) < 0.02, f
        assert abs(f["left"] - (20 - 50) / 300) < 0.02 and abs(f["width"] - 1) < 0.02, f
    assert len(faces_requests) == 1 and "resolution=512" in faces_requests[0]

    # a picture added while the crop is on is asked about, alone; a large one gets a crop of the training size
    drop_images(page, face_payload(1, with_face=True, start=8, size=(1600, 1200), face=(700, 300, 120)))
    page.wait_for_function("document.querySelectorAll('[data-clora=crop-frame]').length === 7", timeout=30000)
    assert len(faces_requests) == 2
    big = frames(page)[8]  # crop (504, 155, 512, 512) of 1600x1200, shown covered: x from 200 to 1400
    assert abs(big["left"] - (504 - 200) / 1200) < 0.02 and abs(big["width"] - 512 / 1200) < 0.02, big
    assert abs(big["top"] - 155 / 1200) < 0.02 and abs(big["height"] - 512 / 1200) < 0.02, big
    page.locator("[data-clora=thumbs]").screenshot(path=str(artifacts_dir() / "face-crop-thumbs.png"))

    page.fill("#clora-name", "Face Hero")
    page.fill("#clora-trigger", "fhx")
    page.locator("[data-clora=advanced] summary").click()
    page.fill("#clora-p-epochs", "1")
    page.locator("[data-clora=root]").screenshot(path=str(artifacts_dir() / "face-crop-form.png"))
    page.locator("#clora-p-epochs").press("Tab")  # the form settles (a field's hint goes) before the click
    page.wait_for_function("document.querySelector('[data-clora=start]')?.disabled === false", timeout=30000)
    page.click("[data-clora=start]")
    wait_job_done(page, "Face Hero")
    job = next(j for j in daemon_json(env, "GET", "/jobs")["jobs"] if j["name"] == "Face Hero")
    assert job["params"]["face_crop"] is True
    logs = "\n".join(daemon_json(env, "GET", f"/jobs/{job['id']}/logs")["lines"])
    assert logs.count("face found: cropped to 300×300 at (20, 0) of its 400×300") == 6
    assert "face-08.png: face found: cropped to 512×512 at (504, 155) of its 1600×1200" in logs
    assert logs.count("no face: whole picture") == 2


def test_face_crop_unavailable_is_disabled_and_says_why(face_env: Env, page: Any) -> None:
    env = face_env

    def no_opencv(route: Any) -> None:
        resp = route.fetch()
        data = resp.json()
        data["face_crop"] = {"name": "face_crop", "ok": False,
                             "detail": "face crop unavailable: OpenCV (cv2) is not installed in /venv/bin/python",
                             "fix": "Install opencv-python into the sd-scripts venv."}
        route.fulfill(response=resp, json=data)

    page.route("**/config/test", no_opencv)
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    box = page.locator("[data-clora=face-crop]")
    assert box.is_disabled() and not box.is_checked()
    note = page.inner_text("[data-clora=face-crop-note]")
    assert note.startswith("Not available: OpenCV (cv2) is not installed") and "opencv-python" in note
    faces_requests: list[str] = []
    page.on("request", lambda req: faces_requests.append(req.url) if "/pictures/faces" in req.url else None)
    drop_images(page, face_payload(2, with_face=True))
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 2")
    page.wait_for_timeout(300)
    assert faces_requests == [] and page.locator("[data-clora=crop-frame]").count() == 0
