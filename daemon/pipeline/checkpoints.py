"""A job's saved epochs: the LoRA files kohya wrote into its output folder, which of them are complete, their
previews and loss, and publishing one into ED's LoRA folder under its own name.

kohya names an epoch file `<output_name>-NNNNNN.safetensors` (NNNNNN = epochs done) and the final one
`<output_name>.safetensors`; it prints `saving checkpoint: <path>` before it writes. A file is complete when
its size is what its header says (8 + header length + the end of the last tensor: safetensors_header).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.jobs.models import Job, PublishedEpoch
from daemon.pipeline import publish
from daemon.safetensors_header import read_header

SUFFIX = ".safetensors"
_EPOCH_FILE = re.compile(r"-(\d{6})\.safetensors")
# kohya's preview names: <name>_e<epoch:06d>_<idx>_<timestamp>[_<seed>].png (same as the tab's SAMPLE_NAME_RE)
_SAMPLE_EPOCH = re.compile(r"_e(\d+)_(\d+)_\d+(?:_\d+)?\.png", re.IGNORECASE)
STEM_CHARS = 58  # publish's temporary names allow a 64-character stem: room for "-e" and the epoch


@dataclass(frozen=True)
class Checkpoint:
    epoch: int
    path: Path
    bytes: int
    final: bool
    complete: bool


def epoch_of(file: str, output_name: str) -> int | None:
    """N for `<output_name>-NNNNNN.safetensors`; None for the final file and anything else."""
    if not file.startswith(output_name):
        return None
    match = _EPOCH_FILE.fullmatch(file[len(output_name):])
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    try:
        read_header(path)  # raises when the tensor data does not end exactly at the file's end
    except (OSError, ValueError):
        return False
    return True


def scan(output_dir: Path, output_name: str, epochs: int) -> list[Checkpoint]:
    """Every epoch file and the final one, complete or not, oldest first (the final one last)."""
    try:
        entries = list(os.scandir(output_dir))
    except OSError:
        return []
    found: list[Checkpoint] = []
    for entry in entries:
        final = entry.name == output_name + SUFFIX
        epoch = epochs if final else epoch_of(entry.name, output_name)
        if epoch is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue  # removed while we looked
        path = Path(entry.path)
        found.append(Checkpoint(epoch, path, size, final, is_complete(path)))
    return sorted(found, key=lambda c: (c.final, c.epoch))


def samples_by_epoch(samples: Iterable[str]) -> dict[int, list[str]]:
    by_epoch: dict[int, list[str]] = {}
    for file in samples:
        match = _SAMPLE_EPOCH.search(file)
        if match:
            by_epoch.setdefault(int(match.group(1)), []).append(file)
    return by_epoch


def published_of(job: Job, checkpoint: Checkpoint) -> PublishedEpoch | None:
    """The copy in ED's folder: what POST .../publish recorded, else the job's own LoRA for its final file (a
    recorded copy of the final epoch is newer: it was made because the job had none, or it was deleted)."""
    recorded = job.published.get(checkpoint.epoch)
    if recorded is None and checkpoint.final and job.artifact and job.lora_id:
        return PublishedEpoch(job.lora_id, job.artifact)
    return recorded


def listing(job: Job, found: list[Checkpoint], loss: Mapping[int, float]) -> dict[str, object]:
    """GET /jobs/{id}/checkpoints: the complete files, each with its loss, previews and published copy."""
    samples = samples_by_epoch(job.samples)
    rows = []
    for c in found:
        if not c.complete:
            continue  # kohya is still writing it
        published = published_of(job, c)
        rows.append({
            "epoch": c.epoch,
            "file": c.path.name,
            "bytes": c.bytes,
            "final": c.final,
            "loss": loss.get(c.epoch),
            "samples": [{"file": f, "url": job.sample_url(f)} for f in samples.get(c.epoch, [])],
            "published": published.to_json() if published else None,
        })
    return {"checkpoints": rows, "bytes": sum(c.bytes for c in found if c.complete)}


def published_stem(output_name: str, epoch: int) -> str:
    return f"{output_name[:STEM_CHARS]}-e{epoch:02d}"


def copy_epoch(checkpoint: Checkpoint, lora_dir: Path, output_name: str) -> PublishedEpoch:
    """Copy the (verified) epoch file into ED's folder as `<name>-eNN` or the next free name; raises
    publish.PublishError."""
    target = publish.publish(checkpoint.path, lora_dir, published_stem(output_name, checkpoint.epoch))
    return PublishedEpoch(publish.lora_id(target, lora_dir), str(target))
