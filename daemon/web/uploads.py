"""Streaming the /train multipart form to disk, under our own file names, within size and time limits.

Nothing of a rejected request stays on disk: the caller owns `tmp_dir` only when this returns. Every way
a form can be malformed (bad part headers, a body that is not what its headers say, a client that stalls
or leaves) ends as a DaemonError or a ConnectionError, never as an aiohttp parser exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam
from aiohttp.web_protocol import RequestPayloadError

from daemon.aio import within
from daemon.config import Config
from daemon.errors import BadInput, RequestTimeout, TooMany, UnsupportedMedia, disk_errors
from daemon.jobs.fields import MAX_CAPTION_CHARS
from daemon.pipeline.dataset import MAX_IMAGES, Upload, display_name
from daemon.web.middlewares import shown_path

TEXT_FIELDS = frozenset({"name", "trigger", "class_token", "base_model", "params", "captions"})
FILE_FIELD = "images"
MAX_TEXT_BYTES = 64 * 1024
# `captions` holds up to 25 captions of up to 1,000 characters. At worst 12 bytes a character: JSON writers that
# escape what is not ASCII (Python's json.dumps) send an emoji as a surrogate pair, "\ud83d\ude00"; plus quotes.
FIELD_BYTES = {"captions": MAX_IMAGES * (MAX_CAPTION_CHARS * 12 + 4) + 2}
CHUNK = 256 * 1024

# aiohttp warns (on the console) about each malformed Content-Disposition; it is the client's mistake, and
# it is answered: the part has no usable name, so the form is refused as an unknown field.
warnings.filterwarnings("ignore", category=BadContentDispositionHeader)
warnings.filterwarnings("ignore", category=BadContentDispositionParam)

log = logging.getLogger(__name__)
T = TypeVar("T")
TextCheck = Callable[[str, str], None]


@dataclass(frozen=True)
class UploadLimits:
    max_file: int
    max_total: int
    idle_timeout_s: float  # the longest silence between two pieces of the body
    total_timeout_s: float  # the longest a whole form may take


@dataclass
class TrainForm:
    fields: dict[str, str]
    uploads: list[Upload]
    tmp_dir: Path


class UploadSlots:
    """At most `limit` forms stream to disk at once; one more is refused instead of queued (no waiting
    handler holds a socket and, later, a temp folder). The limit is the caller's: max_uploads can change live."""

    def __init__(self) -> None:
        self.busy = 0

    @contextlib.contextmanager
    def take(self, limit: int) -> Iterator[None]:
        if self.busy >= limit:
            raise TooMany(
                f"The daemon is already receiving {self.busy} upload(s), at most {limit} at once (max_uploads).",
                hint="Wait for them to finish, then send the pictures again.",
            )
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


UPLOAD_SLOTS = web.AppKey("upload_slots", UploadSlots)


def upload_limits(config: Config) -> UploadLimits:
    return UploadLimits(max_file=config.max_image_bytes, max_total=config.max_request_bytes,
                        idle_timeout_s=config.upload_stall_s, total_timeout_s=config.upload_timeout_s)


async def read_train_form(request: web.Request, *, tmp_root: Path, limits: UploadLimits,
                          check_text: TextCheck | None = None,
                          text_fields: frozenset[str] = TEXT_FIELDS) -> TrainForm:
    """Store the form's files under `tmp_root`; each text field is passed to `check_text` as it arrives,
    so a bad name sent before the pictures is refused before any picture is stored. Other forms with pictures
    name their own `text_fields` (the tagger's: threshold; the picture checks': none)."""
    check_body_headers(request)
    tmp_dir = tmp_root / f"upload-{secrets.token_hex(8)}"
    with disk_errors(tmp_root):
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp_dir.mkdir()
    try:
        form = await _Reader(request, tmp_dir, limits, check_text, text_fields).read()
    except BaseException as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(exc, asyncio.CancelledError):
            # aiohttp cancels the handler of a client that hung up mid-upload (or all of them at shutdown):
            # normal, so one quiet line, not an error
            log.info("the client left during %s %s (or the daemon is stopping); its upload was removed",
                     request.method, shown_path(request))
        raise
    return form


def check_body_headers(request: web.Request) -> None:
    """A multipart body sent as is. read_train_form checks it; /pictures/check and /tagger/runs also check before
    they take an upload slot, so a wrong body is refused as such even while every slot is busy."""
    if not request.content_type.startswith("multipart/form-data"):
        raise BadInput(f"{request.method} {request.path} expects multipart/form-data, the pictures as `images` parts.")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # The daemon reads bodies as sent (see app.py, auto_decompress=False): pictures do not compress.
        raise UnsupportedMedia(
            f"{request.method} {request.path} takes an uncompressed body; send it without Content-Encoding.")


