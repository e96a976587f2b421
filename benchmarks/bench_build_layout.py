"""Layout build from top-k ids: the torch twins (`moe_backend.reference`, ~15 small kernels) vs the Triton
builders (`kernels.build_layout`: one launch for decode, three for prefill), top-8 of 256 experts on
the EP8 slice (32 local experts) and the TP8 slice (all 256), contiguous layout on the static row
bound (segments padded to `--alignment`) and masked layout (max_m = T). CUDA-graph replay, median of
`triton.testing.do_bench`. Checks the kernel's layouts are bit-identical to the twins'. Also times
the fused permute_quant of bf16 x [T, 7168] into the static contiguous layout, one program per row
vs looping programs bounded by the device-side `used_rows` (the tail of the static bound skipped).

    python -m benchmarks.bench_build_layout --md $OUT/build_layout.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from moe_backend import ops
from moe_backend.kernels import build_layout
from moe_backend.reference import layouts
from moe_backend.testing import time_graph

GLOBAL_EXPERTS, TOPK, HIDDEN = 256, 8, 7168
SLICES = {"ep8": (32, 64), "tp8": (256, 0)}  # local experts, first local id
TOKENS = (1, 32, 128, 256, 2048, 8192, 16384)


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


def bench_one(num_local: int, start: int, num_tokens: int, alignment: int) -> dict:
    topk_ids = torch.rand(num_tokens, GLOBAL_EXPERTS, device="cuda").topk(TOPK, dim=-1).indices
    contiguous = dict(expert_start=start, alignment=alignment)
    twin_c = lambda: layouts.build_contiguous_layout(topk_ids, num_local, exact_size=False, **contiguous)  # noqa: E731
    kernel_c = lambda: build_layout.build_contiguous_layout(topk_ids, num_local, **contiguous)  # noqa: E731
    twin_m = lambda: layouts.build_masked_layout(topk_ids, num_local, expert_start=start)  # noqa: E731
    kernel_m = lambda: build_layout.build_masked_layout(topk_ids, num_local, expert_start=start)  # noqa: E731
    equal = _same(twin_c(), kernel_c()) and _same(twin_m(), kernel_m())
    layout = kernel_c()
    x = torch.randn(num_tokens, HIDDEN, device="cuda").bfloat16()
    per_row = lambda: ops.permute_quant(x, layout.src_token)  # noqa: E731
    bounded = lambda: ops.permute_quant(x, layout.src_token, used_rows=layout.expert_offsets[-1:])  # noqa: E731
    real = layout.src_token >= 0
    (q1, s1), (q2, s2) = per_row(), bounded()
    equal = equal and torch.equal(q1[real].view(torch.uint8), q2[real].view(torch.uint8))
    equal = equal and torch.equal(s1[real], s2[real])
    return dict(
        tokens=num_tokens,
        equal=equal,
        twin_c=time_graph(twin_c),
        kernel_c=time_graph(kernel_c),
        twin_m=time_graph(twin_m),
        kernel_m=time_graph(kernel_m),
        rows=layout.num_rows,
        used=int(layout.expert_offsets[-1]),
        pq_rows=time_graph(per_row),
        pq_used=time_graph(bounded),
    )


def table(results: dict, alignment: int) -> str:
    import triton

    lines = [
        f"## Layout build: torch twins vs Triton builders ({torch.cuda.get_device_name()})",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"{datetime.date.today().isoformat()}. Top-{TOPK} of {GLOBAL_EXPERTS} uniform; contiguous on the "
        f"static row bound, segments padded to {alignment}; masked max_m = T. CUDA-graph replay, median µs.",
        "",
        "| slice | T | contiguous twin | contiguous kernel | masked twin | masked kernel | rows used / bound | "
        "permute_quant per row | permute_quant used_rows | bit-equal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, rows in results.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['tokens']} | {r['twin_c']:.1f} | {r['kernel_c']:.1f} | {r['twin_m']:.1f} | "
                f"{r['kernel_m']:.1f} | {r['used']} / {r['rows']} | {r['pq_rows']:.1f} | {r['pq_used']:.1f} | "
                f"{'yes' if r['equal'] else '**NO**'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--md", default=None, help="also write the markdown table here")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--slices", default=",".join(SLICES))
    p.add_argument("--alignment", type=int, default=16)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {}
    for name in args.slices.split(","):
        results[name] = []
        for t in map(int, args.tokens.split(",")):
            r = bench_one(*SLICES[name], t, args.alignment)
            results[name].append(r)
            print(
                f"{name} T={t:6d}: contiguous twin {r['twin_c']:7.1f} us, kernel {r['kernel_c']:7.1f} us; masked "
                f"twin {r['twin_m']:7.1f} us, kernel {r['kernel_m']:7.1f} us; permute_quant per row "
                f"{r['pq_rows']:7.1f} us, used_rows {r['pq_used']:7.1f} us; equal={r['equal']}",
                file=sys.stderr,
                flush=True,
            )
            torch.cuda.empty_cache()
    md = table(results, args.alignment)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    return 0 if all(r["equal"] for rows in results.values() for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
