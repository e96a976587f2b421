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


def layer_and_dg_pair(cell: str, weights: dict, dg, log) -> tuple:
    """One cell's layer call (eager `routed_experts`, called once) and DeepGEMM's contiguous w13
    and w2 on the same rows as CUDA-graph replays: (layer, {"dg w13": replay, "dg w2": replay},
    keep). Only the GEMMs DeepGEMM ran appear; `keep` owns the buffers the replays read, so it must
    live as long as they do. `dg` is the loaded DeepGEMM peer (`_peers.load_peers`)."""
    from benchmarks import _peer_layer, bench_layer
    from moe_backend.experts import routed_experts
    from moe_backend.quant import quantize_fp8_per_token_group
    from moe_backend.testing import capture_graph

    sl, _, w, topk_w, topk_ids, x = layer_cell(cell, weights)

    def layer():
        return routed_experts(x, *w["w13"], *w["w2"], topk_w, topk_ids, num_global_experts=bench_layer.GLOBAL_EXPERTS)

    layer()
    peers = bench_layer.slice_peers({"dg": dg}, sl, w, log)
    x_fp8, x_scale = quantize_fp8_per_token_group(x, 128)
    keep = _peer_layer.LayerPeers(x_fp8, x_scale, topk_ids, w, peers, log)
    keep.time_all(lambda f, warm, rep: (f(), 0.0)[1])
    pair = {
        f"dg {g}": capture_graph(keep.final_fns[("dg_contig", g)])[0]
        for g in ("w13", "w2")
        if ("dg_contig", g) in keep.final_fns
    }
    return layer, pair, keep
