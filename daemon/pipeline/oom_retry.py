"""After kohya runs out of GPU memory: the next attempt's settings one memory tier lower, the sentence saying
what changed, and the error once nothing lower is left. Pure: no I/O.

Which tier. The rungs are fit.py's tiers from the failed run's own downwards (an 80 GB-class card's bigger
40+ GB batch has the tier's plain row as the rung below it). The retry takes the first rung that lowers what the
run needs: its batch, gradient checkpointing or fp8 base (fit.MemoryModel's levers), or SDXL's cached
text-encoder outputs (no text-encoder forward pass per step, ~1.6 GB). The failed run's own tier comes first
because levers set by hand may take more memory than the tier's (batch 16 on the 24 GB tier): going back to the
tier's values is the smallest step down. A rung that changes only the optimizer is passed over: a LoRA's optimizer
state is a few hundred MB at most (fit.py), too little to turn an out-of-memory run into one that fits; the 8-bit
optimizer comes along with the next rung that does change something.

Levers set by hand. A retry moves every lever only towards less memory, so what the user chose is kept wherever
it already needs as little as the lower tier or less: a smaller batch than the tier's stays, checkpointing or fp8
turned on by hand stays on, an optimizer other than AdamW (Adafactor, Lion, Prodigy) stays. A lever set by hand
that needs more than the lower tier is overridden (a batch of 16, checkpointing turned off): the user asked for
the run, and a run that fits is what the retry is for; the notice and the job's params say what changed.

Never changed: the resolution (the pictures were prepared for it and it decides the detail learnt: the error's
hint suggests it instead), the mixed precision (the GPU's, not the tier's), the epochs and repeats (the image
views stay, so the steps follow 1/batch, as params.resolve_params does), and SDXL text-encoder training
(text_encoder_lr > 0 is never turned into cached outputs: that changes what the LoRA learns). The learning
rates follow params.scaled_lr's rule for the new batch.

From a saved state (kohya's --resume) the optimizer and its learning rates are the state's: torch's
Optimizer.load_state_dict takes the saved parameter groups' lr and the scheduler its base_lrs (torch source; not
run here), and an AdamW state cannot be loaded into the 8-bit optimizer. So a retry that continues from a state
keeps the optimizer and the learning rates, and the stored params say so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from daemon.pipeline.fit import TABLE, TIER_LABELS, TIERS, Fit, Hardware, choose_fit
from daemon.pipeline.params import PRESETS_BY_ARCH, TrainParams, scaled_lr

OUT_OF_MEMORY = "out_of_memory"
# torch's CPU allocator: RAM, which a lower GPU tier does not free (failure.py tells it apart the same way).
RAM_MARK = "DefaultCPUAllocator"
EIGHT_BIT = "AdamW8bit"
# The lowest resolution the error's hint suggests: SD 1.x models are trained at 512 px and SDXL at 1024; much
# below 3/4 of that a LoRA learns little of a face (SDXL's own 6 GB tier trains at 768 px).
MIN_RESOLUTION: dict[str, int] = {"sd1": 384, "sdxl": 768}


@dataclass(frozen=True)
class RetryPlan:
    params: TrainParams  # the next attempt's
    from_tier: str
    to_tier: str
    changes: tuple[str, ...]  # what changed, in words ("batch 4", "gradient checkpointing")
    message: str  # the notice: "Ran out of GPU memory at batch 8; retrying with batch 4 (retry 1 of 2)."


def gpu_out_of_memory(kind: str, tail: Sequence[str], *, cpu: bool) -> bool:
    """Whether a failed run ran out of GPU memory (a lower tier may fit), not RAM and not on a CPU run."""
    return kind == OUT_OF_MEMORY and not cpu and not any(RAM_MARK in line for line in tail)


def plan_retry(params: TrainParams, gpu: Hardware, *, attempt: int, limit: int,
               state_epoch: int | None = None) -> RetryPlan | None:
    """The settings for retry `attempt` (1-based, of `limit`) after `params` ran out of GPU memory; None when no
    rung below needs less memory (or the run was on the CPU, which has no tiers).

    `state_epoch`: the retry continues from the state kohya saved after this epoch (None: from the first step).
    """
    if not gpu.cuda or params.memory_tier not in TIERS or params.memory_tier == "cpu" or params.arch not in TABLE:
        return None
    from_state = state_epoch is not None
    for fit in _rungs(params, gpu):
        lower = _apply(params, fit, from_state=from_state)
        if _memory_levers(lower) != _memory_levers(params):
            changes = _changes(params, lower)
            reason = f"{params.fit_reason}; " if params.fit_reason else ""
            lower = replace(lower, fit_reason=f"{reason}retry {attempt} after running out of GPU memory: "
                                              f"{TIER_LABELS[fit.tier]} tier, {', '.join(changes)}")
            where = f", from the state saved after epoch {state_epoch}" if from_state else ""
            message = (f"Ran out of GPU memory at batch {params.batch_size}; retrying with {_and(changes)}{where} "
                       f"(retry {attempt} of {limit}).")
            return RetryPlan(lower, params.memory_tier, fit.tier, changes, message)
    return None


def final_error(tried: Sequence[TrainParams], gpu: Hardware, *, limit: int,
                earlier: Sequence[Mapping[str, Any]] = ()) -> tuple[str, str]:
    """(message, hint) of the out_of_memory error once the retries are used up or nothing lower is left:
    what was tried, and what the user can do. `earlier`: the job's recovery.retries from its runs before this one
    (the daemon died in between); each names the batch and tier that failed."""
    last = tried[-1]
    attempts = [f"batch {r.get('from_batch')} ({TIER_LABELS.get(str(r.get('from_tier')), r.get('from_tier'))} tier)"
                for r in earlier]
    attempts += [f"{_described(p)} ({TIER_LABELS.get(p.memory_tier, p.memory_tier)} tier)" for p in tried]
    times = "once" if len(attempts) == 1 else f"{len(attempts)} times"
    lower = plan_retry(last, gpu, attempt=len(tried), limit=limit)
    if lower is None:
        why = "These are the smallest settings for this card."
    else:
        why = f"That was the last of the {limit} automatic retries (oom_retries)."
    message = f"The graphics card ran out of memory {times}: {', then '.join(attempts)}. {why}"
    steps = ["Free GPU memory and start the job again: close other programs that use the GPU, and while the job "
             "trains set Easy Diffusion's GPU memory usage to low or close it (it keeps its model in GPU memory)"]
    if lower is not None:
        steps.append(f"choose the {TIER_LABELS[lower.to_tier]} memory tier under Advanced, which needs less")
    smaller = max(MIN_RESOLUTION[last.arch], last.resolution * 3 // 4 // 64 * 64)
    if smaller < last.resolution:
        # activations grow with the pixels: 3/4 of the side is a little over half the activations
        steps.append(f"lower the resolution under Advanced (e.g. {smaller})")
    if last.arch == "sdxl":
        steps.append("train on an SD 1.x base model, which needs far less memory than SDXL")
    return message, "; or ".join(steps) + "."


def _rungs(params: TrainParams, gpu: Hardware) -> list[Fit]:
    """The failed run's tier and every GPU tier below it, biggest first."""
    rungs: list[Fit] = []
    for tier in reversed(TIERS[1 : TIERS.index(params.memory_tier) + 1]):
        fit = choose_fit(params.arch, gpu, tier=tier)
        rungs.append(fit)
        row_batch = TABLE[params.arch][tier].batch_size
        if fit.batch_size > row_batch:  # an 80 GB-class card's bigger batch: the tier's own row comes next
            rungs.append(replace(fit, batch_size=row_batch))
    return rungs


