"""kohya's saved training states in a job's output folder: which one a run can continue from, how much disk
they use, and removing them.

Facts (sd-scripts 48d368fa, tests/fixtures/kohya_resume/FACTS.md §2-4): with `--save_state` each epoch file
`<name>-NNNNNN.safetensors` gets a folder `<name>-NNNNNN-state` (NNNNNN = epochs done), and the end of training
a final `<name>-state`. accelerate writes `random_states_0.pkl` last, so a folder without it was cut short.
The final `<name>-state` is never a resume point: kohya asserts on it (run e).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from daemon.jobs.models import Recovery

log = logging.getLogger(__name__)

STATE_SUFFIX = "-state"
# accelerate's save_accelerator_state writes it after the model, optimizer and scheduler (FACTS §4.4.8)
LAST_WRITTEN = "random_states_0.pkl"
REQUIRED = ("model.safetensors", "optimizer.bin", "scheduler.bin", LAST_WRITTEN)
TRAIN_STATE = "train_state.json"
_EPOCH = re.compile(r"-(\d{6})-state")


@dataclass(frozen=True)
class SavedState:
    path: Path
    epoch: int  # epochs done when it was saved (from the folder name)
    # kohya's current_step from train_state.json: steps of the launch that wrote it (relative after a resume,
    # FACTS §4.4.2), so positions are worked out from `epoch`; 0 when the file is unreadable
    step: int


def epoch_of(folder: str, output_name: str) -> int | None:
    """N for `<output_name>-NNNNNN-state`; None for the final `<output_name>-state` and anything else."""
    if not folder.startswith(output_name):
        return None
    match = _EPOCH.fullmatch(folder[len(output_name):])
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def state_folders(output_dir: Path, output_name: str) -> list[Path]:
    """Every state folder of this output name, epoch ones and the final one."""
    try:
        entries = list(os.scandir(output_dir))
    except OSError:
        return []
    return sorted(Path(e.path) for e in entries
                  if e.is_dir(follow_symlinks=False)
                  and (e.name == output_name + STATE_SUFFIX or epoch_of(e.name, output_name) is not None))


def find_resume_state(output_dir: Path, output_name: str) -> SavedState | None:
    """The newest complete `<output_name>-NNNNNN-state`, or None when there is nothing to continue from."""
    found: list[tuple[int, Path]] = []
    for folder in state_folders(output_dir, output_name):
        epoch = epoch_of(folder.name, output_name)
        if epoch is not None and epoch > 0 and is_complete(folder):
            found.append((epoch, folder))
    if not found:
        return None
    epoch, folder = max(found)
    return SavedState(folder, epoch, _recorded_step(folder))


def _recorded_step(folder: Path) -> int:
    try:
        data = json.loads((folder / TRAIN_STATE).read_text(encoding="utf-8"))
        return int(data.get("current_step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in one folder tree (links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            # a file may go while we count (kohya pruning an old state)
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def states_bytes(output_dir: Path, output_name: str) -> int:
    return sum(folder_bytes(folder) for folder in state_folders(output_dir, output_name))


def record_states(recovery: Recovery, output_dir: Path, output_name: str) -> SavedState | None:
    """Bring `recovery.state_epoch` / `state_bytes` up to what is on disk now; returns the resume point."""
    state = find_resume_state(output_dir, output_name)
    recovery.state_epoch = state.epoch if state is not None else None
    recovery.state_bytes = states_bytes(output_dir, output_name)
    return state


def remove_states(output_dir: Path, output_name: str, *, keep: Path | None = None) -> int:
    """Delete the state folders (all, or all but `keep`); returns the bytes freed."""
    freed = 0
    for folder in state_folders(output_dir, output_name):
        if keep is not None and folder == keep:
            continue
        size = folder_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            freed += size
        else:
            log.warning("could not remove the training state %s", folder)
    return freed


def remove_incomplete(output_dir: Path, output_name: str) -> None:
    """States cut short by a kill while kohya saved them: never resumed from, and in the way of a new save."""
    for folder in state_folders(output_dir, output_name):
        if epoch_of(folder.name, output_name) is not None and not is_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)


def clear_output(output_dir: Path, *, keep: tuple[str, ...]) -> None:
    """Empty the output folder for a run from the first step, keeping the named entries (the job's previews)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(output_dir):
        if entry.name in keep:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def step_offset(epochs_done: int, total_steps: int, epochs: int) -> int:
    """Steps done before a launch that resumes after `epochs_done` epochs (kohya's bar restarts at 0)."""
    if epochs <= 0:
        return 0
    return epochs_done * total_steps // epochs
