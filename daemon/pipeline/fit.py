"""How a training run fits the card: a memory tier chosen from the model family x the GPU's memory, and the
levers it sets (batch size, precision, gradient checkpointing, optimizer, text-encoder caching, fp8).

Pure: no I/O. The fastest settings that do not run out of memory: on a big GPU images/s grows almost linearly
with the batch size (kohya.md §9: H100, SD1.5, b2 ~6.6 img/s, b32 55 img/s), while gradient checkpointing
halves the speed, so each tier takes the largest batch the memory model below fits, and checkpointing only
where the memory is tight. How much to train (steps, rank, learning rates) is the preset's business
(daemon/pipeline/params.py); it keeps the training amount when the batch changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from daemon.errors import BadInput

AUTO = "auto"
TIERS: tuple[str, ...] = ("cpu", "6gb", "8gb", "12gb", "16gb", "24gb", "40gb")
TIER_LABELS: dict[str, str] = {
    "cpu": "CPU", "6gb": "6 GB", "8gb": "8 GB", "12gb": "12 GB", "16gb": "16 GB", "24gb": "24 GB", "40gb": "40+ GB",
}
# The least memory (GiB, as torch reports it) a card of each tier has. torch reports GiB, a little under the
# marketing GB: GTX 1060 6 GB 5.93, 8 GB cards 7.79, RTX 3060 12 GB 11.76, T4 16 GB 14.75, RTX 4090 23.99,
# A100 40 GB 39.39 — so each threshold sits below the smallest real card of its class. A 2080 Ti (10.75) or a
# 10 GB 3080 (9.77) is an 8 GB card here; a 20 GB card is a 16 GB one, a 32 GB one a 24 GB one.
TIER_MIN_GIB: dict[str, float] = {"6gb": 5.5, "8gb": 7.5, "12gb": 11.0, "16gb": 14.5, "24gb": 22.0, "40gb": 38.0}
# 80 GB-class cards (A100/H100 80 GB ~79.2 GiB, H200 ~139.8) get a bigger batch within the 40+ tier.
BIG_CARD_GIB = 70.0
# A CUDA GPU whose memory the probe could not read: the settings the presets had before tiers existed
# (SD1.5: batch 2, fp16, AdamW8bit), which an 8 GB card holds.
UNKNOWN_VRAM_TIER = "8gb"

# Headroom, GiB. A desktop session, the driver and the allocator's slack take ~0.5 GiB. An idle Easy Diffusion
# on the same GPU keeps its model's weights there: SD 1.5 in fp16 is 1066M parameters (U-Net 860M, CLIP-L 123M,
# VAE 84M) = 2.0 GiB; SDXL 3469M (kohya-logs/cpu-sdxl/INDEX.md: U-Net 2567.5M, CLIP-L 123.1M, bigG 694.7M, VAE
# 83.7M) = 6.5 GiB. The 6-8 GB cards have no room for both: their tiers assume ED holds no model while a job
# trains (the out-of-memory hint says so); 12-16 GB tiers leave room for ED with an SD 1.5 model, 24 GB and
# more for ED with an SDXL model.
DESKTOP_GIB = 0.5
ED_MODEL_GIB: dict[str, float] = {"sd1": 2.0, "sdxl": 6.5}
RESERVE_GIB: dict[str, float] = {
    "6gb": DESKTOP_GIB, "8gb": DESKTOP_GIB,
    "12gb": DESKTOP_GIB + ED_MODEL_GIB["sd1"], "16gb": DESKTOP_GIB + ED_MODEL_GIB["sd1"],
    "24gb": DESKTOP_GIB + ED_MODEL_GIB["sdxl"], "40gb": DESKTOP_GIB + ED_MODEL_GIB["sdxl"],
}


@dataclass(frozen=True)
class MemoryModel:
    """Peak GPU memory of one run, GiB: base + per picture x batch, at the family's default resolution.

    Activations grow with the number of latent positions, i.e. with resolution squared.
    """

    base_gib: float
    per_image_gib: float
    per_image_checkpointing_gib: float
    fp8_saving_gib: float
    resolution: int

    def peak_gib(self, batch: int, *, checkpointing: bool, fp8: bool = False, resolution: int | None = None) -> float:
        scale = ((resolution or self.resolution) / self.resolution) ** 2
        per_image = self.per_image_checkpointing_gib if checkpointing else self.per_image_gib
        return self.base_gib - (self.fp8_saving_gib if fp8 else 0.0) + per_image * batch * scale


MEMORY: dict[str, MemoryModel] = {
    # measured: real sd-scripts on an H100, 512 px, LoRA dim 16, cached latents, sdpa (kohya.md §9; peak from
    # kohya-logs/gpu-h100/*/smi_mem.txt): bf16 b4 8607 MiB and b8 14429 MiB -> 1.42 GiB per picture and
    # 2.73 GiB at batch 0 (fp16 b1, 4209 MiB, agrees: 4.15); fp16 b1 + checkpointing 3343 MiB -> 0.53 GiB per
    # picture. fp8 is not offered for SD 1.x: it fits every tier without it.
    "sd1": MemoryModel(base_gib=2.73, per_image_gib=1.42, per_image_checkpointing_gib=0.53, fp8_saving_gib=0.0,
                       resolution=512),
    # derived: an SDXL latent at 1024 px has 4x the positions of an SD 1.5 one at 512, so 4x the activations per
    # picture (5.68 / 2.12 GiB); the base is set so that batch 1 with checkpointing is docs/train_SDXL-en.md's
    # "LoRA training can be done with 8GB" (U-Net only, cached text-encoder outputs and latents, 8-bit
    # optimizer; anchors-2026-11.md §1.1/§1.4). fp8_base stores the 2567.5M U-Net parameters in 1 byte
    # instead of 2: 2.39 GiB less.
    "sdxl": MemoryModel(base_gib=5.88, per_image_gib=5.68, per_image_checkpointing_gib=2.12, fp8_saving_gib=2.39,
                        resolution=1024),
}


@dataclass(frozen=True)
class TierRow:
    batch_size: int
    gradient_checkpointing: bool
    optimizer: str
    fp8_base: bool = False
    resolution: int | None = None  # a lower default resolution, where the family's own does not fit


# Each GPU row keeps MEMORY's peak + RESERVE_GIB under TIER_MIN_GIB (tests/test_fit.py checks every row).
# Optimizer: a LoRA's optimizer state is small (SD 1.5 dim 32: ~19M parameters, 0.3 GiB with AdamW), so the
# 8-bit AdamW that kohya's docs advise for small cards (train_SDXL-en.md "8-bit optimizer", kohya.md §1b for
# 8-12 GB) is used up to 12 GB, and plain AdamW above (what the H100 measurements used; no bitsandbytes).
# Adafactor saves no more than AdamW8bit on a LoRA's small matrices and changes how the learning rate acts,
# so it is never picked automatically (a client may still ask for it).
TABLE: dict[str, dict[str, TierRow]] = {
    "sd1": {
        # RAM, not VRAM; a bigger batch does not speed a CPU up. fp32: accelerate on a CPU breaks with fp16.
        "cpu": TierRow(2, False, "AdamW"),
        "6gb": TierRow(2, True, "AdamW8bit"),  # 3.8 GiB (measured 3.3 at b1 with checkpointing)
        "8gb": TierRow(2, False, "AdamW8bit"),  # 5.6 GiB: the pre-tier balanced preset (kohya.md §1b: 8-12 GB)
        "12gb": TierRow(4, False, "AdamW8bit"),  # 8.4 GiB, measured (bf16 b4 8607 MiB)
        "16gb": TierRow(4, False, "AdamW"),  # 8.4 GiB; b8 (14.1, measured) leaves no room for ED's model
        "24gb": TierRow(8, False, "AdamW"),  # 14.1 GiB, measured (bf16 b8 14429 MiB)
        "40gb": TierRow(16, False, "AdamW"),  # 25.5 GiB derived; measured 37 img/s on the H100
    },
    "sdxl": {
        # kohya's SDXL LoRA advice on every tier: U-Net only with cached text-encoder outputs and latents.
        "cpu": TierRow(1, True, "AdamW"),  # RAM: 14.4 GiB anonymous at b1, fp32, 256 px (cpu-sdxl run 01)
        "6gb": TierRow(1, True, "AdamW8bit", fp8_base=True, resolution=768),  # 4.7 GiB derived; 1024 px: 5.6
        "8gb": TierRow(1, True, "AdamW8bit", fp8_base=True),  # 5.6 GiB derived (docs: 8 GB min without fp8)
        "12gb": TierRow(1, True, "AdamW8bit"),  # 8.0 GiB: the docs' minimum; "10GB recommended"
        "16gb": TierRow(2, True, "AdamW"),  # 10.1 GiB derived
        "24gb": TierRow(4, True, "AdamW"),  # 14.4 GiB derived
        "40gb": TierRow(4, False, "AdamW"),  # 28.6 GiB derived
    },
}
# 80 GB-class cards: SD 1.5 b32 measured at 55 img/s on the H100 (48.2 GiB derived); SDXL b8 without
# checkpointing 51.3 GiB derived. Neither is raised further without a measurement.
BIG_CARD_BATCH: dict[str, int] = {"sd1": 32, "sdxl": 8}


class Hardware(Protocol):
    """What the GPU probe found (daemon.pipeline.env_check.GpuInfo)."""

    @property
    def cuda(self) -> bool: ...
    @property
    def name(self) -> str | None: ...
    @property
    def vram_gb(self) -> float | None: ...
    @property
    def bf16(self) -> bool | None: ...


@dataclass(frozen=True)
class Machine:
    """Hardware for a caller without a probe's answer: no GPU, or a GPU whose memory is unknown."""

    cuda: bool
    name: str | None = None
    vram_gb: float | None = None
    bf16: bool | None = None


