"""Per-token-group FP8 quant + permute into the contiguous layout: unfused (per_token_group_quant,
then `permute` of x_fp8 and of x_scale) vs fused (`permute_quant`), bf16 x [T, 7168], top-8 of 256
experts, on the EP8 slice (32 local experts) and the TP8 slice (all 256 local). CUDA-graph replay,
median of `triton.testing.do_bench` (L2 flushed between reps). Checks the outputs are bit-equal on
the rows holding a token (the fused kernel leaves padding rows unwritten).

    python -m benchmarks.bench_permute_quant --md $OUT/permute_quant.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from moe_backend import ops
from moe_backend.constants import DEEPSEEK_V3_EXPERTS, DEEPSEEK_V3_HIDDEN, DEEPSEEK_V3_TOPK, QUANT_BLOCK
from moe_backend.reference import build_contiguous_layout, permute
from moe_backend.testing import time_graph

HIDDEN, GLOBAL_EXPERTS, TOPK, GROUP = DEEPSEEK_V3_HIDDEN, DEEPSEEK_V3_EXPERTS, DEEPSEEK_V3_TOPK, QUANT_BLOCK
SLICES = {"ep8": 32, "tp8": 256}  # local experts, the first at global id 0
TOKENS = (128, 2048, 8192, 16384)


def unfused(x, layout):
    x_fp8, x_scale = ops.per_token_group_quant(x, GROUP)
    return permute(x_fp8, layout), permute(x_scale, layout)


def fused(x, layout):
    return ops.permute_quant(x, layout.src_token, GROUP)


def moved_gb(num_tokens: int, num_rows: int, real_rows: int) -> tuple[float, float]:
    """Bytes each path must move at least (bf16 read, fp8 + f32 scales written / re-read), in GB:
    the unfused gather copies every layout row, the fused kernel only the rows holding a token."""
    row_out = HIDDEN + HIDDEN // GROUP * 4
    unfused_bytes = num_tokens * (2 * HIDDEN + row_out) + num_rows * 2 * row_out
    fused_bytes = real_rows * (2 * HIDDEN + row_out)  # a source row read per real row (L2 may reuse)
    return unfused_bytes / 1e9, fused_bytes / 1e9


def bench_one(num_local: int, num_tokens: int) -> dict:
    x = torch.randn(num_tokens, HIDDEN, device="cuda").bfloat16()
    topk_ids = torch.rand(num_tokens, GLOBAL_EXPERTS, device="cuda").topk(TOPK, dim=-1).indices
    layout = build_contiguous_layout(topk_ids, num_local, alignment=ops.contiguous_alignment("triton", "cuda"))
    (uq, us), (fq, fs) = unfused(x, layout), fused(x, layout)
    real = layout.src_token >= 0
    equal = torch.equal(uq[real].view(torch.uint8), fq[real].view(torch.uint8)) and torch.equal(us[real], fs[real])
    real_rows = int(real.sum())
    uq = us = fq = fs = None
    unfused_us = time_graph(lambda: unfused(x, layout))
    fused_us = time_graph(lambda: fused(x, layout))
    gb_unfused, gb_fused = moved_gb(num_tokens, layout.num_rows, real_rows)
    return dict(
        tokens=num_tokens,
        rows=layout.num_rows,
        unfused_us=unfused_us,
        fused_us=fused_us,
        unfused_tbs=gb_unfused / unfused_us * 1e3,
        fused_tbs=gb_fused / fused_us * 1e3,
        equal=equal,
    )


def table(results: dict) -> str:
    import triton

    lines = [
        f"## permute_quant vs per_token_group_quant + permute ({torch.cuda.get_device_name()})",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"{datetime.date.today().isoformat()}. H = {HIDDEN}, top-{TOPK} of {GLOBAL_EXPERTS}, contiguous "
        f"layout (128-row segments); CUDA-graph replay, median. TB/s: the bytes each path must move "
        f"(`moved_gb`) over its time.",
        "",
        "| slice | T | layout rows | unfused µs | fused µs | speedup | unfused TB/s | fused TB/s | bit-equal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, rows in results.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['tokens']} | {r['rows']} | {r['unfused_us']:.1f} | {r['fused_us']:.1f} | "
                f"{r['unfused_us'] / r['fused_us']:.2f}x | {r['unfused_tbs']:.2f} | {r['fused_tbs']:.2f} | "
                f"{'yes' if r['equal'] else '**NO**'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--md", default=None, help="also write the markdown table here")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--slices", default=",".join(SLICES))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {}
    for name in args.slices.split(","):
        results[name] = []
        for t in map(int, args.tokens.split(",")):
            r = bench_one(SLICES[name], t)
            results[name].append(r)
            print(
                f"{name} T={t:6d} rows={r['rows']:7d}: unfused {r['unfused_us']:8.1f} us, fused "
                f"{r['fused_us']:8.1f} us, equal={r['equal']}",
                file=sys.stderr,
                flush=True,
            )
            torch.cuda.empty_cache()
    md = table(results)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    return 0 if all(r["equal"] for rows in results.values() for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
