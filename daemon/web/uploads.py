"""Streaming the /train multipart form to disk, under our own file names, within size limits.

Nothing of a rejected request stays on disk: the caller owns `tmp_dir` only when this returns.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from aiohttp import BodyPartReader, web

from daemon.errors import BadInput
from daemon.pipeline.dataset import MAX_IMAGES, Upload, display_name

TEXT_FIELDS = frozenset({"name", "trigger", "class_token", "base_model", "params"})
FILE_FIELD = "images"
MAX_TEXT_BYTES = 64 * 1024
CHUNK = 256 * 1024


@dataclass
class TrainForm:
    fields: dict[str, str]
    uploads: list[Upload]
    tmp_dir: Path


async def read_train_form(request: web.Request, *, tmp_root: Path, max_file: int, max_total: int) -> TrainForm:
    if not request.content_type.startswith("multipart/form-data"):
        raise BadInput("POST /train expects multipart/form-data with fields name, trigger and images.")
    tmp_root.mkdir(parents=True, exist_ok=True)
    tmp_dir = tmp_root / f"upload-{secrets.token_hex(8)}"
    tmp_dir.mkdir()
    try:
        form = await _read(request, tmp_dir, max_file, max_total)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return form


async def _read(request: web.Request, tmp_dir: Path, max_file: int, max_total: int) -> TrainForm:
    fields: dict[str, str] = {}
    uploads: list[Upload] = []
    total = 0
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise BadInput(f"The upload is not a valid multipart form: {exc}") from exc
    while True:
        try:
            part = await reader.next()
        except ValueError as exc:
            raise BadInput(f"The upload is not a valid multipart form: {exc}") from exc
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise BadInput("Nested multipart bodies are not accepted.")
        name = part.name or ""
        if name == FILE_FIELD:
            if len(uploads) >= MAX_IMAGES:
                raise BadInput(f"More than {MAX_IMAGES} images were sent; at most {MAX_IMAGES} are accepted.",
                               key="images", hint="Keep the best, most varied pictures.")
            client = display_name(part.filename, len(uploads))
            target = tmp_dir / f"{len(uploads) + 1:03d}.upload"
            size = 0
            with target.open("wb") as fh:
                while chunk := await part.read_chunk(CHUNK):
                    size += len(chunk)
                    total += len(chunk)
                    if size > max_file:
                        raise BadInput(
                            f"'{client}' is larger than the {max_file // (1024 * 1024)} MiB limit per image.",
                            key="images", hint="Use a smaller or more compressed picture.")
                    if total > max_total:
                        raise BadInput(
                            f"The upload is larger than the {max_total // (1024 * 1024)} MiB limit per request.",
                            key="images")
                    fh.write(chunk)
            if size == 0:
                raise BadInput(f"'{client}' is empty.", key="images")
            uploads.append(Upload(target, client))
        elif name in TEXT_FIELDS:
            if name in fields:
                raise BadInput(f"The field '{name}' was sent twice.", key=name)
            raw = b""
            while chunk := await part.read_chunk(CHUNK):
                raw += chunk
                if len(raw) > MAX_TEXT_BYTES:  # checked while reading: a huge field never sits in memory
                    raise BadInput(f"The field '{name}' is too long.", key=name)
            try:
                fields[name] = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(f"The field '{name}' is not UTF-8 text.", key=name) from exc
        else:
            raise BadInput(
                f"Unknown form field '{display_name(name, 0)}'; expected name, trigger, class_token, base_model,"
                " params and images.", key=display_name(name, 0))
    return TrainForm(fields=fields, uploads=uploads, tmp_dir=tmp_dir)
