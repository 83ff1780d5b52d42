"""The bad-input corpus: hostile, broken and odd requests against a real listening daemon.

Each case must be refused with its 4xx status and a JSON `{"error": sentence}`; afterwards the daemon is
healthy, nothing was stored (no job, no upload folder, nothing in ED's LoRA folder, nothing outside the
data dir) and no log record is an ERROR or carries a traceback.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from daemon.config import Config
from tests import rawhttp
from tests.helpers import TOKEN, picture_bytes
from tests.rawhttp import field, form_request, image, request

MARKER = "pwned-corpus"  # every traversal case aims a file of this name somewhere outside the data dir


@dataclass(frozen=True)
class Ctx:
    port: int
    root: Path  # the test's folder: data dir, ED's folders and the workspace are below it


@dataclass(frozen=True)
class Case:
    id: str
    status: int
    build: Callable[[Ctx], bytes | list[bytes]]
    marks: tuple[pytest.MarkDecorator, ...] = ()


def good(*, name: str | bytes = "Hero", trigger: str | bytes = "ohwx") -> list[rawhttp.Part]:
    return [field("name", name), field("trigger", trigger)]


def eight(**kw: str | bytes) -> list[rawhttp.Part]:
    return [*good(**kw), *(image(i, f"pic{i}.png") for i in range(8))]


def train(*parts: rawhttp.Part, **headers: str | bytes | None) -> Callable[[Ctx], bytes]:
    return lambda c: form_request(c.port, list(parts), headers={k.replace("_", "-"): v for k, v in headers.items()})


def call(method: str, path: str, body: bytes = b"", **headers: str | bytes | None) -> Callable[[Ctx], bytes]:
    return lambda c: request(c.port, method, path, body=body,
                             headers={k.replace("_", "-"): v for k, v in headers.items()})


def params(text: str | bytes) -> Callable[[Ctx], bytes]:
    return train(*eight(), field("params", text))


def picture(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def traversal(name: Callable[[Ctx], str]) -> Callable[[Ctx], bytes]:
    # One picture only: refused for the count after the file was stored under our own name.
    return lambda c: form_request(c.port, [*good(), image(0, name(c))])


GZIP_FORM = gzip.compress(rawhttp.multipart(eight()))
MULTIPART = f"multipart/form-data; boundary={rawhttp.BOUNDARY}"

CASES: list[Case] = [
    # --- part headers the multipart parser cannot read ---
    Case("filename-nul", 400, train(*good(), image(0, b"a\x00b.png"))),
    Case("filename-esc", 400, train(*good(), image(0, b"a\x1b[31mb.png"))),
    Case("filename-cr", 400, train(*good(), image(0, b"a\rb.png"))),
    Case("filename-lf", 400, train(*good(), image(0, b"a\nb.png"))),
    Case("filename-del", 400, train(*good(), image(0, b"a\x7fb.png"))),
    Case("filename-10000-chars", 400, train(*good(), image(0, "a" * 10_000 + ".png"))),
    Case("part-header-over-8k", 400, train(*good(), (b'Content-Disposition: form-data; name="images"; '
                                                       b'filename="x.png"\r\nX-Pad: ' + b"p" * 9000, b"x"))),
    Case("field-name-with-control-char", 400, train((b'Content-Disposition: form-data; name="na\x01me"', b"Hero"))),
    Case("part-header-without-colon", 400, train((b"this is not a header", b"x"))),
    Case("filename-not-utf8", 400, train(*good(), image(0, b"\xff\xfe.png"))),
    Case("filename-star-bad-charset", 400, train(*good(), (
        b"Content-Disposition: form-data; name=\"images\"; filename*=nope''%ff%fe.png", picture_bytes(0)))),
    # --- the body is not what its headers say ---
    Case("gzip-header-plain-body", 415, train(*eight(), Content_Encoding="gzip")),
    Case("gzip-header-gzip-body", 415, lambda c: request(c.port, "POST", "/train", body=GZIP_FORM, headers={
        "Content-Type": MULTIPART, "Content-Encoding": "gzip"})),
    Case("deflate-header-plain-body", 415, train(*eight(), Content_Encoding="deflate")),
    Case("br-encoding", 415, train(*eight(), Content_Encoding="br")),
    Case("zstd-encoding", 415, train(*eight(), Content_Encoding="zstd")),
    Case("unknown-encoding", 415, train(*eight(), Content_Encoding="x-rot13")),
    Case("stacked-encodings", 415, train(*eight(), Content_Encoding="gzip, deflate")),
    Case("boundary-missing", 400, train(*eight(), Content_Type="multipart/form-data")),
    Case("boundary-not-in-body", 400, train(*eight(), Content_Type="multipart/form-data; boundary=elsewhere")),
    Case("content-type-json", 400, call("POST", "/train", b'{"name": "Hero"}', Content_Type="application/json")),
    Case("content-type-urlencoded", 400, call("POST", "/train", b"name=Hero&trigger=ohwx",
                                              Content_Type="application/x-www-form-urlencoded")),
    Case("content-type-missing", 400, call("POST", "/train", b"name=Hero")),
    Case("empty-body", 400, call("POST", "/train", b"", Content_Type=MULTIPART)),
    Case("nested-multipart", 400, train((b'Content-Disposition: form-data; name="images"\r\n'
                                         b"Content-Type: multipart/mixed; boundary=inner",
                                         b"--inner\r\n\r\nx\r\n--inner--"))),
    # aiohttp's chunk parser fails without waking the handler, which then hears nothing more: the stall limit.
    Case("chunked-garbage-after-headers", 408, lambda c: [
        request(c.port, "POST", "/train", headers={"Content-Type": MULTIPART, "Transfer-Encoding": "chunked",
                                                   "Content-Length": None}),
        b"zz\r\nnot a chunk\r\n0\r\n\r\n"]),
    Case("body-shorter-than-length", 408, lambda c: [
        request(c.port, "POST", "/train", headers={"Content-Type": MULTIPART, "Content-Length": "100000"}),
        rawhttp.multipart(good())]),
    # --- the params field ---
    Case("params-5000-digit-int", 400, params('{"epochs": ' + "9" * 5000 + "}")),
    Case("params-30000-deep", 400, params("[" * 30_000 + "]" * 30_000)),
    Case("params-1500-deep-short", 400, params("[" * 1500 + "]" * 1500)),
    Case("params-30-digit-int", 400, params('{"epochs": ' + "1" * 30 + "}")),
    Case("params-nan", 400, params('{"unet_lr": NaN}')),
    Case("params-infinity", 400, params('{"unet_lr": -Infinity}')),
    Case("params-float-overflow", 400, params('{"unet_lr": 1e999}')),
    Case("params-not-json", 400, params("{epochs: 3")),
    Case("params-a-list", 400, params("[1, 2]")),
    Case("params-unknown-key", 400, params('{"shell": "rm -rf /"}')),
    Case("params-bool-epochs", 400, params('{"epochs": true}')),
    Case("params-not-utf8", 400, params(b'{"epochs": "\xff"}')),
    Case("params-over-64k", 400, params('{"a": "' + "x" * 70_000 + '"}')),
    # --- the typed fields ---
    Case("name-nul", 400, train(*eight(name="He\x00ro"))),
    Case("name-escape", 400, train(*eight(name="\x1b[2JHero"))),
    Case("name-empty", 400, train(*eight(name=""))),
    Case("name-10000-chars", 400, train(*eight(name="H" * 10_000))),
    Case("name-rtl-override", 400, train(*eight(name="Hero\u202egnp.exe"))),
    Case("name-not-utf8", 400, train(*eight(name=b"H\xe9ro"))),
    Case("trigger-double-dash-option", 400, train(*eight(trigger="--help"))),
    Case("trigger-dash", 400, train(*eight(trigger="-ohwx"))),
    Case("trigger-nul", 400, train(*eight(trigger="oh\x00wx"))),
    Case("trigger-escape", 400, train(*eight(trigger="oh\x1bwx"))),
    Case("trigger-bidi", 400, train(*eight(trigger="oh\u2066wx"))),
    Case("trigger-with-space", 400, train(*eight(trigger="oh wx"))),
    Case("class-with-prompt-option", 400, train(*eight(), field("class_token", "woman --n ugly --s 1"))),
    Case("class-newline", 400, train(*eight(), field("class_token", "woman\n--w 8"))),
    Case("class-escape", 400, train(*eight(), field("class_token", "wo\x1bman"))),
    Case("class-leading-dash", 400, train(*eight(), field("class_token", "-woman"))),
    Case("base-model-traversal", 400, train(*eight(), field("base_model", "../../../../etc/passwd"))),
    Case("base-model-nul", 400, train(*eight(), field("base_model", "sd\x00.safetensors"))),
    Case("base-model-1000-chars", 400, train(*eight(), field("base_model", "m" * 1000))),
    Case("name-twice", 400, train(*eight(), field("name", "Other"))),
    Case("unknown-field", 400, train(*eight(), field("cmd", "id"))),
    Case("part-without-name", 400, train((b"Content-Disposition: form-data", b"x"), *eight())),
    Case("part-without-disposition", 400, train((b"Content-Type: text/plain", b"x"), *eight())),
    # --- the pictures ---
    Case("no-pictures", 400, train(*good())),
    Case("26-pictures", 400, train(*good(), *(image(i, f"p{i}.png") for i in range(26)))),
    Case("empty-picture", 400, train(*eight()[:-1], image(7, "empty.png", b""))),
    Case("not-a-picture", 400, train(*eight()[:-1], image(7, "evil.png", b"#!/bin/sh\nrm -rf /\n"))),
    Case("truncated-png", 400, train(*eight()[:-1], image(7, "cut.png", picture_bytes(7)[:40]))),
    Case("tiny-picture", 400, train(*eight()[:-1], image(7, "tiny.png", picture((8, 8))))),
    Case("aspect-64x12000", 400, train(*eight()[:-1], image(7, "strip.png", picture((64, 12_000))))),
    Case("filename-traversal-relative", 400, traversal(lambda c: f"../../../../{MARKER}.png")),
    Case("filename-traversal-backslash", 400, traversal(lambda c: f"..\\..\\..\\{MARKER}.png")),
    Case("filename-traversal-absolute", 400, traversal(lambda c: f"{c.root}/{MARKER}.png")),
    Case("filename-traversal-encoded", 400, lambda c: form_request(c.port, [*good(), (
        b"Content-Disposition: form-data; name=\"images\"; filename*=UTF-8''..%2F..%2F..%2F" + MARKER.encode()
        + b".png", picture_bytes(0))])),
    # --- the token ---
    Case("token-not-utf8", 401, call("GET", "/jobs", Authorization=b"Bearer \xff\xfe\xfd")),
    Case("token-latin1", 401, call("GET", "/jobs", Authorization=b"Bearer caf\xe9")),
    Case("token-missing", 401, call("GET", "/jobs", Authorization=None)),
    Case("token-empty", 401, call("GET", "/jobs", Authorization="Bearer ")),
    Case("token-basic-scheme", 401, call("GET", "/jobs", Authorization=f"Basic {TOKEN}")),
    Case("token-wrong", 401, call("GET", "/jobs", Authorization="Bearer " + "x" * len(TOKEN))),
    Case("token-with-suffix", 401, call("GET", "/jobs", Authorization=f"Bearer {TOKEN}x")),
    Case("token-8000-chars", 401, call("GET", "/jobs", Authorization="Bearer " + "t" * 8000)),
    Case("token-in-query-not-ws", 401, call("GET", f"/jobs?token={TOKEN}", Authorization=None)),
    Case("token-missing-on-train", 401, train(*eight(), Authorization=None)),
    # --- host and origin ---
    Case("host-foreign", 403, call("GET", "/jobs", Host="evil.example:9131")),
    Case("host-not-ascii", 403, call("GET", "/jobs", Host=b"\xff\xfe:9131")),
    Case("origin-foreign", 403, call("POST", "/train", Origin="http://evil.example")),
    # --- methods, routes and job ids ---
    Case("put-train", 405, call("PUT", "/train")),
    Case("delete-health", 405, call("DELETE", "/health")),
    Case("patch-jobs", 405, call("PATCH", "/jobs")),
    Case("get-train", 405, call("GET", "/train")),
    Case("unknown-route", 404, call("GET", "/admin")),
    Case("dot-dot-route", 404, call("GET", "/jobs/../../etc/passwd")),
    Case("unknown-job", 404, call("GET", "/jobs/000000000000/status")),
    Case("job-id-nul", 404, call("GET", "/jobs/%00/status")),
    Case("job-id-5000-chars", 404, call("GET", "/jobs/" + "a" * 5000 + "/status")),
    Case("job-id-quote", 404, call("GET", "/jobs/'%20OR%201=1--/events")),
    Case("cancel-unknown-job", 404, call("POST", "/jobs/nope/cancel")),
    Case("delete-unknown-job", 404, call("DELETE", "/jobs/nope")),
    Case("logs-unknown-job", 404, call("GET", "/jobs/nope/logs")),
    Case("sample-traversal", 404, call("GET", "/jobs/nope/samples/..%2F..%2Fjobs.sqlite3")),
    Case("ws-without-upgrade", 400, call("GET", "/ws")),
]


STALL_S = 2  # the corpus daemon's upload_stall_s: a body that stops coming is answered within it


@pytest.fixture
def config(tmp_path: Path) -> Config:
    from tests.helpers import free_port, make_config

    return make_config(tmp_path, port=free_port(), upload_stall_s=STALL_S)


def test_the_corpus_is_large_and_its_names_unique() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


def files_outside(root: Path, data_dir: Path) -> set[Path]:
    return {p for p in root.rglob("*") if data_dir not in p.parents and p != data_dir}


def is_sentence(text: object) -> bool:
    return isinstance(text, str) and len(text) >= 12 and " " in text and text.rstrip().endswith(".")


async def assert_unharmed(client: TestClient, config: Config, before: set[Path], caplog) -> None:
    health = await client.get("/health")
    assert health.status == 200
    assert (await client.get("/jobs")).status == 200
    assert (await (await client.get("/jobs")).json())["jobs"] == []
    assert files_outside(config.data_dir.parent, config.data_dir) == before
    assert not any(config.ed_lora_dir.iterdir()) if config.ed_lora_dir.exists() else True
    tmp = config.data_dir / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []
    assert not config.jobs_dir.exists() or list(config.jobs_dir.iterdir()) == []
    assert not list(Path("/tmp").glob(f"{MARKER}*"))
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
async def test_each_bad_request_gets_a_4xx_sentence(case: Case, client: TestClient, config: Config,
                                                    caplog) -> None:
    caplog.set_level(logging.INFO)
    before = files_outside(config.data_dir.parent, config.data_dir)
    reply = await rawhttp.send(config.port, case.build(Ctx(config.port, config.data_dir.parent)))
    assert reply.status == case.status, reply
    assert reply.content_type == "application/json", reply
    body = reply.json()
    assert isinstance(body, dict) and is_sentence(body.get("error")), body
    assert "Traceback" not in body["error"]
    await assert_unharmed(client, config, before, caplog)


# --- requests that are not HTTP at all: aiohttp answers them before the app sees them ---

NOT_HTTP = {
    "request-header-over-8k": lambda p: request(p, headers={"X-Big": "a" * 10_000}),
    "request-header-nul": lambda p: request(p, headers={"X-Nul": b"a\x00b"}),
    "request-header-name-space": lambda p: request(p, headers={"Bad Name": "x"}),
    "bad-content-length": lambda p: request(p, "POST", "/train", headers={"Content-Length": "-5"}),
    "content-length-and-chunked": lambda p: request(p, "POST", "/train", body=b"0\r\n\r\n", headers={
        "Transfer-Encoding": "chunked"}),
    "request-line-garbage": lambda p: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "http-version-9": lambda p: b"GET /health HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    "chunk-size-garbage": lambda p: request(p, "POST", "/train", body=b"zz\r\nx\r\n0\r\n\r\n", headers={
        "Transfer-Encoding": "chunked", "Content-Length": None, "Content-Type": MULTIPART}),
}


@pytest.mark.parametrize("name", list(NOT_HTTP))
async def test_requests_that_are_not_http_get_400_and_one_quiet_line(name: str, client: TestClient,
                                                                     config: Config, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="daemon.web.http")
    before = files_outside(config.data_dir.parent, config.data_dir)
    reply = await rawhttp.send(config.port, NOT_HTTP[name](config.port))
    assert 400 <= reply.status < 500, reply
    await assert_unharmed(client, config, before, caplog)


# --- behaviours that need more than one request ---


async def test_head_health_needs_no_token_like_get(client: TestClient, config: Config) -> None:
    for method in ("GET", "HEAD"):
        reply = await rawhttp.send(config.port, request(config.port, method, "/health", headers={
            "Authorization": None}))
        assert reply.status == 200, (method, reply)
    reply = await rawhttp.send(config.port, request(config.port, "HEAD", "/jobs", headers={"Authorization": None}))
    assert reply.status == 401


async def test_a_client_that_leaves_mid_upload_is_cleaned_up_quietly(client: TestClient, config: Config,
                                                                     caplog) -> None:
    caplog.set_level(logging.INFO)
    body = rawhttp.multipart(eight())
    data = request(config.port, "POST", "/train", body=body, headers={"Content-Type": MULTIPART})
    _reader, writer = await asyncio.open_connection("127.0.0.1", config.port)
    writer.write(data[: len(data) // 2])
    await writer.drain()
    tmp = config.data_dir / "tmp"
    for _ in range(100):  # the upload folder exists: the daemon is storing pictures
        if tmp.exists() and any(tmp.iterdir()):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the daemon never started storing the upload")
    writer.transport.abort()  # a dropped connection, no FIN handshake
    for _ in range(100):
        if not any(tmp.iterdir()):
            break
        await asyncio.sleep(0.05)
    assert list(tmp.iterdir()) == []
    assert any("client left" in r.getMessage() for r in caplog.records)
    await assert_unharmed(client, config, files_outside(config.data_dir.parent, config.data_dir), caplog)


async def test_text_fields_are_checked_before_the_pictures_arrive(client: TestClient, config: Config) -> None:
    noise = bytes(range(256)) * 800  # 200 KiB a "picture": never looked at, the trigger is refused first
    body = rawhttp.multipart([*good(trigger="--help"), *(image(i, f"p{i}.png", noise) for i in range(8))])
    data = request(config.port, "POST", "/train", body=body, headers={"Content-Type": MULTIPART})
    reader, writer = await asyncio.open_connection("127.0.0.1", config.port)
    answer = asyncio.create_task(rawhttp.read_reply(reader))
    tmp, sent, stored = config.data_dir / "tmp", 0, set()
    try:
        while sent < len(data) and not answer.done():  # a slow client: 16 KiB every 20 ms
            writer.write(data[sent:sent + 16_384])
            await writer.drain()
            sent += 16_384
            await asyncio.sleep(0.02)
            stored |= {p.name for p in tmp.glob("*/*")}
        reply = await asyncio.wait_for(answer, 10)
    finally:
        writer.close()
    assert reply.status == 400 and reply.json()["key"] == "trigger"
    assert sent < len(data) // 4, "the daemon read the pictures before refusing the trigger"
    assert stored == set()  # not one picture file was written


async def stalled_upload(config: Config, wait: float) -> rawhttp.Reply:
    body = rawhttp.multipart(eight())
    data = request(config.port, "POST", "/train", body=body, headers={"Content-Type": MULTIPART})
    reader, writer = await asyncio.open_connection("127.0.0.1", config.port)
    try:
        writer.write(data[: len(data) - 1000])  # and then nothing more
        await writer.drain()
        return await asyncio.wait_for(rawhttp.read_reply(reader), wait)
    finally:
        writer.close()


async def test_a_stalled_upload_is_answered_408_and_removed(start_daemon, tmp_path: Path) -> None:
    from tests.helpers import free_port, make_config

    cfg = make_config(tmp_path, port=free_port(), upload_stall_s=1, upload_timeout_s=60)
    client = await start_daemon(cfg)
    reply = await stalled_upload(cfg, wait=20)
    assert reply.status == 408 and "nothing arrived for 1 s" in reply.json()["error"]
    assert list((cfg.data_dir / "tmp").iterdir()) == []
    assert (await client.get("/health")).status == 200


async def test_a_trickling_upload_hits_the_total_limit(start_daemon, tmp_path: Path) -> None:
    from tests.helpers import free_port, make_config

    cfg = make_config(tmp_path, port=free_port(), upload_stall_s=2, upload_timeout_s=3)
    client = await start_daemon(cfg)
    data = form_request(cfg.port, eight())
    reader, writer = await asyncio.open_connection("127.0.0.1", cfg.port)
    answer = asyncio.create_task(rawhttp.read_reply(reader))
    try:
        for start in range(0, len(data), 200):  # 200 bytes every 0.5 s: never silent for 2 s
            if answer.done():
                break
            writer.write(data[start:start + 200])
            await writer.drain()
            await asyncio.sleep(0.5)
        reply = await asyncio.wait_for(answer, 20)
    finally:
        writer.close()
    assert reply.status == 408 and "longer than 3 s" in reply.json()["error"]
    assert list((cfg.data_dir / "tmp").iterdir()) == []
    assert (await client.get("/health")).status == 200


async def test_one_upload_too_many_at_once_is_answered_429(start_daemon, tmp_path: Path) -> None:
    from tests.helpers import free_port, make_config

    cfg = make_config(tmp_path, port=free_port(), max_uploads=1, upload_stall_s=5)
    client = await start_daemon(cfg)
    data = form_request(cfg.port, eight())
    reader, writer = await asyncio.open_connection("127.0.0.1", cfg.port)
    writer.write(data[: len(data) // 2])  # holds the only slot
    await writer.drain()
    for _ in range(100):
        if (cfg.data_dir / "tmp").exists() and any((cfg.data_dir / "tmp").iterdir()):
            break
        await asyncio.sleep(0.02)
    second = await rawhttp.send(cfg.port, form_request(cfg.port, eight()))
    assert second.status == 429 and is_sentence(second.json()["error"])
    writer.write(data[len(data) // 2:])  # the first one completes normally
    await writer.drain()
    first = await asyncio.wait_for(rawhttp.read_reply(reader), 20)
    writer.close()
    assert first.status == 202
    third = await rawhttp.send(cfg.port, form_request(cfg.port, eight()))
    assert third.status == 202  # the slot was given back
    assert (await client.get("/health")).status == 200


async def test_one_job_too_many_in_the_queue_is_answered_429(start_daemon, tmp_path: Path, monkeypatch) -> None:
    from tests.helpers import free_port, make_config

    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.2")  # the first job trains while the others wait
    cfg = make_config(tmp_path, port=free_port(), max_queued_jobs=2)
    client = await start_daemon(cfg)
    ids = []
    for _ in range(3):  # one training + two waiting
        reply = await rawhttp.send(cfg.port, form_request(cfg.port, eight()))
        assert reply.status == 202, reply
        ids.append(reply.json()["job_id"])
        await asyncio.sleep(0.3)
    refused = await rawhttp.send(cfg.port, form_request(cfg.port, eight()))
    assert refused.status == 429 and "at most 2" in refused.json()["error"]
    assert not list((cfg.data_dir / "tmp").iterdir())
    jobs = (await (await client.get("/jobs")).json())["jobs"]
    assert sorted(j["id"] for j in jobs) == sorted(ids)  # the refused one left no job behind
    assert sorted(p.name for p in cfg.jobs_dir.iterdir()) == sorted(ids)
    for job_id in ids:
        await client.post(f"/jobs/{job_id}/cancel")


async def test_samples_never_follow_a_symlink(client: TestClient, config: Config) -> None:
    import time

    from daemon.jobs.models import Job, JobState
    from daemon.pipeline.runner import job_paths
    from daemon.web.keys import STORE

    secret = config.data_dir.parent / "secret.png"
    secret.write_bytes(picture_bytes(1))
    job = Job(id="symlinkjob01", name="Hero", trigger="ohwx", class_token="person", base_model="/m.safetensors",
              params={}, image_count=8, created_at=time.time(), state=JobState.DONE,
              samples=["real.png", "link.png", "inside.png"])
    client.server.app[STORE].insert(job)
    client.server.app[STORE].save(job)  # insert leaves out the samples
    samples = job_paths(config, job.id).samples
    samples.mkdir(parents=True)
    (samples / "real.png").write_bytes(picture_bytes(2))
    (samples / "link.png").symlink_to(secret)
    (samples / "inside.png").symlink_to(samples / "real.png")
    assert (await client.get(f"/jobs/{job.id}/samples/real.png")).status == 200
    for name in ("link.png", "inside.png"):
        resp = await client.get(f"/jobs/{job.id}/samples/{name}")
        assert resp.status == 404 and is_sentence((await resp.json())["error"]), name
    # the whole samples folder swapped for a link to elsewhere
    (samples / "link.png").unlink()
    (samples / "inside.png").unlink()
    samples.rename(samples.with_name("moved"))
    elsewhere = config.data_dir.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "real.png").write_bytes(picture_bytes(3))
    samples.symlink_to(elsewhere, target_is_directory=True)
    assert (await client.get(f"/jobs/{job.id}/samples/real.png")).status == 404


# --- the values that reach kohya ---


def test_user_values_reach_kohyas_parser_as_values_not_options() -> None:
    import importlib.util

    from daemon.pipeline.kohya import KohyaLaunch, build_command
    from daemon.pipeline.params import resolve_params
    from tests.helpers import KOHYA_DOUBLE

    spec = importlib.util.spec_from_file_location("kohya_double_corpus", KOHYA_DOUBLE)
    assert spec and spec.loader
    double = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(double)
    launch = KohyaLaunch(script_path="/sd/train_network.py", workspace="/sd", accelerate_bin="accelerate",
                         python="/venv/python", base_model="/m.safetensors", dataset_config="/j/d.toml",
                         output_dir="/j/out", output_name="--help", logging_dir=None, tokenizer_cache_dir=None,
                         extra_args=(), cpu=False, trigger="--resume", job_id="j1")
    argv = build_command(resolve_params({}, image_count=10, cpu=False), launch)
    args = double.build_parser().parse_args(argv[argv.index("/sd/train_network.py") + 1:])
    assert args.metadata_trigger_phrase == "--resume" and args.output_name == "--help"
    assert args.metadata_title == "--help" and args.training_comment == "job=j1; trigger=--resume"


@pytest.mark.parametrize("class_token", ["woman --n ugly", "woman\n--w 64", "--d 1 woman", "a -- b"])
def test_the_prompt_file_never_carries_user_options(class_token: str) -> None:
    from daemon.pipeline.kohya import sample_prompt_file
    from daemon.pipeline.params import resolve_params

    text = sample_prompt_file(trigger="ohwx", class_token=class_token,
                              params=resolve_params({}, image_count=10, cpu=False), cpu=False)
    assert text.count("\n") == 1
    prompt, *options = text.strip().split(" --")  # how kohya reads the line
    assert prompt.startswith("ohwx ") and prompt.endswith(", portrait, looking at viewer")
    assert [o.split(" ", 1)[0] for o in options] == ["n", "w", "h", "d", "s", "l"]


def test_params_parse_failures_are_bad_input_not_crashes() -> None:
    from daemon.errors import BadInput
    from daemon.jobs.fields import parse_params

    for raw in ("9" * 5000, "[" * 3000, '{"a": NaN}', '{"a": 123456789012345678901234}', "[]", "{"):
        with pytest.raises(BadInput):
            parse_params(raw)
    assert parse_params('{"epochs": 3, "unet_lr": 1e-4}') == {"epochs": 3, "unet_lr": 1e-4}


def test_the_typed_fields_still_take_ordinary_values() -> None:
    from daemon.jobs import fields

    assert fields.check_name("Hero-1 the_2nd") == "Hero-1 the_2nd"
    assert fields.check_trigger("oh-wx") == "oh-wx" and fields.check_trigger("ÿøñ") == "ÿøñ"
    assert fields.check_class_token("  young   woman ") == "young woman"
    assert fields.check_class_token("") == "person" and fields.check_class_token("T-rex") == "T-rex"


@pytest.mark.parametrize(("key", "value"), [("max_uploads", 0), ("max_uploads", "2"), ("max_queued_jobs", 0),
                                            ("upload_stall_s", 0), ("upload_timeout_s", 5)])
def test_the_upload_limits_are_validated_settings(key: str, value: object) -> None:
    from daemon.config import ConfigError, parse_config

    raw = {"token": TOKEN, key: value}  # upload_timeout_s 5 is below the default stall limit (60 s)
    with pytest.raises(ConfigError, match=key):
        parse_config(raw, base_dir=None)
    cfg = parse_config({"token": TOKEN}, base_dir=None)
    assert (cfg.max_uploads, cfg.max_queued_jobs, cfg.upload_stall_s, cfg.upload_timeout_s) == (2, 10, 60, 1800)
