"""Device sweep: at decode batches of 1-32 tokens, does splitting K (or narrower n-tiles) fill the
GPU and make the whole routed layer faster?

Why: the decode tiles come from tables tuned with every expert holding rows (m rows per expert,
all E experts). At T = 1 only T * k = 8 slots are routed: TP8's GEMM1 (N = 512) then has
8 experts x 4 n-tiles of 128 = 32 work units for 132 SMs, EP8's (N = 4096) about one local
expert's 32, so each busy SM streams ~0.9 MB of weights alone and the layer sits at 20-48% of
its memory floor (docs/benchmarks.md, the layer table). Splitting K into 2-8 slices (fp32 partial
sums that SiLU*up quant and the combine add) or narrower n-tiles multiply the units that stream
weights at once; narrower n-tiles lost (BLOCK_N 32 and 16 by 5-25%), so the split is swept here.

For each (slice, tokens, routing) the whole routed pipeline (`plan_execution.run_plan`, bf16 x)
is timed as a CUDA-graph replay under the policy's decode plan and variants that change only
SPLIT_K (and BLOCK_N) of GEMM1 and/or GEMM2, rounds interleaved; every variant's output is
compared with the policy plan's (rel err). "units" counts GEMM1's work units at the routing
drawn (active local experts x n-tiles).

    python -m lab.sweep_small_batch                       # GPU, about two minutes
    python -m lab.sweep_small_batch --list                # CPU: the variants
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lab._plan_variants import SLICES, cell_inputs, slice_plan, slice_weights, time_plans

# name -> (GEMM1 changes, GEMM2 changes) to the policy plan's Triton configs. The policy plan lets
# a GEMM split K where its rule says (dispatch_thresholds.json "split_k"), the kernel cutting as
# many slices as the tiles holding rows need; the variants pin the slices (SPLIT_MIN_UNITS 0).
PIN = {"SPLIT_MIN_UNITS": 0}
VARIANTS = {
    "policy": ({}, {}),
    "nosplit": ({"SPLIT_K": 1}, {"SPLIT_K": 1}),
    "g1s2": ({"SPLIT_K": 2, **PIN}, {"SPLIT_K": 1}),
    "g1s4": ({"SPLIT_K": 4, **PIN}, {"SPLIT_K": 1}),
    "g1s8": ({"SPLIT_K": 8, **PIN}, {"SPLIT_K": 1}),
    "g1n128s8": ({"BLOCK_N": 128, "SPLIT_K": 8, **PIN}, {"SPLIT_K": 1}),
    "g1n64s4": ({"BLOCK_N": 64, "SPLIT_K": 4, **PIN}, {"SPLIT_K": 1}),
}
# With --tiles: GEMM1's and GEMM2's pipeline depth, warps and tile orientation, where few experts
# hold the batch's rows (the tables were tuned with every expert busy).
TILE_VARIANTS = {
    "g1st4": ({"num_stages": 4}, {}),
    "g1st5": ({"num_stages": 5}, {}),
    "g1ku1": ({"K_UNROLL": 1}, {}),
    "g1noswap": ({"SWAP_AB": False, "K_UNROLL": 1}, {}),
    "g1w8": ({"num_warps": 8}, {}),
    "g2st4": ({}, {"num_stages": 4}),
    "g2st5": ({}, {"num_stages": 5}),
    "g2ku1": ({}, {"K_UNROLL": 1}),
    "g12st4": ({"num_stages": 4}, {"num_stages": 4}),
    "g1n64": ({"BLOCK_N": 64}, {}),
    "g1n64st4": ({"BLOCK_N": 64, "num_stages": 4}, {}),
    "g1n32": ({"BLOCK_N": 32, "SWAP_AB": False, "K_UNROLL": 1}, {}),
    "g1n32st4": ({"BLOCK_N": 32, "SWAP_AB": False, "K_UNROLL": 1, "num_stages": 4}, {}),
}
# Plan variants beside the config ones, where the policy plan has the step they undo: the SiLU*up
# quant kernel between the GEMMs instead of GEMM2 computing its activations itself; the kernels
# launched normally instead of as dependents of each other.
PLAN_VARIANTS = {"act_apart": {"silu_in_gemm2": False}, "launch_apart": {"dependent_launch": False}}


def _with(g, changes: dict):
    if not changes:
        return g
    if g.provider != "triton":
        return None  # only the Triton configs are varied
    if (g.k // 128) % changes.get("SPLIT_K", 1):
        return None  # K/128 not divisible into that many slices (TP8's GEMM2: K = 256)
    cfg = dict(g.config) | changes
    return dataclasses.replace(g, config=tuple(sorted(cfg.items())))


def variants(plan, tiles: bool = False) -> dict:
    out = {}
    for name, (c1, c2) in (VARIANTS | TILE_VARIANTS if tiles else VARIANTS).items():
        g1, g2 = _with(plan.gemm1, c1), _with(plan.gemm2, c2)
        if g1 is not None and g2 is not None:
            out[name] = dataclasses.replace(plan, gemm1=g1, gemm2=g2, graph_plan=None)
    for name, changes in PLAN_VARIANTS.items():
        if any(getattr(plan, field) != value for field, value in changes.items()):
            out[name] = dataclasses.replace(plan, graph_plan=None, **changes)
    return out


def candidate_plan(slice_name: str, tokens: int, dev, split_changes: dict):
    """The decode plan made with dispatch_thresholds.json's `split_k` entry changed by
    `split_changes` (a candidate rule), the plan cache cleared before and after."""
    from unittest import mock

    from moe_backend.dispatch import gemm_choice
    from moe_backend.dispatch.plan import clear_plan_cache

    base = gemm_choice.thresholds()
    patched = base | {"split_k": base["split_k"] | split_changes}
    clear_plan_cache()
    try:
        with mock.patch.object(gemm_choice, "thresholds", lambda: patched):
            return slice_plan(slice_name, tokens, "decode", dev)
    finally:
        clear_plan_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1,2,4,8,16,32")
    p.add_argument("--routing", default="0.6,0", help="Zipf exponents (0: uniform)")
    p.add_argument("--list", action="store_true", help="print the variants only (no GPU)")
    p.add_argument("--tiles", action="store_true", help="add the pipeline-depth / warps / orientation variants")
    p.add_argument("--slices", default="ep8,tp8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated variant names to time (default: all)")
    p.add_argument(
        "--candidate-split",
        default="",
        help='JSON changes to dispatch_thresholds.json "split_k" (a list: one variant each): adds "candidate[N]"',
    )
    p.add_argument(
        "--busiest-rank",
        action="store_true",
        help="EP8: bench_layer's routing (its seed; the local experts are the busiest rank's)",
    )
    args = p.parse_args(argv)
    if args.list:
        for name, (c1, c2) in (VARIANTS | TILE_VARIANTS if args.tiles else VARIANTS).items():
            print(f"{name:12s} GEMM1 {c1 or 'as planned'}  GEMM2 {c2 or 'as planned'}")
        for name, changes in PLAN_VARIANTS.items():
            print(f"{name:12s} the policy plan with {changes}")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU (--list runs on CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    candidates = json.loads(args.candidate_split) if args.candidate_split else []
    candidates = candidates if isinstance(candidates, list) else [candidates]
    keep = {"policy", *args.only.split(",")} if args.only else set()
    table = []
    for slice_name, (e, inter) in SLICES.items():
        if slice_name not in args.slices.split(","):
            continue
        weights = slice_weights(slice_name)
        for tokens in map(int, args.tokens.split(",")):
            for alpha in map(float, args.routing.split(",")):
                x, tw, ti = cell_inputs(tokens, alpha, dev)
                if args.busiest_rank:
                    from benchmarks.bench_layer import cell_routing

                    tw, ti, _ = cell_routing(slice_name, f"zipf:{alpha}" if alpha else "uniform", tokens, 0, "busiest")
                plans = variants(slice_plan(slice_name, tokens, "decode", dev), args.tiles)
                for i, change in enumerate(candidates):
                    plans[f"candidate{i or ''}"] = candidate_plan(slice_name, tokens, dev, change)
                if keep:
                    plans = {n: plan for n, plan in plans.items() if n in keep or n.startswith("candidate")}
                local = ti[(ti >= 0) & (ti < e)]
                active = int(local.unique().numel())
                times, outs = time_plans(plans, (x, *weights, tw, ti), rep_ms=20, warmup_ms=5, rounds=args.rounds)
                ref = outs["policy"]
                base = times["policy"]["us"]
                for name, vp in plans.items():
                    bn1 = dict(vp.gemm1.config).get("BLOCK_N", 0) if vp.gemm1.provider == "triton" else 0
                    units = active * -(-2 * inter // bn1) if bn1 else 0
                    err = float((outs[name] - ref).norm() / ref.norm().clamp_min(1e-30))
                    us = times[name]["us"]
                    table.append((slice_name, tokens, alpha, int(local.numel()), name, units, us, us / base, err))
                    print(
                        f"{slice_name} T={tokens} zipf={alpha} slots={int(local.numel())} {name:11s} units {units:4d} "
                        f"{us:8.1f} us ({times[name]['lo']:.1f}-{times[name]['hi']:.1f}) x{us / base:.3f} "
                        f"err {err:.1e} | {vp.describe()}",
                        flush=True,
                    )
                del outs
        torch.cuda.empty_cache()
    print("\n| slice | T | zipf | local slots | variant | GEMM1 units | µs | vs policy | rel err vs policy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]:.1f} | {r[7]:.3f} | {r[8]:.1e} |")
    print("\nfastest per cell (slice T zipf: variant µs, vs policy):")
    for cell in dict.fromkeys(r[:3] for r in table):
        best = min((r for r in table if r[:3] == cell), key=lambda r: r[6])
        policy_us = next(r[6] for r in table if r[:3] == cell and r[4] == "policy")
        print(f"{cell[0]} {cell[1]} {cell[2]}: {best[4]} {best[6]:.1f} us (policy {policy_us:.1f}) x{best[7]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
