"""Hand-made HTTP requests over a real socket: for bytes no well-behaved client library would send."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tests.helpers import TOKEN, picture_bytes

BOUNDARY = "CorpusBoundary7d1f"
Header = str | bytes | None


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip()

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, method: str = "GET", path: str = "/health", *, body: bytes = b"",
            headers: Mapping[str, Header] | None = None) -> bytes:
    """A complete HTTP/1.1 request; a header given as None is left out."""
    merged: dict[str, Header] = {"Host": f"127.0.0.1:{port}", "Authorization": f"Bearer {TOKEN}",
                                 "Connection": "close"}
    if body or method in ("POST", "PUT", "PATCH"):
        merged["Content-Length"] = str(len(body))
    merged.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1".encode()]
    for name, value in merged.items():
        if value is not None:
            lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


Part = tuple[bytes, bytes]  # (header block, content)


def field(name: str | bytes, value: str | bytes) -> Part:
    raw_name = name if isinstance(name, bytes) else name.encode()
    return (b'Content-Disposition: form-data; name="' + raw_name + b'"',
            value if isinstance(value, bytes) else value.encode())


def image(index: int = 0, filename: str | bytes = "pic.png", content: bytes | None = None) -> Part:
    raw = filename if isinstance(filename, bytes) else filename.encode()
    return (b'Content-Disposition: form-data; name="images"; filename="' + raw + b'"\r\nContent-Type: image/png',
            picture_bytes(index) if content is None else content)


def multipart(parts: Sequence[Part], boundary: str = BOUNDARY) -> bytes:
    out = b""
    for head, content in parts:
        out += f"--{boundary}\r\n".encode() + head + b"\r\n\r\n" + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def form_request(port: int, parts: Sequence[Part], *, headers: Mapping[str, Header] | None = None) -> bytes:
    return request(port, "POST", "/train", body=multipart(parts),
                   headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})})


async def send(port: int, data: bytes | list[bytes], *, timeout: float = 20.0) -> Reply:
    """Send `data` (a list: piece by piece, with a pause between, so the server reads them separately)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for index, piece in enumerate([data] if isinstance(data, bytes) else data):
            if index:
                await asyncio.sleep(0.2)
            writer.write(piece)
            await writer.drain()
        pieces = [data] if isinstance(data, bytes) else data
        return await asyncio.wait_for(read_reply(reader, head_only=pieces[0].startswith(b"HEAD ")), timeout)
    finally:
        writer.close()


async def read_reply(reader: asyncio.StreamReader, *, head_only: bool = False) -> Reply:
    """One response: its head, then Content-Length bytes, or up to EOF. A refused upload's connection stays
    open while aiohttp drains the rest of the body (lingering close): the reply is complete before that."""
    head = await reader.readuntil(b"\r\n\r\n")
    reply = parse_reply(head)
    length = reply.headers.get("content-length")
    if head_only:
        return reply
    body = await (reader.readexactly(int(length)) if length is not None else reader.read(-1))
    return Reply(status=reply.status, headers=reply.headers, body=body)


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status=int(status_line.split()[1]), headers=headers, body=body)
