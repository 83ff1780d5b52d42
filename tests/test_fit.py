"""choose_fit: the memory tier and levers for real cards x model family, the memory model behind the table,
and the GPU probe's bf16 answer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from daemon.errors import BadInput
from daemon.pipeline.env_check import GpuInfo, probe_gpu
from daemon.pipeline.fit import (
    BIG_CARD_BATCH,
    BIG_CARD_GIB,
    MEMORY,
    RESERVE_GIB,
    TABLE,
    TIER_MIN_GIB,
    TIERS,
    Machine,
    choose_fit,
    tier_for,
    tiers_json,
)
from tests.helpers import torch_double_path

MIB = 1 / 1024


def card(name: str, vram: float, bf16: bool | None) -> GpuInfo:
    return GpuInfo(cuda=True, name=name, vram_gb=vram, bf16=bf16)


CPU = GpuInfo(cuda=False, error="no CUDA")

# name, GiB as torch reports it, native bf16, tier, SD 1.x (batch, checkpointing, optimizer),
# SDXL (batch, checkpointing, fp8, resolution)
CARDS = [
    ("NVIDIA GeForce GTX 1650", 3.81, False, "6gb", (2, True, "AdamW8bit"), (1, True, True, 768)),
    ("NVIDIA GeForce GTX 1060 6GB", 5.93, False, "6gb", (2, True, "AdamW8bit"), (1, True, True, 768)),
    ("NVIDIA GeForce RTX 3070", 7.79, True, "8gb", (2, False, "AdamW8bit"), (1, True, True, 1024)),
    ("NVIDIA GeForce RTX 2080 Ti", 10.75, False, "8gb", (2, False, "AdamW8bit"), (1, True, True, 1024)),
    ("NVIDIA GeForce RTX 3060", 11.76, True, "12gb", (4, False, "AdamW8bit"), (1, True, False, 1024)),
    ("Tesla T4", 14.75, False, "16gb", (4, False, "AdamW"), (2, True, False, 1024)),
    ("NVIDIA GeForce RTX 4060 Ti", 15.69, True, "16gb", (4, False, "AdamW"), (2, True, False, 1024)),
    ("NVIDIA GeForce RTX 3090", 23.69, True, "24gb", (8, False, "AdamW"), (4, True, False, 1024)),
    ("NVIDIA GeForce RTX 4090", 23.99, True, "24gb", (8, False, "AdamW"), (4, True, False, 1024)),
    ("NVIDIA A100-SXM4-40GB", 39.39, True, "40gb", (16, False, "AdamW"), (4, False, False, 1024)),
    ("NVIDIA H100 80GB HBM3", 79.19, True, "40gb", (32, False, "AdamW"), (8, False, False, 1024)),
    ("NVIDIA H200", 139.8, True, "40gb", (32, False, "AdamW"), (8, False, False, 1024)),
]


@pytest.mark.parametrize(("name", "vram", "bf16", "tier", "sd1", "sdxl"), CARDS, ids=[c[0] for c in CARDS])
def test_real_cards_get_their_tier_and_levers(name: str, vram: float, bf16: bool, tier: str,
                                               sd1: tuple[int, bool, str], sdxl: tuple[int, bool, bool, int]) -> None:
    gpu = card(name, vram, bf16)
    precision = "bf16" if bf16 else "fp16"  # Turing/Pascal (2080 Ti, T4, 1060) have no native bf16
    fit = choose_fit("sd1", gpu)
    assert (fit.tier, fit.auto, fit.mixed_precision) == (tier, True, precision)
    assert (fit.batch_size, fit.gradient_checkpointing, fit.optimizer) == sd1
    assert (fit.train_text_encoder, fit.cache_text_encoder_outputs, fit.fp8_base, fit.resolution) == (
        True, False, False, 512)
    xl = choose_fit("sdxl", gpu)
    assert (xl.tier, xl.mixed_precision) == (tier, precision)
    assert (xl.batch_size, xl.gradient_checkpointing, xl.fp8_base, xl.resolution) == sdxl
    # kohya's SDXL LoRA advice on every card: U-Net only, text-encoder outputs cached
    assert (xl.train_text_encoder, xl.cache_text_encoder_outputs) == (False, True)
    assert xl.reason.startswith(f"{name}, {vram:.0f} GB") and f" → batch {sdxl[0]}, {precision}, " in xl.reason


def test_the_cpu_tier_trains_in_fp32_with_plain_adamw() -> None:
    fit = choose_fit("sd1", CPU)
    assert (fit.tier, fit.label, fit.batch_size, fit.mixed_precision, fit.optimizer) == ("cpu", "CPU", 2, "no", "AdamW")
    assert not fit.gradient_checkpointing and not fit.fp8_base
    xl = choose_fit("sdxl", CPU)
    # fp8 needs mixed precision (kohya asserts it), and AdamW8bit needs CUDA
    assert (xl.batch_size, xl.mixed_precision, xl.optimizer, xl.fp8_base, xl.gradient_checkpointing) == (
        1, "no", "AdamW", False, True)
    assert xl.reason == "No CUDA GPU: training on the CPU (very slow) → batch 1, fp32, gradient checkpointing, " \
                        "text encoders cached, AdamW"


def test_the_reason_says_card_size_and_levers() -> None:
    gpu = card("NVIDIA GeForce RTX 4090", 23.99, True)
    assert choose_fit("sdxl", gpu).reason == ("NVIDIA GeForce RTX 4090, 24 GB → batch 4, bf16, gradient "
                                              "checkpointing, text encoders cached, AdamW")
    assert choose_fit("sd1", gpu).reason == "NVIDIA GeForce RTX 4090, 24 GB → batch 8, bf16, no checkpointing, AdamW"
    small = choose_fit("sdxl", card("NVIDIA GeForce GTX 1060 6GB", 5.93, False)).reason
    assert small.endswith("→ batch 1, fp16, gradient checkpointing, text encoders cached, fp8 base model, 768 px, "
                          "AdamW8bit")
    assert "may run out of memory" in choose_fit("sd1", card("GTX 1650", 3.81, False)).reason
    assert "may run out of memory" not in small


def test_a_tier_chosen_by_hand_wins_and_says_so() -> None:
    gpu = card("NVIDIA GeForce RTX 4090", 23.99, True)
    fit = choose_fit("sdxl", gpu, tier="8gb")
    assert (fit.tier, fit.auto, fit.fp8_base, fit.batch_size) == ("8gb", False, True, 1)
    assert "8 GB settings chosen by hand" in fit.reason
    assert choose_fit("sd1", gpu, tier="auto") == choose_fit("sd1", gpu)
    # a bigger tier than the card is allowed (the user's call); the 80 GB batch needs the card to have 80 GB
    assert choose_fit("sd1", gpu, tier="40gb").batch_size == TABLE["sd1"]["40gb"].batch_size == 16


@pytest.mark.parametrize(("gpu", "tier", "words"), [
    (CPU, "24gb", "needs a CUDA GPU"),
    (CPU, "6gb", "needs a CUDA GPU"),
    (GpuInfo(cuda=True, name="RTX 4090", vram_gb=23.99), "cpu", "without a CUDA GPU"),
    (CPU, "48gb", "must be auto or one of"),
    (CPU, "", "must be auto or one of"),
    (CPU, 24, "must be auto or one of"),
    (CPU, None, None),
])
def test_a_tier_the_machine_cannot_use_is_refused_naming_the_key(gpu: GpuInfo, tier: object, words: str | None) -> None:
    if words is None:
        assert choose_fit("sd1", gpu, tier=tier).tier == "cpu"  # type: ignore[arg-type]
        return
    with pytest.raises(BadInput) as err:
        choose_fit("sd1", gpu, tier=tier)  # type: ignore[arg-type]
    assert err.value.key == "memory_tier" and words in err.value.message and err.value.status == 400


def test_an_untrainable_family_is_refused() -> None:
    with pytest.raises(BadInput) as err:
        choose_fit("sd2", CPU)
    assert err.value.key == "base_model"


def test_unknown_memory_and_unknown_bf16_take_the_safe_side() -> None:
    fit = choose_fit("sd1", Machine(cuda=True))
    # the settings the presets had before tiers: batch 2, fp16, AdamW8bit, no checkpointing
    assert (fit.tier, fit.batch_size, fit.mixed_precision, fit.optimizer, fit.gradient_checkpointing) == (
        "8gb", 2, "fp16", "AdamW8bit", False)
    assert fit.reason.startswith("CUDA GPU, memory unknown → ")
    assert choose_fit("sd1", card("x", 23.99, None)).mixed_precision == "fp16"


def test_tier_thresholds_tolerate_gib_under_the_marketing_size() -> None:
    sizes = (5.93, 7.79, 11.76, 14.75, 23.99, 39.39, 79.19)
    assert [tier_for(card("c", v, True)) for v in sizes] == [*TIERS[1:], "40gb"]
    assert tier_for(CPU) == "cpu"
    assert tiers_json()[0] == {"id": "cpu", "label": "CPU"} and tiers_json()[-1] == {"id": "40gb", "label": "40+ GB"}


@pytest.mark.parametrize("arch", sorted(TABLE))
@pytest.mark.parametrize("tier", TIERS[1:])
def test_every_gpu_row_fits_its_smallest_card_with_the_reserve(arch: str, tier: str) -> None:
    row = TABLE[arch][tier]
    model = MEMORY[arch]
    peak = model.peak_gib(row.batch_size, checkpointing=row.gradient_checkpointing, fp8=row.fp8_base,
                          resolution=row.resolution)
    assert peak + RESERVE_GIB[tier] <= TIER_MIN_GIB[tier], (arch, tier, peak)
    if tier == "40gb":
        big = model.peak_gib(BIG_CARD_BATCH[arch], checkpointing=row.gradient_checkpointing)
        assert big + RESERVE_GIB[tier] <= BIG_CARD_GIB, (arch, big)


@pytest.mark.parametrize("arch", sorted(TABLE))
def test_bigger_tiers_never_train_slower(arch: str) -> None:
    rows = [TABLE[arch][t] for t in TIERS[1:]]
    assert [r.batch_size for r in rows] == sorted(r.batch_size for r in rows)
    checkpointing = [r.gradient_checkpointing for r in rows]
    assert checkpointing == sorted(checkpointing, reverse=True)  # once off, it stays off
    fp8 = [r.fp8_base for r in rows]
    assert fp8 == sorted(fp8, reverse=True) and any(fp8) == (arch == "sdxl")


# Peak memory of real sd-scripts runs on an H100 (kohya-logs/gpu-h100/*/smi_mem.txt, MiB): the SD 1.5 model
# must reproduce them, including the run (A) it was not fitted on.
@pytest.mark.parametrize(("batch", "checkpointing", "mib"), [(1, False, 4209), (4, False, 8607), (8, False, 14429),
                                                             (1, True, 3343)])
def test_the_sd1_memory_model_matches_the_h100_measurements(batch: int, checkpointing: bool, mib: int) -> None:
    assert MEMORY["sd1"].peak_gib(batch, checkpointing=checkpointing) == pytest.approx(mib * MIB, rel=0.02)


def test_the_sdxl_memory_model_matches_kohyas_documented_minimum() -> None:
    # docs/train_SDXL-en.md: "LoRA training can be done with 8GB" (U-Net only, caches, checkpointing)
    assert MEMORY["sdxl"].peak_gib(1, checkpointing=True) == pytest.approx(8.0, abs=0.05)
    # activations grow with the pixels: 768 px takes (768/1024)^2 of 1024 px's
    full, small = (MEMORY["sdxl"].peak_gib(1, checkpointing=True, resolution=r) - MEMORY["sdxl"].base_gib
                   for r in (1024, 768))
    assert small == pytest.approx(full * 0.5625)


@pytest.mark.parametrize(("major", "bf16"), [(6, False), (7, False), (8, True), (9, True)])
def test_the_gpu_probe_reports_native_bf16_from_the_compute_capability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       major: int, bf16: bool) -> None:
    monkeypatch.setenv("PYTHONPATH", torch_double_path(tmp_path, name="Fake GPU", total_memory=12_626_493_440,
                                                       major=major, minor=5))
    info = probe_gpu(sys.executable)
    assert (info.cuda, info.name, info.vram_gb, info.bf16, info.error) == (True, "Fake GPU", 11.8, bf16, None)
    assert choose_fit("sd1", info).mixed_precision == ("bf16" if bf16 else "fp16")


def test_no_gpu_means_bf16_unknown() -> None:
    assert probe_gpu(sys.executable).bf16 is None  # the test venv has no torch
    assert GpuInfo(cuda=False).bf16 is None
