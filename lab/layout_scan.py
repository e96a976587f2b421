"""Device check of the contiguous layout build at prefill sizes: the package's build against the
same kernels with the scan stepping over 16 chunks at a time (its earlier step), over all chunks
up to 128 whatever the tile (no tile budget), and with other chunks of slots per program,
CUDA-graph replays in interleaved rounds (do_bench medians, L2 flushed); every variant's layout
must equal the package's tensor for tensor.

    python -m lab.layout_scan [--slices ep8,tp8] [--tokens 2048,8192,16384] [--rounds 5]   # GPU
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    import torch
    import triton

    from benchmarks import bench_layer
    from moe_backend.kernels import build_layout
    from moe_backend.testing import capture_graph, interleaved_us

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", default="ep8,tp8")
    p.add_argument("--tokens", default="2048,8192,16384")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    shipped_block = build_layout._scan_block
    variants = {
        "package": (None, shipped_block),
        "scan 16, chunks of 1024": (1024, lambda n, e: 16),
        "scan 16": (None, lambda n, e: 16),
        "scan of all, no tile budget": (None, lambda n, e: max(16, min(128, triton.next_power_of_2(n)))),
        "chunks of 512": (512, shipped_block),
        "chunks of 1024": (1024, shipped_block),
        "chunks of 256": (256, shipped_block),
    }
    ok = True
    print("| slice | tokens (Zipf 0.6) | variant | µs (lo-hi) | / package | same layout |")
    print("|---|---|---|---:|---:|---|")
    for slice_name in args.slices.split(","):
        num_local = bench_layer.SLICES[slice_name][0]
        for tokens in map(int, args.tokens.split(",")):
            _, topk_ids, _ = bench_layer.cell_routing(slice_name, "zipf:0.6", tokens, 0, "busiest")
            fns, layouts = {}, {}
            for name, (chunk, block) in variants.items():

                def build(chunk=chunk, block=block):
                    build_layout._scan_block = block
                    try:
                        return build_layout.build_contiguous_layout(
                            topk_ids, num_local, alignment=128, slots_per_program=chunk
                        )
                    finally:
                        build_layout._scan_block = shipped_block

                layouts[name] = build()
                fns[name] = capture_graph(build)[0]
            times = interleaved_us(fns, rounds=args.rounds)
            ref = layouts["package"]
            for name in variants:
                same = all(torch.equal(getattr(layouts[name], f), getattr(ref, f)) for f in ref.__dataclass_fields__)
                ok &= same
                t = times[name]
                print(
                    f"| {slice_name} | {tokens} | {name} | {t['us']:.1f} ({t['lo']:.1f}-{t['hi']:.1f}) | "
                    f"{t['us'] / times['package']['us']:.3f} | {'yes' if same else 'NO'} |",
                    flush=True,
                )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
