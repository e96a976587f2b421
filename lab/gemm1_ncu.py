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

from lab.gemm1_epilogue import gemm1_operands
from lab.prefill_pairing import dg_contiguous


def main(argv=None) -> int:
    import torch

    from moe_backend.constants import FP8_DTYPE
    from moe_backend.cuda.launch import launch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--routing", default="uniform")
    args = p.parse_args(argv)
    import deep_gemm as dg

    op = gemm1_operands("ep8", args.tokens, args.routing)
    used = op.used
    act = torch.empty(op.bound, op.n // 2, dtype=FP8_DTYPE, device="cuda")
    act_scale = torch.empty(op.bound, op.n // 256, dtype=torch.float32, device="cuda")
    dg_out = torch.empty(used, op.n, dtype=torch.bfloat16, device="cuda")
    dg_run = dg_contiguous(dg, op.a[:used], op.a_scale[:used], op.b, op.bs, op.expert_ids[:used].clone(), dg_out)
    for _ in range(3):
        launch(
            op.a, op.a_scale, op.b, op.bs, op.expert_ids, act, config=op.config, rows_in_use=op.rows_in_use,
            act_scale=act_scale,
        )  # fmt: skip
    torch.cuda.synchronize()
    for _ in range(3):
        dg_run()
    torch.cuda.synchronize()
    print(f"ep8 {args.tokens} {args.routing}: {used} rows in use, bound {op.bound}, ours {op.config}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
