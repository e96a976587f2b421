import pytest
import torch

from moe_backend.quant import (
    FP8_DTYPE,
    dequantize_fp8_blockwise,
    dequantize_fp8_per_token_group,
    quantize_fp8_blockwise,
    quantize_fp8_per_token_group,
)
from tests.helpers.naive import rel_err
from tests.helpers.tolerances import FP8_ROUND_TRIP


@pytest.mark.parametrize("shape", [(1, 128), (5, 384), (3, 7, 256)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_per_token_group_round_trip(shape, ue8m0):
    x = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10
    x_fp8, scale = quantize_fp8_per_token_group(x, 128, ue8m0)
    assert x_fp8.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == (*shape[:-1], shape[-1] // 128)
    assert rel_err(dequantize_fp8_per_token_group(x_fp8, scale), x) < FP8_ROUND_TRIP
    # every group's largest value uses the top of the fp8 range (no clipping, no waste)
    amax = x_fp8.float().abs().reshape(*shape[:-1], -1, 128).amax(-1)
    assert amax.max() <= 448
    if not ue8m0:
        assert torch.allclose(amax, torch.full_like(amax, 448.0))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_ue8m0_scales_are_powers_of_two(ue8m0):
    x = torch.randn(4, 512) * 3
    _, scale = quantize_fp8_per_token_group(x, 128, ue8m0)
    w_fp8, w_scale = quantize_fp8_blockwise(torch.randn(300, 260), 128, ue8m0)
    for s in (scale, w_scale):
        mantissa, _ = torch.frexp(s)
        assert bool((mantissa == 0.5).all()) == ue8m0
    # rounding the scale up keeps every value in range, at a small precision cost
    assert w_fp8.float().abs().max() <= 448
    w = torch.randn(300, 260)
    assert rel_err(dequantize_fp8_blockwise(*quantize_fp8_blockwise(w, 128, ue8m0)), w) < FP8_ROUND_TRIP


@pytest.mark.parametrize("n, k", [(128, 128), (300, 260), (7, 129)])
def test_blockwise_round_trip_odd_shapes(n, k):
    w = torch.randn(2, n, k)
    w_fp8, scale = quantize_fp8_blockwise(w)
    assert scale.shape == (2, -(-n // 128), -(-k // 128))
    assert rel_err(dequantize_fp8_blockwise(w_fp8, scale), w) < FP8_ROUND_TRIP
    # quantizing already-representable weights is exact
    again_fp8, again_scale = quantize_fp8_blockwise(dequantize_fp8_blockwise(w_fp8, scale))
    assert torch.equal(dequantize_fp8_blockwise(again_fp8, again_scale), dequantize_fp8_blockwise(w_fp8, scale))


def test_zero_group_gets_finite_scale():
    x = torch.zeros(2, 256)
    x[1, 128:] = torch.randn(128)
    x_fp8, scale = quantize_fp8_per_token_group(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(dequantize_fp8_per_token_group(x_fp8, scale)[0], torch.zeros(256))


def test_bad_inputs():
    with pytest.raises(ValueError, match="x: last dim"):
        quantize_fp8_per_token_group(torch.randn(2, 100))
    with pytest.raises(TypeError, match="x: expected dtype"):
        quantize_fp8_per_token_group(torch.ones(2, 128, dtype=torch.int32))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        quantize_fp8_per_token_group([1.0] * 128)
    w_fp8, scale = quantize_fp8_blockwise(torch.randn(256, 256))
    with pytest.raises(ValueError, match="w_scale_inv: expected shape"):
        dequantize_fp8_blockwise(w_fp8, scale[:1])
