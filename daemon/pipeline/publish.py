"""Checking the trained LoRA and publishing it into ED's lora folder under a name nobody else has.

ED caches a LoRA by path, so a name is never reused; ED scans the folder, so the file appears only
once it is complete (written under a hidden temporary name, then linked/renamed into place).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import DaemonError
from daemon.pipeline.model_arch import ARCH_LABELS, Arch
from daemon.safetensors_header import read_header


class PublishError(DaemonError):
    """The trained file is not a usable LoRA, or the lora folder cannot take it."""


@dataclass(frozen=True)
class LoraSummary:
    tensors: int
    unet_modules: int
    te_modules: int
    alphas: int
    metadata: dict[str, str]
    arch: Arch = "unknown"  # the base model family the LoRA is for (lora_arch)

    @property
    def arch_label(self) -> str:
        return ARCH_LABELS[self.arch]

    @property
    def unet_only(self) -> bool:
        # kohya writes no ss_network_train_unet_only key: a U-Net-only LoRA is told by its keys alone
        return self.te_modules == 0


# kohya's header names the base: `modelspec.architecture` (stable-diffusion-xl-v1-base/lora, stable-diffusion-v1/lora,
# stable-diffusion-v2-768-v/lora, ...) and `ss_base_model_version` (sdxl_base_v1-0, sd_v1, sd_v2, ...).
_ARCH_BY_MODELSPEC: tuple[tuple[str, Arch], ...] = (
    ("stable-diffusion-xl-", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))
_ARCH_BY_VERSION: tuple[tuple[str, Arch], ...] = (("sdxl_", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"))
# Only SDXL LoRAs have two text encoders (lora_te1_/lora_te2_) and SGM U-Net names (input_blocks, middle_block,
# output_blocks); SD 1.x and 2.x share the diffusers names (down_blocks, ...), so their keys cannot tell them apart.
_SDXL_MODULES = ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_",
                 "lora_unet_output_blocks_")


def lora_arch(modules: list[str] | set[str], metadata: dict[str, str]) -> Arch:
    """The family of base model a kohya LoRA was trained on: its keys when they are SDXL's, else its header."""
    if any(module.startswith(_SDXL_MODULES) for module in modules):
        return "sdxl"
    spec = metadata.get("modelspec.architecture", "")
    version = metadata.get("ss_base_model_version", "")
    for value, table in ((spec, _ARCH_BY_MODELSPEC), (version, _ARCH_BY_VERSION)):
        for prefix, arch in table:
            if value.startswith(prefix):
                return arch
    return "unknown"


def verify_lora(path: Path, *, expected_arch: str | None = None) -> LoraSummary:
    """Kohya layout: `lora_unet_*` / `lora_te*` modules, each with lora_down, lora_up and .alpha.

    SD 1.x LoRAs have `lora_te_`, SDXL ones `lora_te1_`/`lora_te2_` or, trained on the U-Net alone, no text
    encoder modules at all (2166 tensors: 722 modules; shared/kohya-logs/cpu-sdxl). With `expected_arch` (the
    job's base model family) a LoRA whose keys or header name another family is refused: ED would load it and
    silently change nothing on the picture.
    """
    try:
        keys, metadata = read_header(path)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PublishError(
            f"The trained file {path.name} cannot be read as safetensors: {exc}",
            hint="The trainer may have been stopped while saving; run the job again.",
        ) from exc
    modules: dict[str, set[str]] = {}
    for key in keys:
        module, _, part = key.partition(".")
        modules.setdefault(module, set()).add(part)
    unet = [m for m in modules if m.startswith("lora_unet_")]
    te = [m for m in modules if m.startswith("lora_te")]
    if not unet and not te:
        raise PublishError(
            f"{path.name} holds no kohya LoRA weights (no lora_unet_*/lora_te* keys).",
            hint="Check that kohya.script_path points at sd-scripts' train_network.py.",
        )
    missing_alpha = [m for m in unet + te if "alpha" not in modules[m]]
    if missing_alpha:
        raise PublishError(
            f"{path.name} has LoRA modules without .alpha (e.g. {missing_alpha[0]}); Easy Diffusion would load"
            " it far too weak.",
            hint="Use kohya's networks.lora module.",
        )
    incomplete = [m for m in unet + te if not {"lora_down.weight", "lora_up.weight"} <= modules[m]]
    if incomplete:
        raise PublishError(f"{path.name} has incomplete LoRA modules (e.g. {incomplete[0]}).")
    arch = lora_arch(unet + te, metadata)
    if expected_arch is not None and arch != "unknown" and arch != expected_arch:
        raise PublishError(
            f"{path.name} is a LoRA for {ARCH_LABELS[arch]} models, but the job trained on an "
            f"{ARCH_LABELS.get(expected_arch, expected_arch)} model.",
            hint="The trainer script does not match the base model; please report this with the job's log.",
        )
    return LoraSummary(
        tensors=len(keys),
        unet_modules=len(unet),
        te_modules=len(te),
        alphas=sum(1 for m in unet + te if "alpha" in modules[m]),
        metadata=metadata,
        arch=arch,
    )


