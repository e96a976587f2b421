"""Side-by-side timing that is fair to every contender: the contenders are timed in rounds,
A B C A B C ..., so clock and temperature drift over a long run lands on all of them alike (timed
one after another, the first one measured ran on a cooler chip). Each round is a
`triton.testing.do_bench` median; the result is the median over rounds, with the spread."""

from __future__ import annotations

from typing import Callable

import triton


def interleaved_us(fns: dict[str, Callable[[], object]], rounds: int = 3, warmup_ms: int = 10,
                   rep_ms: int = 50) -> dict[str, dict[str, float]]:
    """{name: {"us": median over rounds, "lo": fastest round, "hi": slowest round}} in µs."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                               return_mode="median"))
    out = {}
    for name, xs in samples.items():
        xs = sorted(xs)
        out[name] = {"us": xs[len(xs) // 2], "lo": xs[0], "hi": xs[-1]}
    return out
