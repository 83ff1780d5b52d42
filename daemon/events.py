"""The one envelope every WebSocket frame uses, and the event types the daemon sends.

    {"type": <EventType>, "job_id": <id or null>, "data": {...}, "seq": <int>, "ts": <ms since epoch>}

`seq` grows by one per event within a daemon run; the snapshot carries the seq of the last event it
includes, so after it a client sees seq + 1, seq + 2, ... and can tell it missed nothing.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any


class EventType(str, enum.Enum):
    SNAPSHOT = "snapshot"  # data: {"jobs": [job, ...]} — sent once, on connect
    JOB_CREATED = "job_created"  # data: the job
    STATE = "state"  # data: {"state", "error", "artifact", "lora_id"}
    PROGRESS = "progress"  # data: {"step", "total", "epoch", "epochs", "loss", "rate", "eta_s"}
    LOG = "log"  # data: {"lines": [...]}
    CHECKPOINT = "checkpoint"  # data: {"file"}
    SAMPLE = "sample"  # data: {"file", "url"}
    # data: {"kind": "oom_retry" | "resumed" | "auto_resumed" | ..., "message": sentence, "recovery": Recovery json}
    NOTICE = "notice"
    # data: {"points": [[step, epoch, loss], ...]} — every step's loss since the last `loss` event (issue 10)
    LOSS = "loss"
    # data: {"task_id", "state": "running"|"done"|"error"|"cancelled", "done", "total", "error"} — a tagger run
    TAGGING = "tagging"
    RESULT = "result"  # data: {"state", "artifact", "lora_id", "error"} — the final word on a job
    JOB_DELETED = "job_deleted"  # data: {}
    CONFIG = "config"  # data: {"changed", "restart_needed", "error", "key"} — the config file was reloaded


@dataclass(frozen=True)
class Event:
    type: EventType
    job_id: str | None
    data: dict[str, Any]
    ts: int

    @classmethod
    def now(cls, type: EventType, job_id: str | None, data: dict[str, Any]) -> Event:
        return cls(type=type, job_id=job_id, data=data, ts=int(time.time() * 1000))

    def envelope(self, seq: int) -> dict[str, Any]:
        return {"type": self.type.value, "job_id": self.job_id, "data": self.data, "seq": seq, "ts": self.ts}
