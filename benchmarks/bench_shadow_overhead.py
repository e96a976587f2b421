"""Shadow mode's cost to serving: the DeepSeek-V3 layer (EP8 slice + shared expert) timed with
shadow mode off and on at a given rate, in adjacent pairs of blocks whose order alternates
(off-on, on-off, ...) so clock drift lands on both sides. Both paths are warm before timing: the
layer's and the shadow backend's kernels compiled and graphs captured (on the side stream every
Shadow shares), and the timed Shadow's own first sample taken. Prints, per batch size, the median
of the pairs' overheads with its distribution-free 95% interval, the overhead over all calls (what
a user feels on average), the overhead expected from the shadow's own time (rate x shadow time /
layer time), the hook's host time per call (off, not sampled, sampled: where the rest goes), and
a verdict against the 1% budget of docs/ab-testing.md: PASS when the interval lies under it, FAIL
when above, UNRESOLVED when the run's spread straddles it.

The same budget from a second, resolvable measure: a sampled call's extra cost, timed in pairs of
off blocks and blocks where every call is sampled (rate 1), is about the layer's own time, so block
to block noise of a few percent leaves it well resolved; an unsampled call costs what a call with
shadow mode off costs (the hook columns), so the overhead at `rate` is rate x that extra cost, and
its interval is the extra cost's interval scaled by the rate.

    python -m benchmarks.bench_shadow_overhead [--backend triton] [--rate 0.01] [--tokens 128,4096]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()  # every stream: shadow runs still on the side stream count too


def _block(layer, x, calls: int) -> float:
    _sync(x)
    start = time.perf_counter()
    for _ in range(calls):
        layer(x)
    _sync(x)
    return (time.perf_counter() - start) / calls


def _latency(registry, labels) -> tuple[float, float]:
    """(sum, count) of the shadow latency histogram for these labels so far."""
    total = registry.get_sample_value("moe_backend_shadow_latency_seconds_sum", labels) or 0.0
    count = registry.get_sample_value("moe_backend_shadow_latency_seconds_count", labels) or 0.0
    return total, count


def _hook_host_time(layer, x, shadow, calls: int) -> tuple[float, float | None]:
    """Host seconds the layer spends in shadow mode's hook per call: (calls not sampled, sampled
    calls or None when none was), over one block of `calls` with `layer.shadow = shadow`."""
    from moe_backend.ab import shadow_hooks

    hook = shadow_hooks.observe_layer
    plain, sampled = [], []

    def timed(*args):
        before = shadow.sampled if shadow is not None else 0
        start = time.perf_counter()
        hook(*args)
        spent = time.perf_counter() - start
        (sampled if shadow is not None and shadow.sampled != before else plain).append(spent)

    layer.shadow = shadow
    shadow_hooks.observe_layer = timed  # the layer looks the hook up on the module at each call
    try:
        _block(layer, x, calls)
    finally:
        shadow_hooks.observe_layer = hook
    return sum(plain) / max(len(plain), 1), (sum(sampled) / len(sampled) if sampled else None)


def profile_sampled_hook(layer, x, backend: str, calls: int) -> str:
    """cProfile of shadow mode's hook over `calls` calls that are all sampled (rate 1, a Shadow of its
    own), the serving thread's side only: the top functions by cumulative time."""
    import cProfile
    import io
    import pstats

    from prometheus_client import CollectorRegistry

    from moe_backend.ab import shadow_hooks
    from moe_backend.ab.shadow import Shadow

    shadow = Shadow(f"{backend}:1.0", registry=CollectorRegistry())
    hook, profiler = shadow_hooks.observe_layer, cProfile.Profile()

    def profiled(*args):
        profiler.enable()
        try:
            hook(*args)
        finally:
            profiler.disable()

    layer.shadow = shadow
    shadow_hooks.observe_layer = profiled
    try:
        _block(layer, x, calls)
    finally:
        shadow_hooks.observe_layer = hook
        shadow.flush()
        layer.shadow = None
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(20)
    return f"{shadow.sampled} sampled calls profiled\n" + "\n".join(
        line for line in text.getvalue().splitlines() if line.strip()
    )


