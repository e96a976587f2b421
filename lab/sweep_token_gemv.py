"""Device sweep of the layout-free decode experiment (`lab/token_experts.py`) against the
contiguous pipeline at the same routing, both CUDA-graphed, for the DeepSeek-V3 EP8 and TP8
slices: the launch configs at T = 1 and 8, then every token count with the best config. Checks
each output against the reference on the CPU in the same run.

    python -m lab.sweep_token_gemv --json $OUT/token_gemv.json      # GPU, about a minute
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

SLICES = {"ep8": (32, 2048), "tp8": (256, 256)}  # local experts, intermediate
HIDDEN, GLOBAL_EXPERTS, TOPK = 7168, 256, 8
# (up_block_n, down_block_n, num_warps, num_stages, flat_down, up_split_k)
CANDIDATES = [
    *itertools.product((16, 32, 64), (16, 32, 64), (4,), (4,), (True, False), (1, 4, 8)),
    *itertools.product((16, 32), (16, 32), (2,), (4,), (True, False), (4, 8)),
]


def main() -> None:
    from moe_backend import reference
    from moe_backend.dispatch import Policy
    from moe_backend.dispatch.plan import make_plan
    from lab.token_experts import DEFAULT_CONFIG, TokenGemvConfig, token_experts
    from moe_backend.plan_execution import run_plan
    from moe_backend.testing import random_fp8_weights, random_topk, time_graph

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,2,4,8,16,32")
    p.add_argument("--sweep-tokens", default="1,8")
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", default=None, help="print the docs table of a run's --json (no GPU)")
    args = p.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            print(render(json.load(f)))
        return
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    results = {"device": torch.cuda.get_device_name(), "sweep": [], "cells": []}
    for slice_name, (e, inter) in SLICES.items():
        w13, w13_s = random_fp8_weights(e, 2 * inter, HIDDEN)
        w2, w2_s = random_fp8_weights(e, HIDDEN, inter)
        cpu_w = [t.cpu() for t in (w13, w13_s, w2, w2_s)]
        summed: dict = {}
        for sweep_t in map(int, args.sweep_tokens.split(",")):
            x = torch.randn(sweep_t, HIDDEN, device=dev, dtype=torch.bfloat16)
            tw, ti = random_topk(sweep_t, GLOBAL_EXPERTS, TOPK, 0.6, seed=sweep_t, device=dev)
            if slice_name == "ep8":  # at least one local slot per token, as a busy rank sees
                ti[:, 0] = torch.arange(sweep_t, device=dev, dtype=ti.dtype) % e
            timed = []
            for cand in CANDIDATES:
                cfg = TokenGemvConfig(*cand)
                try:
                    us = time_graph(
                        lambda cfg=cfg: token_experts(x, None, w13, w13_s, w2, w2_s, tw, ti, 0, False, None, cfg)
                    )
                except Exception as exc:  # a config that does not compile or fit: not a candidate
                    print(f"{slice_name} {cand}: {type(exc).__name__} {str(exc)[:120]}", flush=True)
                    us = float("inf")
                timed.append((us, cand))
                summed[cand] = summed.get(cand, 0.0) + us
                results["sweep"].append({"slice": slice_name, "tokens": sweep_t, "config": cand, "us": us})
            timed.sort()
            default_us = next(us for us, c in timed if TokenGemvConfig(*c) == DEFAULT_CONFIG)
            print(
                f"{slice_name} T={sweep_t}: best {timed[0][1]} {timed[0][0]:.1f} us, 2nd {timed[1][1]} "
                f"{timed[1][0]:.1f}, default {default_us:.1f}",
                flush=True,
            )
        best = TokenGemvConfig(*min(summed, key=summed.get))  # fastest over the sweep's token counts
        print(f"{slice_name}: tuned {best}", flush=True)
        for tokens in map(int, args.tokens.split(",")):
            for alpha in (0.6, 0.0):
                x = torch.randn(tokens, HIDDEN, device=dev, dtype=torch.bfloat16)
                tw, ti = random_topk(tokens, GLOBAL_EXPERTS, TOPK, alpha, seed=tokens, device=dev)
                plan = make_plan(
                    Policy(graph_max_tokens=0),
                    num_tokens=tokens,
                    topk=TOPK,
                    num_experts=e,
                    num_global_experts=GLOBAL_EXPERTS,
                    hidden=HIDDEN,
                    intermediate=inter,
                    device=dev,
                    phase="decode",
                    kernel="triton",
                )
                outs = {}

                def keep(name):
                    return lambda out: outs.__setitem__(name, out.float().cpu())

                us_contig = time_graph(
                    lambda: run_plan(plan, x, None, w13, w13_s, w2, w2_s, tw, ti, 0, False),
                    on_output=keep("contiguous"),
                )
                us_default = time_graph(
                    lambda: token_experts(x, None, w13, w13_s, w2, w2_s, tw, ti, 0, False), on_output=keep("default")
                )
                us_best = time_graph(
                    lambda: token_experts(x, None, w13, w13_s, w2, w2_s, tw, ti, 0, False, None, best),
                    on_output=keep("best"),
                )
                local = ti.long().cpu()
                local = torch.where(local < e, local, -1)
                if tokens <= 8:  # the CPU reference; above, the token path against the contiguous one
                    ref = reference.routed_experts(x.cpu(), *cpu_w, tw.cpu(), local).float()
                else:
                    ref = outs.pop("contiguous")
                norm = ref.norm().clamp_min(1e-30)
                errs = {k: float((v - ref).norm() / norm) for k, v in outs.items()}
                cell = dict(
                    slice=slice_name,
                    tokens=tokens,
                    zipf=alpha,
                    contiguous_us=us_contig,
                    token_default_us=us_default,
                    token_best_us=us_best,
                    best=list(best.__dict__.values()),
                    errs=errs,
                    local_slots=int((local >= 0).sum()),
                )
                results["cells"].append(cell)
                print(
                    f"{slice_name} T={tokens:3d} zipf={alpha}: contiguous {us_contig:7.1f} us | tokens default "
                    f"{us_default:7.1f} best {us_best:7.1f} (x{us_best / us_contig:.2f}) | local slots "
                    f"{cell['local_slots']} | err " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()),
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def render(results: dict) -> str:
    """The docs/benchmarks.md table of a run: the token path (tuned config) beside the contiguous
    pipeline at the same routing, both CUDA-graph replays."""
    lines = [
        "| slice | T | routing | local slots | contiguous pipeline µs | token_experts µs | ratio | rel err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cells"]:
        err = max(c["errs"].values())
        routing = f"zipf:{c['zipf']}" if c["zipf"] else "uniform"
        lines.append(
            f"| {c['slice'].upper()} | {c['tokens']} | {routing} | {c['local_slots']} | {c['contiguous_us']:.1f} | "
            f"{c['token_best_us']:.1f} | {c['token_best_us'] / c['contiguous_us']:.2f} | {err:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
