"""Training parameters: presets, the card's fit, validation of the client's overrides, and step arithmetic.

Pure: no I/O. Two independent choices make a run's settings: the preset says how much to train (image views,
rank, learning rates, at the preset's reference batch size), and the memory tier (daemon/pipeline/fit.py) says
how to fit the card (batch size, precision, checkpointing, optimizer, caching, fp8). When the fit's batch
differs from the preset's, the image views stay (so the steps follow 1/batch) and the learning rates follow
scaled_lr's rule.

SD 1.x numbers are character-LoRA defaults synthesised from kohya-ss, the bmaltais GUI presets and community
trainers (hollowstrawberry, Civitai): 512 px, images x repeats ~ 200 per epoch, ~10 epochs at batch 2
(~1000 steps), dim 32 / alpha 16, UNet 1e-4 / TE 5e-5. SDXL numbers: see SDXL_PRESETS.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from daemon.errors import BadInput
from daemon.pipeline.fit import AUTO, Fit, Hardware, Machine, check_tier, choose_fit

# Our names are kohya's `--optimizer_type` spellings (kohya compares them case-insensitively).
OPTIMIZERS: tuple[str, ...] = ("AdamW", "AdamW8bit", "Adafactor", "Lion", "Prodigy")
# bitsandbytes' 8-bit optimizers only run on CUDA.
GPU_ONLY_OPTIMIZERS: frozenset[str] = frozenset({"AdamW8bit"})
# Prodigy adapts its own step size and expects lr ~ 1.0; anything else at lr > 1e-2 diverges at once.
ADAPTIVE_OPTIMIZERS: frozenset[str] = frozenset({"Prodigy"})
MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
# accelerate on a CPU gives fp16 no autocast while kohya still casts the U-Net to fp16: dtype errors.
GPU_ONLY_PRECISIONS: frozenset[str] = frozenset({"fp16"})

# The number of image views per epoch the default repeats aim at. SD 1.x: community consensus 150-400
# (anchors.md §4); SDXL: hollowstrawberry's XL trainer, images x repeats ~ 100.
TARGET_IMAGES_PER_EPOCH = 200
TARGET_IMAGES_PER_EPOCH_BY_ARCH: dict[str, int] = {"sd1": TARGET_IMAGES_PER_EPOCH, "sdxl": 100}
DEFAULT_PRESET = "balanced"

MAX_LR = 1e-2
MAX_ADAPTIVE_LR = 2.0
ADAPTIVE_DEFAULT_LR = 1.0
MAX_SEED = 2**32 - 1  # numpy's RandomState, seeded by kohya, rejects larger seeds

# Learning rate vs batch size. Adam-type optimizers follow the square-root rule: lr x sqrt(batch / reference
# batch) keeps the training dynamics when the batch changes (Malladi et al. 2022, "On the SDEs and Scaling
# Rules for Adaptive Gradient Algorithms"; kohya.md §9: keep the image views fixed and adjust the LR).
# Adafactor here runs with relative_step=False, as an Adam-type method. Prodigy finds its own step size;
# Lion, a sign method, has no such rule with a source: both keep the preset's LR.
SQRT_SCALED_OPTIMIZERS: frozenset[str] = frozenset({"AdamW", "AdamW8bit", "Adafactor"})
# A scaled LR never goes above 1e-3, the top of sd-scripts' LoRA range (docs/train_network.md: 1e-4 ... 1e-3).
MAX_SCALED_LR = 1e-3


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
    # Why this tier and these levers ("NVIDIA GeForce RTX 4090, 24 GB → batch 8, bf16, ..."); "" before tiers.
    fit_reason: str = ""
    # Prep crops each picture around its face (head and shoulders, daemon/pipeline/face_crop.py), the whole
    # picture where none is found. Not a kohya argument.
    face_crop: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainParams:
        """Rebuild stored params; keys missing from an older record fall back to its preset."""
        preset = str(data.get("preset", DEFAULT_PRESET))
        presets = PRESETS_BY_ARCH.get(str(data.get("arch", "sd1")), PRESETS)
        base = presets.get(preset, presets[DEFAULT_PRESET]).to_json()
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
    "fit_reason": str,
    "face_crop": bool,
}

# `repeats` here is only a placeholder: resolve_params derives it from the image count unless the client
# sets it. A preset's batch_size is its reference batch (its LRs are tuned for it); its precision, optimizer
# and other levers are replaced by the fit's. memory_tier "auto": the tier is chosen when a job is resolved.
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
        memory_tier=AUTO,
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

# SDXL character LoRA (anchors.md §4 "SDXL", 1024 px): U-Net only with cached text-encoder outputs (kohya's
# SDXL LoRA advice; OneTrainer's SDXL preset freezes the TE too), reference batch 4 (hollowstrawberry XL,
# Civitai SDXL), images x repeats ~ 100 per epoch. Image views per preset, 20 pictures: fast 800
# (hollowstrawberry XL: ~100 x 10 epochs = 1000), balanced 1500 and quality 2000 (the anchors' synthesis:
# 1500-2000 views; Civitai SDXL 200 x 10). Rank / LR: fast dim 8 / alpha 4 at 3e-4 (hollowstrawberry XL);
# balanced dim 16 / 8 at 2e-4 (synthesis: AdamW8bit 1e-4 ... 3e-4, alpha = dim/2); quality dim 32 / 16 at 1e-4
# (sd-scripts docs/sdxl_train_network.md dim 32 at 1e-4; Civitai SDXL dim 32 / 16; kohya_ss malcolmrey preset
# 1e-4).
SDXL_PRESETS: dict[str, TrainParams] = {
    "balanced": TrainParams(
        resolution=1024,
        epochs=15,
        repeats=5,
        batch_size=4,
        network_dim=16,
        network_alpha=8.0,
        unet_lr=2e-4,
        text_encoder_lr=0.0,
        optimizer="AdamW8bit",
        mixed_precision="fp16",
        seed=42,
        save_every_n_epochs=5,
        preset="balanced",
        sample_every_n_epochs=5,
        arch="sdxl",
        memory_tier=AUTO,
        gradient_checkpointing=True,
        cache_text_encoder_outputs=True,
    ),
}
SDXL_PRESETS["fast"] = replace(
    SDXL_PRESETS["balanced"], epochs=8, network_dim=8, network_alpha=4.0, unet_lr=3e-4, save_every_n_epochs=0,
    preset="fast", sample_every_n_epochs=0,
)
SDXL_PRESETS["quality"] = replace(
    SDXL_PRESETS["balanced"], epochs=20, network_dim=32, network_alpha=16.0, unet_lr=1e-4, preset="quality",
)
PRESETS_BY_ARCH: dict[str, dict[str, TrainParams]] = {"sd1": PRESETS, "sdxl": SDXL_PRESETS}

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
    "memory_tier",
    "gradient_checkpointing",
    "cache_text_encoder_outputs",
    "fp8_base",
    "face_crop",
)
# The levers a memory tier sets; an explicit client value of one wins over the tier's.
FIT_KEYS: tuple[str, ...] = (
    "batch_size", "mixed_precision", "gradient_checkpointing", "optimizer", "cache_text_encoder_outputs", "fp8_base",
)

# key -> (min, max) for the plain integer ranges; the cross-field checks live in _check_relations.
INT_RANGES: dict[str, tuple[int, int]] = {
    "resolution": (256, 1024),
    "epochs": (1, 100),
    "repeats": (1, 100),
    "batch_size": (1, 32),  # 32: the 80 GB tier's SD 1.x batch (fit.py)
    "network_dim": (1, 256),
    "seed": (0, MAX_SEED),
    "save_every_n_epochs": (0, 100),
    "sample_every_n_epochs": (0, 100),
}
_FLOAT_KEYS = frozenset({"network_alpha", "unet_lr", "text_encoder_lr"})
_BOOL_KEYS = frozenset({"gradient_checkpointing", "cache_text_encoder_outputs", "fp8_base", "face_crop"})
_CHOICES: dict[str, tuple[str, ...]] = {"optimizer": OPTIMIZERS, "mixed_precision": MIXED_PRECISIONS}


def default_repeats(image_count: int, arch: str = "sd1") -> int:
    target = TARGET_IMAGES_PER_EPOCH_BY_ARCH.get(arch, TARGET_IMAGES_PER_EPOCH)
    return max(1, min(INT_RANGES["repeats"][1], round(target / image_count)))


def presets_for(arch: str) -> dict[str, TrainParams]:
    """The presets of a trainable family ("sd1" | "sdxl"); raises BadInput for any other."""
    if arch not in PRESETS_BY_ARCH:
        raise BadInput(f"'arch' must be one of: {', '.join(PRESETS_BY_ARCH)}.", key="arch")
    return PRESETS_BY_ARCH[arch]


def scaled_lr(lr: float, *, batch_size: int, reference_batch: int, optimizer: str) -> float:
    """The preset's LR for `reference_batch`, carried over to `batch_size` (see SQRT_SCALED_OPTIMIZERS)."""
    if optimizer not in SQRT_SCALED_OPTIMIZERS or batch_size == reference_batch or lr == 0:
        return lr
    scaled = float(f"{lr * math.sqrt(batch_size / reference_batch):.3g}")  # 1.41e-4, not 1.4142135623730951e-4
    return min(scaled, max(lr, MAX_SCALED_LR))


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


