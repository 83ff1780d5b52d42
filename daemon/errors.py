"""Errors a user can act on.

    DaemonError            (500) base: message + optional hint + optional key
    ├── BadInput           (400) the request is wrong; `key` names the field or file
    ├── Unauthorized       (401) token missing or wrong
    ├── Forbidden          (403) Origin / Host not allowed
    ├── NotFound           (404)
    ├── Conflict           (409) the job is not in a state that allows this
    ├── RequestTimeout     (408) the client stopped sending its request
    ├── UnsupportedMedia   (415) a body in a form or encoding the daemon does not read
    ├── TooMany            (429) too many uploads at once or too many queued jobs
    ├── EnvProblem         (503) the machine is not ready (kohya missing, no model, ...)
    │   └── Unavailable    (503) a folder the daemon must write to is not writable
    └── InsufficientStorage (507) the disk is full

The web layer turns each into `{"error": message, "hint": ..., "key": ...}` with its status; nothing
below `web/` knows about HTTP beyond the `status` number.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path


class DaemonError(Exception):
    status = 500

    def __init__(self, message: str, *, hint: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.key = key

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.message}
        if self.hint:
            body["hint"] = self.hint
        if self.key:
            body["key"] = self.key
        return body


class BadInput(DaemonError):
    status = 400


class Unauthorized(DaemonError):
    status = 401


class Forbidden(DaemonError):
    status = 403


class NotFound(DaemonError):
    status = 404


class Conflict(DaemonError):
    status = 409


class EnvProblem(DaemonError):
    status = 503


class RequestTimeout(DaemonError):
    status = 408


class UnsupportedMedia(DaemonError):
    status = 415


class TooMany(DaemonError):
    status = 429


class Unavailable(EnvProblem):
    status = 503


class InsufficientStorage(DaemonError):
    status = 507


_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
# EEXIST: mkdir(exist_ok=True) found a file where the folder should be.
_UNWRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST})


def storage_error(exc: OSError, folder: Path) -> DaemonError | None:
    """The user-facing error for a failed write under `folder`, or None when it is not a disk/folder problem."""
    if exc.errno in _FULL:
        return InsufficientStorage(
            f"The disk holding {folder} is full: free some space on it, then send the pictures again.",
            hint="Nothing of this request was kept; stored jobs are untouched. Or set data_dir in the daemon "
                 "config to a bigger disk.",
        )
    if exc.errno in _UNWRITABLE:
        return Unavailable(
            f"The daemon cannot write to {folder} ({exc.strerror or 'not writable'}): make it writable, "
            "then try again.",
            hint="Nothing of this request was kept; stored jobs are untouched. Or set data_dir in the daemon "
                 "config to a writable folder.",
        )
    return None


@contextlib.contextmanager
def disk_errors(folder: Path) -> Iterator[None]:
    """Writes under `folder`: a full disk or an unwritable folder becomes its sentence, anything else stays."""
    try:
        yield
    except OSError as exc:
        error = None if isinstance(exc, ConnectionError) else storage_error(exc, folder)
        if error is None:
            raise
        raise error from exc


# sqlite3 result codes (the low byte of `sqlite_errorcode`, Python 3.11+); older Pythons: the message.
_SQLITE_FULL, _SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_PERM = 13, 8, 14, 3


def database_error(exc: sqlite3.Error, db_path: Path) -> DaemonError | None:
    """The user-facing error for a failed write to the job database, or None when it is a bug."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    text = str(exc).lower()
    if code == _SQLITE_FULL or "disk is full" in text:
        return storage_error(OSError(errno.ENOSPC, "disk full"), db_path.parent)
    if code in (_SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_PERM) or "readonly" in text or "unable to open" in text:
        return storage_error(OSError(errno.EROFS, "read-only"), db_path.parent)
    return None
