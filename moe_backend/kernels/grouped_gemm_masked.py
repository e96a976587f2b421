"""Masked FP8 grouped GEMM (decode): A `[E, max_m, K]`, expert e uses its first `masked_m[e]` rows.

No host sync and a grid from shapes alone, so it captures into a CUDA graph. The kernel reads
`masked_m` on the device and walks only the tiles that hold rows (a persistent grid over a
prefix sum of per-expert tile counts), so its cost follows the rows present, not `max_m`.
Kernel and work walk: `_grouped_gemm_core`; numerics: docs/design.md.
"""

from __future__ import annotations

import torch

from moe_backend.kernels import _gemm_config, _grouped_gemm_core
from moe_backend.kernels._launch_utils import check_kernel_tensor, device_name
from moe_backend.quant import FP8_DTYPE

__all__ = ["grouped_gemm_masked"]

_INDEX = (torch.int32,)


def grouped_gemm_masked(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    masked_m: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    expected_m: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """out[e, m, :] = A[e, m] @ B[e]^T with block scales, for m < masked_m[e]; other rows untouched.

    a_fp8 `[E, max_m, K]` e4m3 (K % 128 == 0), a_scale f32 `[E, max_m, K/128]`,
    b_fp8 `[E, N, K]` e4m3, b_scale f32 `[E, ceil(N/128), K/128]`, masked_m int32 `[E]` (device),
    out bf16 `[E, max_m, N]` (allocated zeroed when None, like the reference; a given `out` is
    never filled: rows at or past masked_m[e] keep what they held). Values of masked_m outside
    [0, max_m] are clamped on the device (checking them would sync). `expected_m` (rows per expert
    the caller expects; default max_m) picks the tuned config (tile sizes); `config` overrides it
    (keys in `_gemm_config`).
    """
    check_kernel_tensor("a_fp8", a_fp8, dtypes=(FP8_DTYPE,), ndim=3)
    dev = a_fp8.device
    num_experts, max_m, k = a_fp8.shape
    if k == 0 or k % 128:
        raise ValueError(f"a_fp8: K ({k}) must be a positive multiple of 128")
    check_kernel_tensor("a_scale", a_scale, dev, dtypes=(torch.float32,), shape=(num_experts, max_m, k // 128))
    check_kernel_tensor("b_fp8", b_fp8, dev, dtypes=(FP8_DTYPE,), ndim=3)
    if b_fp8.shape[0] != num_experts or b_fp8.shape[2] != k:
        raise ValueError(f"b_fp8: expected shape [{num_experts}, N, {k}] (E and K of a_fp8), got {list(b_fp8.shape)}")
    n = b_fp8.shape[1]
    check_kernel_tensor("b_scale", b_scale, dev, dtypes=(torch.float32,), shape=(num_experts, -(-n // 128), k // 128))
    check_kernel_tensor("masked_m", masked_m, dev, dtypes=_INDEX, shape=(num_experts,))
    if out is None:
        out = torch.zeros((num_experts, max_m, n), dtype=torch.bfloat16, device=dev)
    else:
        check_kernel_tensor("out", out, dev, dtypes=(torch.bfloat16,), shape=(num_experts, max_m, n))
    if num_experts == 0 or max_m == 0 or n == 0:
        return out
    cfg = _gemm_config.get_config(
        "grouped_gemm_masked", expected_m or max_m, n, k, device_name(dev), masked=True, override=config
    )
    _grouped_gemm_core.launch(
        a_fp8, a_scale, b_fp8, b_scale, out, None, masked_m, masked=True, rows=max_m, num_experts=num_experts, cfg=cfg
    )
    return out
