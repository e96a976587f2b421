"""The grouped FP8 GEMMs in both layouts, in fp32 from dequantized operands, one expert at a time."""

from __future__ import annotations

import torch

from moe_backend._checks import check_activations, check_grouped_gemm_weights, check_same_device, check_tensor
from moe_backend.constants import QUANT_BLOCK
from moe_backend.quant import dequantize_fp8_blockwise, dequantize_fp8_per_token_group

__all__ = ["expert_gemm", "grouped_gemm_contiguous", "grouped_gemm_masked", "sum_partials"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def expert_gemm(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """One expert: `[m, K] x [N, K]^T` in fp32 from dequantized operands -> bf16 `[m, N]`."""
    a = dequantize_fp8_per_token_group(a_fp8, a_scale, QUANT_BLOCK)
    b = dequantize_fp8_blockwise(b_fp8, b_scale, QUANT_BLOCK)
    return (a @ b.t()).to(torch.bfloat16)


def sum_partials(partials: torch.Tensor, count: torch.Tensor | int | None = None) -> torch.Tensor:
    """f32 `[S, ...]` partial sums of a GEMM split over K (`SPLIT_K`) -> the bf16 `[...]` product
    they stand for: the first `count` slabs (default all; a device int32 `[1]` is read, clamped to
    1..S as the kernels do) added in slab order in fp32, rounded once (as the consumer kernels do)."""
    check_tensor("partials", partials, dtypes=(torch.float32,), min_dim=2)
    slabs = partials.shape[0] if count is None else min(max(int(count), 1), partials.shape[0])
    total = partials[0].clone()
    for slab in partials[1:slabs]:
        total += slab
    return total.to(torch.bfloat16)


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.zeros(shape, dtype=torch.bfloat16, device=like.device)
    check_tensor("out", out, dtypes=(torch.bfloat16,), shape=shape, device=like.device)
    return out


def grouped_gemm_contiguous(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    expert_ids: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contiguous layout: row m of A `[M, K]` multiplies expert `expert_ids[m]` of B `[E, N, K]`.

    Rows with expert id -1 (segment padding) are not written. Returns bf16 `[M, N]`.
    """
    k = check_activations(a_fp8, a_scale, ndim=2)
    num_experts, n = check_grouped_gemm_weights(b_fp8, b_scale, k)
    check_tensor("expert_ids", expert_ids, dtypes=_INDEX_DTYPES, shape=(a_fp8.shape[0],))
    check_same_device(a_fp8=a_fp8, a_scale=a_scale, b_fp8=b_fp8, b_scale=b_scale, expert_ids=expert_ids)
    if expert_ids.numel() and (int(expert_ids.min()) < -1 or int(expert_ids.max()) >= num_experts):
        raise ValueError(
            f"expert_ids: values must lie in [-1, {num_experts}), got "
            f"[{int(expert_ids.min())}, {int(expert_ids.max())}]"
        )
    out = _check_out(out, (a_fp8.shape[0], n), a_fp8)
    for e in torch.unique(expert_ids).tolist():
        if e < 0:
            continue
        rows = (expert_ids == e).nonzero().squeeze(1)
        out[rows] = expert_gemm(a_fp8[rows], a_scale[rows], b_fp8[e], b_scale[e])
    return out


def grouped_gemm_masked(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    masked_m: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked layout: A `[E, max_m, K]`, expert e uses its first `masked_m[e]` rows.

    Rows at and past `masked_m[e]` are not written. Returns bf16 `[E, max_m, N]`.
    """
    k = check_activations(a_fp8, a_scale, ndim=3)
    num_experts, n = check_grouped_gemm_weights(b_fp8, b_scale, k)
    if a_fp8.shape[0] != num_experts:
        raise ValueError(f"a_fp8: expected {num_experts} experts in dim 0 (as b_fp8), got {a_fp8.shape[0]}")
    max_m = a_fp8.shape[1]
    check_tensor("masked_m", masked_m, dtypes=_INDEX_DTYPES, shape=(num_experts,))
    check_same_device(a_fp8=a_fp8, a_scale=a_scale, b_fp8=b_fp8, b_scale=b_scale, masked_m=masked_m)
    if num_experts and (int(masked_m.min()) < 0 or int(masked_m.max()) > max_m):
        raise ValueError(
            f"masked_m: values must lie in [0, {max_m}], got [{int(masked_m.min())}, {int(masked_m.max())}]"
        )
    out = _check_out(out, (num_experts, max_m, n), a_fp8)
    for e, m in enumerate(masked_m.tolist()):
        if m:
            out[e, :m] = expert_gemm(a_fp8[e, :m], a_scale[e, :m], b_fp8[e], b_scale[e])
    return out