def _sampled_call_extra(layer, x, backend: str, pairs: int, calls: int) -> tuple[float, float, float]:
    """A sampled call's extra time over a call with shadow mode off, as a fraction of the latter:
    (median, low, high) over `pairs` pairs of blocks (order alternating), one with shadow mode off,
    one where every call is sampled (a rate-1 Shadow of its own, warmed up first)."""
    from prometheus_client import CollectorRegistry

    from moe_backend.ab.shadow import Shadow

    every = Shadow(f"{backend}:1.0", seed=0, registry=CollectorRegistry())
    layer.shadow = every
    _block(layer, x, 2)  # its read-back buffer and metric series, outside the timing
    calls = max(20, calls // 4)  # a sampled call costs about two: shorter blocks, similar seconds
    extra = []
    for pair in range(pairs):
        times = {}
        for sampled in (False, True) if pair % 2 == 0 else (True, False):
            layer.shadow = every if sampled else None
            times[sampled] = _block(layer, x, calls)
        extra.append(times[True] / times[False] - 1)
    every.flush()
    layer.shadow = None
    return median_interval(extra)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high): the median of `values` and the order statistics that bracket the true
    median with at least `confidence` whatever the distribution (binomial, p = 1/2); with too few
    values for that, the sample's minimum and maximum."""
    if not values:
        raise ValueError("values: expected at least one value")
    xs = sorted(values)
    n = len(xs)
    median = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    # Largest k with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2: [x_(k), x_(n+1-k)] covers it.
    tail, cumulative, k = (1 - confidence) / 2, 0.0, 0
    while k < n // 2:
        p = math.comb(n, k) / 2**n
        if cumulative + p > tail:
            break
        cumulative += p
        k += 1
    if k == 0:
        return median, xs[0], xs[-1]
    return median, xs[k - 1], xs[n - k]


def verdict(low: float, high: float, budget: float) -> str:
    if high <= budget:
        return "PASS"
    if low > budget:
        return "FAIL"
    return "UNRESOLVED"


