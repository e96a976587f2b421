"""The oracle against float64 and against a per-expert loop: if these fail, every kernel test lies."""

import pytest
import torch

from moe_backend import reference
from moe_backend.quant import (
    dequantize_fp8_blockwise,
    dequantize_fp8_per_token_group,
    quantize_fp8_blockwise,
    quantize_fp8_per_token_group,
)
from tests.helpers.naive import rel_err
from tests.helpers.tolerances import BF16_OUTPUT, REFERENCE_VS_FLOAT64


def _operands(m, n, k, num_experts, *, shape_a=None, seed=0):
    torch.manual_seed(seed)
    a_fp8, a_scale = quantize_fp8_per_token_group(torch.randn(*(shape_a or (m,)), k))
    b_fp8, b_scale = quantize_fp8_blockwise(torch.randn(num_experts, n, k) / k**0.5)
    return a_fp8, a_scale, b_fp8, b_scale


def _float64_product(a_fp8, a_scale, b_fp8_e, b_scale_e):
    a = dequantize_fp8_per_token_group(a_fp8, a_scale).double()
    b = dequantize_fp8_blockwise(b_fp8_e, b_scale_e).double()
    return a @ b.t()


# (rows per expert, N, K): N not a multiple of 128, experts with 0 and 1 rows, all rows on one expert
CONTIGUOUS_CASES = [
    ([3, 0, 1, 5], 200, 256),
    ([0, 0, 7, 0], 128, 384),
    ([1], 96, 128),
    ([4, 4, 4, 4], 257, 512),
]


@pytest.mark.parametrize("rows, n, k", CONTIGUOUS_CASES)
def test_contiguous_matches_float64(rows, n, k):
    pad = 2  # every segment is followed by padding rows marked -1
    expert_ids = torch.cat([torch.tensor([e] * r + [-1] * pad, dtype=torch.int32) for e, r in enumerate(rows)])
    a_fp8, a_scale, b_fp8, b_scale = _operands(len(expert_ids), n, k, len(rows))
    out = torch.full((len(expert_ids), n), float("nan"), dtype=torch.bfloat16)
    reference.grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out)
    valid = expert_ids >= 0
    assert torch.isnan(out[~valid].float()).all(), "padding rows must not be written"
    for e in range(len(rows)):
        sel = expert_ids == e
        if sel.any():
            want = _float64_product(a_fp8[sel], a_scale[sel], b_fp8[e], b_scale[e])
            assert rel_err(out[sel], want) < BF16_OUTPUT


def test_fp32_core_matches_float64():
    a_fp8, a_scale, b_fp8, b_scale = _operands(9, 200, 1024, 1)
    a = dequantize_fp8_per_token_group(a_fp8, a_scale)
    b = dequantize_fp8_blockwise(b_fp8[0], b_scale[0])
    assert rel_err(a @ b.t(), _float64_product(a_fp8, a_scale, b_fp8[0], b_scale[0])) < REFERENCE_VS_FLOAT64


@pytest.mark.parametrize("masked_m", [[3, 0, 1, 6], [6, 6, 6, 6], [0, 0, 0, 1]])
def test_masked_matches_float64(masked_m):
    num_experts, max_m, n, k = 4, 6, 200, 256
    a_fp8, a_scale, b_fp8, b_scale = _operands(0, n, k, num_experts, shape_a=(num_experts, max_m))
    out = torch.full((num_experts, max_m, n), float("nan"), dtype=torch.bfloat16)
    reference.grouped_gemm_masked(a_fp8, a_scale, b_fp8, b_scale, torch.tensor(masked_m, dtype=torch.int32), out)
    for e, m in enumerate(masked_m):
        assert torch.isnan(out[e, m:].float()).all(), "rows past masked_m must not be written"
        if m:
            want = _float64_product(a_fp8[e, :m], a_scale[e, :m], b_fp8[e], b_scale[e])
            assert rel_err(out[e, :m], want) < BF16_OUTPUT


