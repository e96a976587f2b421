"""Shadow mode's cost to serving: the DeepSeek-V3 layer (EP8 slice + shared expert) timed with
shadow mode off and on at a given rate, in interleaved blocks (off, on, off, on, ...) so clock
drift lands on both. Prints the overhead as a percentage of layer time per batch size, and
`PASS`/`FAIL` against the 1% budget of docs/ab-testing.md.

    python -m benchmarks.bench_shadow_overhead [--backend triton] [--rate 0.01] [--tokens 128,4096]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _block(layer, x, calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        layer(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def main(argv=None) -> int:
    from prometheus_client import CollectorRegistry

    from moe_backend import MoEConfig
    from moe_backend.ab.backends import get_backend
    from moe_backend.ab.shadow import Shadow
    from moe_backend.layers import DeepseekV3MoE
    from moe_backend.testing import random_moe_weights

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="triton", help="the shadow backend (default triton; 'deepgemm' when present)")
    p.add_argument("--rate", type=float, default=0.01)
    p.add_argument("--tokens", default="128,4096")
    p.add_argument("--seconds", type=float, default=2.0, help="per block (default 2)")
    p.add_argument("--blocks", type=int, default=4, help="off/on pairs (default 4)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    reason = get_backend(args.backend).unavailable("cuda")
    if reason:
        print(f"shadow backend {args.backend!r} unavailable: {reason}", file=sys.stderr)
        return 2
    config = MoEConfig()
    layer = DeepseekV3MoE(config, expert_range=(0, 32), device="cuda")  # EP8 slice + the shared expert
    layer.load_weights(random_moe_weights(config, seed=0, experts=range(32), device="cuda"))
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; DeepSeek-V3 EP8 layer (32 of 256 experts "
        f"+ shared); shadow {args.backend}:{args.rate:g}; {args.blocks} interleaved off/on blocks of "
        f"~{args.seconds:g} s each"
    )
    print("| tokens | layer µs (off) | layer µs (on) | overhead | shadow runs | shadow µs (mean) | budget 1% |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, config.hidden_size, device="cuda").to(torch.bfloat16)
        warm = Shadow(f"{args.backend}:1.0", registry=CollectorRegistry())
        layer.shadow = warm
        _block(layer, x, 3)  # compile the layer's and the shadow backend's kernels outside the timing
        warm.flush()
        registry = CollectorRegistry()
        shadow = Shadow(f"{args.backend}:{args.rate}", seed=0, registry=registry)
        layer.shadow = None
        per_call = _block(layer, x, 20)
        calls = max(200, int(args.seconds / per_call))
        shadow.flush()
        runs_before = shadow.sampled
        off, on = [], []
        for _ in range(args.blocks):
            layer.shadow = None
            off.append(_block(layer, x, calls))
            layer.shadow = shadow
            on.append(_block(layer, x, calls))
        shadow.flush()
        layer.shadow = None
        t_off, t_on = statistics.median(off), statistics.median(on)
        overhead = t_on / t_off - 1
        worst = max(worst, overhead)
        runs = shadow.sampled - runs_before
        labels = {"layer": "0", "backend": args.backend, "phase": "decode" if tokens <= 256 else "prefill"}
        lat_sum = registry.get_sample_value("moe_backend_shadow_latency_seconds_sum", labels) or 0.0
        lat_n = registry.get_sample_value("moe_backend_shadow_latency_seconds_count", labels) or 1.0
        print(
            f"| {tokens} | {1e6 * t_off:.1f} | {1e6 * t_on:.1f} | {100 * overhead:+.2f}% | {runs} of "
            f"{args.blocks * calls} | {1e6 * lat_sum / lat_n:.1f} | {'PASS' if overhead <= 0.01 else 'FAIL'} |",
            flush=True,
        )
    print(f"worst overhead {100 * worst:+.2f}% of layer time at rate {args.rate:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
