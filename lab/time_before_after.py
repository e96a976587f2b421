"""Same-run before/after check of the CUDA grouped GEMM's refactor: the package's kernel against
the pre-refactor one (lab/cuda_variants, which compiles the shipped configs to the same PTX) on
the DeepSeek-V3 cells, each with the config the package's heuristics pick: EP8 (32 experts,
I = 2048) and TP8 (256 experts, I = 256) prefill on the contiguous layout, and decode at 128 rows
per expert on the masked layout. Timed in interleaved rounds (benchmarks/_timing.py); the two
outputs must be bitwise equal. Prints a markdown table; ratios should sit at 1.00 within noise.

    python -m lab.time_before_after            # on a Hopper GPU
    python -m lab.time_before_after --list     # CPU: the cells, their configs, the lab twins
"""

from __future__ import annotations

import argparse

# (slice, gemm, experts, N, K)
SHAPES = [("ep8", "w13", 32, 4096, 7168), ("ep8", "w2", 32, 7168, 2048),
          ("tp8", "w13", 256, 512, 7168), ("tp8", "w2", 256, 7168, 256)]
PREFILL_ROWS = {"ep8": (512, 2048, 4096), "tp8": (512,)}
DECODE_ROWS = 128
NUM_SMS = 132


def lab_twin(cfg):
    """The pre-refactor config that built the same kernel as the package's `cfg`."""
    from lab.cuda_variants import variants

    wide = cfg.block_n > 128
    return variants.ContiguousConfig(cfg.block_n, cfg.num_stages, cfg.group_m, pingpong=False, cluster=cfg.cluster,
                                     multicast=cfg.multicast, two_acc=True, part_n=128 if wide else 0,
                                     unit_accs=1 if wide else 2)


def cells(num_sms: int = NUM_SMS):
    """(label, layout, experts, rows per expert, N, K, package config, lab config); the pair's
    kernels are checked to render the same template constants."""
    from lab.check_ptx import _key
    from lab.cuda_variants import variants
    from moe_backend.cuda.heuristic import select_config, select_masked_config
    from moe_backend.cuda.launch import kernel_spec

    out = []
    for sl, gemm, e, n, k in SHAPES:
        runs = [("contiguous", r, select_config(e * r, n, num_sms, k=k)) for r in PREFILL_ROWS[sl]]
        runs.append(("masked", DECODE_ROWS, select_masked_config(n, k)))
        for layout, rows, cfg in runs:
            twin = lab_twin(cfg)
            max_m = rows if layout == "masked" else 0
            mine = kernel_spec(n, k, cfg, masked_max_m=max_m)
            theirs = variants.kernel_spec(n, k, twin, masked_max_m=max_m)
            if _key(mine) != _key(theirs) or theirs.constants["K_UNROLL"] != (2 if cfg.block_n <= 128 else 1):
                raise RuntimeError(f"{sl} {gemm}: {mine.kernel_name} has no lab twin ({theirs.kernel_name})")
            out.append((f"{sl} {gemm} {rows}", layout, e, rows, n, k, cfg, twin))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the cells and configs only (no GPU)")
    args = parser.parse_args(argv)
    if args.list:
        for label, layout, *_, cfg, twin in cells():
            print(f"{label:14s} {layout:10s} {cfg}\n{'':25s} lab twin: {twin}")
        return 0

    import torch

    from benchmarks._timing import interleaved_us
    from lab.cuda_variants import variants
    from moe_backend.cuda.launch import launch
    from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("| cell | layout | config | package µs | pre-refactor µs | package / pre |")
    print("|---|---|---|---|---|---|")
    for label, layout, e, rows, n, k, cfg, twin in cells(torch.cuda.get_device_properties(0).multi_processor_count):
        b, bs = quantize_fp8_blockwise(torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5)
        a, a_s = quantize_fp8_per_token_group(torch.randn(e * rows, k, device="cuda", dtype=torch.bfloat16))
        if layout == "masked":
            ids = torch.full((e,), rows, dtype=torch.int32, device="cuda")
            max_m = rows
        else:  # every other expert 37 rows short of its 128-aligned segment
            seg = [rows - 37 if i % 2 else rows for i in range(e)]
            ids = torch.cat([torch.tensor([i] * r + [-1] * (rows - r), dtype=torch.int32) for i, r in enumerate(seg)])
            ids, max_m = ids.cuda(), 0
        outs = [torch.full((e * rows, n), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        fns = {"package": lambda: launch(a, a_s, b, bs, ids, outs[0], config=cfg, masked_max_m=max_m),
               "pre": lambda: variants.launch(a, a_s, b, bs, ids, outs[1], config=twin, masked_max_m=max_m)}
        for fn in fns.values():
            fn()
        torch.cuda.synchronize()
        if not torch.equal(outs[0].nan_to_num(7.0), outs[1].nan_to_num(7.0)):
            raise RuntimeError(f"{label} {layout}: the two kernels' outputs differ")
        t = interleaved_us(fns)
        print(f"| {label} | {layout} | n{cfg.block_n} c{cfg.cluster}{cfg.multicast} g{cfg.group_m} | "
              f"{t['package']['us']:.1f} [{t['package']['lo']:.0f}–{t['package']['hi']:.0f}] | "
              f"{t['pre']['us']:.1f} [{t['pre']['lo']:.0f}–{t['pre']['hi']:.0f}] | "
              f"{t['package']['us'] / t['pre']['us']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
