"""The preview-picture watcher: each finished PNG reported once, half-written ones only when complete."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from PIL import Image

from daemon.pipeline.samples import SampleWatcher


def png(colour: int = 10) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (colour, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


async def test_watcher_reports_complete_pictures_once(tmp_path: Path) -> None:
    seen: list[str] = []

    async def on_sample(path: Path) -> None:
        seen.append(path.name)

    folder = tmp_path / "sample"
    watcher = SampleWatcher(folder, on_sample)
    await watcher.start()
    data = png()
    partial = folder / "hero_e000001_00_20260101000000_42.png"
    partial.write_bytes(data[: len(data) // 2])  # kohya still writing
    (folder / "notes.txt").write_text("not a picture")
    await asyncio.sleep(0.3)
    assert seen == []
    partial.write_bytes(data)
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0.05)
    assert seen == [partial.name]
    # written while nobody watches (an event lost): the final scan still reports it, and only once
    late = folder / "hero_e000002_00_20260101000100_42.png"
    await watcher.stop()
    late.write_bytes(png(200))
    await watcher.stop()
    assert seen == [partial.name, late.name]
