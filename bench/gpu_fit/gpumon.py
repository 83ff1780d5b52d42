"""GPU facts and memory samples from nvidia-smi (the trainers are other processes, so torch cannot tell).

memory.used is DEVICE-WIDE: everything on the card, including other processes and the CUDA context.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from typing import Any

SAMPLE_EVERY_S = 0.5


def _smi(query: str) -> list[str]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return [part.strip() for part in out.splitlines()[0].split(",")]


def gpu_facts() -> dict[str, Any]:
    """Name, total memory and driver of GPU 0; {"nvidia_smi": False} without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": False}
    try:
        name, total, driver = _smi("name,memory.total,driver_version")
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as exc:
        return {"nvidia_smi": True, "error": str(exc)}
    return {"nvidia_smi": True, "name": name, "memory_total_mib": int(total), "driver": driver}


class MemorySampler(threading.Thread):
    """`memory.used` of GPU 0 every 0.5 s for the whole run, stamped with time.monotonic(); the peak of
    each phase is taken from the samples afterwards (measure.peak_between)."""

    def __init__(self, enabled: bool) -> None:
        super().__init__(daemon=True, name="gpu-memory")
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def run(self) -> None:
        while self.enabled and not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError, IndexError, subprocess.SubprocessError):
                self.samples.append((time.monotonic(), int(_smi("memory.used")[0])))
            self._stop.wait(SAMPLE_EVERY_S)

    def stop(self) -> None:
        self._stop.set()