def slugify(name: str) -> str:
    """A file-name stem from a job name: ASCII letters, digits, - and _ only."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name.strip()).strip("_-")
    return (slug or "lora")[:64]


# `.<stem>.<8 hex>.partial`: the stem is a slugify() result. Also matched: the write test of env_check.
_TEMP_NAME = re.compile(r"\.[A-Za-z0-9_-]{1,64}\.[0-9a-f]{8}\.partial")
_WRITE_TEST_NAME = re.compile(r"\.write-test-[A-Za-z0-9_]{1,32}\.partial")


def temp_name(stem: str) -> str:
    return f".{stem}.{secrets.token_hex(4)}.partial"


def is_our_temp(name: str) -> bool:
    """True only for names this daemon gives its temporary files (never another program's `.x.partial`)."""
    return bool(_TEMP_NAME.fullmatch(name) or _WRITE_TEST_NAME.fullmatch(name))


def sweep_temp_files(folder: Path) -> list[Path]:
    """Delete our temporary files that a crash or a power cut left in `folder` (not recursive)."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed  # no folder (yet), or unreadable: nothing of ours can be there to clean
    for entry in entries:
        if not (is_our_temp(entry.name) and entry.is_file(follow_symlinks=False)):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue  # already gone, or a read-only folder: never a reason to stop the daemon starting
        removed.append(Path(entry.path))
    if removed:
        fsync_dir(folder)
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a name just linked, renamed or removed in `folder` survive a power cut (POSIX only)."""
    if sys.platform == "win32":
        return  # NTFS journals names itself; a folder cannot be opened for fsync there
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (network shares) refuse fsync on a folder; nothing more can be done
    finally:
        os.close(fd)


def _claim(tmp: Path, target: Path) -> bool:
    """Move `tmp` to `target` only if `target` does not exist. True on success."""
    if sys.platform == "win32":
        try:
            os.rename(tmp, target)  # fails with FileExistsError instead of overwriting
            return True
        except FileExistsError:
            return False
    try:
        os.link(tmp, target)  # atomic and never overwrites
    except FileExistsError:
        return False
    except OSError:
        # Filesystems without hard links (exFAT, some network shares): best effort.
        if target.exists():
            return False
        os.replace(tmp, target)
        return True
    tmp.unlink()
    return True


def candidate_names(stem: str) -> Iterator[str]:
    """The names publish() tries, in order."""
    for n in range(1, 10_000):
        yield f"{stem}.safetensors" if n == 1 else f"{stem}-{n}.safetensors"


def publish(source: Path, lora_dir: Path, stem: str) -> Path:
    """Copy `source` into `lora_dir` as `<stem>.safetensors`, `<stem>-2.safetensors`, ...; returns the path.

    The bytes reach the disk before the name appears, and the name before we return: after a power
    cut, ED's folder holds either the whole LoRA or only a temporary file that the next start removes.
    """
    try:
        lora_dir.mkdir(parents=True, exist_ok=True)
        tmp = lora_dir / temp_name(stem)
        with source.open("rb") as src, tmp.open("xb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
    except OSError as exc:
        raise PublishError(
            f"Could not write into the LoRA folder {lora_dir}: {exc.strerror or exc}",
            hint="Check ed_lora_dir in the daemon config and that the disk has room.",
        ) from exc
    try:
        for name in candidate_names(stem):
            target = lora_dir / name
            if _claim(tmp, target):
                fsync_dir(lora_dir)
                return target
        raise PublishError(f"No free file name for {stem} in {lora_dir}.")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def publish_verified(source: Path, lora_dir: Path, stem: str, *, expected_arch: str | None) -> Path:
    """verify_lora, then publish: a file that is not a complete LoRA of the job's family never reaches ED's folder
    (a job's final LoRA, at the end of its run or when a restart finishes its copy)."""
    verify_lora(source, expected_arch=expected_arch)
    return publish(source, lora_dir, stem)


def find_published(source: Path, lora_dir: Path, stem: str, *, taken: frozenset[Path] = frozenset()) -> Path | None:
    """The file publish(source, lora_dir, stem) created, if it got that far: one of its names, same bytes.

    `taken` are files other jobs already own (another job of the same name). Used by recovery, when a
    crash came between the copy and the moment the job recorded it.
    """
    names = re.compile(re.escape(stem) + r"(-[0-9]{1,4})?\.safetensors")
    try:
        size = source.stat().st_size
        entries = [e for e in os.scandir(lora_dir) if names.fullmatch(e.name)]
    except OSError:
        return None
    for entry in sorted(entries, key=lambda e: e.name):
        target = Path(entry.path)
        with contextlib.suppress(OSError):
            if (entry.is_file(follow_symlinks=False) and entry.stat().st_size == size and target not in taken
                    and _same_bytes(source, target)):
                return target
    return None


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        with a.open("rb") as fa, b.open("rb") as fb:
            while True:
                ca, cb = fa.read(1024 * 1024), fb.read(1024 * 1024)
                if ca != cb:
                    return False
                if not ca:
                    return True
    except OSError:
        return False


def lora_id(path: Path, lora_dir: Path) -> str:
    """ED's id for a LoRA: its path under models/lora without extension, with forward slashes."""
    return path.relative_to(lora_dir).with_suffix("").as_posix()
