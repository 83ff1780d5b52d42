"""Finding the faces in a set of pictures: upright copies, face_detect.py in the kohya venv, crop boxes.

The daemon has no OpenCV; the sd-scripts venv has. So the daemon writes small upright RGB copies (EXIF
orientation applied, as prep does), runs face_detect.py with the kohya python as a supervised subprocess (its own
process group, a time limit, the tree killed on timeout, cancel or shutdown), and scales the boxes back to each
picture's upright pixels. Whatever goes wrong with the detector is an answer (`available: false` and why), never an
exception: a job that asked for the face crop then trains on the whole pictures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from daemon.config import Config
from daemon.pipeline import dataset
from daemon.pipeline.buckets import Size
from daemon.pipeline.face_crop import Box, clamp_face, crop_box
from daemon.pipeline.process import start_trainer

log = logging.getLogger(__name__)

BUNDLED_SCRIPT = Path(__file__).with_name("face_detect.py")
# The copies' size: at most this squared in pixels, as face_detect.py's MAX_SIDE; a smaller copy is quicker to
# write, and the cascade gains nothing from more.
COPY_RESOLUTION = 640
# 25 pictures take about a second in a warm venv (0.4 s with the opencv import on the test machine); a cold disk
# and a slow CPU can make it many times that, and a stuck detector must not hold a job for long.
DETECT_TIMEOUT_S = 120.0
# face_detect.py prints about 100 bytes a picture; more than this is not its answer.
MAX_OUTPUT_CHARS = 1_000_000
# Copies written at once: Pillow decodes without the GIL; each decode holds up to a whole picture (80 MP x 4 bytes
# at worst), so a few, not one per core.
COPY_THREADS = 4
# What a picture that cannot be decoded raises (dataset.check_size's ImageProblem included).
UNREADABLE = (dataset.ImageProblem, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class PictureFace:
    width: int  # upright pixels; 0 when the picture could not be read
    height: int
    face: Box | None
    crop: Box | None

    def to_json(self, index: int) -> dict[str, object]:
        return {"index": index, "width": self.width, "height": self.height,
                "face": self.face.to_json() if self.face else None, "crop": self.crop.to_json() if self.crop else None}


@dataclass(frozen=True)
class FaceResult:
    available: bool
    problem: str | None  # a sentence when the detector could not run
    pictures: list[PictureFace]


class DetectorFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def detector_argv(config: Config) -> list[str]:
    """The kohya python and the face finder; DetectorFailed when either is missing."""
    from daemon.pipeline.env_check import kohya_python  # env_check imports much; only needed here

    python = kohya_python(config)
    if not python:
        raise DetectorFailed("the kohya python was not found (set kohya.python in the daemon config)")
    script = config.kohya.face_detect_script or BUNDLED_SCRIPT
    if not Path(script).is_file():
        raise DetectorFailed(f"the face finder {script} does not exist")
    return [python, str(script)]


def detector_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUTF8": "1", "PYTHONIOENCODING": "utf-8"}


def write_upright_copy(source: Path, target: Path) -> tuple[Size, Size]:
    """A small upright RGB PNG of `source` at `target`; returns (the picture's upright size, the copy's size)."""
    with dataset.open_picture(source) as img:
        full = dataset.upright_size(img)
        dataset.check_size(full, source.name)  # before any decode: no bomb is decoded here either
        copy = dataset.fit_picture(img, COPY_RESOLUTION)
    copy.save(target, format="PNG", **dataset.PNG_OPTIONS)
    return full, copy.size


def write_copies(sources: Sequence[Path], folder: Path) -> list[tuple[Size, Size] | None]:
    """Upright copies `NNN.png` in `folder`; None for a picture that cannot be read (it keeps no crop)."""
    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> tuple[Size, Size] | None:
        try:
            return write_upright_copy(sources[i], folder / f"{i + 1:03d}.png")
        except UNREADABLE as exc:
            log.info("face crop: picture %d cannot be read (%s); it keeps its whole picture", i + 1, exc)
            return None

    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=min(COPY_THREADS, len(sources))) as pool:
        return list(pool.map(one, range(len(sources))))


async def run_detector(argv: Sequence[str], list_file: Path, *, timeout_s: float | None = None) -> list[dict]:
    """face_detect.py's answers, in the list's order; DetectorFailed with a sentence when it did not answer."""
    timeout_s = DETECT_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        proc = await start_trainer([*argv, str(list_file)], cwd=str(list_file.parent), env=detector_env())
    except OSError as exc:
        raise DetectorFailed(f"the face finder could not be started ({exc})") from exc
    out: list[str] = []
    err: list[str] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in proc.output():
            size += len(chunk.text)
            if size > MAX_OUTPUT_CHARS:
                raise DetectorFailed("the face finder printed far more than its answer")
            (out if chunk.stream == "stdout" else err).append(chunk.text)

    try:
        await asyncio.wait_for(read(), timeout_s)
        code = await asyncio.wait_for(proc.wait(), 5.0)
    except asyncio.TimeoutError as exc:
        raise DetectorFailed(f"the face finder did not finish within {timeout_s:g} s") from exc
    finally:
        # also after a normal exit: whatever it started goes with it
        await asyncio.shield(proc.terminate_tree(grace_s=2.0))
    if code != 0:
        why = "".join(err).strip().splitlines()
        raise DetectorFailed(why[-1].removeprefix("face_detect: ") if why else f"the face finder exited with {code}")
    try:
        pictures = json.loads("".join(out))["pictures"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DetectorFailed("the face finder's answer is not the JSON it should print") from exc
    if not isinstance(pictures, list) or not all(isinstance(p, dict) for p in pictures):
        raise DetectorFailed("the face finder's answer is not the JSON it should print")
    return pictures


def picture_faces(sizes: Sequence[tuple[Size, Size] | None], answers: Sequence[dict], *,
                  min_side: int) -> list[PictureFace]:
    """The detector's boxes (in the copies' pixels) back in each picture's upright pixels, with their crops."""
    result: list[PictureFace] = []
    for i, sized in enumerate(sizes):
        if sized is None:
            result.append(PictureFace(0, 0, None, None))
            continue
        full, copy = sized
        answer = answers[i] if i < len(answers) else {}
        face = Box.from_json(answer.get("face"))
        if face is not None:
            face = clamp_face(face.scaled(full[0] / copy[0], full[1] / copy[1]), full)
        crop = crop_box(face, full, min_side=min_side) if face is not None else None
        result.append(PictureFace(full[0], full[1], face, crop))
    return result


