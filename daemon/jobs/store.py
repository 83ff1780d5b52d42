"""SQLite persistence for jobs, their log lines and their event history.

One connection, one lock: the daemon is a single process and writes are small (a state change, a
throttled progress row, a batch of log lines), so a lock is simpler than a writer thread and callers
on the event loop hop here with `asyncio.to_thread`. WAL keeps readers from blocking the writer.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from daemon.events import Event
from daemon.jobs.models import Job, JobError, JobState, LossPoint, Progress, PublishedEpoch, Recovery

SCHEMA_VERSION = 5
LOG_TAIL = 60  # lines in a job's JSON (GET /jobs, the WebSocket snapshot)
LOG_RING = 2000  # lines kept per job; the job's trainer.log keeps every line

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    trigger TEXT NOT NULL,
    class_token TEXT NOT NULL,
    base_model TEXT NOT NULL,
    params TEXT NOT NULL,
    image_count INTEGER NOT NULL,
    state TEXT NOT NULL,
    progress TEXT NOT NULL,
    artifact TEXT,
    lora_id TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    pid INTEGER,
    pid_started REAL
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS log_lines (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (job_id, n)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT REFERENCES jobs (id) ON DELETE CASCADE,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
"""

# MIGRATIONS[n] takes a database from user_version n to n + 1 (one statement or several, in one transaction).
MIGRATIONS: dict[int, str | tuple[str, ...]] = {
    1: "ALTER TABLE jobs ADD COLUMN samples TEXT NOT NULL DEFAULT '[]'",
    # the trainer's descendants as {pid: create time}, so a restart can stop the orphans of a crash
    2: "ALTER TABLE jobs ADD COLUMN descendants TEXT NOT NULL DEFAULT '{}'",
    # resumes, out-of-memory retries and saved-state disk use (models.Recovery)
    3: "ALTER TABLE jobs ADD COLUMN recovery TEXT NOT NULL DEFAULT '{}'",
    # issue 10: every step's loss, and the saved epochs published into ED's folder. Their own tables: a runner's
    # save() of its copy of the job must never undo an epoch the API published meanwhile.
    4: (
        "CREATE TABLE IF NOT EXISTS loss_points (job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,"
        " step INTEGER NOT NULL, epoch INTEGER NOT NULL, loss REAL NOT NULL, PRIMARY KEY (job_id, step))"
        " WITHOUT ROWID",
        "CREATE TABLE IF NOT EXISTS published_epochs (job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,"
        " epoch INTEGER NOT NULL, lora_id TEXT NOT NULL, artifact TEXT NOT NULL, PRIMARY KEY (job_id, epoch))",
    ),
}


