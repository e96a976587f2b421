"""Device probe of an eager call's host cost at decode sizes: wall time per call over back-to-back
calls of `routed_experts` (the graph-replay path), the same for its pieces timed apart (argument
checks, the plan look-up, the input copies, the replay, the output copy), and a cProfile of the
calls sorted by own time.

    python -m lab.host_cost [--slices tp8,ep8] [--tokens 1,8] [--calls 2000]   # GPU
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks import bench_layer
    from moe_backend import _checks, eager_graphs, experts
    from moe_backend.dispatch.policy import Policy
    from moe_backend.testing import random_fp8_weights

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", default="tp8,ep8")
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--profile-lines", type=int, default=25)
    args = p.parse_args(argv)
    hidden = bench_layer.HIDDEN
    print("| slice | T | piece | host µs per call |")
    print("|---|---|---|---:|")
    profiles = []
    for slice_name in args.slices.split(","):
        num_experts, inter = bench_layer.SLICES[slice_name]
        w13, w13_s = random_fp8_weights(num_experts, 2 * inter, hidden)
        w2, w2_s = random_fp8_weights(num_experts, hidden, inter)
        for tokens in map(int, args.tokens.split(",")):
            topk_w, topk_ids, _ = bench_layer.cell_routing(slice_name, "zipf:0.6", tokens, 0, "busiest")
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
            call = lambda: experts.routed_experts(  # noqa: E731
                x, w13, w13_s, w2, w2_s, topk_w, topk_ids, num_global_experts=256
            )
            for _ in range(3):
                call()  # the first runs eagerly, the second captures
            policy = Policy.from_env()

            def checks():
                h = _checks.check_token_activations(x, None)
                _checks.check_expert_weights(w13, w13_s, w2, w2_s, h)
                _checks.check_topk(topk_ids, topk_w, tokens)
                _checks.check_same_device(x=x, w13_fp8=w13, w2_fp8=w2, topk_ids=topk_ids, topk_weights=topk_w)

            plan = experts.routed_plan(x, w13, topk_ids, policy=Policy.from_env(), num_global_experts=256)
            io_ = next(iter(eager_graphs._static.values()))
            graph = next(g for _, g in eager_graphs._graphs.values() if g)

            def copies():
                io_.x[:tokens].copy_(x)
                io_.ids[:tokens].copy_(topk_ids)
                io_.weights[:tokens].copy_(topk_w)

            pieces = {
                "whole call": call,
                "argument checks": checks,
                "policy + plan look-up": lambda: experts.routed_plan(
                    x, w13, topk_ids, policy=Policy.from_env(), num_global_experts=256
                ),
                "current stream": lambda: torch.cuda.current_stream(x.device),
                "3 input copies": copies,
                "graph replay": graph.replay,
                "output clone": lambda: io_.out[:tokens].clone(),
            }
            for name, fn in pieces.items():
                print(f"| {slice_name} | {tokens} | {name} | {bench_layer.wall_us(fn, args.calls):.1f} |", flush=True)
            del policy, plan
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                call()
            torch.cuda.synchronize()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile_lines)
            profiles.append(f"== {slice_name} T={tokens}, {args.calls} calls\n{out.getvalue()}")
    print("\n".join(profiles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