def main(argv=None) -> int:
    from prometheus_client import CollectorRegistry

    from moe_backend import MoEConfig
    from moe_backend.ab.backends import get_backend
    from moe_backend.ab.shadow import Shadow
    from moe_backend.dispatch.policy import Policy
    from moe_backend.layers import DeepseekV3MoE
    from moe_backend.testing import random_moe_weights

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="triton", help="the shadow backend (default triton; 'deepgemm' when present)")
    p.add_argument("--rate", type=float, default=0.01)
    p.add_argument("--tokens", default="128,4096")
    p.add_argument("--seconds", type=float, default=0.5, help="per block (default 0.5)")
    p.add_argument("--blocks", type=int, default=20, help="off/on pairs (default 20)")
    p.add_argument("--sample-blocks", type=int, default=10, help="off / every-call-sampled pairs (default 10; 0: skip)")
    p.add_argument(
        "--profile-sampled",
        type=int,
        default=0,
        metavar="N",
        help="after the table, N sampled calls (rate 1) under cProfile: where a sampled call's host time goes",
    )
    p.add_argument(
        "--small-cpu",
        action="store_true",
        help="a small layer on the CPU: runs the whole procedure quickly (tests); its figures mean nothing",
    )
    args = p.parse_args(argv)
    device = "cpu" if args.small_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    reason = get_backend(args.backend).unavailable(device)
    if reason:
        print(f"shadow backend {args.backend!r} unavailable: {reason}", file=sys.stderr)
        return 2
    if args.small_cpu:
        config = MoEConfig(
            hidden_size=256,
            moe_intermediate_size=128,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
        )
        expert_range, where = (0, 8), "CPU, small layer (8 experts, hidden 256)"
    else:
        config = MoEConfig()
        expert_range = (0, 32)  # EP8 slice + the shared expert
        where = f"{torch.cuda.get_device_name()}; DeepSeek-V3 EP8 layer (32 of 256 experts + shared)"
    layer = DeepseekV3MoE(config, expert_range=expert_range, device=device)
    layer.load_weights(random_moe_weights(config, seed=0, experts=range(*expert_range), device=device))
    print(
        f"{where}, torch {torch.__version__}; shadow {args.backend}:{args.rate:g}; {args.blocks} pairs of "
        f"off/on blocks (order alternating) of ~{args.seconds:g} s each"
    )
    print(
        "| tokens | layer µs (off, median) | overhead (median of pairs) | 95% interval | overhead (all calls) "
        "| expected | shadow runs | shadow µs (mean) | hook host µs: off / not sampled / sampled | budget 1% "
        "| sampled call's extra, x layer (95%) | rate x extra (95%) | budget 1%, from the extra |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, config.hidden_size, device=device).to(torch.bfloat16)
        # Every shadow run goes through one side stream per device, so this warm-up also compiles
        # and captures what the timed Shadow's runs replay: the layer's plan and the shadow
        # backend's run once eagerly, are captured, then replayed.
        warm = Shadow(f"{args.backend}:1.0", registry=CollectorRegistry())
        layer.shadow = warm
        _block(layer, x, 4)
        warm.flush()
        layer.shadow = None
        per_call = _block(layer, x, 20)
        calls = max(200, int(args.seconds / per_call))
        registry = CollectorRegistry()
        shadow = Shadow(f"{args.backend}:{args.rate}", seed=0, registry=registry)
        # The timed Shadow's own first sample (its read-back buffer, its metric series) before timing.
        layer.shadow = shadow
        for _ in range(int(50 / args.rate)):
            layer(x)
            if shadow.sampled:
                break
        shadow.flush()
        labels = {"layer": "0", "backend": args.backend, "phase": Policy.from_env().phase_of(tokens)}
        runs_before, lat_before = shadow.sampled, _latency(registry, labels)
        off, on = [], []
        for pair in range(args.blocks):
            for shadow_on in (False, True) if pair % 2 == 0 else (True, False):
                layer.shadow = shadow if shadow_on else None
                (on if shadow_on else off).append(_block(layer, x, calls))
        shadow.flush()
        runs = shadow.sampled - runs_before
        lat_sum, lat_n = (after - before for after, before in zip(_latency(registry, labels), lat_before))
        # Outside the pairs: where the hook's host time goes (timing it adds its own cost).
        hook_off = _hook_host_time(layer, x, None, calls)[0]
        hook_plain, hook_sampled = _hook_host_time(layer, x, shadow, calls)
        shadow.flush()
        layer.shadow = None
        extra_text, scaled_text, extra_verdict = "-", "-", "-"
        if args.sample_blocks:
            cost, cost_low, cost_high = _sampled_call_extra(layer, x, args.backend, args.sample_blocks, calls)
            extra_text = f"{cost:.2f} ({cost_low:.2f} .. {cost_high:.2f})"
            pct = [100 * args.rate * c for c in (cost, cost_low, cost_high)]
            scaled_text = f"{pct[0]:.2f}% ({pct[1]:.2f}% .. {pct[2]:.2f}%)"
            extra_verdict = verdict(args.rate * cost_low, args.rate * cost_high, 0.01)
        overhead, low, high = median_interval([b / a - 1 for a, b in zip(off, on)])
        t_off = median_interval(off)[0]
        worst = max(worst, overhead)
        shadow_s = lat_sum / max(lat_n, 1)
        expected = args.rate * shadow_s / t_off
        sampled_text = "-" if hook_sampled is None else f"{1e6 * hook_sampled:.0f}"
        print(
            f"| {tokens} | {1e6 * t_off:.1f} | {100 * overhead:+.2f}% | {100 * low:+.2f}% .. {100 * high:+.2f}% | "
            f"{100 * (sum(on) / sum(off) - 1):+.2f}% | {100 * expected:.2f}% | {runs} of {args.blocks * calls} | "
            f"{1e6 * shadow_s:.1f} | {1e6 * hook_off:.2f} / {1e6 * hook_plain:.2f} / {sampled_text} | "
            f"{verdict(low, high, 0.01)} | {extra_text} | {scaled_text} | {extra_verdict} |",
            flush=True,
        )
    print(f"worst overhead {100 * worst:+.2f}% of layer time at rate {args.rate:g}")
    if args.profile_sampled:
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, config.hidden_size, device=device).to(torch.bfloat16)
            print(f"\n== {tokens} tokens: the hook's host time on sampled calls ({args.backend})")
            print(profile_sampled_hook(layer, x, args.backend, args.profile_sampled))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
