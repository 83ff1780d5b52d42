"""Every optimisation step's loss, as kohya's bar shows it, in batches.

kohya redraws its `steps:` bar twice per step: right after the step (still showing the previous avr_loss) and
again once the new avr_loss is set. So a step's point is only final once a later step (or the end of the
output) arrives: the newest step is held back until then, and each step is handed on exactly once, in order.
Pure: the runner feeds it and sends what `take` returns as one `loss` event and one store transaction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from daemon.jobs.models import LossPoint

FLUSH_INTERVAL_S = 0.5  # at most two `loss` events (and store transactions) a second per job


class LossBuffer:
    def __init__(self) -> None:
        self._ready: list[LossPoint] = []
        self._held: LossPoint | None = None

    def add(self, step: int, epoch: int, loss: float | None) -> None:
        """The bar at `step` shows `loss`; no loss (yet), or nan/inf, is not a point."""
        if loss is None or not math.isfinite(loss) or step <= 0:
            return
        point = LossPoint(step, max(epoch, 1), float(loss))
        # a later step makes the held one final; so does a lower one (a bar that started again), whose
        # points replace the older ones at the same steps in the store
        if self._held is not None and step != self._held.step:
            self._ready.append(self._held)
        self._held = point

    def take(self, *, final: bool = False) -> list[LossPoint]:
        """Points that are final; with `final` (the output ended) the held one too."""
        if final and self._held is not None:
            self._ready.append(self._held)
            self._held = None
        ready, self._ready = self._ready, []
        return ready


def epoch_means(points: Iterable[LossPoint]) -> dict[int, float]:
    """The mean loss of each epoch's steps."""
    sums: dict[int, tuple[float, int]] = {}
    for point in points:
        total, count = sums.get(point.epoch, (0.0, 0))
        sums[point.epoch] = (total + point.loss, count + 1)
    return {epoch: total / count for epoch, (total, count) in sums.items()}


def to_json(points: Iterable[LossPoint]) -> list[list[float]]:
    return [[p.step, p.epoch, p.loss] for p in points]