def resolve_params(overrides: Mapping[str, object], *, image_count: int, cpu: bool | None = None,
                   arch: str = "sd1", gpu: Hardware | None = None) -> TrainParams:
    """Preset + the card's fit + the client's overrides, validated; raises BadInput naming the offending key.

    `arch`: "sd1" | "sdxl". `gpu`: the GPU probe's answer (env_check.GpuInfo). Without it, `cpu` says whether
    the machine has a CUDA GPU at all; a GPU of unknown memory gets fit.UNKNOWN_VRAM_TIER.
    """
    if image_count < 1:
        raise BadInput("A training job needs at least one image.", key="images")
    unknown = sorted(k for k in overrides if k not in OVERRIDE_KEYS)
    if unknown:
        raise BadInput(
            f"Unknown training parameter '{unknown[0]}'; allowed: {', '.join(OVERRIDE_KEYS)}.", key=unknown[0]
        )
    hardware: Hardware = gpu if gpu is not None else Machine(cuda=not cpu)

    presets = presets_for(arch)
    preset_name = _preset_name(overrides.get("preset", DEFAULT_PRESET), presets)
    reference = presets[preset_name]
    values: dict[str, Any] = reference.to_json()
    values["repeats"] = default_repeats(image_count, arch)
    for key in OVERRIDE_KEYS[1:]:
        if key in overrides:
            values[key] = _validate_value(key, overrides[key])
    _apply_fit(values, choose_fit(arch, hardware, tier=values["memory_tier"]), overrides)

    if "network_dim" in overrides and "network_alpha" not in overrides:
        # Keep the preset's alpha/dim ratio (the effective LoRA scale) instead of its absolute alpha.
        values["network_alpha"] = values["network_dim"] * reference.network_alpha / reference.network_dim
    if not hardware.cuda:
        _force_cpu_safe(values, overrides)
    for key in ("unet_lr", "text_encoder_lr"):
        if key not in overrides:
            values[key] = scaled_lr(values[key], batch_size=values["batch_size"],
                                    reference_batch=reference.batch_size, optimizer=values["optimizer"])
    if values["optimizer"] in ADAPTIVE_OPTIMIZERS:
        _default_adaptive_lrs(values, overrides)
    for key in ("save_every_n_epochs", "sample_every_n_epochs"):
        if key not in overrides and values[key] > values["epochs"]:
            # The preset's interval would never fire with the client's shorter run.
            values[key] = 0
    _check_relations(values)
    return TrainParams(**values)


