"""Where a graphed decode layer call's time goes, kernel by kernel, at `bench_layer`'s cells.

Per cell (slice, tokens, routing) the layer call `bench_layer` times (same routing and seed, EP8's
local experts the busiest rank's) is captured in a CUDA graph; its replay is timed as there
(do_bench median, L2 flushed), then a torch.profiler trace of replays, each after the same flush
(`lab.prefill_launch_gaps.gap_trace`), gives per replay (the median one) each kernel's duration,
the idle time before it, and the span from the first kernel's start to the last kernel's end.

    python -m lab.decode_trace [--cells ep8:1:zipf:0.6,ep8:8:uniform,tp8:32:zipf:0.6] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

DEFAULT_CELLS = "ep8:1:zipf:0.6,ep8:1:uniform,ep8:8:uniform,ep8:8:zipf:0.6,tp8:32:zipf:0.6,tp8:32:uniform"


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.bench_layer import GLOBAL_EXPERTS, HIDDEN, SLICES, cell_routing
    from lab.prefill_launch_gaps import gap_trace
    from moe_backend.experts import routed_experts
    from moe_backend.testing import capture_graph, expert_counts, random_fp8_weights, time_graph

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=DEFAULT_CELLS, help="slice:tokens:routing,...")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    weights = {}
    results = []
    for cell in args.cells.split(","):
        sl, tokens, routing = cell.split(":", 2)
        tokens = int(tokens)
        num_experts, inter = SLICES[sl]
        if sl not in weights:
            weights[sl] = (
                *random_fp8_weights(num_experts, 2 * inter, HIDDEN),
                *random_fp8_weights(num_experts, HIDDEN, inter),
            )
        topk_w, topk_ids, _ = cell_routing(sl, routing, tokens, 0, "busiest")
        live = int((expert_counts(topk_ids, num_experts) > 0).sum())
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)

        def fn(x=x, topk_w=topk_w, topk_ids=topk_ids, w=weights[sl]):
            return routed_experts(x, *w, topk_w, topk_ids, num_global_experts=GLOBAL_EXPERTS)

        us = time_graph(fn, warmup_ms=10, rep_ms=50)
        replay, _ = capture_graph(fn)
        tr = gap_trace(replay, calls=9)
        results.append(dict(cell=cell, live_experts=live, graph_us=us, **tr))
        print(
            f"{cell}: live experts {live}, graph replay {us:.1f} µs, span {tr['span_us']:.1f}, "
            f"kernels' sum {tr['busy_us']:.1f}",
            flush=True,
        )
        idle_before = [0.0] + [gap for _, gap in tr["gaps"]]
        for (name, dur), gap in zip(tr["durations"], idle_before, strict=True):
            print(f"    {gap:6.1f} idle, {dur:7.1f}  {name}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
