"""The user-typed fields of a job, checked the same way the ED tab checks them (see the plugin).

Each value ends up in kohya's argv, its prompt file and its captions: no control characters, nothing an
argument parser could take for an option (a leading '-'), no ' --' that kohya's prompt parser splits on.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from daemon.errors import BadInput

NAME_RE = re.compile(r"^[A-Za-z0-9 _-]{1,64}$")
TRIGGER_RE = re.compile(r"^[^\s,]{1,32}$")
CLASS_RE = re.compile(r"^[^,\n\r\t]{1,40}$")
DEFAULT_CLASS = "person"
# Line/paragraph separators and the bidi controls that make text display other than it reads.
_INVISIBLE = frozenset("\u2028\u2029\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff")
# `params` is a small flat object; anything longer or deeper is not a training setting.
MAX_PARAMS_CHARS = 4096
MAX_NUMBER_DIGITS = 20
# One picture's caption after the prefix. CLIP reads about 75 tokens (225 with --max_token_length): more is cut
# by the tokenizer anyway.
MAX_CAPTION_CHARS = 1000


def is_control(ch: str) -> bool:
    return ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cs")


def has_control(text: str) -> bool:
    return any(is_control(ch) for ch in text)


def check_name(value: str | None) -> str:
    name = (value or "").strip()
    if not name:
        raise BadInput("Give the character a name.", key="name")
    if not NAME_RE.match(name):
        raise BadInput(
            "The name may have 1 to 64 characters: letters, digits, spaces, '-' and '_'.",
            key="name",
        )
    return name


def check_trigger(value: str | None) -> str:
    trigger = (value or "").strip()
    if not trigger:
        raise BadInput("Give a trigger word, e.g. 'ohwx' (a word the model does not know yet).", key="trigger")
    if has_control(trigger):
        raise BadInput("The trigger word may not contain control or invisible characters.", key="trigger")
    if not TRIGGER_RE.match(trigger):
        raise BadInput("The trigger word must be 1 to 32 characters with no spaces and no commas.", key="trigger")
    if trigger.startswith("-"):
        raise BadInput("The trigger word may not start with '-'.", key="trigger")
    return trigger


def check_class_token(value: str | None) -> str:
    if has_control(value or ""):
        raise BadInput("The class word may not contain control or invisible characters.", key="class_token")
    token = " ".join((value or "").split())
    if not token:
        return DEFAULT_CLASS
    if not CLASS_RE.match(token):
        raise BadInput("The class word may have up to 40 characters and no commas (e.g. 'woman', 'dog').",
                       key="class_token")
    if token.startswith("-") or "--" in token:
        raise BadInput("The class word may not start with '-' or contain '--'.", key="class_token")
    return token


def parse_params(raw: str | None) -> dict[str, Any]:
    """The `params` form field: a small JSON object; every parse failure is a BadInput, never a crash."""
    if raw is None or not raw.strip():
        return {}
    if len(raw) > MAX_PARAMS_CHARS:
        raise BadInput(f"'params' is longer than {MAX_PARAMS_CHARS} characters.", key="params")
    try:
        value = json.loads(raw, parse_int=_small_int, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise BadInput(f"'params' is not valid JSON: {exc.msg}.", key="params") from exc
    except RecursionError as exc:
        raise BadInput("'params' is nested too deeply; it must be a flat JSON object.", key="params") from exc
    except ValueError as exc:  # from the hooks below
        raise BadInput(f"'params' holds {exc}.", key="params") from exc
    if not isinstance(value, dict):
        raise BadInput("'params' must be a JSON object such as {\"epochs\": 10}.", key="params")
    return value


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise ValueError(f"a number with more than {MAX_NUMBER_DIGITS} digits")
    return int(text)


def _no_constant(text: str) -> float:
    raise ValueError(f"{text}, which is not a number JSON allows")


def parse_captions(raw: str | None, *, count: int | None = None) -> list[str] | None:
    """The `captions` form field: a JSON array of strings, one per picture in upload order (the part after the
    fixed `<trigger> <class>` prefix). None when absent. `count` (the pictures sent) is checked when known;
    the texts are returned as sent (captions.clean_caption makes them safe)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BadInput("'captions' is not valid JSON; send a JSON array of strings, one per picture.",
                       key="captions") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInput("'captions' must be a JSON array of strings, one per picture, such as [\"smiling\", \"\"].",
                       key="captions")
    for index, text in enumerate(value):
        if len(text) > MAX_CAPTION_CHARS:
            raise BadInput(f"The caption of picture {index + 1} is {len(text)} characters long; at most "
                           f"{MAX_CAPTION_CHARS} are allowed.", key="captions",
                           hint="Shorten it: the text encoder reads only the first 75 tokens or so.")
    if count is not None and len(value) != count:
        raise BadInput(f"{len(value)} caption(s) were sent for {count} picture(s); send one per picture, in the "
                       "order of the pictures.", key="captions")
    return value