@dataclass(frozen=True)
class Fit:
    tier: str
    label: str
    auto: bool
    batch_size: int
    mixed_precision: str
    gradient_checkpointing: bool
    optimizer: str
    train_text_encoder: bool
    cache_text_encoder_outputs: bool
    fp8_base: bool
    resolution: int  # the resolution the batch size is sized for (the family's default, or the tier's lower one)
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tier_for(gpu: Hardware) -> str:
    """The tier a machine gets automatically (the same for every family: only the rows differ)."""
    if not gpu.cuda:
        return "cpu"
    if gpu.vram_gb is None:
        return UNKNOWN_VRAM_TIER
    fitting = [tier for tier, least in TIER_MIN_GIB.items() if gpu.vram_gb >= least]
    return fitting[-1] if fitting else "6gb"  # under 6 GB: the smallest settings are the best chance


def check_tier(value: object) -> str:
    if not isinstance(value, str) or (value != AUTO and value not in TIERS):
        raise BadInput(f"'memory_tier' must be {AUTO} or one of: {', '.join(TIERS)}.", key="memory_tier")
    return value


def choose_fit(arch: str, gpu: Hardware, *, tier: str | None = None) -> Fit:
    """The settings for `arch` ("sd1" | "sdxl") on this machine; `tier` None/"auto" picks by VRAM.

    Raises BadInput(key="memory_tier") for a tier this machine cannot use (a GPU tier without a GPU, the CPU
    tier with one).
    """
    if arch not in TABLE:
        raise BadInput(f"Models of the '{arch}' family cannot be trained.", key="base_model")
    requested = check_tier(AUTO if tier is None else tier)
    chosen = tier_for(gpu) if requested == AUTO else requested
    if gpu.cuda and chosen == "cpu":
        raise BadInput(f"'memory_tier' cpu is for machines without a CUDA GPU; this one has {gpu.name or 'one'}. "
                       f"Choose {AUTO} or a GB tier.", key="memory_tier")
    if not gpu.cuda and chosen != "cpu":
        raise BadInput(f"'memory_tier' {chosen} needs a CUDA GPU, and this machine has none. Choose {AUTO} or cpu.",
                       key="memory_tier")
    row = TABLE[arch][chosen]
    batch = row.batch_size
    if chosen == "40gb" and gpu.vram_gb is not None and gpu.vram_gb >= BIG_CARD_GIB:
        batch = BIG_CARD_BATCH[arch]
    # bf16 keeps fp32's range (no loss scaling, no NaN-prone fp16 SDXL VAE); only Ampere and newer run it natively.
    precision = "no" if chosen == "cpu" else ("bf16" if gpu.bf16 else "fp16")
    sdxl = arch == "sdxl"
    fit = Fit(
        tier=chosen,
        label=TIER_LABELS[chosen],
        auto=requested == AUTO,
        batch_size=batch,
        mixed_precision=precision,
        gradient_checkpointing=row.gradient_checkpointing,
        optimizer=row.optimizer,
        train_text_encoder=not sdxl,
        cache_text_encoder_outputs=sdxl,
        fp8_base=row.fp8_base,
        resolution=row.resolution or MEMORY[arch].resolution,
        reason="",
    )
    return Fit(**{**asdict(fit), "reason": _reason(fit, gpu, MEMORY[arch].resolution)})


