"""Masked FP8 grouped GEMM on our CUDA C++ kernel (sm_90a), for decode batches of 64-256 rows
per expert (the DeepEP low-latency / vLLM batched layout).

The masked layout `[E, max_m, K]` *is* a contiguous layout when `max_m` is a multiple of the
kernel's 128-row tile: expert e's rows start at row e * max_m, a tile boundary. So this op views A
as `[E * max_m, K]` and runs the contiguous kernel compiled for this max_m, which reads masked_m
itself: row r of expert e counts while r < masked_m[e] (no host sync, no per-row id array built
per call, CUDA-graph capturable). Each CTA first counts every expert's live 128-row tiles from
masked_m and walks only those, spread evenly over the CTAs: the cost follows the rows present, not
max_m, and an expert with 0 rows costs nothing. Rows at or past `masked_m[e]` are not written.
"""

from __future__ import annotations

import torch

from moe_backend._checks import check_same_device, check_tensor
from moe_backend.cuda.config import BLOCK_M, MAX_MASKED_EXPERTS, ContiguousConfig
from moe_backend.cuda.grouped_gemm_contiguous import grouped_gemm_contiguous
from moe_backend.cuda.heuristic import select_masked_config
from moe_backend.cuda.launch import check_device, check_weights, launch
from moe_backend.kernels._launch_utils import device_name
from moe_backend.quant import FP8_DTYPE

__all__ = ["grouped_gemm_masked", "supports_max_m", "supports_experts", "select_masked_config"]


def supports_max_m(max_m: int) -> bool:
    """Whether a masked layout with this many rows per expert maps onto the kernel's tiles."""
    return max_m > 0 and max_m % BLOCK_M == 0


def supports_experts(num_experts: int) -> bool:
    """Whether the kernel's table of live tiles per expert holds this many experts."""
    return num_experts <= MAX_MASKED_EXPERTS


def masked_expert_ids(masked_m: torch.Tensor, max_m: int) -> torch.Tensor:
    """int32 `[E * max_m]`: e for the first masked_m[e] rows of expert e, -1 after them."""
    num_experts = masked_m.shape[0]
    rows = torch.arange(max_m, device=masked_m.device, dtype=torch.int32)
    experts = torch.arange(num_experts, device=masked_m.device, dtype=torch.int32)
    ids = torch.where(rows[None, :] < masked_m[:, None], experts[:, None], -1)
    return ids.to(torch.int32).reshape(-1)


def grouped_gemm_masked(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    masked_m: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    config: ContiguousConfig | None = None,
) -> torch.Tensor:
    """out[e, m, :] = A[e, m] @ B[e]^T with block scales for m < masked_m[e]; other rows untouched.

    a_fp8 e4m3 `[E, max_m, K]` with max_m a multiple of 128 and K of 128, a_scale f32
    `[E, max_m, K/128]`, b_fp8 e4m3 `[E, N, K]`, b_scale f32 `[E, ceil(N/128), K/128]`,
    masked_m int32 `[E]` on the device (values are not range-checked: that would sync), out bf16
    `[E, max_m, N]` (allocated zeroed when None, like the reference). Contiguous, one Hopper GPU.
    `config` overrides `select_masked_config`.
    """
    check_tensor("a_fp8", a_fp8, dtypes=(FP8_DTYPE,), ndim=3, contiguous=True)
    num_experts, max_m, k = a_fp8.shape
    if not supports_max_m(max_m):
        raise ValueError(
            f"a_fp8: the CUDA masked GEMM needs max_m (dim 1, got {max_m}) to be a positive "
            f"multiple of {BLOCK_M}; use the Triton kernel (impl='triton') for other sizes"
        )
    if not supports_experts(num_experts):
        raise ValueError(
            f"a_fp8: the CUDA masked GEMM serves at most {MAX_MASKED_EXPERTS} experts (dim 0, got "
            f"{num_experts}); use the Triton kernel (impl='triton')"
        )
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=(num_experts, max_m, k // 128), contiguous=True)
    b_experts, n = check_weights(b_fp8, b_scale, k)
    if b_experts != num_experts:
        raise ValueError(f"b_fp8: expected {num_experts} experts (dim 0 of a_fp8), got {b_experts}")
    check_tensor("masked_m", masked_m, dtypes=(torch.int32,), shape=(num_experts,))
    # The direct launch below skips the contiguous op's checks: every operand on one device.
    check_same_device(a_fp8=a_fp8, a_scale=a_scale, b_fp8=b_fp8, b_scale=b_scale, masked_m=masked_m)
    if out is None:
        out = torch.zeros((num_experts, max_m, n), dtype=torch.bfloat16, device=a_fp8.device)
    else:
        check_tensor(
            "out", out, dtypes=(torch.bfloat16,), shape=(num_experts, max_m, n), device=a_fp8.device, contiguous=True
        )
    if num_experts == 0:
        return out
    check_device(a_fp8.device)
    a2, s2, o2 = (
        a_fp8.view(num_experts * max_m, k),
        a_scale.view(num_experts * max_m, -1),
        out.view(num_experts * max_m, n),
    )
    cfg = config or select_masked_config(n, k, device_name(a_fp8.device))
    if a_fp8.data_ptr() % 16 or b_fp8.data_ptr() % 16 or out.data_ptr() % 16:
        # A view at an odd offset: the contiguous op's checks and staging, on per-row ids.
        grouped_gemm_contiguous(a2, s2, b_fp8, b_scale, masked_expert_ids(masked_m, max_m), o2, config=cfg)
    else:  # the kernel reads masked_m itself: no per-row id array to build per call
        launch(a2, s2, b_fp8, b_scale, masked_m, o2, config=cfg, masked_max_m=max_m)
    return out
