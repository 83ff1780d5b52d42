"""The bad-input corpus of the newer routes (picture checks, face preview, tagger, saved epochs, captions, the
face crop, samples and resume), against one real `python -m daemon` process that holds a finished job.

Each case is answered with its status and a JSON `{"error": sentence}` (or, where the route documents it, its
success); afterwards the daemon still answers, the jobs list is what it was, nothing of the request is left in
<data_dir>/tmp, no file appeared, vanished or changed anywhere under the test's folder (the job's folder and ED's
LoRA folder included), and the daemon's console holds no ERROR line and no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from tests import rawhttp
from tests.helpers import REPO, TOKEN, free_port, make_config, picture_bytes
from tests.rawhttp import BOUNDARY, field, image, multipart, request
from tests.tagger_double.layout import onnx_pythonpath, sd_scripts_with_double, write_model

FACE_DOUBLE = REPO / "tests" / "face_detect_double.py"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
JOB_PARAMS = json.dumps({"epochs": 3, "save_every_n_epochs": 1, "sample_every_n_epochs": 1})
STALL_S = 2
MAX_UPLOADS = 2


@dataclass
class Live:
    """The real daemon, its folders and its one finished job."""

    proc: subprocess.Popen[bytes]
    port: int
    root: Path
    data_dir: Path
    lora_dir: Path
    log: Path
    job_id: str
    jobs: Any  # GET /jobs as it was once the job had finished
    sample: str  # one preview the job recorded
    log_seen: int = 0  # how much of the console the previous checks read

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _call(port: int, method: str, path: str, body: bytes = b"", **headers: str) -> rawhttp.Reply:
    return asyncio.run(rawhttp.send(port, request(port, method, path, body=body, headers=headers)))


def _train(port: int, parts: list[rawhttp.Part]) -> rawhttp.Reply:
    return asyncio.run(rawhttp.send(port, request(port, "POST", "/train", body=multipart(parts),
                                                  headers={"Content-Type": MULTIPART})))


def _eight() -> list[rawhttp.Part]:
    return [field("name", "Hero"), field("trigger", "ohwx"), *(image(i, f"pic{i}.png") for i in range(8))]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("newer-routes")
    port = free_port()
    workspace = sd_scripts_with_double(root)  # the tagger double at finetune/, as sd-scripts has the tagger
    config = make_config(root, port=port, upload_stall_s=STALL_S, max_uploads=MAX_UPLOADS,
                         kohya={"workspace": str(workspace), "face_detect_script": str(FACE_DOUBLE)})
    raw = {"port": port, "token": TOKEN, "data_dir": str(config.data_dir), "ed_lora_dir": str(config.ed_lora_dir),
           "ed_models_dir": str(config.ed_models_dir), "base_model": str(config.base_model), "allow_cpu": True,
           "upload_stall_s": STALL_S, "max_uploads": MAX_UPLOADS,
           "kohya": {"python": sys.executable, "script_path": str(config.kohya.script_path),
                     "workspace": str(workspace), "face_detect_script": str(FACE_DOUBLE)}}
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    write_model(config.data_dir / "wd14_tagger_model")  # the tagger is ready: a good run would start
    log = root / "daemon.log"
    env = {**os.environ, "PYTHONPATH": onnx_pythonpath(), "KOHYA_DOUBLE_STEP_SECONDS": "0.005",
           "PATH": f"{fake_ghostscript(root / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
           "GS_MARKER": str(root / GS_MARKER)}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config_path)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, port, log)
        reply = _train(port, [*_eight()[:2], field("params", JOB_PARAMS), *_eight()[2:]])
        assert reply.status == 202, reply
        job_id = reply.json()["job_id"]
        end = time.monotonic() + 60
        while (job := _call(port, "GET", f"/jobs/{job_id}/status").json())["state"] not in ("done", "error"):
            assert time.monotonic() < end, job
            time.sleep(0.05)
        assert job["state"] == "done", job
        jobs = _call(port, "GET", "/jobs").json()
        yield Live(proc, port, root, config.data_dir, config.ed_lora_dir, log, job_id, jobs,
                   job["samples"][0]["file"])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]


GS_MARKER = "ghostscript-ran.txt"


def fake_ghostscript(folder: Path) -> Path:
    """A `gs` that notes its arguments: Pillow renders an EPS by running Ghostscript on it, a program with a long
    record of -dSAFER escapes. No upload may ever make the daemon run it."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "gs"
    script.write_text('#!/bin/sh\necho "$@" >> "$GS_MARKER"\nexit 0\n', encoding="utf-8")
    script.chmod(0o755)
    return folder


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text(errors="replace")
        with contextlib.suppress(OSError, ValueError):
            if _call(port, "GET", "/health").status == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"the daemon did not answer within 30 s:\n{log.read_text(errors='replace')}")


