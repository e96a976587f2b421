"""Our CUDA GEMM's stream-K, two questions. Is it deterministic? Launches the same stream-K GEMM
many times on the same inputs (the bf16 output, and GEMM1 storing SiLU*up quant) and counts the
launches whose output differs bit for bit from the first, the same config without stream-K
beside it, and prints each kernel's grid (a helper's partial sum read before it is written, or a
split that changes between launches, shows up as differing launches). And why did the SiLU*up
quant GPU test's stream-K cases fail now and then? `--seeds N` runs that test's comparison on N
fresh operand sets per case, the bf16 GEMM once on the weights in their plain order and once in
the SiLU*up kernel's tile order (`gate_up_tiled`), and counts the seeds whose scales differ from
the reference by more than the test's tolerance. GPU only.

    python -m lab.stream_k_repeat [--repeats 30] [--seeds 0]
"""

from __future__ import annotations

import argparse

# The stream-K cases of GEMM1's SiLU*up quant GPU test (SILU_CASES), by name; each also runs without stream-K.
CASES = ("ep8_w13_pairs_stream_k", "few_units_stream_k_ue8m0", "tp8_w13_gather_stream_k")


def main(argv=None) -> int:
    import torch

    from moe_backend.cuda import jit
    from moe_backend.cuda import launch as launch_mod
    from moe_backend.cuda.grouped_gemm_contiguous import ContiguousConfig, launch
    from tests.cuda import test_cuda_gemm_gpu as gemm_tests

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--seeds", type=int, default=0, help="also run the test's comparison on this many operand sets")
    args = p.parse_args(argv)
    if args.seeds:
        compare_orders(args.seeds)
    print("| case | stream-K | output | grid | launches differing from the first | most elements differing |")
    print("|---|---|---|---:|---:|---:|")
    cases = {c[0]: c for c in gemm_tests.SILU_CASES}
    for name in CASES:
        _, inter, k, counts, cfg, tokens, ue8m0 = cases[name]
        expert_ids, src, a, a_scale, b, b_scale = gemm_tests.silu_case_operands(inter, k, counts, tokens)
        rows, n = expert_ids.numel(), 2 * inter
        for stream_k in (True, False):
            config = ContiguousConfig(**{**cfg, "stream_k": stream_k})
            for output in ("bf16", "silu"):
                silu = int(output == "silu")
                grid = launch_mod._kernel_and_grid(
                    rows, n, k, config, 0, torch.cuda.current_device(), jit.env_flags(), bool(tokens), silu, False
                )[1]
                firsts, differing, most = None, 0, 0
                for _ in range(args.repeats):
                    if output == "bf16":
                        out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                        launch(a, a_scale, b, b_scale, expert_ids, out, config=config, a_rows=src)
                        got = (out.view(torch.int16),)
                    else:
                        act = torch.full((rows, inter), 0x7F, dtype=torch.uint8, device="cuda")
                        scale = torch.full((rows, inter // 128), float("nan"), device="cuda")
                        launch(a, a_scale, b, b_scale, expert_ids, act.view(torch.float8_e4m3fn), config=config,
                               a_rows=src, act_scale=scale, ue8m0=ue8m0)  # fmt: skip
                        got = (act, scale.view(torch.int32))
                    torch.cuda.synchronize()
                    if firsts is None:
                        firsts = got
                        continue
                    diff = sum(int((x != y).sum()) for x, y in zip(got, firsts))
                    differing += diff > 0
                    most = max(most, diff)
                mode = "on" if stream_k else "off"
                row = f"| {name} | {mode} | {output} | {grid} | {differing} / {args.repeats - 1} | {most} |"
                print(row, flush=True)
    return 0


def compare_orders(seeds: int) -> None:
    """The SiLU*up quant test's comparison per case and seed, the bf16 GEMM on the weights in their
    plain order and in the SiLU*up kernel's tile order: seeds whose act scales differ from the
    reference by more than TOL["silu_scale"], and the largest relative difference."""
    import torch

    from moe_backend import reference
    from moe_backend.cuda.grouped_gemm_contiguous import ContiguousConfig, launch
    from tests.cuda import test_cuda_gemm_gpu as gemm_tests

    tol = gemm_tests.TOL["silu_scale"]
    print(f"| case | seeds | plain order: seeds over {tol:g} (largest) | tile order: seeds over {tol:g} (largest) |")
    print("|---|---:|---:|---:|")
    for name, inter, k, counts, cfg, tokens, ue8m0 in gemm_tests.SILU_CASES:
        config = None if cfg is None else ContiguousConfig(**cfg)
        over, largest = [0, 0], [0.0, 0.0]
        for seed in range(seeds):
            torch.manual_seed(seed)
            expert_ids, src, a, a_scale, b, b_scale = gemm_tests.silu_case_operands(inter, k, counts, tokens)
            real = expert_ids >= 0
            rows, n = expert_ids.numel(), 2 * inter
            act = torch.empty(rows, inter, dtype=torch.float8_e4m3fn, device="cuda")
            scale = torch.empty(rows, inter // 128, device="cuda")
            launch(a, a_scale, b, b_scale, expert_ids, act, config=config, a_rows=src, act_scale=scale, ue8m0=ue8m0)
            b_tiled, b_scale_tiled, order = gemm_tests.gate_up_tiled(b, b_scale, inter)
            for i, (weights, weight_scales) in enumerate(((b, b_scale), (b_tiled, b_scale_tiled))):
                h = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda")
                launch(a, a_scale, weights, weight_scales, expert_ids, h, config=config, a_rows=src)
                if i:
                    h[:, order] = h.clone()
                ref_scale = reference.silu_mul_quant(h[real], 128, ue8m0)[1]
                diff = float(((scale[real] - ref_scale).abs() / ref_scale).max())
                over[i] += diff > tol
                largest[i] = max(largest[i], diff)
        print(f"| {name} | {seeds} | {over[0]} ({largest[0]:.1e}) | {over[1]} ({largest[1]:.1e}) |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
