"""Which Stable Diffusion family a base checkpoint belongs to, read from its keys (no tensors loaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from daemon.safetensors_header import read_header

Arch = Literal["sd1", "sd2", "sdxl", "unknown"]

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".sft")
# sd-scripts trains SD 1.x with train_network.py and SDXL (Pony, Illustrious, NoobAI...) with sdxl_train_network.py.
TRAINABLE_ARCHS: tuple[Arch, ...] = ("sd1", "sdxl")
ARCH_LABELS: dict[str, str] = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "unknown": "unknown"}
PICK_INSTEAD = "Choose an SD 1.x model (such as sd-v1-5) or an SDXL one (SDXL 1.0, Pony, Illustrious, NoobAI)."


def untrainable_reason(arch: Arch, file_name: str) -> str | None:
    """Why a model of this family is not trained, or None when it is (an unreadable family is trained as SD 1.x)."""
    if arch != "sd2":
        return None
    # kohya needs --v2, plus --v_parameterization for the 768-v models, and few character LoRAs or ED
    # users are on SD 2.x: not worth a family of its own.
    return (f"{file_name} is an SD 2.x model; SD 2.x is not trained here (it needs its own v2/v-prediction "
            f"settings, and few character LoRAs use it). {PICK_INSTEAD}")


def family_note(arch: Arch, file_name: str) -> str | None:
    """What a user should know about a model whose family cannot be read: it is trained as SD 1.x."""
    if arch != "unknown":
        return None
    if file_name.lower().endswith(".ckpt"):
        why = "a .ckpt file is never opened here: loading one runs code inside it"
    else:
        why = "its contents do not say"
    return (f"Which family {file_name} belongs to cannot be read ({why}); it is trained as SD 1.x, and the trainer "
            "stops at once with a clear error if it is not. A .safetensors copy of it avoids the guess.")


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
