"""Pure arithmetic of the benchmark: steady rates, the sweep's stopping rules, ratios and goals.

No I/O and no clock: callers hand in (time, step) samples they stamped themselves.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The goals for this benchmark (issue 8, "3. Proof").
GOAL_RATIO = 0.95  # automatic tier images/s ÷ best hand-tuned images/s
GOAL_CLICK_TO_LORA_S = 90.0  # the standard SD1.5 job, on an H100/H200
GOAL_CARDS = ("H100", "H200")

# Outcomes of one training run (a daemon job or a hand-run sweep point).
OK = "ok"
OOM = "oom"
ERROR = "error"
TIMEOUT = "timeout"
SKIPPED = "skipped"


@dataclass(frozen=True)
class StepSample:
    """A step count seen at time `t` (seconds, any fixed origin); `phase` is the daemon's ("preview" while
    kohya draws previews, when no steps are made)."""

    t: float
    step: int
    phase: str = "training"


def warmup_steps(total: int, requested: int = 5) -> int:
    """Steps left out of the steady rate: CUDA kernels autotune and the allocator grows in the first few.

    At least `requested` (or a tenth of a long run), but always leaving one interval to measure.
    """
    return max(1, min(max(requested, total // 10), total - 1))


def first_arrivals(samples: Iterable[StepSample]) -> list[StepSample]:
    """The first sample of each new step, in order (tqdm redraws one step several times: postfix, unpause)."""
    out: list[StepSample] = []
    for sample in samples:
        if sample.step > 0 and (not out or sample.step > out[-1].step):
            out.append(sample)
    return out


def steady_rate(samples: Sequence[StepSample], warmup: int) -> float | None:
    """Optimisation steps per second after `warmup` steps, over training time only.

    An interval counts only when both of its ends are in the training phase, so the previews (and the
    pause before the phase says so) do not lower the rate; kohya's own tqdm rate leaves them out too.
    """
    points = first_arrivals(samples)
    steps = 0
    seconds = 0.0
    for a, b in itertools.pairwise(points):
        if a.step < warmup or a.phase != "training" or b.phase != "training" or b.t <= a.t:
            continue
        steps += b.step - a.step
        seconds += b.t - a.t
    return steps / seconds if seconds > 0 and steps > 0 else None


def images_per_s(steps_per_s: float | None, batch: int | None) -> float | None:
    return steps_per_s * batch if steps_per_s is not None and batch else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def peak_between(samples: Sequence[tuple[float, int]], start: float, end: float) -> int | None:
    """Highest memory sample (MiB) taken in [start, end]; None when none was taken then."""
    inside = [mib for t, mib in samples if start <= t <= end]
    return max(inside) if inside else None


@dataclass(frozen=True)
class SweepPoint:
    """One hand-run training at one batch size."""

    batch: int
    outcome: str
    steps_per_s: float | None = None
    images_per_s: float | None = None
    first_step_s: float | None = None
    wall_s: float | None = None
    peak_mib: int | None = None
    note: str = ""


def sweep_stop_reason(points: Sequence[SweepPoint], *, stop_when_slower: bool) -> str | None:
    """Why the batch-size sweep (ascending) ends after these points, or None to go on.

    Out of memory ends it (a bigger batch needs more); so does any other failure (the set-up is broken and
    every further run would fail the same way). Images/s rises with the batch until the card is saturated,
    then falls: once a run is slower than the best so far the peak is behind us.
    """
    if not points:
        return None
    last = points[-1]
    if last.outcome == OOM:
        return f"out of memory at batch {last.batch}"
    if last.outcome != OK:
        return f"batch {last.batch} ended with {last.outcome}"
    best = best_point(points)
    if stop_when_slower and best is not None and best is not last and last.images_per_s is not None:
        return f"batch {last.batch} was slower than batch {best.batch} ({last.images_per_s:.3g} < " \
               f"{best.images_per_s:.3g} images/s)"
    return None


def best_point(points: Iterable[SweepPoint]) -> SweepPoint | None:
    ok = [p for p in points if p.outcome == OK and p.images_per_s is not None]
    return max(ok, key=lambda p: p.images_per_s or 0.0) if ok else None


def fits_budget(remaining_s: float | None, past_walls: Sequence[float], *, first_guess_s: float,
                margin: float = 1.25) -> bool:
    """Whether one more run is likely to end before the budget does: its cost is guessed from the longest
    run so far (bigger batches only take longer), or `first_guess_s` before any."""
    if remaining_s is None:
        return True
    guess = max(past_walls) if past_walls else first_guess_s
    return remaining_s >= guess * margin


def is_goal_card(gpu_name: str | None) -> bool:
    return gpu_name is not None and any(card in gpu_name for card in GOAL_CARDS)


def judge(value: float | None, goal: float, *, at_least: bool, applies: bool) -> str:
    """'met' / 'missed' / a reason why the goal is not judged."""
    if not applies:
        return "not judged"
    if value is None:
        return "not measured"
    ok = value >= goal if at_least else value <= goal
    return "met" if ok else "missed"


def parse_batches(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4]: ascending, distinct, positive (the sweep's stopping rules assume the order)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"batch sizes must be whole numbers separated by commas, not {text!r}") from exc
    if not values or any(v < 1 for v in values) or values != sorted(set(values)):
        raise ValueError(f"batch sizes must be positive and ascending without repeats, not {text!r}")
    return values
