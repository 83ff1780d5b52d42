"""Which Stable Diffusion family a base checkpoint belongs to, read from its keys (no tensors loaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from daemon.safetensors_header import read_header

Arch = Literal["sd1", "sd2", "sdxl", "unknown"]

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".sft")
# What train_network.py can train today; SDXL (sdxl_train_network.py) is a later step.
TRAINABLE_ARCHS: tuple[Arch, ...] = ("sd1",)
ARCH_LABELS: dict[str, str] = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "unknown": "unknown"}


def arch_from_keys(keys: list[str] | set[str]) -> Arch:
    """SDXL has `conditioner.embedders.*`, SD2 `cond_stage_model.model.*`, SD1 `cond_stage_model.transformer.*`."""
    has = set(keys)

    def any_prefix(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in has)

    if any_prefix("conditioner.embedders."):
        return "sdxl"
    if any_prefix("cond_stage_model.model."):
        return "sd2"
    if any_prefix("cond_stage_model.transformer."):
        return "sd1"
    return "unknown"


def _diffusers_arch(folder: Path) -> Arch:
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    dim = unet.get("cross_attention_dim")
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(dim, "unknown")  # type: ignore[return-value]


def detect_arch(path: Path) -> Arch:
    """Best effort: `unknown` for .ckpt (pickle; reading it would execute code) and unreadable files."""
    if path.is_dir():
        return _diffusers_arch(path) if (path / "model_index.json").is_file() else "unknown"
    if path.suffix.lower() in (".safetensors", ".sft"):
        try:
            return arch_from_keys(read_header(path)[0])
        except (OSError, ValueError):
            return "unknown"
    return "unknown"