def test_silu_mul_quant():
    h = torch.randn(5, 512, dtype=torch.bfloat16)
    a_fp8, a_scale = reference.silu_mul_quant(h)
    gate, up = h.double().chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    assert a_fp8.shape == (5, 256) and a_scale.shape == (5, 2)
    assert rel_err(dequantize_fp8_per_token_group(a_fp8, a_scale), want) < 4e-2


def test_routed_experts_matches_grouped_gemms():
    """routed_experts == explicit contiguous GEMM1 -> act -> GEMM2 -> weighted sum."""
    torch.manual_seed(1)
    t, h, i, e, k = 11, 256, 256, 5, 2
    x = torch.randn(t, h, dtype=torch.bfloat16)
    w13_fp8, w13_s = quantize_fp8_blockwise(torch.randn(e, 2 * i, h) / h**0.5)
    w2_fp8, w2_s = quantize_fp8_blockwise(torch.randn(e, h, i) / i**0.5)
    topk_ids = torch.stack([torch.randperm(e - 1)[:k] for _ in range(t)]).int()  # expert e-1: no tokens
    topk_ids[0, 1] = -1  # a slot routed to another rank
    topk_w = torch.rand(t, k)
    out = reference.routed_experts(x, w13_fp8, w13_s, w2_fp8, w2_s, topk_w, topk_ids)
    x_fp8, x_s = quantize_fp8_per_token_group(x)
    want = torch.zeros(t, h, dtype=torch.float64)
    for tok in range(t):
        for slot in range(k):
            ex = int(topk_ids[tok, slot])
            if ex < 0:
                continue
            ids = torch.zeros(1, dtype=torch.int32)
            hh = reference.grouped_gemm_contiguous(
                x_fp8[tok : tok + 1], x_s[tok : tok + 1], w13_fp8[ex : ex + 1], w13_s[ex : ex + 1], ids
            )
            a_fp8, a_s = reference.silu_mul_quant(hh)
            y = reference.grouped_gemm_contiguous(a_fp8, a_s, w2_fp8[ex : ex + 1], w2_s[ex : ex + 1], ids)
            want[tok] += float(topk_w[tok, slot]) * y[0].double()
    assert rel_err(out, want) < BF16_OUTPUT
    # pre-quantized input gives the same answer
    assert torch.equal(
        reference.routed_experts(x_fp8, w13_fp8, w13_s, w2_fp8, w2_s, topk_w, topk_ids, x_scale=x_s), out
    )


def test_bad_inputs_name_the_argument():
    a_fp8, a_scale, b_fp8, b_scale = _operands(4, 128, 256, 2)
    ids = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(TypeError, match="a_fp8: expected dtype"):
        reference.grouped_gemm_contiguous(a_fp8.float(), a_scale, b_fp8, b_scale, ids)
    with pytest.raises(ValueError, match="a_scale: expected shape"):
        reference.grouped_gemm_contiguous(a_fp8, a_scale[:, :1], b_fp8, b_scale, ids)
    with pytest.raises(ValueError, match="b_fp8: K"):
        reference.grouped_gemm_contiguous(a_fp8, a_scale, b_fp8[..., :128], b_scale, ids)
    with pytest.raises(ValueError, match="expert_ids: values"):
        reference.grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, ids + 5)
    with pytest.raises(ValueError, match="K \\(100\\)"):
        reference.grouped_gemm_contiguous(a_fp8[:, :100], a_scale[:, :1], b_fp8, b_scale, ids)
    with pytest.raises(ValueError, match="out: expected shape"):
        reference.grouped_gemm_contiguous(
            a_fp8, a_scale, b_fp8, b_scale, ids, torch.empty(3, 128, dtype=torch.bfloat16)
        )
    with pytest.raises(ValueError, match="masked_m: values"):
        reference.grouped_gemm_masked(
            a_fp8.view(2, 2, 256), a_scale.view(2, 2, 2), b_fp8, b_scale, torch.tensor([3, 0], dtype=torch.int32)
        )
