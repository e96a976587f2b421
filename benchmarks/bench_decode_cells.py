"""The decode cells that sit between memory- and compute-bound (64 and 128 rows per expert): our
Triton masked kernel, our CUDA contiguous kernel (segments of exactly `rows`), DeepGEMM 0.1.5
masked, side by side, each output checked against the fp32 reference in the same run.

    python -m benchmarks.bench_decode_cells [--rows 64,128] [--md OUT.md]
"""

from __future__ import annotations

import argparse
import sys

import torch

from moe_backend import reference
from moe_backend.constants import DEEPSEEK_V3_GEMM_SHAPES
from moe_backend.kernels.grouped_gemm_masked import grouped_gemm_masked
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from moe_backend.testing import time_graph

SHAPES = DEEPSEEK_V3_GEMM_SHAPES


def graph_us(fn) -> float:
    return time_graph(fn, warmup_ms=25, rep_ms=100)


def rel(out_rows, a, a_s, b, bs) -> float:
    want = reference._expert_gemm(a, a_s, b, bs).float()
    return float((out_rows.float() - want).norm() / want.norm())


def main(argv=None) -> int:
    from moe_backend.cuda.grouped_gemm_contiguous import grouped_gemm_contiguous as cuda_gemm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="64,128")
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)
    try:
        import deep_gemm as dg
    except ImportError:
        dg = None
    lines = [
        "| slice | gemm | rows/e | Triton masked µs | CUDA contig µs | DeepGEMM masked µs | best ours / DG "
        "| errs (T, C, DG) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sl, gemm, e, n, k in SHAPES:
        b, bs = quantize_fp8_blockwise(torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) / k**0.5)
        sfb = dg.transform_sf_into_required_layout(bs, n, k, (1, 128, 128), e, False) if dg else None
        for rows in [int(r) for r in args.rows.split(",")]:
            a, a_s = quantize_fp8_per_token_group(torch.randn(e, rows, k, device="cuda", dtype=torch.bfloat16))
            masked_m = torch.full((e,), rows, dtype=torch.int32, device="cuda")
            res = {}
            out = torch.full((e, rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            res["T"] = (
                graph_us(lambda: grouped_gemm_masked(a, a_s, b, bs, masked_m, out, expected_m=rows)),
                rel(out[1], a[1], a_s[1], b[1], bs[1]),
            )
            a2, s2 = a.view(e * rows, k), a_s.view(e * rows, k // 128)
            seg = -(-rows // 128) * 128
            if seg != rows:  # segments must start on 128-row boundaries: pad each with -1 rows
                a2 = torch.zeros(e, seg, k, device="cuda").to(a.dtype)
                a2[:, :rows] = a
                s2 = torch.ones(e, seg, k // 128, device="cuda")
                s2[:, :rows] = a_s
                a2, s2 = a2.view(e * seg, k), s2.view(e * seg, k // 128)
            ids = torch.full((e, seg), -1, dtype=torch.int32, device="cuda")
            ids[:, :rows] = torch.arange(e, dtype=torch.int32, device="cuda")[:, None]
            ids = ids.view(-1)
            out2 = torch.full((e * seg, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            try:
                res["C"] = (
                    graph_us(lambda: cuda_gemm(a2, s2, b, bs, ids, out2)),
                    rel(out2[seg : seg + rows], a[1], a_s[1], b[1], bs[1]),
                )
            except Exception as exc:
                print(f"cuda {sl} {gemm} {rows}: {exc}", file=sys.stderr)
            if dg is not None and rows % 64 == 0:
                out3 = torch.full((e, rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                sfa = dg.transform_sf_into_required_layout(a_s, rows, k, (1, 128, 128), e, True)
                res["DG"] = (
                    graph_us(lambda: dg.m_grouped_fp8_fp4_gemm_nt_masked((a, sfa), (b, sfb), out3, masked_m, rows)),
                    rel(out3[1], a[1], a_s[1], b[1], bs[1]),
                )
            best = min(v[0] for key, v in res.items() if key != "DG")
            ratio = f"{best / res['DG'][0]:.3f}" if "DG" in res else "–"
            cell = lambda key: f"{res[key][0]:.1f}" if key in res else "–"  # noqa: E731
            errs = ", ".join(f"{res[key][1]:.1e}" if key in res else "–" for key in ("T", "C", "DG"))
            lines.append(f"| {sl} | {gemm} | {rows} | {cell('T')} | {cell('C')} | {cell('DG')} | {ratio} | {errs} |")
            print(lines[-1], flush=True)
        b = bs = None
        torch.cuda.empty_cache()
    table = "\n".join(lines) + "\n"
    print(table)
    if args.md:
        open(args.md, "w").write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
