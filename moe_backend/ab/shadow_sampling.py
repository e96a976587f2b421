"""Shadow mode's sampling countdown: which served calls are sampled, drawn ahead as each target
backend's geometric gap to its next sample (the same Bernoulli(rate) per call as a draw per call),
so a call that is not sampled only decrements a counter."""

from __future__ import annotations

import math
import random

from moe_backend.ab.backends import Backend

__all__ = ["FLUSH_EVERY", "SamplingCountdown"]

# The slow path (publish the calls tally, record finished shadow runs) runs at least this often.
FLUSH_EVERY = 128


class SamplingCountdown:
    """The countdown part of `Shadow`: it reads `self._backends` ([(Backend, rate)]) and owns the
    random draws and the call counts. `Shadow._skip` decrements `_countdown` on the fast path."""

    def _init_sampling(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._due_in = [self._gap(rate) for _, rate in self._backends]  # calls to each one's next sample
        self._calls_before = 0  # calls up to the last slow path
        self._armed = 0  # the countdown's start: calls from the last slow path to the next
        self._countdown = 0
        self._arm()

    @property
    def calls(self) -> int:
        """Calls seen, sampled or not (one that reaches the slow path while a CUDA graph is being
        captured is not counted)."""
        return self._calls_before + self._armed - self._countdown

    def _gap(self, rate: float) -> int:
        """Calls up to and including the next sampled one: geometric, P(gap = k) = (1-r)^(k-1) r."""
        if rate >= 1.0:
            return 1
        gap = math.log(1.0 - self._rng.random()) / math.log1p(-rate)
        return 1 + int(min(gap, 2.0**62))  # a vanishing rate: never, in practice (and no overflow)

    def _arm(self) -> None:
        self._armed = self._countdown = min(min(self._due_in), FLUSH_EVERY)

    def _due(self) -> list[Backend]:
        """At the countdown's end: the backends whose sample falls on this call (their next gaps
        drawn), the countdown re-armed."""
        elapsed = self._armed
        self._calls_before += elapsed
        chosen = []
        for i, (backend, rate) in enumerate(self._backends):
            self._due_in[i] -= elapsed
            if self._due_in[i] == 0:
                chosen.append(backend)
                self._due_in[i] = self._gap(rate)
        self._arm()
        return chosen

    def _sample(self) -> list[Backend]:
        """One call's sampling decision: the backends sampled on it (usually none)."""
        self._countdown -= 1
        return [] if self._countdown > 0 else self._due()
