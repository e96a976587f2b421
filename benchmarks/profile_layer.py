"""Where the routed-expert layer's time goes: one torch.profiler trace per (slice, tokens), the
kernels' device time summed by name, and the host time of one eager call beside it.

    python -m benchmarks.profile_layer --cells ep8:128,tp8:256,ep8:8192
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from moe_backend.experts import routed_experts
from moe_backend.testing import random_fp8_weights

SLICES = {"ep8": (32, 2048), "tp8": (256, 256)}  # local experts, intermediate
HIDDEN, GLOBAL_EXPERTS, TOPK = 7168, 256, 8


def profile_cell(
    slice_name: str, tokens: int, weights: dict, reps: int = 5, host_profile: bool = False, routing: str = "uniform"
) -> None:
    from torch.profiler import ProfilerActivity, profile

    from moe_backend.testing import parse_routing_exponent, random_topk

    e, inter = SLICES[slice_name]
    w13, w13_s, w2, w2_s = weights[slice_name]
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    if routing == "uniform":
        topk_w, topk_ids = torch.rand(tokens, GLOBAL_EXPERTS, device="cuda").topk(TOPK, dim=-1)
        topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).float()
    else:  # Zipf-like popularity (bench_layer's routing; EP8's local experts are ids 0-31 here)
        topk_w, topk_ids = random_topk(tokens, GLOBAL_EXPERTS, TOPK, parse_routing_exponent(routing), tokens, "cuda")

    def call():
        return routed_experts(x, w13, w13_s, w2, w2_s, topk_w, topk_ids, num_global_experts=GLOBAL_EXPERTS)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    host_reps = 50
    t0 = time.perf_counter()
    for _ in range(host_reps):
        call()
    host_us = (time.perf_counter() - t0) / host_reps * 1e6  # launch-bound part only: no sync inside
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) / host_reps * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    by_name: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            by_name[evt.name[:70]] += evt.device_time_total / reps
            count[evt.name[:70]] += 1
    gpu_us = sum(by_name.values())
    print(
        f"== {slice_name} {routing} T={tokens}: GPU kernels {gpu_us:.1f} us, host issue {host_us:.1f} us, "
        f"eager wall {wall_us:.1f} us, launches {sum(count.values()) // reps}"
    )
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:14]:
        print(f"   {us:8.1f} us  x{count[name] // reps:<3d} {name}")
    if host_profile:
        import cProfile
        import io
        import pstats

        prof_host = cProfile.Profile()
        prof_host.enable()
        for _ in range(host_reps):
            call()
        prof_host.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        for order in ("tottime", "cumulative"):
            pstats.Stats(prof_host, stream=text).sort_stats(order).print_stats(22)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="ep8:128,tp8:128,tp8:256,ep8:2048")
    p.add_argument("--host", action="store_true", help="also a cProfile of the host side (tottime)")
    p.add_argument("--routing", default="uniform", help="uniform or zipf:A (Zipf-like expert popularity)")
    args = p.parse_args(argv)
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
    weights = {}
    for name in sorted({s for s, _ in cells}):
        e, inter = SLICES[name]
        weights[name] = (*random_fp8_weights(e, 2 * inter, HIDDEN), *random_fp8_weights(e, HIDDEN, inter))
    for slice_name, tokens in cells:
        profile_cell(slice_name, tokens, weights, host_profile=args.host, routing=args.routing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
