"""Small JSON maps kept beside a job's uploads (the client's file names, the captions), keyed by our upload names.

Read leniently: a job from an older version has no file, and a damaged file must not stop a restart or a resume,
so anything unreadable reads as an empty map and each caller falls back to its default per entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path


def write_json_map(path: Path, data: Mapping[str, str]) -> None:
    path.write_text(json.dumps(dict(data), ensure_ascii=False), encoding="utf-8")


def read_json_map(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
