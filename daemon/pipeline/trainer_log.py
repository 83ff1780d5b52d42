"""Pages of a job's trainer.log (everything the trainer printed), read without loading the whole file.

A page is a byte window [offset, offset + limit) cut back to its last line break, so pages join into
the whole file; `next_offset` is where the next page starts. A line longer than a page comes whole
in its own page's worth of bytes rather than never.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.errors import BadInput

DEFAULT_PAGE_BYTES = 256 * 1024
MAX_PAGE_BYTES = 1024 * 1024

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class LogPage:
    lines: list[str]
    offset: int
    next_offset: int
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"lines": self.lines, "offset": self.offset, "next_offset": self.next_offset, "size": self.size,
                "eof": self.next_offset >= self.size}


def read_page(path: Path, offset: int, limit: int, *, final: bool) -> LogPage:
    """Lines (tqdm redraws split at `\\r`, blank lines left out) from byte `offset`, at most `limit` bytes.

    `final`: the trainer is done writing, so an unterminated last line is complete too. While it
    runs, that line is left for a later page.
    """
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            if offset > size:
                raise BadInput(f"offset {offset} is past the end of this job's trainer.log ({size} bytes).",
                               key="offset", hint="Start again from offset=0 or from the last next_offset.")
            fh.seek(offset)
            data = fh.read(limit)
    except FileNotFoundError:  # the trainer has not started yet
        if offset:
            raise BadInput("This job has no trainer.log yet, so offset must be 0.", key="offset") from None
        return LogPage([], 0, 0, 0)
    # An offset inside a UTF-8 character: skip its continuation bytes rather than show them as garbage.
    skip = 0
    while skip < min(3, len(data)) and 0x80 <= data[skip] < 0xC0:
        skip += 1
    cut = len(data)
    if not (final and offset + len(data) >= size):
        last_break = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        if last_break > skip:
            cut = last_break
        elif offset + len(data) >= size:
            cut = skip  # only the start of a line that is still being written: wait for the rest
    text = data[skip:cut].decode("utf-8", errors="replace")
    return LogPage([line for line in _LINE_BREAK.split(text) if line.strip()], offset, offset + cut, size)
