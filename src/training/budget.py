"""When a run ends: the step, token, time and cost budgets, whichever comes first."""

from __future__ import annotations

import time


class Budget:
    """progress() is the share of the budget used (1.0 = done), from training.max_steps,
    max_tokens and max_seconds, and the cost stop modal.max_cost_usd.

    Under torchrun every rank decides with rank 0's clock (agree() sets it each step), so all
    ranks schedule the learning rate and stop at the same step.
    """

    def __init__(self, t, elapsed_before: float = 0.0, cost_per_hour: float | None = None,
                 max_cost_usd: float | None = None, world: int = 1):
        self.t, self.before = t, elapsed_before
        self.cost_per_hour = cost_per_hour
        self.max_cost = max_cost_usd if cost_per_hour else None
        self.world = world
        self.started = time.time()
        self._agreed = self.elapsed()

    def elapsed(self) -> float:
        """Training seconds so far on this process, over all attempts of the run."""
        return self.before + (time.time() - self.started)

    def agree(self, seconds: float) -> None:
        self._agreed = seconds

    def clock(self) -> float:
        """The time every rank uses for decisions: rank 0's, under torchrun."""
        return self.elapsed() if self.world == 1 else self._agreed

    def progress(self, step: int, tokens: int, seconds: float | None = None) -> float:
        t, s = self.t, self.clock() if seconds is None else seconds
        p = step / t.max_steps
        if t.max_tokens:
            p = max(p, tokens / t.max_tokens)
        if t.max_seconds:
            p = max(p, s / t.max_seconds)
        return p

    def done(self, step: int, tokens: int) -> bool:
        return self.progress(step, tokens) >= 1.0

    def cost(self) -> float | None:
        return self.cost_per_hour * self.clock() / 3600 if self.cost_per_hour else None

    def over_cost(self) -> bool:
        return bool(self.max_cost) and self.cost() >= self.max_cost