def _apply_fit(values: dict[str, Any], fit: Fit, overrides: Mapping[str, object]) -> None:
    """The tier's levers, except where the client set one: an explicit value wins, and a tier lever that
    cannot go with it yields (fp8 without mixed precision, cached text-encoder outputs while training them)."""
    values["memory_tier"] = fit.tier
    values["fit_reason"] = fit.reason
    if "resolution" not in overrides:
        values["resolution"] = min(values["resolution"], fit.resolution)
    for key in ("mixed_precision", "gradient_checkpointing", "optimizer"):
        if key not in overrides:
            values[key] = getattr(fit, key)
    if "batch_size" not in overrides:
        # The tier's batch is sized for fit.resolution; activations grow with the pixels (fit.MemoryModel).
        shrink = min(1.0, (fit.resolution / values["resolution"]) ** 2)
        values["batch_size"] = max(1, math.floor(fit.batch_size * shrink))
    if "fp8_base" not in overrides:
        values["fp8_base"] = fit.fp8_base and values["mixed_precision"] != "no"
    if "cache_text_encoder_outputs" not in overrides:
        values["cache_text_encoder_outputs"] = fit.cache_text_encoder_outputs and values["text_encoder_lr"] == 0
    by_hand = [f"{key} {_shown(values[key])}" for key in FIT_KEYS if key in overrides]
    if by_hand:
        # The tier's reason alone would name a batch (say) the job does not use.
        values["fit_reason"] = f"{fit.reason}; set by hand: {', '.join(by_hand)}"


def _shown(value: object) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _preset_name(value: object, presets: Mapping[str, TrainParams]) -> str:
    if not isinstance(value, str) or value not in presets:
        raise BadInput(f"'preset' must be one of: {', '.join(presets)}.", key="preset")
    return value


def _validate_value(key: str, value: object) -> object:
    if key in INT_RANGES:
        low, high = INT_RANGES[key]
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
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise BadInput(f"'{key}' must be true or false.", key=key)
        return value
    if key == "memory_tier":
        return check_tier(value)
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
    if values["fp8_base"]:
        raise BadInput("'fp8_base' needs a GPU; turn it off on this CPU-only machine.", key="fp8_base")
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
    _check_sdxl_levers(values)
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


def _check_sdxl_levers(values: dict[str, Any]) -> None:
    sdxl = values["arch"] == "sdxl"
    if values["fp8_base"]:
        if not sdxl:
            raise BadInput("'fp8_base' is for SDXL models; an SD 1.x run fits every card without it.", key="fp8_base")
        if values["mixed_precision"] == "no":
            # kohya asserts it only after loading the whole model (kohya-logs/cpu-sdxl run 14).
            raise BadInput("'fp8_base' needs mixed_precision fp16 or bf16.", key="fp8_base")
    if values["cache_text_encoder_outputs"]:
        if not sdxl:
            raise BadInput("'cache_text_encoder_outputs' is for SDXL models; kohya's SD 1.x trainer has no such "
                           "option.", key="cache_text_encoder_outputs")
        if values["text_encoder_lr"] > 0:
            raise BadInput("'cache_text_encoder_outputs' needs text_encoder_lr 0: kohya cannot train the text "
                           "encoders while their outputs are cached.", key="cache_text_encoder_outputs")
