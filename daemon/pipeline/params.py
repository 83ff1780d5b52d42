"""Training parameters: presets, validation of the client's overrides, and step arithmetic.

Pure: no I/O. The numbers are SD1.5 character-LoRA defaults synthesised from kohya-ss, the bmaltais GUI
presets and community trainers (hollowstrawberry, Civitai): 512 px, images x repeats ~ 200 per epoch,
~10 epochs at batch 2 (~1000 steps), dim 32 / alpha 16, UNet 1e-4 / TE 5e-5, AdamW8bit, fp16.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from daemon.errors import BadInput

# Our names are kohya's `--optimizer_type` spellings (kohya compares them case-insensitively).
OPTIMIZERS: tuple[str, ...] = ("AdamW", "AdamW8bit", "Adafactor", "Lion", "Prodigy")
# bitsandbytes' 8-bit optimizers only run on CUDA.
GPU_ONLY_OPTIMIZERS: frozenset[str] = frozenset({"AdamW8bit"})
# Prodigy adapts its own step size and expects lr ~ 1.0; anything else at lr > 1e-2 diverges at once.
ADAPTIVE_OPTIMIZERS: frozenset[str] = frozenset({"Prodigy"})
MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
# accelerate on a CPU gives fp16 no autocast while kohya still casts the U-Net to fp16: dtype errors.
GPU_ONLY_PRECISIONS: frozenset[str] = frozenset({"fp16"})

# The number of image views per epoch the default repeats aim at (community consensus: 150-400).
TARGET_IMAGES_PER_EPOCH = 200
DEFAULT_PRESET = "balanced"

MAX_LR = 1e-2
MAX_ADAPTIVE_LR = 2.0
ADAPTIVE_DEFAULT_LR = 1.0
MAX_SEED = 2**32 - 1  # numpy's RandomState, seeded by kohya, rejects larger seeds


@dataclass(frozen=True)
class TrainParams:
    resolution: int
    epochs: int
    repeats: int
    batch_size: int
    network_dim: int
    network_alpha: float
    unet_lr: float
    text_encoder_lr: float  # 0 = the text encoder is not trained (kohya: --network_train_unet_only)
    optimizer: str
    mixed_precision: str
    seed: int
    save_every_n_epochs: int  # 0 = only the final file
    preset: str
    # 0 = none. A preview picture of the character every N epochs, so a user can see it learn (and stop
    # early); costs a few seconds per picture on a GPU, minutes on a CPU.
    sample_every_n_epochs: int = 0
    # The base model's family ("sd1" | "sdxl"): picks the trainer script and its levers.
    arch: str = "sd1"
    # How the run fits the card (daemon/pipeline/fit.py): the memory tier chosen, and the levers it sets.
    memory_tier: str = "cpu"
    gradient_checkpointing: bool = False
    # SDXL: the text encoders run once and are freed; requires text_encoder_lr == 0, forbids caption shuffling.
    cache_text_encoder_outputs: bool = False
    fp8_base: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainParams:
        """Rebuild stored params; keys missing from an older record fall back to its preset."""
        preset = str(data.get("preset", DEFAULT_PRESET))
        base = PRESETS.get(preset, PRESETS[DEFAULT_PRESET]).to_json()
        merged = {**base, **{k: data[k] for k in base if k in data}, "preset": preset}
        return cls(**{f.name: _COERCE[f.name](merged[f.name]) for f in fields(cls)})


_COERCE: dict[str, Any] = {
    "resolution": int,
    "epochs": int,
    "repeats": int,
    "batch_size": int,
    "network_dim": int,
    "network_alpha": float,
    "unet_lr": float,
    "text_encoder_lr": float,
    "optimizer": str,
    "mixed_precision": str,
    "seed": int,
    "save_every_n_epochs": int,
    "preset": str,
    "sample_every_n_epochs": int,
    "arch": str,
    "memory_tier": str,
    "gradient_checkpointing": bool,
    "cache_text_encoder_outputs": bool,
    "fp8_base": bool,
}

# `repeats` here is only a placeholder: resolve_params derives it from the image count unless the client
# sets it. Presets are the GPU settings; resolve_params swaps in CPU-safe values when cpu=True.
PRESETS: dict[str, TrainParams] = {
    "balanced": TrainParams(
        resolution=512,
        epochs=10,
        repeats=10,
        batch_size=2,
        network_dim=32,
        network_alpha=16.0,
        unet_lr=1e-4,
        text_encoder_lr=5e-5,
        optimizer="AdamW8bit",
        mixed_precision="fp16",
        seed=42,
        save_every_n_epochs=2,
        preset="balanced",
        sample_every_n_epochs=2,
    ),
}
# Fewer, larger steps: images/s grows almost linearly with batch size, so batch 4 for ~6 epochs is
# roughly a third of balanced's wall time; the higher LR makes up for the ~300 steps.
PRESETS["fast"] = replace(
    PRESETS["balanced"], epochs=6, batch_size=4, network_dim=16, network_alpha=8.0, unet_lr=3e-4,
    save_every_n_epochs=0, preset="fast", sample_every_n_epochs=0,
)
# ~1500 steps at the balanced LR and a larger rank for more detail; still inside the 800-2000 band.
PRESETS["quality"] = replace(
    PRESETS["balanced"], epochs=15, network_dim=64, network_alpha=32.0, save_every_n_epochs=3, preset="quality",
    sample_every_n_epochs=3,
)

OVERRIDE_KEYS: tuple[str, ...] = (
    "preset",
    "resolution",
    "epochs",
    "repeats",
    "batch_size",
    "network_dim",
    "network_alpha",
    "unet_lr",
    "text_encoder_lr",
    "optimizer",
    "mixed_precision",
    "seed",
    "save_every_n_epochs",
    "sample_every_n_epochs",
)

# key -> (min, max) for the plain integer ranges; the cross-field checks live in _check_relations.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "resolution": (256, 1024),
    "epochs": (1, 100),
    "repeats": (1, 100),
    "batch_size": (1, 16),
    "network_dim": (1, 256),
    "seed": (0, MAX_SEED),
    "save_every_n_epochs": (0, 100),
    "sample_every_n_epochs": (0, 100),
}
_FLOAT_KEYS = frozenset({"network_alpha", "unet_lr", "text_encoder_lr"})
_CHOICES: dict[str, tuple[str, ...]] = {"optimizer": OPTIMIZERS, "mixed_precision": MIXED_PRECISIONS}


def default_repeats(image_count: int) -> int:
    return max(1, min(_INT_RANGES["repeats"][1], round(TARGET_IMAGES_PER_EPOCH / image_count)))


def steps_per_epoch(bucket_counts: Iterable[int], *, repeats: int, batch_size: int) -> int:
    """kohya never mixes buckets in a batch: each bucket's last batch may be short."""
    return sum(math.ceil(count * repeats / batch_size) for count in bucket_counts)