def _apply(params: TrainParams, fit: Fit, *, from_state: bool) -> TrainParams:
    """`params` with each of the tier's levers that needs less memory than the failed run's (module docstring)."""
    # The tier's batch is sized for fit.resolution; activations grow with the pixels (as params._apply_fit does).
    shrink = min(1.0, (fit.resolution / params.resolution) ** 2)
    batch = min(params.batch_size, max(1, math.floor(fit.batch_size * shrink)))
    optimizer = params.optimizer
    if not from_state and params.optimizer == "AdamW" and fit.optimizer == EIGHT_BIT:
        optimizer = EIGHT_BIT
    lower = replace(
        params,
        memory_tier=fit.tier,
        batch_size=batch,
        optimizer=optimizer,
        gradient_checkpointing=params.gradient_checkpointing or fit.gradient_checkpointing,
        fp8_base=params.fp8_base or (fit.fp8_base and params.mixed_precision != "no"),
        cache_text_encoder_outputs=params.cache_text_encoder_outputs or (
            fit.cache_text_encoder_outputs and params.text_encoder_lr == 0),
    )
    if from_state or batch == params.batch_size:
        return lower
    return replace(lower, unet_lr=_lr(params, params.unet_lr, "unet_lr", batch, optimizer),
                   text_encoder_lr=_lr(params, params.text_encoder_lr, "text_encoder_lr", batch, optimizer))


def _lr(params: TrainParams, lr: float, key: str, batch: int, optimizer: str) -> float:
    """The learning rate for the new batch: from the preset's when the failed run's was the preset's, scaled for
    its batch (no rounding drift over retries); else the failed run's (set by hand) carried over by the rule."""
    preset = PRESETS_BY_ARCH.get(params.arch, {}).get(params.preset)
    if preset is not None:
        base = getattr(preset, key)
        if scaled_lr(base, batch_size=params.batch_size, reference_batch=preset.batch_size,
                     optimizer=params.optimizer) == lr:
            return scaled_lr(base, batch_size=batch, reference_batch=preset.batch_size, optimizer=optimizer)
    return scaled_lr(lr, batch_size=batch, reference_batch=params.batch_size, optimizer=optimizer)


def _memory_levers(p: TrainParams) -> tuple[int, bool, bool, bool]:
    return (p.batch_size, p.gradient_checkpointing, p.fp8_base, p.cache_text_encoder_outputs)


def _changes(before: TrainParams, after: TrainParams) -> tuple[str, ...]:
    changes = []
    if after.batch_size != before.batch_size:
        changes.append(f"batch {after.batch_size}")
    if after.gradient_checkpointing and not before.gradient_checkpointing:
        changes.append("gradient checkpointing")
    if after.cache_text_encoder_outputs and not before.cache_text_encoder_outputs:
        changes.append("cached text-encoder outputs")
    if after.fp8_base and not before.fp8_base:
        changes.append("an fp8 base model")
    if after.optimizer != before.optimizer:
        changes.append("the 8-bit AdamW optimizer")
    return tuple(changes)


def _described(p: TrainParams) -> str:
    levers = []
    if p.gradient_checkpointing:
        levers.append("gradient checkpointing")
    if p.arch == "sdxl" and p.cache_text_encoder_outputs:
        levers.append("cached text-encoder outputs")
    if p.fp8_base:
        levers.append("an fp8 base model")
    if p.optimizer == EIGHT_BIT:
        levers.append("the 8-bit AdamW optimizer")
    return f"batch {p.batch_size}" + (f" with {_and(levers)}" if levers else "")


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
