"""Contiguous FP8 grouped GEMM (prefill): rows sorted by expert, one expert id per row.

Each expert's segment is padded to `CONTIGUOUS_ALIGNMENT` rows (padding rows have id -1 and are
not written), so every BLOCK_M tile (BLOCK_M divides the alignment) holds one expert's rows.
A layout sized for the worst case (a static row bound, e.g. T * k + E * (alignment - 1) rows
under a CUDA graph) ends in tiles of padding only: pass `num_rows` (int32 `[1]` on the device,
the rows in use) and the kernel walks only the tiles below it, with a persistent grid, so that
tail costs nothing. Kernel: `_grouped_gemm_core`; numerics: docs/design.md.
"""

from __future__ import annotations

import torch

from moe_backend.kernels import _gemm_config, _grouped_gemm_core
from moe_backend.kernels._launch_utils import check_kernel_tensor, device_name
from moe_backend.quant import FP8_DTYPE

__all__ = ["grouped_gemm_contiguous", "CONTIGUOUS_ALIGNMENT"]

# 128 = the largest BLOCK_M; also DeepGEMM's alignment, so one layout serves both providers.
CONTIGUOUS_ALIGNMENT = 128


def grouped_gemm_contiguous(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    expert_ids: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    expected_m: int | None = None,
    config: dict | None = None,
    num_rows: torch.Tensor | None = None,
    a_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[m, :] = A[m] @ B[expert_ids[m]]^T with block scales; rows with id -1 are not written.

    a_fp8 `[M, K]` e4m3 (K % 128 == 0), a_scale f32 `[M, K/128]`, b_fp8 `[E, N, K]`,
    b_scale f32 `[E, ceil(N/128), K/128]`, expert_ids int32 `[M]` (segments aligned to
    CONTIGUOUS_ALIGNMENT; ids are not range-checked: that would sync with the host),
    out bf16 `[M, N]` (allocated zeroed when None, like the reference). `expected_m` (rows per
    expert; default M/E) picks the tuned config; `config` overrides it. `num_rows` int32 `[1]` on
    the device (optional): rows at or past it are padding and are neither read nor written (a
    value above M counts as M); without it every tile is visited and padding tiles exit at once.
    `a_rows` int64 `[M]` (optional; a layout's `src_token`): layout row m reads A's row
    `a_rows[m]` (-1: padding), so a_fp8 `[T, K]` and a_scale `[T, K/128]` are the unpermuted
    token rows; such configs load A without TMA.
    """
    check_kernel_tensor("a_fp8", a_fp8, dtypes=(FP8_DTYPE,), ndim=2)
    dev = a_fp8.device
    a_rows_total, k = a_fp8.shape
    if k == 0 or k % 128:
        raise ValueError(f"a_fp8: K ({k}) must be a positive multiple of 128")
    check_kernel_tensor("a_scale", a_scale, dev, dtypes=(torch.float32,), shape=(a_rows_total, k // 128))
    if a_rows is None:
        m = a_rows_total
    else:
        check_kernel_tensor("a_rows", a_rows, dev, dtypes=(torch.int64,), ndim=1)
        m = a_rows.shape[0]
        if a_rows_total == 0 and m:
            raise ValueError("a_fp8: no rows to gather from, but a_rows names rows")
    check_kernel_tensor("b_fp8", b_fp8, dev, dtypes=(FP8_DTYPE,), ndim=3)
    if b_fp8.shape[2] != k:
        raise ValueError(f"b_fp8: K ({b_fp8.shape[2]}) must equal a_fp8's K ({k})")
    num_experts, n = b_fp8.shape[0], b_fp8.shape[1]
    check_kernel_tensor("b_scale", b_scale, dev, dtypes=(torch.float32,), shape=(num_experts, -(-n // 128), k // 128))
    check_kernel_tensor("expert_ids", expert_ids, dev, dtypes=(torch.int32,), shape=(m,))
    if num_rows is not None:
        check_kernel_tensor("num_rows", num_rows, dev, dtypes=(torch.int32,), shape=(1,))
    if out is None:
        out = torch.zeros((m, n), dtype=torch.bfloat16, device=dev)
    else:
        check_kernel_tensor("out", out, dev, dtypes=(torch.bfloat16,), shape=(m, n))
    if m == 0 or n == 0 or num_experts == 0:
        return out
    hint = expected_m or max(1, m // num_experts)
    cfg = _gemm_config.get_config(
        "grouped_gemm_contiguous",
        hint,
        n,
        k,
        device_name(dev),
        masked=False,
        override=config,
        max_block_m=CONTIGUOUS_ALIGNMENT,
    )
    if cfg["SPLIT_K"] > 1:
        raise ValueError(
            "config: SPLIT_K > 1 writes fp32 partial sums, which only the layer's pipeline consumes "
            "(plan_execution); this op returns the bf16 product: use SPLIT_K=1"
        )
    _grouped_gemm_core.launch(
        a_fp8,
        a_scale,
        b_fp8,
        b_scale,
        out,
        expert_ids,
        None,
        masked=False,
        rows=m,
        num_experts=num_experts,
        cfg=cfg,
        num_rows=num_rows,
        a_rows=a_rows,
    )
    return out
