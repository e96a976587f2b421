"""Does DeepGEMM's contiguous GEMM accept a row count M that is not a multiple of its M alignment?

`dispatch.plan.rows_bucket` caps the rows a `rows_on_host` graph hands DeepGEMM at the layout's
static bound (T*k + E*(align-1)), which need not be a multiple of the alignment. This runs
DeepGEMM's contiguous GEMM on such M: segments aligned, the tail past the last segment marked -1
(the capped bucket), and a last segment cut short by M, against the torch reference on the valid
rows, with the output poisoned first (rows marked -1 must stay as they were).

    python -m lab.probe_deepgemm_odd_m
"""

from __future__ import annotations

import torch

from moe_backend import reference
from moe_backend.providers import deepgemm
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group


def _case(name: str, seg_rows: list[int], m: int, k: int, n: int, align: int, dev) -> None:
    ids = torch.full((m,), -1, dtype=torch.int32, device=dev)
    start = 0
    for e, r in enumerate(seg_rows):
        ids[start : min(start + r, m)] = e
        start += -(-r // align) * align
    e_count = len(seg_rows)
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    a_fp8, a_s = quantize_fp8_per_token_group(a)
    b = torch.randn(e_count, n, k, device=dev, dtype=torch.bfloat16) * 0.05
    b_fp8, b_s = quantize_fp8_blockwise(b)
    poison = torch.full((m, n), 7.0, device=dev, dtype=torch.bfloat16)
    try:
        out = deepgemm.grouped_gemm_contiguous(a_fp8, a_s, b_fp8, b_s, ids, out=poison.clone())
        torch.cuda.synchronize()
    except Exception as exc:  # the answer sought: does it refuse such M?
        print(f"{name:34} M={m:6} ({m % align:3} past a multiple of {align}): raised {type(exc).__name__}: {exc}")
        return
    ref = reference.grouped_gemm_contiguous(a_fp8, a_s, b_fp8, b_s, ids, out=poison.clone())
    valid = ids >= 0
    err = ((out[valid].float() - ref[valid].float()).norm() / ref[valid].float().norm()).item()
    tail_kept = bool((out[~valid] == 7.0).all().item())
    print(
        f"{name:34} M={m:6} ({m % align:3} past a multiple of {align}): rel err {err:.2e}, "
        f"rows marked -1 untouched: {tail_kept}"
    )


def main() -> None:
    dev = torch.device("cuda")
    align = deepgemm.contiguous_alignment()
    k, n = 7168, 512
    _case("aligned (control)", [100, 256, 30, 128], 4 * align + 128, k, n, align, dev)
    _case("tail of -1 rows, M unaligned", [100, 256, 30, 128], 5 * align + 77, k, n, align, dev)
    _case("last segment cut by M", [100, 256, 30, 128], 4 * align + 77, k, n, align, dev)
    e_bound = 32
    rows = [int(v) for v in torch.randint(0, 300, (e_bound,)).tolist()]
    bound = sum(rows) + e_bound * (align - 1)
    _case("EP8-like, M = static bound", rows, bound, k, n, align, dev)


if __name__ == "__main__":
    main()
