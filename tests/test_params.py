"""resolve_params: presets, the client's overrides, CPU forcing and the step arithmetic."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from daemon.errors import BadInput
from daemon.pipeline.params import (
    OVERRIDE_KEYS,
    PRESETS,
    TrainParams,
    default_repeats,
    resolve_params,
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