class _Reader:
    def __init__(self, request: web.Request, tmp_dir: Path, limits: UploadLimits, check_text: TextCheck | None,
                 text_fields: frozenset[str] = TEXT_FIELDS) -> None:
        self._request = request
        self._text_fields = text_fields
        self._tmp_dir = tmp_dir
        self._limits = limits
        self._check_text = check_text
        self._deadline = asyncio.get_running_loop().time() + limits.total_timeout_s
        self._total = 0

    async def read(self) -> TrainForm:
        fields: dict[str, str] = {}
        uploads: list[Upload] = []
        try:
            reader = await self._request.multipart()
        except (ValueError, AssertionError, KeyError) as exc:
            raise BadInput("The upload is not a valid multipart form (its boundary is missing or wrong).") from exc
        while True:
            part = await self._step(reader.next())
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadInput("Nested multipart bodies are not accepted.")
            name = part.name or ""
            if not name:  # display_name would call it "image #1", a name the client never sent
                raise BadInput("A part of the form has no field name (Content-Disposition: form-data; name=...); "
                               "the pictures go in 'images'.")
            if name == FILE_FIELD:
                uploads.append(await self._store_file(part, len(uploads)))
            elif name in self._text_fields:
                if name in fields:
                    raise BadInput(f"The field '{name}' was sent twice.", key=name)
                fields[name] = await self._text(part, name)
                if self._check_text is not None:
                    self._check_text(name, fields[name])
            else:
                shown = display_name(name, 0)
                raise BadInput(f"Unknown form field '{shown}'; {self._expected()}.", key=shown)
        return TrainForm(fields=fields, uploads=uploads, tmp_dir=self._tmp_dir)

    def _expected(self) -> str:
        """What this route's form takes, for the sentence that refuses another field."""
        if not self._text_fields:
            return (f"{self._request.method} {self._request.path} takes only pictures, in 'images' (settings such "
                    "as the resolution go in the query: ?resolution=768)")
        if self._text_fields == TEXT_FIELDS:
            return "expected name, trigger, class_token, base_model, params, captions and images"
        return "expected " + ", ".join(sorted(self._text_fields)) + " and images"

    async def _store_file(self, part: BodyPartReader, index: int) -> Upload:
        if index >= MAX_IMAGES:
            raise BadInput(f"More than {MAX_IMAGES} images were sent; at most {MAX_IMAGES} are accepted.",
                           key="images", hint="Keep the best, most varied pictures.")
        client = display_name(_filename(part), index)
        target = self._tmp_dir / f"{index + 1:03d}.upload"
        size = 0
        with disk_errors(self._tmp_dir.parent), target.open("wb") as fh:
            while chunk := await self._step(part.read_chunk(CHUNK)):
                size += len(chunk)
                self._total += len(chunk)
                self._check_sizes(client, size)
                fh.write(chunk)
        if size == 0:
            raise BadInput(f"'{client}' is empty.", key="images")
        return Upload(target, client)

    def _check_sizes(self, client: str, size: int) -> None:
        if size > self._limits.max_file:
            raise BadInput(f"'{client}' is larger than the {self._limits.max_file // (1024 * 1024)} MiB limit per "
                           "image.", key="images", hint="Use a smaller or more compressed picture.")
        if self._total > self._limits.max_total:
            raise BadInput(f"The upload is larger than the {self._limits.max_total // (1024 * 1024)} MiB limit per "
                           "request.", key="images")

    async def _text(self, part: BodyPartReader, name: str) -> str:
        raw = b""
        while chunk := await self._step(part.read_chunk(CHUNK)):
            raw += chunk
            if len(raw) > FIELD_BYTES.get(name, MAX_TEXT_BYTES):  # while reading: a huge field never sits in memory
                raise BadInput(f"The field '{name}' is too long.", key=name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(f"The field '{name}' is not UTF-8 text.", key=name) from exc

    async def _step(self, read: Awaitable[T]) -> T:
        """One read from the client, within the idle and total limits; parser failures become sentences."""
        remaining = self._deadline - asyncio.get_running_loop().time()
        idle = self._limits.idle_timeout_s
        try:
            return await within(read, max(0.0, min(idle, remaining)))
        except asyncio.TimeoutError as exc:
            if remaining <= idle:
                raise RequestTimeout(f"The upload took longer than {self._limits.total_timeout_s:g} s.",
                                     hint="Send fewer or smaller pictures, or check the connection.") from exc
            raise RequestTimeout(f"The upload stalled: nothing arrived for {idle:g} s.",
                                 hint="Check the connection, then send the pictures again.") from exc
        except LineTooLong as exc:
            raise BadInput("A part header of the upload is longer than 8 KiB; file names must be short.") from exc
        except HttpProcessingError as exc:
            raise BadInput("A part header of the upload is malformed (control characters, line breaks or bad "
                           "syntax); rename the file and try again.") from exc
        except RequestPayloadError as exc:
            raise BadInput("The upload's body does not match its headers (length or transfer encoding).") from exc
        except (ValueError, AssertionError, LookupError, UnicodeError) as exc:
            raise BadInput("The upload is not a valid multipart form.") from exc


def _filename(part: BodyPartReader) -> str | None:
    try:
        return part.filename
    except (ValueError, LookupError, UnicodeError):  # an odd `filename*=` charset: the name is only for messages
        return None
