"""The prefill layer against DeepGEMM's pair once the board is warm: each round, side by side, the
layer called eagerly (as `bench_layer` times prefill), the same call replayed from a CUDA graph,
and DeepGEMM's contiguous w13 and w2 on the same rows (graph replays), every figure a do_bench
median (L2 flushed); then the host's enqueue time of one eager call (the device idle before it), a
profiler sum of the layer's kernels, and a kernel-by-kernel trace taken after half a second of calls
(the warm board's durations). Per-round figures are printed, so a first round on a cool
board shows apart from the rest.

    python -m lab.prefill_steady [--cells ep8:8192:uniform,ep8:16384:uniform] [--rounds 7]
"""

from __future__ import annotations

import argparse
import io
import statistics

DEFAULT_CELLS = "ep8:8192:uniform,ep8:16384:uniform,ep8:8192:zipf:0.6"


def main(argv: list[str] | None = None) -> int:
    import torch
    import triton

    from benchmarks import _peers, bench_layer
    from lab._layer_cells import host_enqueue_us, layer_and_dg_pair
    from lab.prefill_launch_gaps import gap_trace
    from moe_backend.testing import capture_graph

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=DEFAULT_CELLS, help="slice:tokens:routing,...")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    log = io.StringIO()
    loaded, _ = _peers.load_peers(log)
    weights = {}
    for cell in args.cells.split(","):
        layer, dg_graphs, keep = layer_and_dg_pair(cell, weights, loaded.get("dg"), log)
        fns = {"eager": layer, "graph": capture_graph(layer)[0], **dg_graphs}
        samples = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                samples[name].append(1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
        host = host_enqueue_us(layer)
        gpu_us, _ = bench_layer.gpu_kernel_us(layer, 5)
        # Kernel by kernel on the warm board: half a second of calls, then a traced few (L2 flushed).
        triton.testing.do_bench(layer, warmup=10, rep=500)
        warm = gap_trace(layer, calls=5)
        med = {name: statistics.median(v) for name, v in samples.items()}
        pair = med.get("dg w13", 0.0) + med.get("dg w2", 0.0)
        print(f"{cell}: host enqueue per eager call {host:.0f} µs; profiler kernel sum {gpu_us:.1f} µs")
        for name, v in samples.items():
            print(f"  {name:8s} median {med[name]:8.1f}  rounds " + " ".join(f"{t:.1f}" for t in v))
        print(
            f"  warm trace: span {warm.get('span_us', 0):.1f}, kernels {warm.get('busy_us', 0):.1f}: "
            + ", ".join(f"{n} {d:.1f}" for n, d in warm.get("durations", []))
        )
        if pair:
            print(
                f"  eager / DG pair {med['eager'] / pair:.3f}; graph / DG pair {med['graph'] / pair:.3f} "
                f"(DG pair {pair:.1f} µs)",
                flush=True,
            )
        del fns, dg_graphs, keep
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