def _reason(fit: Fit, gpu: Hardware, default_resolution: int) -> str:
    if not gpu.cuda:
        head = "No CUDA GPU: training on the CPU (very slow)"
    else:
        size = "memory unknown" if gpu.vram_gb is None else f"{gpu.vram_gb:.0f} GB"
        head = f"{gpu.name or 'CUDA GPU'}, {size}"
        if gpu.vram_gb is not None and gpu.vram_gb < TIER_MIN_GIB["6gb"]:
            head += " (less than the smallest tier is sized for: it may run out of memory)"
    if not fit.auto:
        head += f"; {fit.label} settings chosen by hand"
    levers = [f"batch {fit.batch_size}", "fp32" if fit.mixed_precision == "no" else fit.mixed_precision,
              "gradient checkpointing" if fit.gradient_checkpointing else "no checkpointing"]
    if fit.cache_text_encoder_outputs:
        levers.append("text encoders cached")
    if fit.fp8_base:
        levers.append("fp8 base model")
    if fit.resolution != default_resolution:
        levers.append(f"{fit.resolution} px")
    levers.append(fit.optimizer)
    return f"{head} → {', '.join(levers)}"


def tiers_json() -> list[dict[str, str]]:
    return [{"id": tier, "label": TIER_LABELS[tier]} for tier in TIERS]
