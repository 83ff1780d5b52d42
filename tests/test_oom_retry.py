"""The out-of-memory retry planner (daemon/pipeline/oom_retry.py): one memory tier lower, same training amount."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.pipeline.env_check import GpuInfo
from daemon.pipeline.fit import MEMORY
from daemon.pipeline.oom_retry import final_error, gpu_out_of_memory, plan_retry
from daemon.pipeline.params import PRESETS_BY_ARCH, TrainParams, resolve_params, scaled_lr, total_steps

RTX_4090 = GpuInfo(cuda=True, name="NVIDIA GeForce RTX 4090", vram_gb=23.99, bf16=True)
H100 = GpuInfo(cuda=True, name="NVIDIA H100 80GB HBM3", vram_gb=79.19, bf16=True)
NO_GPU = GpuInfo(cuda=False)
IMAGES = 10


def params_for(arch: str, gpu: GpuInfo = RTX_4090, **overrides: Any) -> TrainParams:
    return resolve_params(overrides, image_count=IMAGES, arch=arch, gpu=gpu)


# Every GPU tier of both families on a 24 GB card, set by hand: where the retry lands and what it changes.
LADDER = [
    ("sd1", "40gb", "24gb", ("batch 8",)),
    ("sd1", "24gb", "16gb", ("batch 4",)),
    # 12 GB differs from 16 GB only by the 8-bit optimizer: passed over, it comes along with 8 GB's batch 2
    ("sd1", "16gb", "8gb", ("batch 2", "the 8-bit AdamW optimizer")),
    ("sd1", "12gb", "8gb", ("batch 2",)),
    ("sd1", "8gb", "6gb", ("gradient checkpointing",)),
    ("sd1", "6gb", None, ()),
    ("sdxl", "40gb", "24gb", ("gradient checkpointing",)),
    ("sdxl", "24gb", "16gb", ("batch 2",)),
    ("sdxl", "16gb", "12gb", ("batch 1", "the 8-bit AdamW optimizer")),
    ("sdxl", "12gb", "8gb", ("an fp8 base model",)),
    # 6 GB differs from 8 GB only by its 768 px, and a retry never changes the resolution
    ("sdxl", "8gb", None, ()),
    ("sdxl", "6gb", None, ()),
]


def peak(p: TrainParams) -> float:
    return MEMORY[p.arch].peak_gib(p.batch_size, checkpointing=p.gradient_checkpointing, fp8=p.fp8_base,
                                   resolution=p.resolution)


@pytest.mark.parametrize(("arch", "tier", "to_tier", "changes"), LADDER)
def test_every_tier_retries_one_rung_lower_with_the_same_training_amount(
        arch: str, tier: str, to_tier: str | None, changes: tuple[str, ...]) -> None:
    failed = params_for(arch, memory_tier=tier)
    plan = plan_retry(failed, RTX_4090, attempt=1, limit=2)
    if to_tier is None:
        assert plan is None
        return
    assert plan is not None
    new = plan.params
    assert (plan.from_tier, plan.to_tier, plan.changes, new.memory_tier) == (tier, to_tier, changes, to_tier)
    assert peak(new) < peak(failed)
    # the training amount: the same image views (epochs x repeats x pictures), so the steps follow 1/batch
    for key in ("epochs", "repeats", "resolution", "mixed_precision", "network_dim", "network_alpha", "seed",
                "preset", "arch", "save_every_n_epochs", "sample_every_n_epochs"):
        assert getattr(new, key) == getattr(failed, key), key
    assert total_steps(new, IMAGES) == new.epochs * -(-IMAGES * new.repeats // new.batch_size)
    # the learning rate is the preset's, carried to the new batch by the square-root rule
    preset = PRESETS_BY_ARCH[arch][failed.preset]
    assert new.unet_lr == scaled_lr(preset.unet_lr, batch_size=new.batch_size, reference_batch=preset.batch_size,
                                    optimizer=new.optimizer)
    assert new.fit_reason.startswith(failed.fit_reason) and "retry 1 after running out of GPU memory" in new.fit_reason
    assert plan.message == (f"Ran out of GPU memory at batch {failed.batch_size}; retrying with "
                            f"{' and '.join(changes)} (retry 1 of 2).")


def test_the_sentence_names_exactly_what_changed() -> None:
    plan = plan_retry(params_for("sd1", memory_tier="16gb"), RTX_4090, attempt=2, limit=2)
    assert plan is not None
    assert plan.message == ("Ran out of GPU memory at batch 4; retrying with batch 2 and the 8-bit AdamW optimizer "
                            "(retry 2 of 2).")
    xl = plan_retry(params_for("sdxl", gpu=H100), H100, attempt=1, limit=1)
    assert xl is not None and xl.message == "Ran out of GPU memory at batch 8; retrying with batch 4 (retry 1 of 1)."


def test_an_80_gb_card_first_drops_to_its_tiers_plain_batch() -> None:
    failed = params_for("sd1", gpu=H100)
    assert (failed.memory_tier, failed.batch_size) == ("40gb", 32)
    plan = plan_retry(failed, H100, attempt=1, limit=2)
    assert plan is not None and (plan.to_tier, plan.params.batch_size) == ("40gb", 16)
    second = plan_retry(plan.params, H100, attempt=2, limit=2)
    assert second is not None and (second.to_tier, second.params.batch_size) == ("24gb", 8)
    assert second.params.unet_lr == scaled_lr(1e-4, batch_size=8, reference_batch=2, optimizer="AdamW")


def test_a_batch_set_by_hand_above_the_tiers_goes_back_to_the_tiers_own() -> None:
    failed = params_for("sd1", batch_size=16)  # 24 GB tier, whose batch is 8
    plan = plan_retry(failed, RTX_4090, attempt=1, limit=2)
    assert plan is not None and (plan.from_tier, plan.to_tier, plan.params.batch_size) == ("24gb", "24gb", 8)


def test_levers_set_by_hand_that_already_save_memory_are_kept() -> None:
    # batch 1 by hand on 24 GB: 16/12/8 GB would not lower it; 6 GB's checkpointing does
    failed = params_for("sd1", batch_size=1)
    plan = plan_retry(failed, RTX_4090, attempt=1, limit=2)
    assert plan is not None and plan.to_tier == "6gb" and plan.params.batch_size == 1
    assert plan.changes == ("gradient checkpointing", "the 8-bit AdamW optimizer")
    # checkpointing turned on by hand stays on where the lower tier has it off; Prodigy is never swapped
    failed = params_for("sd1", gradient_checkpointing=True, optimizer="Prodigy")
    plan = plan_retry(failed, RTX_4090, attempt=1, limit=2)
    assert plan is not None and plan.params.gradient_checkpointing and plan.params.optimizer == "Prodigy"
    assert plan.params.unet_lr == failed.unet_lr == 1.0  # Prodigy finds its own step size


def test_a_learning_rate_set_by_hand_is_carried_over_by_the_rule() -> None:
    failed = params_for("sd1", unet_lr=4e-4)  # batch 8
    plan = plan_retry(failed, RTX_4090, attempt=1, limit=2)
    assert plan is not None and plan.params.batch_size == 4
    assert plan.params.unet_lr == scaled_lr(4e-4, batch_size=4, reference_batch=8, optimizer="AdamW") == 2.83e-4


def test_sdxl_text_encoder_training_is_never_turned_into_cached_outputs() -> None:
    failed = params_for("sdxl", text_encoder_lr=5e-5)
    assert not failed.cache_text_encoder_outputs
    plan = plan_retry(failed, RTX_4090, attempt=1, limit=2)
    assert plan is not None and not plan.params.cache_text_encoder_outputs
    assert plan.params.text_encoder_lr > 0 and plan.changes == ("batch 2",)


def test_cached_text_encoder_outputs_turned_off_by_hand_are_turned_on() -> None:
    failed = params_for("sdxl", memory_tier="12gb", cache_text_encoder_outputs=False)
    plan = plan_retry(failed, RTX_4090, attempt=1, limit=2)
    assert plan is not None and plan.to_tier == "12gb" and plan.changes == ("cached text-encoder outputs",)


def test_from_a_saved_state_the_optimizer_and_learning_rates_are_the_states() -> None:
    failed = params_for("sd1", memory_tier="16gb")  # AdamW, batch 4
    plan = plan_retry(failed, RTX_4090, attempt=1, limit=2, state_epoch=3)
    assert plan is not None and plan.params.batch_size == 2
    assert (plan.params.optimizer, plan.params.unet_lr, plan.params.text_encoder_lr) == (
        failed.optimizer, failed.unet_lr, failed.text_encoder_lr)
    assert plan.message == ("Ran out of GPU memory at batch 4; retrying with batch 2, from the state saved after "
                            "epoch 3 (retry 1 of 2).")


def test_a_cpu_run_is_never_retried() -> None:
    failed = params_for("sd1", gpu=NO_GPU)
    assert failed.memory_tier == "cpu"
    assert plan_retry(failed, NO_GPU, attempt=1, limit=2) is None
    assert plan_retry(failed, RTX_4090, attempt=1, limit=2) is None  # a job resolved without a GPU
    assert not gpu_out_of_memory("out_of_memory", [], cpu=True)


def test_only_gpu_memory_counts() -> None:
    assert gpu_out_of_memory("out_of_memory", ["torch.OutOfMemoryError: CUDA out of memory."], cpu=False)
    assert not gpu_out_of_memory("out_of_memory", ["RuntimeError: [enforce fail at alloc_cpu.cpp:114] data. "
                                                   "DefaultCPUAllocator: not enough memory"], cpu=False)
    assert not gpu_out_of_memory("trainer_crashed", [], cpu=False)


def test_the_final_error_lists_what_was_tried_and_names_a_smaller_tier_when_one_is_left() -> None:
    first = params_for("sd1")
    second = plan_retry(first, RTX_4090, attempt=1, limit=2)
    assert second is not None
    third = plan_retry(second.params, RTX_4090, attempt=2, limit=2)
    assert third is not None
    message, hint = final_error([first, second.params, third.params], RTX_4090, limit=2)
    assert message == ("The graphics card ran out of memory 3 times: batch 8 (24 GB tier), then batch 4 (16 GB tier), "
                       "then batch 2 with the 8-bit AdamW optimizer (8 GB tier). That was the last of the 2 automatic "
                       "retries (oom_retries).")
    assert "close other programs that use the GPU" in hint and "Easy Diffusion" in hint
    assert "choose the 6 GB memory tier under Advanced" in hint and "(e.g. 384)" in hint and "SD 1.x" not in hint


def test_the_final_error_at_the_smallest_tier_says_so_and_what_else_helps() -> None:
    lowest = params_for("sdxl", memory_tier="8gb")
    message, hint = final_error([lowest], RTX_4090, limit=2)
    assert message == ("The graphics card ran out of memory once: batch 1 with gradient checkpointing, cached "
                       "text-encoder outputs, an fp8 base model and the 8-bit AdamW optimizer (8 GB tier). These are "
                       "the smallest settings for this card.")
    assert "memory tier" not in hint
    assert "lower the resolution under Advanced (e.g. 768)" in hint and "SD 1.x base model" in hint
