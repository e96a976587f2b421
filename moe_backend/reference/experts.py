"""The routed experts' weighted sum, token by expert, with no layout at all: the layer's oracle."""

from __future__ import annotations

import torch

from moe_backend._checks import check_bool, check_expert_weights, check_token_activations, check_topk
from moe_backend.constants import QUANT_BLOCK
from moe_backend.quant import quantize_fp8_per_token_group
from moe_backend.reference.activation import silu_mul_quant
from moe_backend.reference.gemm import expert_gemm

__all__ = ["routed_experts"]


def routed_experts(
    x: torch.Tensor,
    w13_fp8: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2_fp8: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    ue8m0: bool = False,
) -> torch.Tensor:
    """The routed experts' weighted sum, one expert at a time.

    x: bf16 `[T, H]`, or fp8 `[T, H]` with `x_scale` fp32 `[T, H/128]` (already quantized).
    w13: fp8 `[E, 2I, H]` (gate rows, then up rows); w2: fp8 `[E, H, I]`; block scales beside them.
    topk_weights f32 `[T, k]`, topk_ids `[T, k]` local expert ids; ids outside `[0, E)` (-1, or
    experts of another rank) contribute nothing. Returns bf16 `[T, H]`:
    `sum_j topk_weights[t, j] * MLP_{topk_ids[t, j]}(x[t])`, summed in fp32.
    """
    check_bool("ue8m0", ue8m0)
    hidden = check_token_activations(x, x_scale)
    num_experts, _ = check_expert_weights(w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, hidden)
    num_tokens = x.shape[0]
    check_topk(topk_ids, topk_weights, num_tokens)
    x_fp8, x_scale = quantize_fp8_per_token_group(x, QUANT_BLOCK, ue8m0) if x_scale is None else (x, x_scale)

    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x_fp8.device)
    for e in torch.unique(topk_ids).tolist():
        if not 0 <= e < num_experts:
            continue
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        h = expert_gemm(x_fp8[tokens], x_scale[tokens], w13_fp8[e], w13_scale_inv[e])
        a_fp8, a_scale = silu_mul_quant(h, QUANT_BLOCK, ue8m0)
        y = expert_gemm(a_fp8, a_scale, w2_fp8[e], w2_scale_inv[e])
        acc.index_add_(0, tokens, topk_weights[tokens, slots].unsqueeze(1) * y.float())
    return acc.to(torch.bfloat16)
