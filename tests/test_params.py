"""resolve_params: presets, the client's overrides, CPU forcing and the step arithmetic."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from daemon.errors import BadInput
from daemon.pipeline.env_check import GpuInfo
from daemon.pipeline.params import (
    OVERRIDE_KEYS,
    PRESETS,
    PRESETS_BY_ARCH,
    SDXL_PRESETS,
    TrainParams,
    default_repeats,
    presets_for,
    resolve_params,
    scaled_lr,
    total_steps,
)


def resolve(overrides: dict[str, object] | None = None, *, images: int = 20, cpu: bool = False) -> TrainParams:
    return resolve_params(overrides or {}, image_count=images, cpu=cpu)


def test_default_is_the_balanced_sd15_character_preset() -> None:
    p = resolve()
    assert (p.preset, p.resolution, p.epochs, p.batch_size) == ("balanced", 512, 10, 2)
    assert (p.network_dim, p.network_alpha, p.unet_lr, p.text_encoder_lr) == (32, 16.0, 1e-4, 5e-5)
    assert (p.optimizer, p.mixed_precision) == ("AdamW8bit", "fp16")
    assert p.repeats == 10  # 20 images x 10 = 200 per epoch
    assert total_steps(p, 20) == 1000


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_and_stays_in_the_useful_step_band(name: str) -> None:
    p = resolve({"preset": name})
    assert p.preset == name
    assert p.network_alpha <= p.network_dim
    assert 250 <= total_steps(p, 20) <= 2000


@pytest.mark.parametrize(
    ("images", "repeats"),
    [(1, 100), (2, 100), (7, 29), (15, 13), (20, 10), (40, 5), (150, 1), (400, 1), (1000, 1)],
)
def test_default_repeats_aim_at_200_image_views_per_epoch(images: int, repeats: int) -> None:
    assert default_repeats(images) == repeats
    assert resolve(images=images).repeats == repeats


def test_explicit_repeats_win_over_the_image_count() -> None:
    assert resolve({"repeats": 3}, images=20).repeats == 3


BAD_VALUES: list[tuple[str, object]] = [
    ("preset", "turbo"),
    ("preset", 1),
    ("preset", None),
    ("resolution", 500),  # not a multiple of 64
    ("resolution", 192),
    ("resolution", 1088),
    ("resolution", "512"),
    ("resolution", 512.0),
    ("resolution", True),
    ("epochs", 0),
    ("epochs", 101),
    ("epochs", 1.5),
    ("epochs", True),
    ("epochs", None),
    ("repeats", 0),
    ("repeats", 101),
    ("repeats", False),
    ("batch_size", 0),
    ("batch_size", 33),  # 32 is the 80 GB tier's SD 1.x batch
    ("batch_size", "2"),
    ("network_dim", 0),
    ("network_dim", 257),
    ("network_dim", True),
    ("network_alpha", 0),
    ("network_alpha", -1),
    ("network_alpha", 33),  # > network_dim (32)
    ("network_alpha", "16"),
    ("network_alpha", True),
    ("network_alpha", float("nan")),
    ("network_alpha", float("inf")),
    ("unet_lr", 0),
    ("unet_lr", -1e-4),
    ("unet_lr", 0.5),  # only an adaptive optimizer takes lr ~ 1
    ("unet_lr", None),
    ("unet_lr", True),
    ("text_encoder_lr", -1e-5),
    ("text_encoder_lr", 0.5),
    ("text_encoder_lr", "5e-5"),
    ("optimizer", "SGD"),
    ("optimizer", "PagedAdamW8bit"),
    ("optimizer", 1),
    ("mixed_precision", "fp32"),
    ("mixed_precision", None),
    ("seed", -1),
    ("seed", 2**32),
    ("seed", True),
    ("seed", 4.0),
    ("save_every_n_epochs", -1),
    ("save_every_n_epochs", 11),  # > epochs (10)
    ("save_every_n_epochs", True),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_value_is_rejected_naming_its_key(key: str, value: object) -> None:
    with pytest.raises(BadInput) as err:
        resolve({key: value})
    assert err.value.key == key
    assert key in err.value.message
    assert err.value.status == 400


@pytest.mark.parametrize("key", ["learning_rate", "lr", "Epochs", "max_train_steps", "dataset_config", ""])
def test_unknown_key_is_rejected_naming_it(key: str) -> None:
    with pytest.raises(BadInput) as err:
        resolve({key: 1})
    assert err.value.key == key


def test_overrides_accept_the_exact_client_keys() -> None:
    overrides = {
        "preset": "quality",
        "resolution": 768,
        "epochs": 4,
        "repeats": 5,
        "batch_size": 1,
        "network_dim": 8,
        "network_alpha": 4,
        "unet_lr": 2e-4,
        "text_encoder_lr": 0,
        "optimizer": "lion",
        "mixed_precision": "bf16",
        "seed": 7,
        "save_every_n_epochs": 2,
        "sample_every_n_epochs": 1,
        "memory_tier": "12gb",
        "gradient_checkpointing": True,
        "cache_text_encoder_outputs": False,
        "fp8_base": False,
        "face_crop": True,
    }
    assert set(overrides) == set(OVERRIDE_KEYS)
    p = resolve(overrides)
    assert p.fit_reason.startswith("CUDA GPU, memory unknown; 12 GB settings chosen by hand → ")
    assert dataclasses.replace(p, fit_reason="") == TrainParams(
        resolution=768,
        epochs=4,
        repeats=5,
        batch_size=1,
        network_dim=8,
        network_alpha=4.0,
        unet_lr=2e-4,
        text_encoder_lr=0.0,
        optimizer="Lion",
        mixed_precision="bf16",
        seed=7,
        save_every_n_epochs=2,
        preset="quality",
        sample_every_n_epochs=1,
        memory_tier="12gb",
        gradient_checkpointing=True,
        face_crop=True,
    )
    # JSON integers for float fields come out as floats (kohya prints them into argv and metadata).
    assert type(p.network_alpha) is float and type(p.text_encoder_lr) is float


@pytest.mark.parametrize(
    ("overrides", "mixed_precision", "optimizer"),
    [
        ({}, "no", "AdamW"),  # the preset's fp16 / AdamW8bit are swapped silently
        ({"preset": "fast"}, "no", "AdamW"),
        ({"mixed_precision": "no"}, "no", "AdamW"),
        ({"mixed_precision": "bf16"}, "bf16", "AdamW"),
        ({"optimizer": "AdamW"}, "no", "AdamW"),
        ({"optimizer": "Lion"}, "no", "Lion"),
        ({"optimizer": "Adafactor"}, "no", "Adafactor"),
    ],
)
def test_cpu_forces_cpu_safe_settings_the_client_did_not_ask_for(
    overrides: dict[str, object], mixed_precision: str, optimizer: str
) -> None:
    p = resolve(overrides, cpu=True)
    assert (p.mixed_precision, p.optimizer) == (mixed_precision, optimizer)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"mixed_precision": "fp16"}, "mixed_precision"),
        ({"optimizer": "AdamW8bit"}, "optimizer"),
        ({"optimizer": "adamw8bit"}, "optimizer"),
    ],
)
def test_cpu_refuses_gpu_only_settings_the_client_asked_for(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(BadInput) as err:
        resolve(overrides, cpu=True)
    assert err.value.key == key
    assert "GPU" in err.value.message


def test_gpu_keeps_the_presets_gpu_settings() -> None:
    p = resolve({"mixed_precision": "fp16", "optimizer": "AdamW8bit"}, cpu=False)
    assert (p.mixed_precision, p.optimizer) == ("fp16", "AdamW8bit")


def test_prodigy_gets_its_adaptive_learning_rate_unless_the_client_sets_one() -> None:
    p = resolve({"optimizer": "Prodigy"})
    assert (p.unet_lr, p.text_encoder_lr) == (1.0, 1.0)
    p = resolve({"optimizer": "Prodigy", "unet_lr": 0.5, "text_encoder_lr": 0})
    assert (p.unet_lr, p.text_encoder_lr) == (0.5, 0.0)


@pytest.mark.parametrize(("dim", "alpha"), [(8, 4.0), (1, 0.5), (256, 128.0)])
def test_a_client_dim_alone_keeps_the_presets_alpha_ratio(dim: int, alpha: float) -> None:
    assert resolve({"network_dim": dim}).network_alpha == alpha


def test_text_encoder_lr_zero_means_unet_only() -> None:
    assert resolve({"text_encoder_lr": 0}).text_encoder_lr == 0.0


def test_a_preset_save_interval_longer_than_the_clients_run_falls_back_to_final_only() -> None:
    assert resolve({"epochs": 1}).save_every_n_epochs == 0
    assert resolve({"epochs": 4}).save_every_n_epochs == 2


def test_no_images_is_rejected() -> None:
    with pytest.raises(BadInput) as err:
        resolve(images=0)
    assert err.value.key == "images"


@pytest.mark.parametrize(
    ("images", "repeats", "batch", "epochs", "steps"),
    [(20, 10, 2, 10, 1000), (7, 29, 2, 10, 1020), (3, 1, 4, 5, 5), (8, 1, 4, 2, 4), (1, 1, 1, 1, 1)],
)
def test_total_steps_is_ceil_images_times_repeats_over_batch_times_epochs(
    images: int, repeats: int, batch: int, epochs: int, steps: int
) -> None:
    p = dataclasses.replace(PRESETS["balanced"], repeats=repeats, batch_size=batch, epochs=epochs)
    assert total_steps(p, images) == steps == math.ceil(images * repeats / batch) * epochs


@pytest.mark.parametrize(
    ("buckets", "repeats", "batch", "epochs", "steps"),
    [
        ([13, 7], 10, 2, 10, (65 + 35) * 10),  # no batch mixes buckets...
        ([3, 3, 1], 1, 2, 1, 2 + 2 + 1),  # ...so each bucket's last batch may be short: 5, not ceil(7/2) = 4
        ([5, 5], 3, 4, 2, (4 + 4) * 2),
        ([20], 10, 2, 10, 1000),
    ],
)
def test_total_steps_counts_batches_per_bucket(buckets: list[int], repeats: int, batch: int, epochs: int,
                                               steps: int) -> None:
    p = dataclasses.replace(PRESETS["balanced"], repeats=repeats, batch_size=batch, epochs=epochs)
    assert total_steps(p, buckets) == steps
    assert total_steps(p, buckets) >= total_steps(p, sum(buckets))  # never fewer than one big bucket


def test_json_round_trip() -> None:
    p = resolve({"optimizer": "Lion", "seed": 3}, images=12, cpu=True)
    data = json.loads(json.dumps(p.to_json()))
    assert set(data) == {f.name for f in dataclasses.fields(TrainParams)}
    assert TrainParams.from_json(data) == p


def test_from_json_fills_keys_an_older_record_lacks_from_its_preset() -> None:
    p = TrainParams.from_json({"preset": "fast", "epochs": 3})
    assert p.epochs == 3 and p.network_dim == PRESETS["fast"].network_dim


def test_params_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolve().epochs = 3  # type: ignore[misc]


def test_previews_are_off_on_cpu_unless_asked_and_bounded_by_epochs() -> None:
    assert resolve({}).sample_every_n_epochs == PRESETS["balanced"].sample_every_n_epochs > 0
    assert resolve({}, cpu=True).sample_every_n_epochs == 0
    assert resolve({"sample_every_n_epochs": 1}, cpu=True).sample_every_n_epochs == 1
    assert resolve({"epochs": 1}).sample_every_n_epochs == 0  # the preset's 2 would never fire
    with pytest.raises(BadInput) as err:
        resolve({"epochs": 2, "sample_every_n_epochs": 3})
    assert err.value.key == "sample_every_n_epochs"


# --- issue 8: presets per family, the card's fit, and the training amount kept when the batch changes ---

RTX_4090 = GpuInfo(cuda=True, name="NVIDIA GeForce RTX 4090", vram_gb=23.99, bf16=True)
RTX_3060 = GpuInfo(cuda=True, name="NVIDIA GeForce RTX 3060", vram_gb=11.76, bf16=True)
RTX_3070 = GpuInfo(cuda=True, name="NVIDIA GeForce RTX 3070", vram_gb=7.79, bf16=True)
H100 = GpuInfo(cuda=True, name="NVIDIA H100 80GB HBM3", vram_gb=79.19, bf16=True)
NO_GPU = GpuInfo(cuda=False)
MACHINES = [NO_GPU, GpuInfo(cuda=True, name="GTX 1060", vram_gb=5.93, bf16=False), RTX_3070, RTX_3060,
            GpuInfo(cuda=True, name="RTX 4060 Ti", vram_gb=15.69, bf16=True), RTX_4090,
            GpuInfo(cuda=True, name="A100", vram_gb=39.39, bf16=True), H100]


def on(gpu: GpuInfo, overrides: dict[str, object] | None = None, *, arch: str = "sd1", images: int = 20) -> TrainParams:
    return resolve_params(overrides or {}, image_count=images, arch=arch, gpu=gpu)


def views(p: TrainParams, images: int = 20) -> int:
    return images * p.repeats * p.epochs


@pytest.mark.parametrize("name", sorted(SDXL_PRESETS))
def test_sdxl_presets_train_the_unet_only_at_1024_px_for_800_to_2000_image_views(name: str) -> None:
    p = on(RTX_4090, {"preset": name}, arch="sdxl")
    assert (p.arch, p.preset, p.resolution, p.text_encoder_lr, p.cache_text_encoder_outputs) == (
        "sdxl", name, 1024, 0.0, True)
    assert p.repeats == 5  # 20 pictures x 5 ~ 100 per epoch (hollowstrawberry XL)
    assert 800 <= views(p) <= 2000 and p.network_alpha == p.network_dim / 2
    assert SDXL_PRESETS[name].batch_size == 4  # the reference batch their LRs are tuned for


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("preset", ["fast", "balanced", "quality"])
def test_the_training_amount_stays_whatever_batch_the_card_gets(arch: str, preset: str) -> None:
    reference = PRESETS_BY_ARCH[arch][preset]
    runs = [on(gpu, {"preset": preset}, arch=arch) for gpu in MACHINES]
    assert len({p.batch_size for p in runs}) >= 4  # the cards really differ
    for p in runs:
        assert views(p) == views(runs[0])  # the same image views on every card...
        assert total_steps(p, 20) == math.ceil(20 * p.repeats / p.batch_size) * p.epochs  # ...so steps follow 1/batch
        assert (p.network_dim, p.network_alpha) == (reference.network_dim, reference.network_alpha)
        want = min(reference.unet_lr * math.sqrt(p.batch_size / reference.batch_size), max(reference.unet_lr, 1e-3))
        assert p.unet_lr == pytest.approx(want, rel=5e-3), (p.memory_tier, p.batch_size)


@pytest.mark.parametrize(("lr", "batch", "reference", "optimizer", "want"), [
    (1e-4, 2, 2, "AdamW8bit", 1e-4),
    (1e-4, 8, 2, "AdamW", 2e-4),  # sqrt(4) = 2
    (1e-4, 32, 2, "AdamW", 4e-4),
    (1e-4, 1, 2, "AdamW8bit", 7.07e-5),  # smaller batches take a smaller step
    (2e-4, 8, 4, "Adafactor", 2.83e-4),
    (3e-4, 32, 4, "AdamW", 8.49e-4),
    (5e-4, 32, 2, "AdamW", 1e-3),  # capped at the top of kohya's LoRA range
    (2e-3, 32, 2, "AdamW", 2e-3),  # ...which never lowers a preset's own LR
    (5e-5, 2, 8, "AdamW", 2.5e-5),
    (0.0, 8, 2, "AdamW", 0.0),  # 0 = that part is not trained
    (1.0, 32, 2, "Prodigy", 1.0),  # adapts its own step size
    (1e-4, 32, 2, "Lion", 1e-4),  # no rule with a source for a sign method
])
def test_learning_rate_follows_the_square_root_of_the_batch_for_adam_types(lr: float, batch: int, reference: int,
                                                                           optimizer: str, want: float) -> None:
    assert scaled_lr(lr, batch_size=batch, reference_batch=reference, optimizer=optimizer) == want


def test_the_fit_fills_the_levers_and_records_the_tier_and_why() -> None:
    p = on(RTX_4090, arch="sdxl")
    assert (p.memory_tier, p.batch_size, p.mixed_precision, p.gradient_checkpointing, p.optimizer) == (
        "24gb", 4, "bf16", True, "AdamW")
    assert (p.cache_text_encoder_outputs, p.fp8_base, p.text_encoder_lr, p.unet_lr) == (True, False, 0.0, 2e-4)
    assert p.fit_reason.startswith("NVIDIA GeForce RTX 4090, 24 GB → batch 4, bf16")
    small = on(RTX_3070, arch="sdxl")
    assert (small.memory_tier, small.batch_size, small.fp8_base, small.optimizer) == ("8gb", 1, True, "AdamW8bit")
    assert small.unet_lr == 1e-4  # 2e-4 x sqrt(1/4)
    sd1 = on(H100)
    assert (sd1.memory_tier, sd1.batch_size, sd1.mixed_precision, sd1.unet_lr, sd1.text_encoder_lr) == (
        "40gb", 32, "bf16", 4e-4, 2e-4)
    assert total_steps(sd1, 20) == 70  # 2000 image views at batch 32 (was 1000 steps at batch 2)


def test_explicit_levers_win_over_the_tier() -> None:
    p = on(RTX_4090, {"batch_size": 2, "mixed_precision": "fp16", "optimizer": "AdamW8bit",
                      "gradient_checkpointing": True})
    assert (p.batch_size, p.mixed_precision, p.optimizer, p.gradient_checkpointing) == (2, "fp16", "AdamW8bit", True)
    assert p.unet_lr == PRESETS["balanced"].unet_lr  # batch 2 is the preset's own: its own LR
    assert on(RTX_4090, {"batch_size": 8}).unet_lr == 2e-4  # a client batch moves the LR by the same rule...
    assert on(RTX_4090, {"batch_size": 8, "unet_lr": 1e-4}).unet_lr == 1e-4  # ...unless the client set it
    assert on(RTX_4090, {"memory_tier": "8gb"}, arch="sdxl").batch_size == 1


def test_a_bigger_picture_than_the_tier_is_sized_for_shrinks_the_batch() -> None:
    assert on(H100, {"resolution": 1024}).batch_size == 8  # 4x the pixels: a quarter of the batch
    assert on(H100, {"resolution": 256}).batch_size == 32  # never grown beyond the measured batch
    small = GpuInfo(cuda=True, name="GTX 1060", vram_gb=5.93, bf16=False)
    assert (on(small, arch="sdxl").resolution, on(small, arch="sdxl").batch_size) == (768, 1)
    assert on(small, {"resolution": 1024}, arch="sdxl").resolution == 1024  # the client's own resolution stays


@pytest.mark.parametrize(("gpu", "arch", "overrides", "key", "words"), [
    (RTX_3070, "sdxl", {"fp8_base": True, "mixed_precision": "no"}, "fp8_base", "needs mixed_precision"),
    (RTX_4090, "sd1", {"fp8_base": True}, "fp8_base", "for SDXL"),
    (RTX_4090, "sd1", {"cache_text_encoder_outputs": True}, "cache_text_encoder_outputs", "for SDXL"),
    (RTX_4090, "sdxl", {"cache_text_encoder_outputs": True, "text_encoder_lr": 5e-5}, "cache_text_encoder_outputs",
     "needs text_encoder_lr 0"),
    (NO_GPU, "sdxl", {"fp8_base": True, "mixed_precision": "bf16"}, "fp8_base", "needs a GPU"),
    (NO_GPU, "sd1", {"memory_tier": "24gb"}, "memory_tier", "needs a CUDA GPU"),
    (RTX_4090, "sd1", {"memory_tier": "cpu"}, "memory_tier", "without a CUDA GPU"),
    (RTX_4090, "sd1", {"memory_tier": "80gb"}, "memory_tier", "must be auto or one of"),
    (RTX_4090, "sd1", {"memory_tier": None}, "memory_tier", "must be auto or one of"),
    (RTX_4090, "sd1", {"gradient_checkpointing": "yes"}, "gradient_checkpointing", "true or false"),
    (RTX_4090, "sd1", {"fp8_base": 1}, "fp8_base", "true or false"),
    (RTX_4090, "sd2", {}, "arch", "must be one of"),
])
def test_levers_that_cannot_go_together_are_refused_saying_why(gpu: GpuInfo, arch: str, overrides: dict[str, object],
                                                               key: str, words: str) -> None:
    with pytest.raises(BadInput) as err:
        on(gpu, overrides, arch=arch)
    assert (err.value.key, err.value.status) == (key, 400)
    assert words in err.value.message


def test_a_tier_lever_yields_to_an_explicit_choice_it_cannot_go_with() -> None:
    fp32 = on(RTX_3070, {"mixed_precision": "no"}, arch="sdxl")
    assert (fp32.memory_tier, fp32.fp8_base) == ("8gb", False)  # kohya refuses fp8 without mixed precision
    te = on(RTX_4090, {"text_encoder_lr": 5e-5}, arch="sdxl")
    assert (te.cache_text_encoder_outputs, te.text_encoder_lr) == (False, 5e-5)  # training the TEs: not cached


def test_a_stored_job_from_before_tiers_still_loads() -> None:
    old = {k: v for k, v in resolve().to_json().items()
           if k not in ("arch", "memory_tier", "gradient_checkpointing", "cache_text_encoder_outputs", "fp8_base",
                        "fit_reason")}
    p = TrainParams.from_json(old)
    assert (p.arch, p.batch_size, p.mixed_precision, p.gradient_checkpointing, p.fp8_base, p.fit_reason) == (
        "sd1", 2, "fp16", False, False, "")
    xl = TrainParams.from_json({"arch": "sdxl", "preset": "quality", "epochs": 3})
    assert (xl.resolution, xl.network_dim, xl.cache_text_encoder_outputs, xl.epochs) == (1024, 32, True, 3)


def test_presets_for_knows_the_trainable_families() -> None:
    assert presets_for("sd1") is PRESETS and presets_for("sdxl") is SDXL_PRESETS
    assert set(SDXL_PRESETS) == set(PRESETS)


def test_the_reason_names_the_levers_the_client_set_by_hand() -> None:
    from daemon.pipeline.fit import Machine

    cpu = Machine(cuda=False)
    auto = resolve_params({}, image_count=20, arch="sdxl", gpu=cpu)
    assert "set by hand" not in auto.fit_reason
    mine = resolve_params({"batch_size": 2, "gradient_checkpointing": False}, image_count=20, arch="sdxl", gpu=cpu)
    assert mine.batch_size == 2 and mine.fit_reason.startswith(auto.fit_reason)
    assert mine.fit_reason.endswith("; set by hand: batch_size 2, gradient_checkpointing off")
