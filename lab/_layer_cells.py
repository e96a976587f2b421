"""Shared by the lab's whole-layer timings: one `bench_layer` cell's operands (the weights of its
slice, kept across cells; the routing `bench_layer` draws, the busiest EP8 rank's experts; bf16 x)."""

from __future__ import annotations


def layer_cell(cell: str, weights: dict) -> tuple:
    """`slice:tokens:routing` -> (slice, tokens, weights {"w13": (fp8, scale), "w2": ...},
    topk_weights, topk_ids, x); `weights` caches each slice's random FP8 weights."""
    import torch

    from benchmarks import bench_layer
    from moe_backend.testing import random_fp8_weights

    sl, tokens, routing = cell.split(":", 2)
    tokens = int(tokens)
    num_experts, inter = bench_layer.SLICES[sl]
    if sl not in weights:
        weights[sl] = {
            "w13": random_fp8_weights(num_experts, 2 * inter, bench_layer.HIDDEN),
            "w2": random_fp8_weights(num_experts, bench_layer.HIDDEN, inter),
        }
    topk_w, topk_ids, _ = bench_layer.cell_routing(sl, routing, tokens, 0, "busiest")
    x = torch.randn(tokens, bench_layer.HIDDEN, device="cuda", dtype=torch.bfloat16)
    return sl, tokens, weights[sl], topk_w, topk_ids, x


def host_enqueue_us(fn, calls: int = 10) -> float:
    """Median host time of one call of `fn` with the device idle before it (µs): how long the call
    takes to enqueue its work, not to run it."""
    import statistics
    import time

    import torch

    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - t0))
    torch.cuda.synchronize()
    return statistics.median(times)
