"""The oracle: plain-torch FP8 grouped GEMMs and the routed-expert MLP, in fp32 from dequantized
operands. Every kernel is tested against these functions, and the layer falls back to them when
no GPU kernel applies. They are written for clarity and host-sync freely (never on a hot path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_backend._checks import check_bool, check_int, check_quant_out, check_same_device, check_tensor
from moe_backend.quant import (
    FP8_DTYPE,
    dequantize_fp8_blockwise,
    dequantize_fp8_per_token_group,
    quantize_fp8_per_token_group,
)

__all__ = [
    "grouped_gemm_contiguous",
    "grouped_gemm_masked",
    "silu_mul_quant",
    "routed_experts",
]

GROUP = 128
_INDEX_DTYPES = (torch.int32, torch.int64)


def check_grouped_gemm_weights(b_fp8: torch.Tensor, b_scale: torch.Tensor, k: int) -> tuple[int, int]:
    """B fp8 `[E, N, K]` + fp32 `[E, ceil(N/128), K/128]`; returns (E, N)."""
    check_tensor("b_fp8", b_fp8, dtypes=(FP8_DTYPE,), ndim=3)
    num_experts, n, kb = b_fp8.shape
    if kb != k:
        raise ValueError(f"b_fp8: K ({kb}) must equal the activations' K ({k})")
    check_tensor("b_scale", b_scale, dtypes=(torch.float32,),
                 shape=(num_experts, -(-n // GROUP), k // GROUP))
    return num_experts, n


def check_activations(a_fp8: torch.Tensor, a_scale: torch.Tensor, ndim: int) -> int:
    """A fp8 `[..., K]` (K a multiple of 128) + fp32 `[..., K/128]`; returns K."""
    check_tensor("a_fp8", a_fp8, dtypes=(FP8_DTYPE,), ndim=ndim)
    k = a_fp8.shape[-1]
    if k == 0 or k % GROUP:
        raise ValueError(f"a_fp8: K ({k}) must be a positive multiple of {GROUP}")
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=(*a_fp8.shape[:-1], k // GROUP))
    return k


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.zeros(shape, dtype=torch.bfloat16, device=like.device)
    check_tensor("out", out, dtypes=(torch.bfloat16,), shape=shape, device=like.device)
    return out


def _expert_gemm(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor,
                 b_scale: torch.Tensor) -> torch.Tensor:
    """`[m, K] x [N, K]^T` in fp32 from dequantized operands -> bf16 `[m, N]`."""
    a = dequantize_fp8_per_token_group(a_fp8, a_scale, GROUP)
    b = dequantize_fp8_blockwise(b_fp8, b_scale, GROUP)
    return (a @ b.t()).to(torch.bfloat16)


def grouped_gemm_contiguous(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor,
                            b_scale: torch.Tensor, expert_ids: torch.Tensor,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Contiguous layout: row m of A `[M, K]` multiplies expert `expert_ids[m]` of B `[E, N, K]`.

    Rows with expert id -1 (segment padding) are not written. Returns bf16 `[M, N]`.
    """
    k = check_activations(a_fp8, a_scale, ndim=2)
    num_experts, n = check_grouped_gemm_weights(b_fp8, b_scale, k)
    check_tensor("expert_ids", expert_ids, dtypes=_INDEX_DTYPES, shape=(a_fp8.shape[0],))
    check_same_device(a_fp8=a_fp8, a_scale=a_scale, b_fp8=b_fp8, b_scale=b_scale, expert_ids=expert_ids)
    if expert_ids.numel() and (int(expert_ids.min()) < -1 or int(expert_ids.max()) >= num_experts):
        raise ValueError(f"expert_ids: values must lie in [-1, {num_experts}), got "
                         f"[{int(expert_ids.min())}, {int(expert_ids.max())}]")
    out = _check_out(out, (a_fp8.shape[0], n), a_fp8)
    for e in torch.unique(expert_ids).tolist():
        if e < 0:
            continue
        rows = (expert_ids == e).nonzero().squeeze(1)
        out[rows] = _expert_gemm(a_fp8[rows], a_scale[rows], b_fp8[e], b_scale[e])
    return out