# ------------------------------------------------------------------------------------------------ what is stored
VOLATILE = ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm", "daemon.log")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the test's folder (the database and the console excepted: reads touch them) with its
    size and modification time."""
    found = {}
    for path in root.rglob("*"):
        if path.name in VOLATILE or path.is_dir():
            continue
        with contextlib.suppress(FileNotFoundError):
            stat = path.lstat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def tmp_entries(live: Live) -> list[str]:
    tmp = live.data_dir / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


async def settle_tmp(live: Live, timeout: float = 10.0) -> list[str]:
    """<data_dir>/tmp once the daemon has removed what the request left (a check thread may outlive the request)."""
    end = time.monotonic() + timeout
    while (left := tmp_entries(live)) and time.monotonic() < end:
        await asyncio.sleep(0.05)
    return left


def new_console(live: Live) -> str:
    text = live.output()
    fresh, live.log_seen = text[live.log_seen:], len(text)
    return fresh


def trouble(console: str) -> list[str]:
    """ERROR lines, tracebacks, and lines with characters a client could forge a line or drive the terminal with
    (a decoded %0D, %1B, %00 or bidi control in a path)."""
    from daemon.jobs.fields import is_control

    return [line for line in console.split("\n") if " ERROR " in line or "Traceback" in line
            or " CRITICAL " in line or line.startswith("FORGED") or any(is_control(ch) and ch != "\t" for ch in line)]


async def assert_unharmed(live: Live, before: dict[str, tuple[int, int]]) -> None:
    assert live.proc.poll() is None, live.output()[-3000:]
    health = await rawhttp.send(live.port, request(live.port, "GET", "/health"))
    assert health.status == 200
    jobs = await rawhttp.send(live.port, request(live.port, "GET", "/jobs"))
    assert jobs.json() == live.jobs
    assert await settle_tmp(live) == []
    assert not (live.root / GS_MARKER).exists(), "the daemon ran Ghostscript on an upload"
    assert snapshot(live.root) == before
    assert trouble(new_console(live)) == []


def is_sentence(text: object) -> bool:
    return isinstance(text, str) and len(text) >= 12 and " " in text and text.rstrip().endswith(".")


# ------------------------------------------------------------------------------------------------ the cases
@dataclass(frozen=True)
class Ctx:
    port: int
    job_id: str
    sample: str


@dataclass(frozen=True)
class Case:
    id: str
    status: int
    build: Callable[[Ctx], bytes | list[bytes]]
    key: str | None = None  # the field the answer names, where it names one
    says: str | None = None  # words the sentence must hold


def call(method: str, path: str | Callable[[Ctx], str], body: bytes = b"",
         **headers: str | bytes | None) -> Callable[[Ctx], bytes]:
    def build(c: Ctx) -> bytes:
        target = path(c) if callable(path) else path
        return request(c.port, method, target, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
    return build


def form(path: str | Callable[[Ctx], str], *parts: rawhttp.Part,
         **headers: str | bytes | None) -> Callable[[Ctx], bytes]:
    def build(c: Ctx) -> bytes:
        target = path(c) if callable(path) else path
        return request(c.port, "POST", target, body=multipart(list(parts)),
                       headers={"Content-Type": MULTIPART, **{k.replace("_", "-"): v for k, v in headers.items()}})
    return build


def png(size: tuple[int, int], colour: tuple[int, int, int] = (120, 120, 120)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels (10 G pixels: a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 120\n%%EndComments\n"
       b"newpath 0 0 moveto 100 120 lineto stroke\nshowpage\n%%EOF\n")


def pics(count: int) -> list[rawhttp.Part]:
    return [image(i, f"p{i}.png") for i in range(count)]


def text_as_file(name: str, value: bytes) -> rawhttp.Part:
    return (f'Content-Disposition: form-data; name="{name}"; filename="{name}.txt"\r\nContent-Type: text/plain'
            .encode(), value)


def picture_as_text(index: int) -> rawhttp.Part:
    return (b'Content-Disposition: form-data; name="images"', picture_bytes(index))


def job(suffix: str) -> Callable[[Ctx], str]:
    return lambda c: f"/jobs/{c.job_id}{suffix}"


def publish(epoch: str) -> Callable[[Ctx], str]:
    return job(f"/checkpoints/{epoch}/publish")


def train(*parts: rawhttp.Part) -> Callable[[Ctx], bytes]:
    return form("/train", field("name", "Hero"), field("trigger", "ohwx"), *parts)


CHECK, FACES, TAG = "/pictures/check", "/pictures/faces", "/tagger/runs"

CASES: list[Case] = [
    # --- POST /pictures/check: the query ---
    *(Case(f"check-resolution-{label}", 400, form(f"{CHECK}?resolution={value}", *pics(1)), "resolution")
      for label, value in (("minus-1", "-1"), ("1e9", "1e9"), ("nan", "NaN"), ("1000000000", "1000000000"),
                           ("5000-digits", "9" * 5000), ("float", "512.0"), ("superscript-2", "%C2%B2"),
                           ("arabic-digit", "%D9%A1"), ("nul", "%00"), ("repeated-bad-first", "-1&resolution=512"),
                           ("space", "%20"), ("hex", "0x200"), ("arabic-512", "%D9%A5%D9%A1%D9%A2"),
                           ("plus-512", "%2B512"), ("underscore-512", "5_12"), ("padded-512", "%20512"),
                           ("not-utf8", "%FF"), ("bad-escape", "%ZZ"), ("half-escape", "5%2"))),
    # --- POST /pictures/check: the form ---
    Case("check-empty-boundary", 400, form(CHECK, *pics(1), Content_Type="multipart/form-data; boundary=")),
    Case("check-only-boundary-no-crlf", 400, call("POST", CHECK, f"--{BOUNDARY}--".encode(), Content_Type=MULTIPART)),
    Case("check-nested-multipart", 400, form(CHECK, (b'Content-Disposition: form-data; name="images"\r\n'
                                                     b"Content-Type: multipart/mixed; boundary=inner",
                                                     b"--inner\r\n\r\nx\r\n--inner--"))),
    Case("check-part-without-name", 400, form(CHECK, (b"Content-Disposition: form-data", picture_bytes(0))),
         says="has no field name"),
    Case("check-part-empty-name", 400, form(CHECK, (b'Content-Disposition: form-data; name=""', b"x")),
         says="has no field name"),
    Case("tag-part-without-disposition", 400, form(TAG, (b"Content-Type: image/png", picture_bytes(0))),
         says="has no field name"),
    Case("train-part-without-name", 400, train((b'Content-Disposition: form-data; filename="a.png"', b"x")),
         says="has no field name"),
    Case("check-no-images", 400, form(CHECK), "images"),
    Case("check-only-end-boundary", 400, call("POST", CHECK, f"--{BOUNDARY}--\r\n".encode(), Content_Type=MULTIPART)),
    Case("check-zero-byte-picture", 400, form(CHECK, image(0, "empty.png", b"")), "images"),
    Case("check-26-pictures", 400, form(CHECK, *pics(26)), "images"),
    Case("check-text-field", 400, form(CHECK, field("resolution", "768"), *pics(1)), "resolution",
         says="POST /pictures/check takes only pictures"),
    Case("check-unknown-field", 400, form(CHECK, *pics(1), field("foo", "1")), "foo",
         says="POST /pictures/check takes only pictures"),
    Case("check-name-field", 400, form(CHECK, field("name", "Hero"), *pics(1)), "name"),
    Case("check-text-sent-as-file", 400, form(CHECK, *pics(1), text_as_file("name", b"Hero")), "name"),
    Case("check-json-body", 400, call("POST", CHECK, b"{}", Content_Type="application/json")),
    Case("check-no-content-type", 400, call("POST", CHECK, b"x")),
    Case("check-gzip", 415, form(CHECK, *pics(1), Content_Encoding="gzip")),
    Case("check-get", 405, call("GET", CHECK)),
    Case("check-no-token", 401, form(CHECK, *pics(1), Authorization=None)),
    Case("check-foreign-origin", 403, form(CHECK, *pics(1), Origin="http://evil.example")),
    Case("check-foreign-host", 403, form(CHECK, *pics(1), Host="evil.example")),
    # --- POST /pictures/faces ---
    *(Case(f"faces-resolution-{label}", 400, form(f"{FACES}?resolution={value}", *pics(1)), "resolution")
      for label, value in (("minus-1", "-1"), ("1e9", "1e9"), ("nan", "NaN"), ("empty", ""), ("float", "512.0"),
                           ("5000-digits", "9" * 5000), ("superscript-2", "%C2%B2"),
                           ("arabic-digits", "%D9%A5%D9%A1%D9%A2"), ("fullwidth-digits", "%EF%BC%95%EF%BC%91%EF%BC%92"),
                           ("repeated-bad-first", "x&resolution=512"))),
    Case("faces-no-images", 400, form(FACES), "images"),
    Case("faces-zero-byte-picture", 400, form(FACES, image(0, "empty.png", b"")), "images"),
    Case("faces-26-pictures", 400, form(FACES, *pics(26)), "images"),
    Case("faces-text-field", 400, form(FACES, field("threshold", "0.3"), *pics(1)), "threshold",
         says="POST /pictures/faces takes only pictures"),
    Case("faces-captions-field", 400, form(FACES, field("captions", "[]"), *pics(1)), "captions",
         says="POST /pictures/faces takes only pictures"),
    Case("faces-text-sent-as-file", 400, form(FACES, text_as_file("trigger", b"ohwx")), "trigger"),
    Case("faces-json-body", 400, call("POST", FACES, b"{}", Content_Type="application/json")),
    Case("faces-deflate", 415, form(FACES, *pics(1), Content_Encoding="deflate")),
    Case("faces-get", 405, call("GET", FACES)),
    Case("faces-wrong-token", 401, form(FACES, *pics(1), Authorization="Bearer nope")),
    Case("faces-foreign-origin", 403, form(FACES, *pics(1), Origin="http://evil.example")),
    # --- the tagger ---
    *(Case(f"tag-threshold-{label}", 400, form(TAG, field("threshold", value), *pics(2)), "threshold")
      for label, value in (("nan", "NaN"), ("inf", "inf"), ("minus", "-0.5"), ("over-1", "1.5"), ("1e999", "1e999"),
                           ("word", "half"), ("5000-digits", "9" * 5000), ("nul", "0.\x005"))),
    Case("tag-threshold-twice", 400, form(TAG, field("threshold", "0.3"), field("threshold", "0.4"), *pics(2)),
         "threshold"),
    Case("tag-threshold-not-utf8", 400, form(TAG, field("threshold", b"0.\xff"), *pics(2)), "threshold"),
    Case("tag-bad-threshold-as-file", 400, form(TAG, text_as_file("threshold", b"2"), *pics(2)), "threshold"),
    Case("tag-unknown-field", 400, form(TAG, field("trigger", "ohwx"), *pics(2)), "trigger"),
    Case("tag-no-images", 400, form(TAG, field("threshold", "0.35")), "images"),
    Case("tag-zero-byte-picture", 400, form(TAG, *pics(1), image(1, "empty.png", b"")), "images"),
    Case("tag-26-pictures", 400, form(TAG, *pics(26)), "images"),
    Case("tag-not-a-picture", 400, form(TAG, *pics(1), image(1, "evil.png", b"#!/bin/sh\nrm -rf /\n")), "images"),
    Case("tag-decompression-bomb", 400, form(TAG, *pics(1), image(1, "bomb.png", bomb_png())), "images"),
    Case("tag-eps", 400, form(TAG, *pics(1), image(1, "drawing.eps", EPS)), "images"),
    Case("tag-text-as-picture", 400, form(TAG, *pics(1), field("images", "not a picture")), "images"),
    Case("tag-json-body", 400, call("POST", TAG, b"{}", Content_Type="application/json")),
    Case("tag-br", 415, form(TAG, *pics(1), Content_Encoding="br")),
    Case("tag-put", 405, call("PUT", TAG)),
    Case("tag-readiness-post", 405, call("POST", "/tagger")),
    Case("tag-no-token", 401, form(TAG, *pics(1), Authorization=None)),
    Case("tag-readiness-no-token", 401, call("GET", "/tagger", Authorization=None)),
    Case("tag-foreign-origin", 403, form(TAG, *pics(1), Origin="http://evil.example")),
    *(Case(f"tag-run-{label}", 404, call(method, f"/tagger/runs/{task}"))
      for method in ("GET", "DELETE")
      for label, task in ((f"{method}-unknown", "000000000000"), (f"{method}-dotdot-encoded", "..%2F..%2Fetc%2Fpasswd"),
                          (f"{method}-dotdot-encoded-dots", "%2e%2e"), (f"{method}-nul", "%00"),
                          (f"{method}-5000-chars", "a" * 5000), (f"{method}-backslash", "..%5C..%5Cconfig.yaml"),
                          (f"{method}-absolute", "%2Fetc%2Fpasswd"), (f"{method}-quote", "'%20OR%201=1--"))),
    Case("tag-run-not-utf8", 404, call("GET", "/tagger/runs/%FF%FE")),
    Case("tag-run-bad-escape", 404, call("DELETE", "/tagger/runs/%ZZ")),
    Case("tag-run-post", 405, call("POST", "/tagger/runs/000000000000")),
    Case("tag-run-delete-no-token", 401, call("DELETE", "/tagger/runs/000000000000", Authorization=None)),
    # --- the loss and the saved epochs ---
    Case("loss-unknown-job", 404, call("GET", "/jobs/000000000000/loss")),
    Case("loss-job-id-nul", 404, call("GET", "/jobs/%00/loss")),
    Case("loss-post", 405, call("POST", job("/loss"))),
    Case("loss-no-token", 401, call("GET", job("/loss"), Authorization=None)),
    Case("checkpoints-unknown-job", 404, call("GET", "/jobs/nope/checkpoints")),
    Case("checkpoints-job-id-5000-chars", 404, call("GET", "/jobs/" + "a" * 5000 + "/checkpoints")),
    Case("checkpoints-delete", 405, call("DELETE", job("/checkpoints"))),
    Case("checkpoints-foreign-host", 403, call("GET", job("/checkpoints"), Host="evil.example:1")),
    *(Case(f"publish-epoch-{label}", 404, call("POST", publish(epoch)))
      for label, epoch in (("minus-1", "-1"), ("0", "0"), ("huge", "999999999999999999999"), ("float", "1.0"),
                           ("dotdot-encoded", "%2e%2e"), ("slash-encoded", "..%2F1"), ("arabic-1", "%D9%A1"),
                           ("superscript-1", "%C2%B9"), ("fullwidth-1", "%EF%BC%91"), ("plus-1", "%2B1"),
                           ("space-1", "%201"), ("nul", "1%00"), ("hex", "0x1"), ("5000-digits", "1" * 5000),
                           ("not-saved", "7"), ("final-name", "Hero"), ("not-utf8", "%FF"), ("bad-escape", "%ZZ"),
                           ("six-zeros", "000000"), ("seven-digits", "0000001"))),
    Case("publish-unknown-job", 404, call("POST", "/jobs/nope/checkpoints/1/publish")),
    Case("publish-job-id-traversal", 404, call("POST", "/jobs/..%2F..%2Fdata/checkpoints/1/publish")),
    Case("publish-get", 405, call("GET", publish("1"))),
    Case("publish-no-token", 401, call("POST", publish("1"), Authorization=None)),
    Case("publish-wrong-token", 401, call("POST", publish("1"), Authorization="Bearer " + "x" * len(TOKEN))),
    Case("publish-foreign-origin", 403, call("POST", publish("1"), Origin="http://evil.example")),
    Case("publish-foreign-host", 403, call("POST", publish("1"), Host="evil.example")),
    Case("publish-null-origin", 403, call("POST", publish("1"), Origin="null")),
    # --- paths that would write into the daemon's console: a forged line, terminal escapes, a NUL ---
    Case("console-forged-line", 404, call("GET", "/jobs/x%0AFORGED%20daemon:%20all%20jobs%20deleted/loss")),
    Case("console-forged-line-cr", 404, call("GET", "/tagger/runs/x%0DFORGED%20line")),
    Case("console-terminal-escape", 404, call("POST", "/jobs/%1B%5B2J%1B%5B31mred/resume")),
    Case("console-nul", 404, call("GET", "/jobs/%00/checkpoints")),
    Case("console-bidi", 404, call("DELETE", "/tagger/runs/%E2%80%AEgnp.exe")),
    Case("console-no-token-forged-line", 401, call("GET", "/jobs%0AFORGED%20line", Authorization=None)),
    # --- previews with odd names ---
    *(Case(f"sample-{label}", 404, call("GET", job(f"/samples/{name}")))
      for label, name in (("dotdot-db", "..%2F..%2Fjobs.sqlite3"), ("dotdot-dots", "%2e%2e"),
                          ("dotdot-config", "..%2F..%2F..%2Fconfig.yaml"), ("backslash", "..%5C..%5Cjobs.sqlite3"),
                          ("absolute", "%2Fetc%2Fpasswd"), ("nul", "x%00.png"), ("5000-chars", "a" * 5000 + ".png"),
                          ("unicode", "%D9%A1.png"), ("dot", "."), ("uploads", "..%2Fuploads%2F001.upload"),
                          ("output", "..%2Foutput%2FHero.safetensors"))),
    Case("sample-in-list-with-dotdot", 404, lambda c: request(c.port, "GET", f"/jobs/{c.job_id}/samples/..%2F"
                                                              f"samples%2F{c.sample}")),
    Case("sample-unknown-job", 404, lambda c: request(c.port, "GET", f"/jobs/nope/samples/{c.sample}")),
    Case("sample-post", 405, lambda c: request(c.port, "POST", f"/jobs/{c.job_id}/samples/{c.sample}")),
    Case("sample-no-token", 401, lambda c: request(c.port, "GET", f"/jobs/{c.job_id}/samples/{c.sample}",
                                                   headers={"Authorization": None})),
    # --- resume on odd ids ---
    Case("resume-done-job", 409, call("POST", job("/resume"))),
    *(Case(f"resume-{label}", 404, call("POST", f"/jobs/{job_id}/resume"))
      for label, job_id in (("unknown", "000000000000"), ("nul", "%00"), ("dotdot-encoded", "..%2F..%2Fetc"),
                            ("5000-chars", "a" * 5000), ("quote", "'%20OR%201=1--"), ("unicode", "%D9%A1"),
                            ("dots", "%2e%2e"))),
    Case("resume-get", 405, call("GET", job("/resume"))),
    Case("resume-no-token", 401, call("POST", job("/resume"), Authorization=None)),
    # --- POST /train: captions ---
    Case("captions-not-json", 400, train(field("captions", "[\"a\""), *pics(8)), "captions"),
    Case("captions-an-object", 400, train(field("captions", '{"0": "a"}'), *pics(8)), "captions"),
    Case("captions-numbers", 400, train(field("captions", json.dumps([1] * 8)), *pics(8)), "captions"),
    Case("captions-null-entries", 400, train(field("captions", json.dumps([None] * 8)), *pics(8)), "captions"),
    Case("captions-nested", 400, train(field("captions", json.dumps([["a"]] * 8)), *pics(8)), "captions"),
    Case("captions-nan", 400, train(field("captions", "[NaN]"), *pics(8)), "captions"),
    Case("captions-5000-digit-number", 400, train(field("captions", "[" + "9" * 5000 + "]"), *pics(8)), "captions"),
    Case("captions-30000-deep", 400, train(field("captions", "[" * 30_000 + "]" * 30_000), *pics(8)), "captions"),
    Case("captions-too-few", 400, train(field("captions", json.dumps(["a"] * 7)), *pics(8)), "captions"),
    Case("captions-too-many", 400, train(field("captions", json.dumps(["a"] * 9)), *pics(8)), "captions"),
    Case("captions-one-too-long", 400, train(field("captions", json.dumps(["a" * 1001] + [""] * 7)), *pics(8)),
         "captions"),
    Case("captions-over-the-field-limit", 400, train(field("captions", json.dumps(["a" * 1000] * 400)), *pics(8)),
         "captions", says="too long"),
    # the longest captions allowed, \u-escaped as Python's json.dumps writes them (12 bytes an emoji): read whole,
    # so the request is refused for its bad picture, not for the size of the field
    Case("captions-25-longest-escaped", 400, train(field("captions", json.dumps(["\U0001F600" * 1000] * 25)),
                                                   *pics(24), image(24, "drawing.eps", EPS)), "images"),
    Case("captions-twice", 400, train(field("captions", json.dumps([""] * 8)), field("captions", "[]"), *pics(8)),
         "captions"),
    Case("captions-not-utf8", 400, train(field("captions", b'["\xff"]'), *pics(8)), "captions"),
    Case("captions-bad-as-file", 400, train(text_as_file("captions", b"nope"), *pics(8)), "captions"),
    Case("captions-after-pictures-count", 400, train(*pics(8), field("captions", json.dumps([""] * 3))), "captions"),
    # --- POST /train: the face crop ---
    *(Case(f"face-crop-{label}", 400, train(field("params", json.dumps({"face_crop": value})), *pics(8)),
           "face_crop")
      for label, value in (("string", "yes"), ("one", 1), ("null", None), ("list", [True]), ("zero", 0))),
    Case("face-crop-as-form-field", 400, train(field("face_crop", "true"), *pics(8)), "face_crop"),
    # --- POST /train: the pictures ---
    Case("train-decompression-bomb", 400, train(*pics(7), image(7, "bomb.png", bomb_png())), "images"),
    Case("train-eps", 400, train(*pics(7), image(7, "drawing.eps", EPS)), "images"),
    Case("train-eps-as-png", 400, train(*pics(7), image(7, "drawing.png", EPS)), "images"),
    Case("train-text-as-picture", 400, train(*pics(7), field("images", "hello")), "images"),
    Case("train-picture-as-text-field", 400, train(*pics(7), (b'Content-Disposition: form-data; name="trigger"',
                                                              picture_bytes(1))), "trigger"),
]


def test_the_corpus_names_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
async def test_each_bad_request_gets_its_4xx_sentence(case: Case, live: Live) -> None:
    before = snapshot(live.root)
    new_console(live)
    reply = await rawhttp.send(live.port, case.build(Ctx(live.port, live.job_id, live.sample)))
    assert reply.status == case.status, reply
    assert reply.content_type == "application/json", reply
    body = reply.json()
    assert isinstance(body, dict) and is_sentence(body.get("error")), body
    if case.key is not None:
        assert body.get("key") == case.key, body
    if case.says is not None:
        assert case.says in body["error"], body
    await assert_unharmed(live, before)


# ------------------------------------------------------------------------------------------------ answered 200
def odd_pictures() -> list[rawhttp.Part]:
    return [image(0, "ok.png"), image(1, "bomb.png", bomb_png()), image(2, "evil.png", b"#!/bin/sh\nrm -rf /\n"),
            picture_as_text(3), image(4, "cut.png", picture_bytes(4)[:40]), image(5, "drawing.eps", EPS)]


async def test_the_picture_check_answers_odd_pictures_with_warnings(live: Live) -> None:
    """Advice, never a refusal: a decompression bomb, a script, a picture sent as a text part and a cut file each
    get their sentence; the good one is measured."""
    before = snapshot(live.root)
    new_console(live)
    reply = await rawhttp.send(live.port, form(f"{CHECK}?resolution=512", *odd_pictures())(Ctx(live.port, "", "")))
    assert reply.status == 200, reply
    pictures = reply.json()["pictures"]
    assert [p["index"] for p in pictures] == [0, 1, 2, 3, 4, 5]
    assert [pictures[i]["width"] for i in (0, 3)] == [96, 96]  # the picture sent as a text part is a picture
    for bad in (pictures[i] for i in (1, 2, 4, 5)):
        assert [w["code"] for w in bad["warnings"]] == ["unreadable"], bad
        assert is_sentence(bad["warnings"][0]["message"])
    assert "pixels" in pictures[1]["warnings"][0]["message"]  # the bomb is named as such
    await assert_unharmed(live, before)


async def test_the_picture_check_names_a_traversing_file_by_its_last_part_only(live: Live) -> None:
    before = snapshot(live.root)
    new_console(live)
    names = ["../../../../pwned.png", "/etc/pwned.png", "C:/Users/pwned.png", "ok/../../x.png", ".."]
    parts = [image(i, name) for i, name in enumerate(names)]
    reply = await rawhttp.send(live.port, form(CHECK, *parts)(Ctx(live.port, "", "")))
    assert reply.status == 200, reply
    assert [p["name"] for p in reply.json()["pictures"]] == ["pwned.png", "pwned.png", "pwned.png", "x.png", ".."]
    await assert_unharmed(live, before)


async def test_the_face_preview_answers_odd_pictures_with_width_0(live: Live) -> None:
    before = snapshot(live.root)
    new_console(live)
    reply = await rawhttp.send(live.port, form(f"{FACES}?resolution=512", *odd_pictures())(Ctx(live.port, "", "")))
    assert reply.status == 200, reply
    body = reply.json()
    assert body["available"] is True, body
    assert [(p["index"], p["width"] > 0) for p in body["pictures"]] == [(0, True), (1, False), (2, False),
                                                                        (3, True), (4, False), (5, False)]
    await assert_unharmed(live, before)


async def test_the_tagger_readiness_and_its_unknown_runs(live: Live) -> None:
    before = snapshot(live.root)
    new_console(live)
    ready = await rawhttp.send(live.port, request(live.port, "GET", "/tagger"))
    assert ready.status == 200 and ready.json()["available"] is True, ready
    await assert_unharmed(live, before)


def formats() -> list[rawhttp.Part]:
    """Pictures in each format a phone or an editor saves (a phone's MPO too), all readable."""
    parts = []
    for i, fmt in enumerate(("JPEG", "MPO", "GIF", "BMP", "TIFF", "WEBP")):
        buf = io.BytesIO()
        extra = {"save_all": True, "append_images": [Image.new("RGB", (96, 128))]} if fmt == "MPO" else {}
        Image.new("RGB", (96, 128), (200, 10 * i, 10)).save(buf, format=fmt, **extra)
        parts.append(image(i, f"p{i}.{fmt.lower()}", buf.getvalue()))
    return parts


async def test_a_tagging_run_of_every_format_is_read_and_forgotten(live: Live) -> None:
    before = snapshot(live.root)
    new_console(live)
    ctx = Ctx(live.port, live.job_id, live.sample)
    started = await rawhttp.send(live.port, form(TAG, field("threshold", "0.35"), *formats())(ctx))
    assert started.status == 202, started
    task_id = started.json()["task_id"]
    end = time.monotonic() + 60
    while (run := (await rawhttp.send(live.port, request(live.port, "GET", f"{TAG}/{task_id}"))).json())[
            "state"] == "running":
        assert time.monotonic() < end, run
        await asyncio.sleep(0.1)
    assert run["state"] == "done" and len(run["pictures"]) == 6, run
    gone = await rawhttp.send(live.port, request(live.port, "DELETE", f"{TAG}/{task_id}"))
    assert gone.status == 200 and gone.json() == {"deleted": task_id, "state": "done"}
    for method in ("GET", "DELETE"):
        again = await rawhttp.send(live.port, request(live.port, method, f"{TAG}/{task_id}"))
        assert again.status == 404 and is_sentence(again.json()["error"])
    await assert_unharmed(live, before)


# ------------------------------------------------------------------------------------------------ more than one
UPLOAD_ROUTES = {"check": CHECK, "faces": FACES, "tagger": TAG, "train": "/train"}


def big_form(route: str) -> bytes:
    """A form of 8 pictures large enough (about 3 MB) that half of it is never one read."""
    noisy = [image(i, f"big{i}.png", os.urandom(400_000)) for i in range(8)]
    head = [field("name", "Hero"), field("trigger", "ohwx")] if route == "/train" else []
    return request(0, "POST", route, body=multipart([*head, *noisy]), headers={"Content-Type": MULTIPART})


async def hold_upload(live: Live, route: str) -> asyncio.StreamWriter:
    """Half an upload, then silence (shorter than the stall limit): the daemon has started storing it."""
    data = big_form(route).replace(b"Host: 127.0.0.1:0", f"Host: 127.0.0.1:{live.port}".encode(), 1)
    _reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    known = set(tmp_entries(live))
    writer.write(data[: len(data) // 2])
    await writer.drain()
    end = time.monotonic() + 10
    while not (set(tmp_entries(live)) - known):
        assert time.monotonic() < end, "the daemon never started storing the upload"
        await asyncio.sleep(0.02)
    return writer


@pytest.mark.parametrize("route", list(UPLOAD_ROUTES))
async def test_a_client_that_leaves_mid_upload_leaves_nothing(route: str, live: Live) -> None:
    before = snapshot(live.root)
    new_console(live)
    writer = await hold_upload(live, UPLOAD_ROUTES[route])
    writer.transport.abort()  # a dropped connection, no FIN handshake
    assert await settle_tmp(live) == []
    await asyncio.sleep(0.2)  # the handler's last line
    console = new_console(live)
    assert "client left" in console, console
    assert trouble(console) == []
    await assert_unharmed(live, before)


@pytest.mark.parametrize("route", ["check", "faces", "tagger"])
async def test_a_stalled_upload_is_answered_408_and_removed(route: str, live: Live) -> None:
    before = snapshot(live.root)
    new_console(live)
    data = form(UPLOAD_ROUTES[route], *pics(8))(Ctx(live.port, "", ""))
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    try:
        writer.write(data[: len(data) - 300])  # and then nothing more
        await writer.drain()
        reply = await asyncio.wait_for(rawhttp.read_reply(reader), STALL_S + 10)
    finally:
        writer.close()
    assert reply.status == 408 and f"nothing arrived for {STALL_S} s" in reply.json()["error"], reply
    await assert_unharmed(live, before)


async def test_tagging_runs_started_at_once_are_one_run_and_sentences(live: Live) -> None:
    before = snapshot(live.root)
    new_console(live)
    ctx = Ctx(live.port, "", "")
    replies = await asyncio.gather(*(rawhttp.send(live.port, form(TAG, *pics(2))(ctx)) for _ in range(4)))
    statuses = sorted(r.status for r in replies)
    assert set(statuses) <= {202, 409, 429} and statuses.count(202) >= 1, statuses
    for reply in replies:
        assert reply.content_type == "application/json"
        assert reply.status == 202 or is_sentence(reply.json()["error"]), reply
    for task_id in (r.json()["task_id"] for r in replies if r.status == 202):
        end = time.monotonic() + 60
        while (await rawhttp.send(live.port, request(live.port, "GET", f"{TAG}/{task_id}"))).json()[
                "state"] == "running":
            assert time.monotonic() < end
            await asyncio.sleep(0.1)
        assert (await rawhttp.send(live.port, request(live.port, "DELETE", f"{TAG}/{task_id}"))).status == 200
    await assert_unharmed(live, before)


async def test_uploads_beyond_max_uploads_are_429_and_every_slot_comes_back(live: Live) -> None:
    before = snapshot(live.root)
    new_console(live)
    holders = [await hold_upload(live, CHECK), await hold_upload(live, TAG)]  # max_uploads is 2
    try:
        ctx = Ctx(live.port, live.job_id, live.sample)
        refused = await asyncio.gather(*(rawhttp.send(live.port, form(route, *pics(2))(ctx))
                                         for route in (CHECK, FACES, TAG, CHECK, FACES, TAG)))
        refused.append(await rawhttp.send(live.port, train(*pics(8))(ctx)))
        for reply in refused:
            assert reply.status == 429, reply
            assert is_sentence(reply.json()["error"]) and "max_uploads" in reply.json()["error"]
    finally:
        for writer in holders:
            writer.transport.abort()
    assert await settle_tmp(live) == []
    # the slots came back: many at once now get 200 or 429, never anything else, and the daemon keeps no picture
    ctx = Ctx(live.port, live.job_id, live.sample)
    many = await asyncio.gather(*(rawhttp.send(live.port, form(CHECK, *pics(3))(ctx)) for _ in range(12)))
    assert {r.status for r in many} <= {200, 429} and 200 in {r.status for r in many}, [r.status for r in many]
    assert all(r.content_type == "application/json" for r in many)
    await assert_unharmed(live, before)


# ------------------------------------------------------------------------------------------------ publishing
async def test_an_epoch_with_leading_zeros_is_that_epoch_published_inside_eds_folder(live: Live) -> None:
    """Runs last against the live daemon: it is the one request here that stores something."""
    before = snapshot(live.root)
    new_console(live)
    first = await rawhttp.send(live.port, request(live.port, "POST", f"/jobs/{live.job_id}/checkpoints/01/publish"))
    assert first.status == 201, first
    target = live.lora_dir / "Hero-e01.safetensors"
    assert first.json() == {"epoch": 1, "lora_id": "Hero-e01", "artifact": str(target)}
    again = await rawhttp.send(live.port, request(live.port, "POST", f"/jobs/{live.job_id}/checkpoints/1/publish"))
    assert again.status == 200 and again.json() == first.json()
    after = snapshot(live.root)
    assert set(after) - set(before) == {str(target.relative_to(live.root))}
    assert {k: v for k, v in after.items() if k in before} == before
    assert trouble(new_console(live)) == []


HOSTILE_NAMES = ["../../../pwned", "..", ".", "/etc/pwned", "a/../../b", "..\\..\\pwned", "C:\\pwned", "CON",
                 "x" * 500, "\u202epwned", "", " ", "-", "~root", "$(touch pwned)", "pwned\x00.txt", "Zoë/../é"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_published_epoch_stays_in_eds_folder_whatever_the_jobs_name(tmp_path: Path, name: str) -> None:
    """The job's name reaches the file name only through slugify (the API refuses such names; an old or edited
    database could still hold one)."""
    from daemon.jobs.models import Job
    from daemon.pipeline import checkpoints
    from daemon.pipeline.runner import output_name

    lora_dir = tmp_path / "ed" / "models" / "lora"
    source = tmp_path / "job" / "out.safetensors"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"lora bytes")
    job = Job(id="j1", name=name, trigger="ohwx", class_token="person", base_model="/m.safetensors", params={},
              image_count=8)
    stem = output_name(job)
    for epoch in (1, 100, 999_999):
        published = checkpoints.copy_epoch(checkpoints.Checkpoint(epoch, source, 10, False, True), lora_dir, stem)
        target = Path(published.artifact)
        assert target.parent == lora_dir and target.read_bytes() == b"lora bytes", target
        assert "/" not in published.lora_id and ".." not in published.lora_id
    everything = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert everything == {"job/out.safetensors", *(f"ed/models/lora/{p.name}" for p in lora_dir.iterdir())}
    assert len(list(lora_dir.iterdir())) == 3  # no temporary file left either


# ------------------------------------------------------------------------------------------------ the tagger probe
async def test_many_tagger_readiness_calls_at_once_start_one_probe_and_starve_nothing(
        tmp_path: Path, start_daemon: Callable[..., Any]) -> None:
    """GET /tagger asks the kohya python whether it imports onnxruntime (a subprocess, up to a minute cold). Forty
    calls at once while nothing is cached run one probe, and the daemon's worker threads stay free for others."""
    probes = tmp_path / "probes.txt"
    python = tmp_path / "slow-python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {probes}\nsleep 3\necho "No module named onnxruntime" >&2\nexit 1\n',
                      encoding="utf-8")
    python.chmod(0o755)
    cfg = make_config(tmp_path, port=free_port(), kohya={"python": str(python),
                                                         "workspace": str(sd_scripts_with_double(tmp_path))})
    client = await start_daemon(cfg)
    calls = [asyncio.create_task(client.get("/tagger")) for _ in range(40)]
    await asyncio.sleep(0.5)  # every call has reached the daemon; the probe runs
    started = time.monotonic()
    jobs = await client.get("/jobs")
    assert jobs.status == 200 and time.monotonic() - started < 1.5, "GET /jobs waited for the tagger probes"
    answers = await asyncio.gather(*calls)
    for resp in answers:
        body = await resp.json()
        assert resp.status == 200 and body["available"] is False, body
        assert "onnxruntime" in body["problems"][0]["detail"]
    assert len([line for line in probes.read_text().splitlines() if "onnx" in line]) == 1


def test_the_onnx_probe_runs_once_for_callers_that_ask_together(tmp_path: Path) -> None:
    """/config/test asks from its own thread: callers in threads share one probe too; a refresh asks again."""
    from concurrent.futures import ThreadPoolExecutor

    from daemon.pipeline.tagger import OnnxProbe

    probes = tmp_path / "probes.txt"
    python = tmp_path / "slow-python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {probes}\nsleep 1\nexit 1\n', encoding="utf-8")
    python.chmod(0o755)
    probe = OnnxProbe()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: probe.problem(str(python)), range(6)))
    assert len(set(answers)) == 1 and answers[0] is not None
    assert len(probes.read_text().splitlines()) == 1
    probe.problem(str(python), refresh=True)
    assert len(probes.read_text().splitlines()) == 2
