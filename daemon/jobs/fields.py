"""The user-typed fields of a job, checked the same way the ED tab checks them (see the plugin)."""

from __future__ import annotations

import re

from daemon.errors import BadInput

NAME_RE = re.compile(r"^[A-Za-z0-9 _-]{1,64}$")
TRIGGER_RE = re.compile(r"^[^\s,]{1,32}$")
CLASS_RE = re.compile(r"^[^,\n\r\t]{1,40}$")
DEFAULT_CLASS = "person"


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
    if not TRIGGER_RE.match(trigger):
        raise BadInput("The trigger word must be 1 to 32 characters with no spaces and no commas.", key="trigger")
    return trigger


def check_class_token(value: str | None) -> str:
    token = " ".join((value or "").split())
    if not token:
        return DEFAULT_CLASS
    if not CLASS_RE.match(token):
        raise BadInput("The class word may have up to 40 characters and no commas (e.g. 'woman', 'dog').",
                       key="class_token")
    return token