def grouped_gemm_masked(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor,
                        b_scale: torch.Tensor, masked_m: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
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
        raise ValueError(f"masked_m: values must lie in [0, {max_m}], got "
                         f"[{int(masked_m.min())}, {int(masked_m.max())}]")
    out = _check_out(out, (num_experts, max_m, n), a_fp8)
    for e, m in enumerate(masked_m.tolist()):
        if m:
            out[e, :m] = _expert_gemm(a_fp8[e, :m], a_scale[e, :m], b_fp8[e], b_scale[e])
    return out


def silu_mul_quant(h: torch.Tensor, group: int = GROUP, ue8m0: bool = False, *,
                   expert_ids: torch.Tensor | None = None, masked_m: torch.Tensor | None = None,
                   used_rows: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """h `[..., 2I]` (gate columns, then up) -> FP8 of `silu(gate) * up` computed in fp32, `[..., I]`
    (written into the pair `out` when given).

    Optional row validity, as the kernel's: `expert_ids` int32 `[M]` with h `[M, 2I]` (valid iff
    >= 0) or `masked_m` int32 `[E]` with h `[E, max_m, 2I]` (row r of expert e valid iff r <
    masked_m[e]), and `used_rows` int32 `[1]` (flat rows at and past it invalid); invalid rows come
    out zero here (the kernel leaves them unwritten)."""
    check_tensor("h", h, dtypes=(torch.bfloat16, torch.float16, torch.float32), min_dim=1)
    check_int("group", group, minimum=1)
    check_bool("ue8m0", ue8m0)
    if h.shape[-1] % (2 * group):
        raise ValueError(f"h: last dim ({h.shape[-1]}) must be 2*I with I a multiple of {group}")
    gate, up = h.float().chunk(2, dim=-1)
    a_fp8, a_scale = quantize_fp8_per_token_group(F.silu(gate) * up, group, ue8m0)
    valid = _valid_rows(h, expert_ids, masked_m)
    if used_rows is not None:
        check_tensor("used_rows", used_rows, dtypes=(torch.int32,), shape=(1,), device=h.device)
        below = torch.arange(a_scale[..., 0].numel(), device=h.device).view(a_scale.shape[:-1]) < used_rows
        valid = below if valid is None else valid & below
    if valid is not None:
        a_fp8 = torch.where(valid[..., None], a_fp8.view(torch.uint8), 0).view(a_fp8.dtype)
        a_scale = torch.where(valid[..., None], a_scale, 0.0)
    if out is None:
        return a_fp8, a_scale
    check_quant_out(out, a_fp8.shape, a_scale.shape, h.device)
    return out[0].copy_(a_fp8), out[1].copy_(a_scale)


def _valid_rows(h: torch.Tensor, expert_ids: torch.Tensor | None, masked_m: torch.Tensor | None
                ) -> torch.Tensor | None:
    """bool `h.shape[:-1]`: the rows a layout fills (None: all)."""
    if expert_ids is not None and masked_m is not None:
        raise ValueError("expert_ids, masked_m: give at most one row validity")
    if expert_ids is not None:
        if h.dim() != 2:
            raise ValueError(f"h: expected [M, 2I] with expert_ids, got shape {list(h.shape)}")
        check_tensor("expert_ids", expert_ids, dtypes=(torch.int32,), shape=(h.shape[0],), device=h.device)
        return expert_ids >= 0
    if masked_m is not None:
        if h.dim() != 3:
            raise ValueError(f"h: expected [E, max_m, 2I] with masked_m, got shape {list(h.shape)}")
        check_tensor("masked_m", masked_m, dtypes=(torch.int32,), shape=(h.shape[0],), device=h.device)
        return torch.arange(h.shape[1], device=h.device)[None, :] < masked_m[:, None]
    return None


def routed_experts(x: torch.Tensor, w13_fp8: torch.Tensor, w13_scale_inv: torch.Tensor,
                   w2_fp8: torch.Tensor, w2_scale_inv: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, *, x_scale: torch.Tensor | None = None,
                   ue8m0: bool = False) -> torch.Tensor:
    """The routed experts' weighted sum, one expert at a time.

    x: bf16 `[T, H]`, or fp8 `[T, H]` with `x_scale` fp32 `[T, H/128]` (already quantized).
    w13: fp8 `[E, 2I, H]` (gate rows, then up rows); w2: fp8 `[E, H, I]`; block scales beside them.
    topk_weights f32 `[T, k]`, topk_ids `[T, k]` local expert ids; ids outside `[0, E)` (-1, or
    experts of another rank) contribute nothing. Returns bf16 `[T, H]`:
    `sum_j topk_weights[t, j] * MLP_{topk_ids[t, j]}(x[t])`, summed in fp32.
    """
    check_bool("ue8m0", ue8m0)
    if x_scale is None:
        check_tensor("x", x, dtypes=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
        x_fp8, x_scale = quantize_fp8_per_token_group(x, GROUP, ue8m0)
    else:
        x_fp8 = x
    hidden = check_activations(x_fp8, x_scale, ndim=2)
    num_experts, two_i = check_grouped_gemm_weights(w13_fp8, w13_scale_inv, hidden)
    check_grouped_gemm_weights(w2_fp8, w2_scale_inv, two_i // 2)
    if w2_fp8.shape[:2] != (num_experts, hidden):
        raise ValueError(f"w2_fp8: expected shape [{num_experts}, {hidden}, {two_i // 2}], "
                         f"got {list(w2_fp8.shape)}")
    num_tokens = x_fp8.shape[0]
    check_tensor("topk_ids", topk_ids, dtypes=_INDEX_DTYPES, ndim=2)
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids: expected {num_tokens} rows (tokens), got {topk_ids.shape[0]}")
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=tuple(topk_ids.shape))

    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x_fp8.device)
    for e in torch.unique(topk_ids).tolist():
        if not 0 <= e < num_experts:
            continue
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        h = _expert_gemm(x_fp8[tokens], x_scale[tokens], w13_fp8[e], w13_scale_inv[e])
        a_fp8, a_scale = silu_mul_quant(h, GROUP, ue8m0)
        y = _expert_gemm(a_fp8, a_scale, w2_fp8[e], w2_scale_inv[e])
        acc.index_add_(0, tokens, topk_weights[tokens, slots].unsqueeze(1) * y.float())
    return acc.to(torch.bfloat16)
