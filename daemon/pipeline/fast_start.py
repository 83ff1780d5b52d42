"""A quicker start (issue 9 §3, config.fast_start): what the daemon does so kohya reaches its first step sooner.

Measured on the real sd-scripts (tests/fixtures/kohya_startup/FACTS.md, bench/quick_start.py), four cuts, none of
which changes what kohya trains:

- warm: while the pictures are prepared, a background thread reads the base checkpoint once, so kohya's load
  finds it in the page cache (cold → warm: −2 to −3 s for SD1.5 on a fast disk, more on a slow one and for SDXL).
  It never blocks or fails a job: any error just ends the warm-up.
- prestart: kohya's python starts while the pictures are prepared, through kohya_prestart.py, which does the
  script's imports (~5 s) and then waits for the go file; FastStart.start() writes the real argv into it. What
  runs is the unchanged script with the argv the daemon logs; a cancel, a failed prep or a daemon shutdown kills
  it like any trainer (it is recorded as the job's process, so a restart after a crash stops it too).
- latent_cache: `--cache_latents_to_disk`, so a rerun of the same job without new pictures (an out-of-memory
  retry, a resume that keeps its pictures) loads kohya's latents instead of encoding every picture again (−5 s
  here per rerun). kohya keys the files by picture path and size only, so they are dropped when the base
  checkpoint changed or a file is unreadable (a run killed while writing it).
- model_hash: the warm-up also computes the checkpoint's sha256 (kohya's `ss_new_sd_model_hash`, for which it
  reads the whole file again after loading it: ~1.5 s for SD1.5 here, ~3x for SDXL) and writes it to the job's
  model-sha256.json; the go file names that file, and the prestarted kohya's train_util.calculate_sha256 returns
  the value written there for that checkpoint while its size and mtime are unchanged, else (not written yet,
  another file) kohya's own function runs. Same metadata, one read less. Kept per daemon, per file.

Left out on purpose: skipping kohya's random weight init before load_state_dict (−5.8 s here, the biggest cut)
changes the run a seed gives, because the init no longer advances torch's RNG before the LoRA's own init.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
import zipfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from daemon.config import Config
from daemon.jobs.store import JobStore
from daemon.pipeline import kohya
from daemon.pipeline.process import TrainerProcess, start_trainer
from daemon.pipeline.standby import Standby, Waiting, ready_file, spec_for

log = logging.getLogger(__name__)

ALL_CUTS = frozenset({"warm", "prestart", "latent_cache", "model_hash", "vae_batch"})
# The cuts fast_start: true turns on; bench/quick_start.py narrows it to time one cut at a time.
CUTS: frozenset[str] = ALL_CUTS
WRAPPER = Path(__file__).with_name("kohya_prestart.py")
GO_FILE = "prestart-go.json"
LATENT_STAMP = "latent-cache.json"
MODEL_HASH_FILE = "model-sha256.json"
WARM_CHUNK = 8 * 1024 * 1024
# The checkpoint is read only when it fits in this share of the free memory: else it would push out its own
# first pages (and everyone else's) before kohya reads them.
WARM_MEMORY_SHARE = 0.5
# A prestarted kohya that never gets its go signal gives up after this long (the daemon normally kills it first).
PRESTART_MAX_WAIT_S = 3600
# sha256 of base checkpoints this daemon has read whole, by (path, size, mtime_ns).
_HASHES: dict[tuple[str, int, int], str] = {}
_HASHES_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------ warm-up
def worth_warming(size: int, available: int) -> bool:
    return 0 < size <= available * WARM_MEMORY_SHARE


def warm_file(path: Path, stop: threading.Event, chunk: int = WARM_CHUNK, digest: Any = None) -> int:
    """Read `path` once (into the page cache) until done or `stop` is set, feeding `digest` (a hashlib object)
    if given; the bytes read. Raises OSError."""
    done = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):  # a hint only: the reads below do the work everywhere
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while not stop.is_set():
            n = fh.readinto(buf)
            if not n:
                break
            done += n
            if digest is not None:
                digest.update(view[:n])  # hashlib lets go of the GIL for blocks this large
    return done


def stamp_of(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def hash_entry(key: tuple[str, int, int], sha256: str) -> dict[str, object]:
    """What model-sha256.json holds (read by kohya_prestart.py)."""
    return {"path": key[0], "size": key[1], "mtime_ns": key[2], "sha256": sha256}


class Warmer:
    """One background read of the base checkpoint; never raises, never waited for."""

    def __init__(self, path: Path, *, hash_file: Path | None = None) -> None:
        self.path = path
        self.hash_file = hash_file  # where the checkpoint's sha256 goes, when wanted
        self.bytes_read = 0
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"warm {path.name}", daemon=True)

    def start(self) -> Warmer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            size = self.path.stat().st_size
            if not worth_warming(size, psutil.virtual_memory().available):
                log.info("not warming %s: %d MiB would not stay in the page cache", self.path, size >> 20)
                return
            key = stamp_of(self.path)
            with _HASHES_LOCK:
                known = _HASHES.get(key)
            if known is not None and self.hash_file is not None:
                write_json(self.hash_file, hash_entry(key, known))
            digest = hashlib.sha256() if self.hash_file is not None and known is None else None
            self.bytes_read = warm_file(self.path, self._stop, digest=digest)
            if digest is not None and self.hash_file is not None and self.bytes_read == key[1] \
                    and stamp_of(self.path) == key:
                with _HASHES_LOCK:
                    _HASHES[key] = digest.hexdigest()
                write_json(self.hash_file, hash_entry(key, digest.hexdigest()))
            log.debug("warmed %s: %d MiB", self.path, self.bytes_read >> 20)
        except Exception as exc:  # a warm-up is only ever a hint: the job goes on without it
            log.info("could not warm %s: %s", self.path, exc)
        finally:
            self.finished.set()


# ------------------------------------------------------------------------------------------------ latents
def model_stamp(model: Path) -> dict[str, object]:
    st = model.stat()
    return {"model": str(model), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def clean_latent_cache(images: Path, stamp_file: Path, model: Path) -> list[Path]:
    """Remove kohya's latent files (*.npz beside the pictures) that a run must not reuse: all of them when the base
    checkpoint is not the one they were made with, else those that are not a complete zip (a run killed while
    writing one: kohya would fail on it instead of encoding the picture again). Records the checkpoint."""
    stamp = model_stamp(model)
    try:
        same = json.loads(stamp_file.read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        same = False
    removed: list[Path] = []
    for npz in sorted(images.rglob("*.npz")) if images.is_dir() else []:
        if not same or not _complete_zip(npz):
            with contextlib.suppress(FileNotFoundError):
                npz.unlink()
            removed.append(npz)
    stamp_file.write_text(json.dumps(stamp), encoding="utf-8")
    return removed


def _complete_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


# ------------------------------------------------------------------------------------------------ VAE batch
# kohya's --vae_batch_size (train_util.new_cache_latents at 48d368fa): latents are cached in batches of up to this
# many pictures OF ONE BUCKET (a batch is flushed when the bucket changes), and as many threads load the pictures.
# Only the VAE is on the card then (the U-Net is moved after caching), so the batch may use a good share of it.
# A picture's encoder activations: the first down block keeps ~6 tensors of 128 x H x W alive (fp32 VAE, SD 1.x's
# default without --no_half_vae is the weight dtype, fp32 is the worst case): ~0.75 GiB at 512 px, rounded up.
VAE_GIB_PER_PICTURE_512 = 1.0
VAE_CARD_SHARE = 0.5
VAE_BATCH_MAX = 8  # few pictures share a bucket: more only adds threads
TIER_GIB = {"6gb": 6, "8gb": 8, "12gb": 12, "16gb": 16, "24gb": 24, "40gb": 40}


def vae_batch_size(memory_tier: str, resolution: int, cpu: bool) -> int:
    """The latent-caching batch for a run on this memory tier at this resolution (1 = kohya's default)."""
    gib = TIER_GIB.get(memory_tier)
    if cpu or gib is None:
        return 1  # a CPU encodes one picture at a time as fast; an unknown tier gets kohya's default
    per_picture = VAE_GIB_PER_PICTURE_512 * (resolution / 512) ** 2
    return max(1, min(VAE_BATCH_MAX, int(gib * VAE_CARD_SHARE / per_picture)))


def with_vae_batch(argv: list[str], size: int) -> list[str]:
    """`argv` with `--vae_batch_size N` after `--cache_latents` (kohya's flag; only caching uses it here)."""
    if size <= 1 or "--cache_latents" not in argv or "--vae_batch_size" in argv:
        return argv
    at = argv.index("--cache_latents") + 1
    return [*argv[:at], "--vae_batch_size", str(size), *argv[at:]]


# ------------------------------------------------------------------------------------------------ prestart
def prestart_argv(python: str, script: str, go_file: Path, max_wait_s: float = PRESTART_MAX_WAIT_S,
                  ready: Path | None = None) -> list[str]:
    marker = ["--ready", str(ready)] if ready is not None else []
    return [python, "-u", str(WRAPPER), "--go", str(go_file), "--parent", str(os.getpid()),
            "--max-wait", str(round(max_wait_s)), *marker, script]


def go_document(argv: Sequence[str], python: str, script: str) -> dict[str, object] | None:
    """What the go file says for the real `argv` ([python, -u, script, ARGS...]); None when the prestarted
    process cannot run it (another launcher or script: then it is started the usual way)."""
    if list(argv[:3]) != [python, "-u", script]:
        return None
    return {"script": script, "argv": list(argv[3:])}


def write_json(path: Path, doc: Mapping[str, object]) -> None:
    """Atomically: the prestarted process must never read half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class Prestarted:
    proc: TrainerProcess
    python: str
    script: str
    env: dict[str, str]
    go_file: Path
    guard: asyncio.Task[None] | None = field(default=None, repr=False)


class FastStart:
    """The hooks JobRunner calls: around the prep (`prepare`), on the argv (`argv`), at the trainer's start
    (`start`). With fast_start off each is the plain behaviour."""

    def __init__(self, config: Config, store: JobStore, cuts: frozenset[str] | None = None,
                 standby: Standby | None = None) -> None:
        self._config = config
        self._store = store
        self._standby = standby  # the daemon's standby trainer (standby.py), taken by this job when it fits
        self.cuts = (CUTS if cuts is None else cuts) if config.fast_start else frozenset()
        self.prestarted: Prestarted | None = None
        self.warmer: Warmer | None = None

    def argv(self, argv: list[str], *, memory_tier: str = "cpu", resolution: int = 512, cpu: bool = True) -> list[str]:
        if "vae_batch" in self.cuts:
            argv = with_vae_batch(argv, vae_batch_size(memory_tier, resolution, cpu))
        return kohya.with_latent_disk_cache(argv) if "latent_cache" in self.cuts else argv

    async def prepare(self, prep: Callable[[], Awaitable[None]], *, job_id: str, base_model: str, arch: str,
                      job_root: Path, images: Path, cpu: bool, cancel: asyncio.Event) -> None:
        """Run `prep` with the warm-up and the prestart alongside; a prep that fails (or a cancel) kills it."""
        # Always claimed: a standby this job cannot use is killed now, never left beside a training run.
        waiting = await self._standby.claim() if self._standby is not None else None
        if "warm" in self.cuts:
            # Only a prestarted kohya can take the hash (`accelerate launch` is never prestarted).
            wanted = {"model_hash", "prestart"} <= self.cuts and self._config.kohya.python is not None
            hash_file = job_root / MODEL_HASH_FILE if wanted else None
            if hash_file is not None:
                hash_file.unlink(missing_ok=True)
            self.warmer = Warmer(Path(base_model), hash_file=hash_file).start()
        if "prestart" in self.cuts:
            await self._prestart(job_id, arch, job_root / GO_FILE, cpu, cancel, waiting)
        elif waiting is not None:
            await self._kill_waiting(waiting)
        try:
            await prep()
            if "latent_cache" in self.cuts:
                removed = await asyncio.to_thread(clean_latent_cache, images, job_root / LATENT_STAMP,
                                                  Path(base_model))
                if removed:
                    log.info("job %s: %d cached latents not reused", job_id, len(removed))
        except BaseException:
            await self.discard(job_id)
            raise
        if cancel.is_set():
            await self.discard(job_id)

    async def start(self, argv: list[str], *, cwd: str, env: Mapping[str, str], job_id: str) -> TrainerProcess:
        """The trainer for `argv`: the prestarted one, told to go, when it can run exactly this; else a new one."""
        pre, self.prestarted = self.prestarted, None
        if pre is not None:
            if pre.guard is not None:
                pre.guard.cancel()
            doc = go_document(argv, pre.python, pre.script)
            if doc is not None and self.warmer is not None and self.warmer.hash_file is not None:
                doc["sha256_file"] = str(self.warmer.hash_file)
            if doc is not None and dict(env) == pre.env and pre.proc.returncode is None:
                await asyncio.to_thread(write_json, pre.go_file, doc)
                return pre.proc
            log.info("job %s: the prestarted trainer cannot run this command; starting a new one", job_id)
            await self._kill(pre, job_id)
        return await start_trainer(argv, cwd=cwd, env=env)

    async def discard(self, job_id: str) -> None:
        """Stop what prepare() started and has not been handed to the trainer (idempotent)."""
        if self.warmer is not None:
            self.warmer.stop()
        pre, self.prestarted = self.prestarted, None
        if pre is not None:
            if pre.guard is not None and pre.guard is not asyncio.current_task():
                pre.guard.cancel()
            await self._kill(pre, job_id)

    async def _prestart(self, job_id: str, arch: str, go_file: Path, cpu: bool, cancel: asyncio.Event,
                        waiting: Waiting | None = None) -> None:
        k = self._config.kohya
        if k.python is None or k.script_path is None or k.workspace is None:
            if waiting is not None:
                await self._kill_waiting(waiting)
            return  # `accelerate launch` starts the script in a child of its own: nothing to prestart
        script = str(kohya.script_for(arch, k.script_path))
        python = str(k.python)
        env = kohya.build_env(os.environ, tokenizer_cache_dir=str(k.tokenizer_cache_dir)
                              if k.tokenizer_cache_dir else None, cpu=cpu)
        if waiting is not None and waiting.spec == spec_for(self._config, cpu) and waiting.proc.returncode is None:
            proc, go_file = waiting.proc, waiting.go_file
            ready_file(go_file).unlink(missing_ok=True)
            log.info("job %s: takes the standby trainer (pid %d)", job_id, proc.pid)
        else:
            if waiting is not None:
                await self._kill_waiting(waiting)
            try:
                go_file.unlink(missing_ok=True)
                proc = await start_trainer(prestart_argv(python, script, go_file), cwd=str(k.workspace), env=env)
            except OSError as exc:  # the usual start reports it with its hint
                log.info("job %s: kohya could not be prestarted: %s", job_id, exc)
                return
        # Recorded like a trainer: a restart after a daemon crash stops it.
        await asyncio.to_thread(self._store.set_process, job_id, proc.pid, proc.started)
        pre = Prestarted(proc=proc, python=python, script=script, env=env, go_file=go_file)
        self.prestarted = pre
        pre.guard = asyncio.create_task(self._kill_on_cancel(pre, job_id, cancel), name=f"prestart guard {job_id}")

    async def _kill_on_cancel(self, pre: Prestarted, job_id: str, cancel: asyncio.Event) -> None:
        try:
            await cancel.wait()
        except GeneratorExit:
            # Thrown away with a closed event loop, never cancelled: nothing can be awaited any more (an await here
            # is a RuntimeError); the prestarted trainer ends itself when the daemon does (its parent check).
            raise
        except asyncio.CancelledError:
            # the loop shutting down with the job unfinished
            if self.prestarted is pre:
                await self.discard(job_id)
            raise
        if self.prestarted is pre:
            await self.discard(job_id)

    @staticmethod
    async def _kill_waiting(waiting: Waiting) -> None:
        await waiting.proc.terminate_tree()
        for path in (waiting.go_file, ready_file(waiting.go_file)):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    async def _kill(self, pre: Prestarted, job_id: str) -> None:
        await pre.proc.terminate_tree()
        with contextlib.suppress(OSError):
            pre.go_file.unlink(missing_ok=True)
        await asyncio.to_thread(self._store.set_process, job_id, None, None)
