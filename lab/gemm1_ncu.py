"""Our CUDA GEMM1 (the layer's prefill config, SiLU*up quant epilogue, static row bound) and
DeepGEMM's contiguous w13 on the same routed EP8 rows, each launched a few times outside any
graph, so that Nsight Compute can profile one launch of each:

    ncu -k regex:"phasemoe|sm90" --launch-skip 2 --launch-count 2 --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section WarpStateStats --csv \\
        python -m lab.gemm1_ncu --tokens 16384

Our kernel runs first (launches 0-2), then DeepGEMM's (3-5); `--launch-skip 2 --launch-count 2`
takes the third of ours and the first of DeepGEMM's, both JIT-compiled by then.
"""

from __future__ import annotations

import argparse

from lab.prefill_pairing import GLOBAL_EXPERTS, SHAPES, TILE, TOPK, dg_contiguous, layouts


def main(argv=None) -> int:
    import torch

    from lab._plan_variants import slice_plan
    from moe_backend import testing
    from moe_backend.constants import FP8_DTYPE
    from moe_backend.cuda.launch import launch
    from moe_backend.dispatch.layouts import max_contiguous_rows
    from moe_backend.quant import quantize_fp8_per_token_group

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--routing", default="uniform")
    args = p.parse_args(argv)
    import deep_gemm as dg

    num_local, gemms = SHAPES["ep8"]
    _, n, k = gemms[0]
    _, topk_ids = testing.random_topk(
        args.tokens, GLOBAL_EXPERTS, TOPK, testing.parse_routing_exponent(args.routing), args.tokens
    )
    ids = layouts(testing.expert_counts(topk_ids, num_local).tolist())["plan"][0][0]
    used = len(ids)
    bound = max(max_contiguous_rows(args.tokens * TOPK, num_local, TILE), used)
    b, bs = testing.random_fp8_weights(num_local, n, k)
    a_b, as_b = quantize_fp8_per_token_group(torch.randn(bound, k, device="cuda", dtype=torch.bfloat16))
    ids_b = torch.full((bound,), -1, dtype=torch.int32, device="cuda")
    ids_b[:used] = torch.tensor(ids, dtype=torch.int32, device="cuda")
    rows_in_use = torch.tensor([used], dtype=torch.int32, device="cuda")
    cfg = slice_plan("ep8", args.tokens, "prefill", torch.device("cuda")).gemm1.config
    act = torch.empty(bound, n // 2, dtype=FP8_DTYPE, device="cuda")
    act_scale = torch.empty(bound, n // 256, dtype=torch.float32, device="cuda")
    dg_out = torch.empty(used, n, dtype=torch.bfloat16, device="cuda")
    dg_run = dg_contiguous(dg, a_b[:used], as_b[:used], b, bs, ids_b[:used].clone(), dg_out)
    for _ in range(3):
        launch(a_b, as_b, b, bs, ids_b, act, config=cfg, rows_in_use=rows_in_use, act_scale=act_scale)
    torch.cuda.synchronize()
    for _ in range(3):
        dg_run()
    torch.cuda.synchronize()
    print(f"ep8 {args.tokens} {args.routing}: {used} rows in use, bound {bound}, ours {cfg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
