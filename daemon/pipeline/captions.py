"""Per-picture captions: what the user typed after the fixed `<trigger> <class>` prefix, made safe for kohya.

The caption file kohya reads is `"<trigger> <class>, <user text>"`. kohya's keep_tokens=1 keeps the first
comma-separated item in place and shuffles the rest (when shuffling is on), so the trigger always stays in
front. Pure functions; the daemon stores the cleaned texts with the job (`captions.json` beside the uploads) so a
restart, a resume or an out-of-memory retry prepares the same captions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from daemon.jobs.fields import MAX_CAPTION_CHARS, is_control
from daemon.pipeline.side_files import read_json_map, write_json_map

__all__ = ["MAX_CAPTION_CHARS", "caption_text", "clean_all", "clean_caption", "read_captions", "write_captions"]

CAPTIONS_FILE = "captions.json"
SEPARATOR = ","


def _visible(ch: str) -> str:
    # Newlines would end the caption early (kohya reads the first line only); other control characters,
    # surrogates and bidi controls (the ones the name and trigger checks refuse) mean nothing to the tokenizer.
    return " " if is_control(ch) else ch


def _trigger_pattern(trigger: str) -> re.Pattern[str]:
    # A whole word or tag: bounded by the text's ends, whitespace or commas (the trigger has none of them).
    return re.compile(r"(?<![^\s,])" + re.escape(trigger) + r"(?![^\s,])", re.IGNORECASE)


def clean_caption(text: str, trigger: str) -> str:
    """The user's part of a caption, safe to put after the prefix: one line, no control characters, single
    spaces, no empty comma items, and no trigger word (it is already in front, and only once)."""
    flat = "".join(_visible(ch) for ch in text)
    if trigger:
        flat = _trigger_pattern(trigger).sub(" ", flat)
    items = (" ".join(item.split()) for item in flat.split(SEPARATOR))
    return ", ".join(item for item in items if item)


def caption_text(fixed: str, user: str) -> str:
    """One caption file's text: the fixed prefix, then the user's (already cleaned) part."""
    return f"{fixed}{SEPARATOR} {user}" if user else fixed


def clean_all(texts: Sequence[str], trigger: str) -> list[str]:
    return [clean_caption(t, trigger) for t in texts]


# ------------------------------------------------------------------------------------------ stored with the job
def write_captions(folder: Path, upload_names: Sequence[str], texts: Sequence[str]) -> None:
    """Keep each upload's cleaned caption beside it, keyed by our own upload file name (as names.json is)."""
    write_json_map(folder / CAPTIONS_FILE, dict(zip(upload_names, texts, strict=True)))


def read_captions(folder: Path, upload_names: Sequence[str]) -> list[str]:
    """The stored caption of each upload, "" where none was given (a job from before captions, or no file)."""
    data = read_json_map(folder / CAPTIONS_FILE)
    return [v if isinstance(v := data.get(name), str) else "" for name in upload_names]