async def find_faces(config: Config, sources: Sequence[Path], work_dir: Path, *, min_side: int,
                     timeout_s: float | None = None) -> FaceResult:
    """Faces and crops of `sources` (upload files), using `work_dir` (created, and removed afterwards)."""
    sizes: list[tuple[Size, Size] | None] = [None] * len(sources)
    try:
        try:
            sizes = await asyncio.to_thread(write_copies, sources, work_dir)
            copies = [str(work_dir / f"{i + 1:03d}.png") for i in range(len(sources))]
            list_file = work_dir / "pictures.json"
            await asyncio.to_thread(list_file.write_text, json.dumps(copies), encoding="utf-8")
        except OSError as exc:  # a full disk, a data dir gone: the crop is optional, never the job's failure
            raise DetectorFailed(f"its working copies could not be written in {work_dir} ({exc.strerror or exc})"
                                 ) from exc
        answers = await run_detector(detector_argv(config), list_file, timeout_s=timeout_s)
    except DetectorFailed as exc:
        log.warning("face crop unavailable: %s", exc.message)
        whole = [PictureFace(s[0][0], s[0][1], None, None) if s else PictureFace(0, 0, None, None) for s in sizes]
        return FaceResult(False, f"Faces could not be found: {exc.message}.", whole)
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(shutil.rmtree, work_dir, True)
    return FaceResult(True, None, picture_faces(sizes, answers, min_side=min_side))

Crop = tuple[int, int, int, int]


def crop_lines(names: Sequence[str], result: FaceResult) -> list[str]:
    """The job log's account: one line per picture, or one saying why nothing was cropped."""
    if not result.available:
        return [f"face crop: {result.problem} The pictures are used whole."]
    lines = []
    for name, pic in zip(names, result.pictures, strict=True):
        if pic.crop is not None:
            c = pic.crop
            lines.append(f"face crop: {name}: face found: cropped to {c.w}×{c.h} at ({c.x}, {c.y}) of its "
                         f"{pic.width}×{pic.height}")
        else:
            lines.append(f"face crop: {name}: no face: whole picture")
    return lines


async def job_crops(config: Config, uploads: Sequence[dataset.Upload], work_dir: Path, *, resolution: int,
                    cancel: asyncio.Event) -> tuple[list[Crop | None], list[str]]:
    """Per upload its crop box (or None: the whole picture), and the log lines saying so. A cancel stops the
    detector at once (its process tree is killed) and answers no crops."""
    finding = asyncio.ensure_future(find_faces(config, [u.path for u in uploads], work_dir, min_side=resolution))
    cancelled = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({finding, cancelled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cancelled.cancel()
        if not finding.done():
            finding.cancel()
        await asyncio.gather(finding, cancelled, return_exceptions=True)
    if finding.cancelled():
        return [None] * len(uploads), []
    result = finding.result()
    crops: list[Crop | None] = [(c.x, c.y, c.w, c.h) if (c := p.crop) else None for p in result.pictures]
    return crops, crop_lines([u.client_name for u in uploads], result)