def total_steps(params: TrainParams, bucket_counts: Iterable[int] | int) -> int:
    """Optimisation steps kohya will run (no gradient accumulation).

    `bucket_counts`: the number of pictures in each bucket (buckets.bucket_counts), or one int for pictures
    that all share a bucket.
    """
    counts = [bucket_counts] if isinstance(bucket_counts, int) else list(bucket_counts)
    return steps_per_epoch(counts, repeats=params.repeats, batch_size=params.batch_size) * params.epochs


def resolve_params(overrides: Mapping[str, object], *, image_count: int, cpu: bool) -> TrainParams:
    """Preset + the client's overrides, validated; raises BadInput naming the offending key."""
    if image_count < 1:
        raise BadInput("A training job needs at least one image.", key="images")
    unknown = sorted(k for k in overrides if k not in OVERRIDE_KEYS)
    if unknown:
        raise BadInput(
            f"Unknown training parameter '{unknown[0]}'; allowed: {', '.join(OVERRIDE_KEYS)}.", key=unknown[0]
        )

    preset_name = _preset_name(overrides.get("preset", DEFAULT_PRESET))
    values: dict[str, Any] = PRESETS[preset_name].to_json()
    values["repeats"] = default_repeats(image_count)
    for key in OVERRIDE_KEYS[1:]:
        if key in overrides:
            values[key] = _validate_value(key, overrides[key])

    if "network_dim" in overrides and "network_alpha" not in overrides:
        # Keep the preset's alpha/dim ratio (the effective LoRA scale) instead of its absolute alpha.
        preset = PRESETS[preset_name]
        values["network_alpha"] = values["network_dim"] * preset.network_alpha / preset.network_dim
    if cpu:
        _force_cpu_safe(values, overrides)
    if values["optimizer"] in ADAPTIVE_OPTIMIZERS:
        _default_adaptive_lrs(values, overrides)
    for key in ("save_every_n_epochs", "sample_every_n_epochs"):
        if key not in overrides and values[key] > values["epochs"]:
            # The preset's interval would never fire with the client's shorter run.
            values[key] = 0
    _check_relations(values)
    return TrainParams(**values)


