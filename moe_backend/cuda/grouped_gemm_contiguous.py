"""Contiguous FP8 grouped GEMM in CUDA C++ for Hopper (sm_90a): the public op. Kernel:
`grouped_gemm_contiguous.cuh` (design: docs/cuda_kernel.md); config and heuristic:
`moe_backend.cuda.config`, `moe_backend.cuda.heuristic`; build and launch: `moe_backend.cuda.launch`.
"""

from __future__ import annotations

import torch

from moe_backend._checks import check_same_device, check_tensor

# `X as X`: names re-exported for the callers that import them from here (the layer pipeline,
# the plan, the ops front door), as before the package was split by role.
from moe_backend.cuda.config import BLOCK_K, ContiguousConfig
from moe_backend.cuda.config import BLOCK_M as BLOCK_M
from moe_backend.cuda.config import CONTIGUOUS_ALIGNMENT as CONTIGUOUS_ALIGNMENT
from moe_backend.cuda.config import max_stages as max_stages
from moe_backend.cuda.heuristic import select_config
from moe_backend.cuda.launch import _num_sms as _num_sms
from moe_backend.cuda.launch import check_device, check_weights, kernel_spec
from moe_backend.cuda.launch import launch as launch
from moe_backend.quant import FP8_DTYPE

__all__ = ["grouped_gemm_contiguous", "ContiguousConfig", "select_config", "kernel_spec"]


def grouped_gemm_contiguous(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    expert_ids: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    config: ContiguousConfig | None = None,
    a_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[m, :] = A[m] @ B[expert_ids[m]]^T with block scales; rows with id -1 are not written.

    a_fp8 e4m3 `[M, K]` (K % 128 == 0), a_scale f32 `[M, K/128]`, b_fp8 e4m3 `[E, N, K]`,
    b_scale f32 `[E, ceil(N/128), K/128]`, expert_ids int32 (int64 is converted) `[M]`, each
    expert's segment starting on a multiple of 128 rows (padding rows -1; ids are not
    range-checked: that would sync with the host), out bf16 `[M, N]` (allocated zeroed when
    None, like the reference). All contiguous, on one Hopper GPU. `config` overrides the
    heuristic (MOE_BACKEND_PRINT_CONFIG=1 prints each new choice).

    a_rows (the layout's src_token): int64 `[M]`; A and a_scale then hold token rows `[T, K]`,
    `[T, K/128]`, and row m reads A[a_rows[m]] (-1: padding), so the rows are never copied into
    the layout. Indices are not range-checked on the device either; values in [-1, T) are the
    caller's contract.
    """
    check_tensor("a_fp8", a_fp8, dtypes=(FP8_DTYPE,), ndim=2, contiguous=True)
    rows, k = a_fp8.shape
    if k == 0 or k % BLOCK_K:
        raise ValueError(f"a_fp8: K ({k}) must be a positive multiple of {BLOCK_K}")
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=(rows, k // BLOCK_K), contiguous=True)
    num_experts, n = check_weights(b_fp8, b_scale, k)
    if a_rows is not None:  # the layout's rows, behind which A's token rows lie
        check_tensor("a_rows", a_rows, dtypes=(torch.int64,), ndim=1, contiguous=True)
        check_same_device(a_fp8=a_fp8, a_rows=a_rows)
    m = rows if a_rows is None else a_rows.shape[0]
    check_tensor("expert_ids", expert_ids, dtypes=(torch.int32, torch.int64), shape=(m,), contiguous=True)
    check_same_device(a_fp8=a_fp8, a_scale=a_scale, b_fp8=b_fp8, b_scale=b_scale, expert_ids=expert_ids)
    dev = a_fp8.device
    if out is None:
        out = torch.zeros((m, n), dtype=torch.bfloat16, device=dev)
    else:
        check_tensor("out", out, dtypes=(torch.bfloat16,), shape=(m, n), device=dev, contiguous=True)
    check_device(dev)
    for name, t in (("a_fp8", a_fp8), ("b_fp8", b_fp8)):
        if t.data_ptr() % 16:
            raise ValueError(
                f"{name}: TMA needs a 16-byte aligned base address (got a view at offset "
                f"{t.data_ptr() % 16} mod 16); pass a fresh tensor"
            )
    if m == 0 or n == 0 or num_experts == 0:
        return out
    if expert_ids.dtype != torch.int32:
        expert_ids = expert_ids.to(torch.int32)
    if out.data_ptr() % 16:  # the epilogue stores 16-byte vectors
        staged = grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, None, config=config, a_rows=a_rows)
        pad = expert_ids < 0
        out[~pad] = staged[~pad]
        return out
    return launch(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out, config=config, a_rows=a_rows)
