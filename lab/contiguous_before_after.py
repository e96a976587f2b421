"""Our CUDA contiguous GEMM against the same kernel built from an earlier copy of the headers, at
the layer's prefill shapes: the segments a DeepSeek-V3 batch of T tokens gives one slice's experts
(top-8 of 256, uniform or Zipf routing), each padded to 128 rows, the config the plan picks
(`select_config` over the layout's rows). GEMM1 (w13) and GEMM2 (w2) as plain bf16-output GEMMs on
rows already in the layout; CUDA-graph replays timed in interleaved rounds; the two builds'
outputs must match bit for bit and the padding rows stay untouched.

    python -m lab.contiguous_before_after --old DIR [--cells ep8:8192,tp8:8192] [--routings uniform]

DIR holds the earlier *.cuh files (e.g. `git show REV:moe_backend/cuda/epilogue.cuh`, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lab._prebuild import compile_all, old_launcher, old_spec

SHAPES = {  # slice -> local experts, [(gemm, N, K)]
    "ep8": (32, [("w13", 4096, 7168), ("w2", 7168, 2048)]),
    "tp8": (256, [("w13", 512, 7168), ("w2", 7168, 256)]),
}
GLOBAL_EXPERTS, TOPK, ALIGN = 256, 8, 128


def segment_ids(counts) -> list[int]:
    ids = []
    for e, c in enumerate(counts.tolist()):
        ids += [e] * c + [-1] * (-c % ALIGN)
    return ids


def main(argv=None) -> int:
    import torch

    from moe_backend import testing
    from moe_backend.cuda import launch
    from moe_backend.cuda.grouped_gemm_contiguous import grouped_gemm_contiguous
    from moe_backend.cuda.heuristic import select_config
    from moe_backend.quant import quantize_fp8_per_token_group

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, type=Path)
    p.add_argument("--cells", default="ep8:8192,ep8:16384,tp8:2048,tp8:8192")
    p.add_argument("--routings", default="uniform,zipf:0.6")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cells = []
    for cell in args.cells.split(","):
        slice_name, tokens = cell.split(":")[0], int(cell.split(":")[1])
        for routing in args.routings.split(","):
            _, ids = testing.random_topk(tokens, GLOBAL_EXPERTS, TOPK, testing.parse_routing_exponent(routing), tokens)
            cells.append((slice_name, tokens, routing, segment_ids(testing.expert_counts(ids, SHAPES[slice_name][0]))))
    specs = []
    for slice_name, _, _, layout in cells:
        for _, n, k in SHAPES[slice_name][1]:
            spec = launch.kernel_spec(n, k, select_config(len(layout), n, sms, k=k))
            specs += [spec, old_spec(spec, args.old)]
    compile_all(specs)
    print("| slice | T | routing | gemm | rows (padding) | config | before µs | after µs | after/before | same |")
    print("|---|---:|---|---|---|---|---:|---:|---:|---|")
    for slice_name, tokens, routing, layout in cells:
        num_local, gemms = SHAPES[slice_name]
        m = len(layout)
        expert_ids = torch.tensor(layout, dtype=torch.int32, device="cuda")
        pad = expert_ids < 0
        for gemm, n, k in gemms:
            b, bs = testing.random_fp8_weights(num_local, n, k)
            a, a_s = quantize_fp8_per_token_group(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            cfg = select_config(m, n, sms, k=k)
            outs = [torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2)]
            fns = {
                "before": old_launcher(
                    launch.kernel_spec(n, k, cfg),
                    args.old,
                    m,
                    n,
                    cfg,
                    launch.kernel_args(a, a_s, b, bs, expert_ids, outs[0], cfg),
                ),
                "after": lambda a=a, a_s=a_s, b=b, bs=bs, o=outs[1], cfg=cfg: grouped_gemm_contiguous(
                    a, a_s, b, bs, expert_ids, o, config=cfg
                ),
            }
            for fn in fns.values():
                fn()
            torch.cuda.synchronize()
            same = torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
            pad_ok = bool(torch.isnan(outs[1][pad]).all()) and bool(torch.isfinite(outs[1][~pad]).all())
            graphs = {name: testing.capture_graph(fn)[0] for name, fn in fns.items()}
            t = {name: v["us"] for name, v in testing.interleaved_us(graphs, rounds=args.rounds).items()}
            print(
                f"| {slice_name} | {tokens} | {routing} | {gemm} | {m} ({int(pad.sum())}) | "
                f"n{cfg.block_n} c{cfg.cluster}{cfg.multicast} g{cfg.group_m} | {t['before']:.1f} | "
                f"{t['after']:.1f} | {t['after'] / t['before']:.3f} | {same and pad_ok} |",
                flush=True,
            )
            del graphs, fns, a, a_s, b, bs, outs
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
