"""Where an eager call should stop replaying a CUDA graph: the layer called eagerly (as
`bench_layer` times prefill) under the policy with its graph threshold raised to cover the cell
(`graph`: the inputs copied into static buffers, the bucket's graph replayed, the rows copied out)
and with graphs off (`launches`: the plan's kernels launched one by one), in interleaved rounds
(do_bench medians, L2 flushed), outputs compared bit for bit. Then, as `bench_layer` times an
eager call's wall: back-to-back calls with one synchronize at the end (`bench_layer.wall_us`),
where a call whose host enqueue outlasts its device time shows; and the host's enqueue time of
one call (the device idle before it).

    python -m lab.eager_graph_threshold [--cells ep8:1024:uniform,ep8:2048:zipf:0.6] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses

DEFAULT_CELLS = ",".join(
    f"{sl}:{t}:{r}" for sl in ("ep8", "tp8") for t in (512, 1024, 2048, 4096) for r in ("uniform", "zipf:0.6")
)


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks import bench_layer
    from lab._layer_cells import host_enqueue_us, layer_cell
    from moe_backend.dispatch.policy import Policy
    from moe_backend.experts import routed_experts
    from moe_backend.testing import interleaved_us

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=DEFAULT_CELLS, help="slice:tokens:routing,...")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    weights = {}
    print(
        "| cell | graph µs (lo-hi) | launches µs (lo-hi) | launches / graph | back-to-back wall graph / launches µs "
        "| host enqueue graph / launches µs | same |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for cell in args.cells.split(","):
        _, tokens, w, topk_w, topk_ids, x = layer_cell(cell, weights)
        policies = {
            "graph": dataclasses.replace(Policy(), graph_max_tokens=max(tokens, Policy().graph_max_tokens)),
            "launches": dataclasses.replace(Policy(), graph_max_tokens=0),
        }
        outs = {name: torch.empty(tokens, bench_layer.HIDDEN, device="cuda", dtype=torch.bfloat16) for name in policies}

        def call(name, policies=policies, outs=outs, x=x, topk_w=topk_w, topk_ids=topk_ids, w=w):
            return routed_experts(
                x, *w["w13"], *w["w2"], topk_w, topk_ids, num_global_experts=bench_layer.GLOBAL_EXPERTS,
                policy=policies[name], out=outs[name],
            )  # fmt: skip

        fns = {name: (lambda name=name: call(name)) for name in policies}
        for fn in fns.values():
            fn()
            fn()
        torch.cuda.synchronize()
        same = torch.equal(outs["graph"].view(torch.int16), outs["launches"].view(torch.int16))
        t = interleaved_us(fns, rounds=args.rounds)
        wall = {name: bench_layer.wall_us(fn, 20) for name, fn in fns.items()}
        host = {name: host_enqueue_us(fn) for name, fn in fns.items()}
        med = {name: v["us"] for name, v in t.items()}
        g, lch = t["graph"], t["launches"]
        print(
            f"| {cell} | {med['graph']:.1f} ({g['lo']:.1f}-{g['hi']:.1f}) | {med['launches']:.1f} "
            f"({lch['lo']:.1f}-{lch['hi']:.1f}) | {med['launches'] / med['graph']:.3f} | "
            f"{wall['graph']:.0f} / {wall['launches']:.0f} | {host['graph']:.0f} / {host['launches']:.0f} | {same} |",
            flush=True,
        )
        del fns, outs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
