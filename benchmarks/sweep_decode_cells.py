"""Config sweep on the decode cells where we trail DeepGEMM (128 rows per expert by default):
Triton masked candidates (incl. TMA loads), our CUDA kernel on the masked layout per N tile and
ping-pong setting, and DeepGEMM masked, side by side on the same inputs. Prints the fastest
candidates per cell and checks each kind's best against the fp32 reference.

    python -m benchmarks.sweep_decode_cells [--rows 128] [--cells ep8-w13,...] [--log FILE]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from benchmarks.bench_decode_cells import SHAPES, graph_us, rel
from moe_backend.cuda.grouped_gemm_contiguous import ContiguousConfig, max_stages
from moe_backend.cuda.grouped_gemm_masked import grouped_gemm_masked as cuda_masked
from moe_backend.kernels.grouped_gemm_masked import grouped_gemm_masked as triton_masked
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group


def triton_candidates(rows: int, k: int) -> list[dict]:
    out = []
    for bm, bn, (unroll, stages), tma in itertools.product(
            (64, 128), (128, 256), ((1, 3), (1, 4), (2, 3)), (True, False)):
        if stages * unroll * 128 * (bm + bn) > 200 * 1024 or bm > rows:
            continue
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, K_UNROLL=unroll, num_stages=stages, num_warps=8 if bm == 128 else 4,
                        TMA=tma))
    if k <= 256:
        out += [dict(BLOCK_M=bm, BLOCK_N=bn, N_LOOP=nl, num_stages=2, num_warps=w)
                for bm, bn, nl, w in itertools.product((64, 128), (128, 256), (4, 8), (4, 8)) if bm * bn >= 128 * 128 or w == 4]
    return out


def cuda_candidates() -> list[ContiguousConfig]:
    # 128-wide tiles walked N-fastest per expert (group_m 1), single CTAs or N-tile pairs sharing A
    # through multicast (one M tile per expert); one accumulator, or two (chains of 2 x k_unroll)
    out = []
    for cl in (1, 2):
        out.append(ContiguousConfig(128, max_stages(128), 1, False, cluster=cl, multicast="a", k_unroll=2))
        out += [ContiguousConfig(128, max_stages(128), 1, False, cluster=cl, multicast="a", k_unroll=u, two_acc=True)
                for u in (1, 2, 4)]
    # the short-K (K = 256) choice of the one-accumulator kernel: 192 wide, ping-pong, no unroll
    out.append(ContiguousConfig(192, max_stages(192), 1, True, cluster=1, k_unroll=1))
    out += [ContiguousConfig(64, max_stages(64), 1, False, cluster=cl, multicast="a", k_unroll=u, two_acc=True)
            for cl in (1, 2) for u in (1, 2)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="128")
    p.add_argument("--cells", default="")
    p.add_argument("--kinds", default="deepgemm,triton,cuda", help="which kernels to time")
    p.add_argument("--log", default=None)
    args = p.parse_args(argv)
    kinds = set(args.kinds.split(","))
    log = open(args.log, "w") if args.log else sys.stderr
    try:
        import deep_gemm as dg
    except ImportError:
        dg = None
    summary = []
    for sl, gemm, e, n, k in SHAPES:
        if args.cells and f"{sl}-{gemm}" not in args.cells.split(","):
            continue
        b, bs = quantize_fp8_blockwise(torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5)
        for rows in [int(r) for r in args.rows.split(",")]:
            a, a_s = quantize_fp8_per_token_group(torch.randn(e, rows, k, device="cuda", dtype=torch.bfloat16))
            masked_m = torch.full((e,), rows, dtype=torch.int32, device="cuda")
            out = torch.full((e, rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            results = []  # (us, kind, cfg, err)

            def measure(kind, cfg, fn):
                try:
                    out.fill_(float("nan"))
                    us = graph_us(fn)
                    err = rel(out[1], a[1], a_s[1], b[1], bs[1])
                except Exception as exc:  # a config that does not fit: not a candidate
                    print(f"{sl} {gemm} {rows} {kind} {cfg}: {type(exc).__name__} {str(exc)[:100]}", file=log)
                    return
                results.append((us, kind, cfg, err))
                print(f"{sl} {gemm} {rows} {kind} {cfg} {us:.1f}us err {err:.1e}", file=log, flush=True)

            if dg is not None and rows % 64 == 0 and "deepgemm" in kinds:
                sfb = dg.transform_sf_into_required_layout(bs, n, k, (1, 128, 128), e, False)
                sfa = dg.transform_sf_into_required_layout(a_s, rows, k, (1, 128, 128), e, True)
                measure("deepgemm", "-", lambda: dg.m_grouped_fp8_fp4_gemm_nt_masked((a, sfa), (b, sfb), out,
                                                                                    masked_m, rows))
            for cfg in triton_candidates(rows, k) if "triton" in kinds else ():
                measure("triton", cfg, lambda: triton_masked(a, a_s, b, bs, masked_m, out, config=cfg))
            if rows % 128 == 0 and "cuda" in kinds:
                for cfg in cuda_candidates():
                    measure("cuda", cfg, lambda: cuda_masked(a, a_s, b, bs, masked_m, out, config=cfg))
            dg_us = next((r[0] for r in results if r[1] == "deepgemm"), float("nan"))
            results.sort(key=lambda r: r[0])
            print(f"\n== {sl} {gemm} rows={rows}  DeepGEMM {dg_us:.1f} us", flush=True)
            for kind in ("triton", "cuda"):
                for us, _, cfg, err in [r for r in results if r[1] == kind][:3]:
                    print(f"  {kind:6s} {us:7.1f} us  {us / dg_us:5.3f}x DG  err {err:.1e}  {cfg}", flush=True)
            best = next((r for r in results if r[1] != "deepgemm"), None)
            if best:
                summary.append(f"| {sl} | {gemm} | {rows} | {dg_us:.1f} | {best[0]:.1f} ({best[1]}) | "
                               f"{best[0] / dg_us:.3f} | {best[3]:.1e} |")
            a = a_s = out = None
        b = bs = None
        torch.cuda.empty_cache()
    print("\n| slice | gemm | rows/e | DeepGEMM µs | best ours µs | ours / DG | err |\n|---|---|---|---|---|---|---|")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
