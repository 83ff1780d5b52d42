"""The job as the daemon stores it and shows it: plain dataclasses, no I/O."""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple


class JobState(str, enum.Enum):
    QUEUED = "queued"
    PREPPING = "prepping"
    TRAINING = "training"
    COPYING = "copying"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES

    @property
    def active(self) -> bool:
        return self in (JobState.PREPPING, JobState.TRAINING, JobState.COPYING)


FINISHED_STATES = frozenset({JobState.DONE, JobState.ERROR, JobState.CANCELLED, JobState.INTERRUPTED})


@dataclass
class Progress:
    step: int = 0
    total: int | None = None
    epoch: int = 0
    epochs: int | None = None
    loss: float | None = None
    rate: float | None = None  # optimisation steps per second
    eta_s: float | None = None
    # "preview" while kohya draws the preview pictures: no steps are made then, so the tab says so instead
    # of showing a stalled rate and a frozen time left.
    phase: str = "training"
    # The caching phases before the first step (SDXL: minutes on a small card) have their own n of N.
    prep_done: int | None = None
    prep_total: int | None = None

    def to_json(self) -> dict[str, Any]:
        # JSON has no inf/nan: a diverging loss or a zero rate must not break every job listing.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Progress:
        if not data:
            return cls()
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class JobError:
    """Why a job failed, classified so the UI can say what to do about it."""

    kind: str  # out_of_memory, no_data, model_not_found, bad_arguments, trainer_crashed, ...
    message: str
    hint: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message, "hint": self.hint}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> JobError | None:
        if not data:
            return None
        return cls(kind=str(data["kind"]), message=str(data["message"]), hint=str(data.get("hint", "")))


@dataclass
class Recovery:
    """How a job survived crashes and out-of-memory failures (issue 9); saved with the job."""

    resumes: int = 0  # times the job continued from a saved kohya state (by hand or at start-up)
    # of those, started by the daemon at start-up (capped: a job that kills the daemon must not loop)
    auto_resumes: int = 0
    # out-of-memory retries, oldest first: {"attempt", "from_tier", "to_tier", "from_batch", "to_batch", "at_step",
    # "message"}
    retries: list[dict[str, Any]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # one sentence per recovery action, for the tab
    state_epoch: int | None = None  # epoch of the newest complete saved state on disk; None: nothing to resume from
    state_bytes: int = 0  # disk used by the job's kohya state folders now
    resume_next: bool = False  # the job's next run continues from the saved state (set by resume, cleared at start)
    # optimisation steps done before the current kohya launch: kohya's bar restarts at 0 after --resume
    step_offset: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Recovery:
        if not data:
            return cls()
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class LossPoint(NamedTuple):
    """kohya's avr_loss after one optimisation step; `step` counts the job's steps (across resumes), `epoch`
    is 1-based."""

    step: int
    epoch: int
    loss: float


@dataclass(frozen=True)
class PublishedEpoch:
    """A saved epoch copied into ED's LoRA folder (POST /jobs/{id}/checkpoints/{epoch}/publish)."""

    lora_id: str
    artifact: str

    def to_json(self) -> dict[str, str]:
        return {"lora_id": self.lora_id, "artifact": self.artifact}


def interrupted_error() -> JobError:
    """Why a job that was running when the daemon stopped is not done."""
    return JobError("interrupted", "The daemon stopped while this job was running.",
                    "Start the job again with the same pictures.")


@dataclass
class Job:
    id: str
    name: str
    trigger: str
    class_token: str
    base_model: str  # absolute path of the checkpoint the job trains on
    params: dict[str, Any]  # the resolved training parameters (TrainParams.to_json())
    image_count: int
    state: JobState = JobState.QUEUED
    progress: Progress = field(default_factory=Progress)
    artifact: str | None = None
    lora_id: str | None = None  # ED's model id of the published LoRA (path under models/lora, no extension)
    error: JobError | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    logs: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # preview pictures kohya made, oldest first
    recovery: Recovery = field(default_factory=Recovery)
    # epoch -> its published copy; kept in its own table (store.set_published), never written by save()
    published: dict[int, PublishedEpoch] = field(default_factory=dict)

    @property
    def resumable(self) -> bool:
        """POST /jobs/{id}/resume is allowed: from the saved state when there is one, else from the start."""
        return self.state is JobState.INTERRUPTED

    def sample_url(self, file: str) -> str:
        return f"/jobs/{self.id}/samples/{file}"

    def state_data(self) -> dict[str, Any]:
        """The payload of `state` and `result` events."""
        return {
            "state": self.state.value,
            "error": self.error.to_json() if self.error else None,
            "artifact": self.artifact,
            "lora_id": self.lora_id,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "trigger": self.trigger,
            "class_token": self.class_token,
            "base_model": self.base_model,
            "params": self.params,
            "image_count": self.image_count,
            "state": self.state.value,
            "progress": self.progress.to_json(),
            "logs": list(self.logs),
            "samples": [{"file": f, "url": self.sample_url(f)} for f in self.samples],
            "artifact": self.artifact,
            "lora_id": self.lora_id,
            "error": self.error.to_json() if self.error else None,
            "recovery": self.recovery.to_json(),
            "resumable": self.resumable,
            "published_epochs": {str(e): p.to_json() for e, p in sorted(self.published.items())},
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
