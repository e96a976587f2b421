"""Our CUDA masked GEMM walking the dense list of live tiles (scheduler.cuh, LiveTiles) against the
same kernel built from an earlier copy of the headers (the walk over the whole [E * max_m / 128]
tile space with dead-run skips), side by side with DeepGEMM's masked GEMM, at the same counts:
EP8 (32 experts) w13 / w2 at a mean of --rows rows per expert, uniform and Zipf routing, each
max_m from the hottest expert's rows (rounded up to 128) to 1024. CUDA-graph replays timed in
interleaved rounds; the two builds' outputs must match bit for bit (the same tiles, computed by
other CTAs).

    python -m lab.masked_walk_before_after --old DIR [--rows 128] [--rounds 5]

DIR holds the earlier *.cuh files (e.g. `git show REV:moe_backend/cuda/scheduler.cuh`, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lab._prebuild import compile_all, old_launcher, old_spec
from moe_backend import reference, testing
from moe_backend.cuda import launch
from moe_backend.cuda.grouped_gemm_masked import grouped_gemm_masked as cuda_masked
from moe_backend.cuda.heuristic import select_masked_config
from moe_backend.quant import quantize_fp8_per_token_group

SHAPES = {"w13": (4096, 7168), "w2": (7168, 2048)}


def max_ms_of(top: int) -> list[int]:
    return [m for m in (128, 256, 512, 1024, 2048) if m >= top and (m <= 1024 or m < 2 * top)]


def prebuild(args, e: int) -> None:
    specs = []
    for gemm in args.gemms.split(","):
        n, k = SHAPES[gemm]
        cfg = select_masked_config(n, k)
        for routing in args.routings.split(","):
            top = int(testing.zipf_counts(e, e * args.rows, testing.parse_routing_exponent(routing)).max())
            for max_m in max_ms_of(top):
                spec = launch.kernel_spec(n, k, cfg, masked_max_m=max_m)
                specs += [spec, old_spec(spec, args.old)]
    compile_all(specs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True, type=Path)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--routings", default="uniform,zipf:0.6,zipf:0.9,zipf:1.2")
    p.add_argument("--gemms", default="w13,w2")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    try:
        import deep_gemm as dg
    except ImportError:
        dg = None
    e = 32
    prebuild(args, e)
    print("| gemm | routing (max/mean) | max_m | before µs | after µs | after/before | DG masked µs | DG/after |")
    print("|---|---|---|---|---|---|---|---|")
    for gemm in args.gemms.split(","):
        n, k = SHAPES[gemm]
        b, bs = testing.random_fp8_weights(e, n, k)
        sfb = dg.transform_sf_into_required_layout(bs, n, k, (1, 128, 128), e, False) if dg else None
        cfg = select_masked_config(n, k)
        for routing in args.routings.split(","):
            exponent = testing.parse_routing_exponent(routing)
            counts = testing.zipf_counts(e, e * args.rows, exponent)
            top = int(counts.max())
            counts_dev = counts.to(torch.int32).cuda()
            for max_m in max_ms_of(top):
                a, a_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda", dtype=torch.bfloat16))
                out_new = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                out_old = out_new.clone()
                out_dg = out_new.clone()
                m = e * max_m
                params = launch.kernel_args(a.view(m, k), a_s.view(m, -1), b, bs, counts_dev, out_old.view(m, n), cfg)
                spec = launch.kernel_spec(n, k, cfg, masked_max_m=max_m)
                before = old_launcher(spec, args.old, m, n, cfg, params)

                fns = {
                    "before": before,
                    "after": lambda a=a, a_s=a_s, o=out_new: cuda_masked(a, a_s, b, bs, counts_dev, o, config=cfg),
                }
                if dg is not None:
                    sfa = dg.transform_sf_into_required_layout(a_s, max_m, k, (1, 128, 128), e, True)
                    fns["dg"] = lambda a=a, sfa=sfa, o=out_dg: dg.m_grouped_fp8_fp4_gemm_nt_masked(
                        (a, sfa), (b, sfb), o, counts_dev, args.rows
                    )
                for fn in fns.values():
                    fn()
                torch.cuda.synchronize()
                same = torch.equal(out_new.view(torch.int16), out_old.view(torch.int16))
                hot = int(torch.argmax(counts))
                ref = reference.grouped_gemm_masked(
                    a[hot : hot + 1], a_s[hot : hot + 1], b[hot : hot + 1], bs[hot : hot + 1], counts_dev[hot : hot + 1]
                )
                c = int(counts[hot])
                err = float((out_new[hot, :c].float() - ref[0, :c].float()).norm() / ref[0, :c].float().norm())
                pad_ok = all(bool(torch.isnan(out_new[x, int(counts[x]) :].float()).all()) for x in range(e))
                graphs = {name: testing.capture_graph(fn)[0] for name, fn in fns.items()}
                t = testing.interleaved_us(graphs, rounds=args.rounds)
                us = {name: v["us"] for name, v in t.items()}
                dg_us = us.get("dg")
                dg_text = f"{dg_us:.1f}" if dg_us else "–"
                dg_ratio = f"{dg_us / us['after']:.3f}" if dg_us else "–"
                print(
                    f"| {gemm} | {routing} ({top / args.rows:.1f}x) | {max_m} | "
                    f"{us['before']:.1f} | {us['after']:.1f} | "
                    f"{us['after'] / us['before']:.3f} | {dg_text} | {dg_ratio} |"
                    + ("" if same and pad_ok and err <= 2e-3 else f" **same={same} pad={pad_ok} err={err:.1e}**"),
                    flush=True,
                )
                del graphs, fns, a, a_s, out_new, out_old, out_dg
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