class ProcessRow(NamedTuple):
    pid: int
    started: float  # psutil create time, 0 when unknown
    descendants: dict[int, float]


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{path} was written by a newer version of the daemon (schema {version}); upgrade the daemon"
                )
            self._db.executescript(_SCHEMA)
            for step in range(max(version, 1), SCHEMA_VERSION):
                # One transaction per step: a crash mid-migration must not leave a column without its version.
                self._db.execute("BEGIN IMMEDIATE")
                migration = MIGRATIONS[step]
                for statement in (migration,) if isinstance(migration, str) else migration:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={step + 1}")
                self._db.execute("COMMIT")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs -------------------------------------------------------------------------------------

    def insert(self, job: Job) -> None:
        now = time.time()
        job.created_at = job.created_at or now
        job.updated_at = now
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, name, trigger, class_token, base_model, params, image_count, state,"
                " progress, artifact, lora_id, error, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id, job.name, job.trigger, job.class_token, job.base_model, json.dumps(job.params),
                    job.image_count, job.state.value, json.dumps(job.progress.to_json()), job.artifact,
                    job.lora_id, _dump_error(job.error), job.created_at, job.updated_at,
                ),
            )

    def save(self, job: Job) -> None:
        """Write the mutable part of a job (state, progress, result, recovery, params)."""
        job.updated_at = time.time()
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state=?, progress=?, artifact=?, lora_id=?, error=?, samples=?, recovery=?,"
                " params=?, updated_at=? WHERE id=?",
                (
                    job.state.value, json.dumps(job.progress.to_json()), job.artifact, job.lora_id,
                    _dump_error(job.error), json.dumps(job.samples), json.dumps(job.recovery.to_json()),
                    # an out-of-memory retry runs the job one memory tier lower: its params change
                    json.dumps(job.params), job.updated_at, job.id,
                ),
            )

    def set_process(self, job_id: str, pid: int | None, started: float | None) -> None:
        """The trainer now running for the job (or none); forgets the previous one's descendants."""
        with self._lock:
            self._db.execute("UPDATE jobs SET pid=?, pid_started=?, descendants='{}' WHERE id=?",
                             (pid, started, job_id))

    def set_descendants(self, job_id: str, descendants: dict[int, float]) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET descendants=? WHERE id=? AND pid IS NOT NULL",
                             (json.dumps({str(k): v for k, v in descendants.items()}), job_id))

    def process_of(self, job_id: str) -> ProcessRow | None:
        with self._lock:
            row = self._db.execute("SELECT pid, pid_started, descendants FROM jobs WHERE id=?",
                                   (job_id,)).fetchone()
        if row is None or row["pid"] is None:
            return None
        descendants = {int(k): float(v) for k, v in json.loads(row["descendants"] or "{}").items()}
        return ProcessRow(int(row["pid"]), float(row["pid_started"] or 0.0), descendants)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            return self._job(row, self._tail(job_id), self._published(job_id))

    def list(self) -> list[Job]:
        """Newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC").fetchall()
            return [self._job(row, self._tail(row["id"]), self._published(row["id"])) for row in rows]

    def ids_in_states(self, states: Iterable[JobState]) -> list[str]:
        values = [s.value for s in states]
        marks = ",".join("?" * len(values))
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY created_at, rowid", values
            ).fetchall()
        return [row["id"] for row in rows]

    def artifacts(self) -> set[str]:
        """Every published file a job has recorded: final LoRAs and published epochs."""
        with self._lock:
            rows = self._db.execute("SELECT artifact FROM jobs WHERE artifact IS NOT NULL"
                                    " UNION SELECT artifact FROM published_epochs").fetchall()
        return {row["artifact"] for row in rows}

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    # -- logs and events --------------------------------------------------------------------------

    def append_logs(self, job_id: str, lines: list[str]) -> None:
        """Add lines to the job's ring: only its last LOG_RING lines are kept."""
        if not lines:
            return
        lines = lines[-LOG_RING:]
        with self._lock, self._db:
            self._db.execute("BEGIN")
            start = self._db.execute(
                "SELECT COALESCE(MAX(n), -1) + 1 FROM log_lines WHERE job_id=?", (job_id,)
            ).fetchone()[0]
            self._db.executemany(
                "INSERT INTO log_lines (job_id, n, line) VALUES (?, ?, ?)",
                [(job_id, start + i, line) for i, line in enumerate(lines)],
            )
            self._db.execute("DELETE FROM log_lines WHERE job_id=? AND n < ?",
                             (job_id, start + len(lines) - LOG_RING))

    def logs(self, job_id: str, limit: int = LOG_RING) -> list[str]:
        """The job's last `limit` lines (at most the ring), oldest first."""
        with self._lock:
            return self._tail(job_id, limit)

    def append_event(self, event: Event) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO events (job_id, type, data, ts) VALUES (?, ?, ?, ?)",
                (event.job_id, event.type.value, json.dumps(event.data), event.ts),
            )

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT type, data, ts FROM events WHERE job_id=? ORDER BY id", (job_id,)
            ).fetchall()
        return [{"type": r["type"], "data": json.loads(r["data"]), "ts": r["ts"]} for r in rows]

    # -- loss history and published epochs (issue 10) ---------------------------------------------

    def add_loss(self, job_id: str, points: list[LossPoint]) -> None:
        """One transaction per batch; a point at a step already recorded (a resumed epoch) replaces it."""
        if not points:
            return
        with self._lock, self._db:
            self._db.execute("BEGIN")
            # INSERT ... SELECT: a batch that arrives after the job was deleted is dropped, not an error
            self._db.executemany(
                "INSERT OR REPLACE INTO loss_points (job_id, step, epoch, loss)"
                " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM jobs WHERE id=?)",
                [(job_id, p.step, p.epoch, p.loss, job_id) for p in points],
            )

    def loss(self, job_id: str) -> list[LossPoint]:
        """The job's points, by step."""
        with self._lock:
            rows = self._db.execute("SELECT step, epoch, loss FROM loss_points WHERE job_id=? ORDER BY step",
                                    (job_id,)).fetchall()
        return [LossPoint(row[0], row[1], row[2]) for row in rows]

    def forget_after(self, job_id: str, epoch: int) -> None:
        """A launch that trains again from after `epoch` (0: from the first step): the loss of the later epochs
        and their published records go (the copies in ED's folder stay: the user may use them)."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM loss_points WHERE job_id=? AND epoch > ?", (job_id, epoch))
            self._db.execute("DELETE FROM published_epochs WHERE job_id=? AND epoch > ?", (job_id, epoch))

    def set_published(self, job_id: str, epoch: int, published: PublishedEpoch) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO published_epochs (job_id, epoch, lora_id, artifact) VALUES (?, ?, ?, ?)",
                (job_id, epoch, published.lora_id, published.artifact))

    def published(self, job_id: str) -> dict[int, PublishedEpoch]:
        with self._lock:
            return self._published(job_id)

    # -- helpers (lock held) ----------------------------------------------------------------------

    def _tail(self, job_id: str, limit: int = LOG_TAIL) -> list[str]:
        rows = self._db.execute(
            "SELECT line FROM log_lines WHERE job_id=? ORDER BY n DESC LIMIT ?", (job_id, limit)
        ).fetchall()
        return [r["line"] for r in reversed(rows)]

    def _published(self, job_id: str) -> dict[int, PublishedEpoch]:
        rows = self._db.execute("SELECT epoch, lora_id, artifact FROM published_epochs WHERE job_id=? ORDER BY epoch",
                                (job_id,)).fetchall()
        return {row["epoch"]: PublishedEpoch(row["lora_id"], row["artifact"]) for row in rows}

    @staticmethod
    def _job(row: sqlite3.Row, logs: list[str], published: dict[int, PublishedEpoch]) -> Job:
        return Job(
            id=row["id"],
            name=row["name"],
            trigger=row["trigger"],
            class_token=row["class_token"],
            base_model=row["base_model"],
            params=json.loads(row["params"]),
            image_count=row["image_count"],
            state=JobState(row["state"]),
            progress=Progress.from_json(json.loads(row["progress"])),
            artifact=row["artifact"],
            lora_id=row["lora_id"],
            error=JobError.from_json(json.loads(row["error"]) if row["error"] else None),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            logs=logs,
            samples=json.loads(row["samples"]),
            recovery=Recovery.from_json(json.loads(row["recovery"] or "{}")),
            published=published,
        )


def _dump_error(error: JobError | None) -> str | None:
    return json.dumps(error.to_json()) if error else None
