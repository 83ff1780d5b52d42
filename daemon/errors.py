"""Errors a user can act on.

    DaemonError            (500) base: message + optional hint + optional key
    ├── BadInput           (400) the request is wrong; `key` names the field or file
    ├── Unauthorized       (401) token missing or wrong
    ├── Forbidden          (403) Origin / Host not allowed
    ├── NotFound           (404)
    ├── Conflict           (409) the job is not in a state that allows this
    └── EnvProblem         (503) the machine is not ready (kohya missing, no model, ...)

The web layer turns each into `{"error": message, "hint": ..., "key": ...}` with its status; nothing
below `web/` knows about HTTP beyond the `status` number.
"""

from __future__ import annotations


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