def _preset_name(value: object) -> str:
    if not isinstance(value, str) or value not in PRESETS:
        raise BadInput(f"'preset' must be one of: {', '.join(PRESETS)}.", key="preset")
    return value


def _validate_value(key: str, value: object) -> object:
    if key in _INT_RANGES:
        low, high = _INT_RANGES[key]
        # bool is an int subclass in Python; JSON true must not train 1 epoch.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BadInput(f"'{key}' must be a whole number from {low} to {high}.", key=key)
        if key == "resolution" and value % 64:
            raise BadInput(f"'resolution' must be a multiple of 64 from {low} to {high}.", key=key)
        return value
    if key in _FLOAT_KEYS:
        # JSON has one number type: 16 and 16.0 are the same alpha.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadInput(f"'{key}' must be a number.", key=key)
        return float(value)
    choices = _CHOICES[key]
    if isinstance(value, str):
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
    raise BadInput(f"'{key}' must be one of: {', '.join(choices)}.", key=key)


def _force_cpu_safe(values: dict[str, Any], overrides: Mapping[str, object]) -> None:
    """Swap the preset's GPU-only choices for CPU-safe ones; refuse them when the client asked."""
    if values["mixed_precision"] in GPU_ONLY_PRECISIONS:
        if "mixed_precision" in overrides:
            raise BadInput(
                f"'mixed_precision' {values['mixed_precision']} needs a GPU; use no or bf16 on this CPU-only machine.",
                key="mixed_precision",
            )
        values["mixed_precision"] = "no"
    if values["optimizer"] in GPU_ONLY_OPTIMIZERS:
        if "optimizer" in overrides:
            raise BadInput(
                f"'optimizer' {values['optimizer']} needs a GPU (bitsandbytes); use AdamW on this CPU-only machine.",
                key="optimizer",
            )
        values["optimizer"] = "AdamW"
    if "sample_every_n_epochs" not in overrides:
        # A 512 px preview takes minutes on a CPU; only when asked for.
        values["sample_every_n_epochs"] = 0


def _default_adaptive_lrs(values: dict[str, Any], overrides: Mapping[str, object]) -> None:
    # The presets' 1e-4 would make Prodigy crawl (kohya warns "learning rate is too low").
    if "unet_lr" not in overrides:
        values["unet_lr"] = ADAPTIVE_DEFAULT_LR
    if "text_encoder_lr" not in overrides and values["text_encoder_lr"] > 0:
        values["text_encoder_lr"] = ADAPTIVE_DEFAULT_LR


def _check_relations(values: dict[str, Any]) -> None:
    dim = values["network_dim"]
    if not 0 < values["network_alpha"] <= dim:
        # alpha > dim scales the LoRA update up, which the kohya docs warn against.
        raise BadInput(f"'network_alpha' must be above 0 and at most network_dim ({dim}).", key="network_alpha")
    max_lr = MAX_ADAPTIVE_LR if values["optimizer"] in ADAPTIVE_OPTIMIZERS else MAX_LR
    if not 0 < values["unet_lr"] <= max_lr:
        raise BadInput(f"'unet_lr' must be above 0 and at most {max_lr:g} for {values['optimizer']}.", key="unet_lr")
    if not 0 <= values["text_encoder_lr"] <= max_lr:
        raise BadInput(
            f"'text_encoder_lr' must be from 0 (text encoder not trained) to {max_lr:g} for {values['optimizer']}.",
            key="text_encoder_lr",
        )
    epochs = values["epochs"]
    for key, zero_means in (("save_every_n_epochs", "final file only"), ("sample_every_n_epochs", "no previews")):
        if values[key] > epochs:
            raise BadInput(f"'{key}' must be from 0 ({zero_means}) to epochs ({epochs}).", key=key)
