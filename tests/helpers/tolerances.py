"""Every tolerance the tests use, with the reason it is what it is (relative Frobenius error)."""

# fp32 GEMM from the same dequantized operands vs float64: fp32 rounding over K <= 1024 terms.
REFERENCE_VS_FLOAT64 = 1e-5
# bf16 output rounding alone is 2^-9 = 2e-3 per element, ~1e-3 as a norm-wise error.
BF16_OUTPUT = 4e-3
# Layer vs an independent computation with the same quantized activations: two bf16 roundings
# (GEMM1 output, final) and fp32 summation order; measured ~2e-3.
LAYER_SAME_QUANT = 1e-2


def layer_same_quant(pairs: int) -> float:
    """LAYER_SAME_QUANT for an output made of `pairs` routed (token, expert) pairs. A GPU kernel's
    GEMM1 output can differ from the reference's by a bf16 ulp, which flips some FP8 roundings of
    the activation (6% steps): averaged over many pairs that stays ~2e-3, but a single pair's
    output carries it undiluted (>1e-2 for every correct kernel, DeepGEMM's included, on the
    H200); the spread shrinks as 1/sqrt(pairs). Same rule as `moe_backend.ab.divergence`."""
    from moe_backend.ab.divergence import cell_tolerance

    return cell_tolerance(LAYER_SAME_QUANT, pairs)


# The same on the GPU when a dimension is a single 128-element scale group (hidden or
# intermediate = 128, the property tests' smallest shapes): one group scale per row, so a scale the
# kernel rounds differently moves every element of that row; measured 1.3e-2 on an H200 over 269
# tokens on one expert and 1.25e-2 for the whole layer at hidden 128 over 2964 tokens
# (tests/test_properties.py, GPU profile), against ~5e-3 at DeepSeek-V3 sizes.
LAYER_SAME_QUANT_ONE_GROUP = 2e-2


# Layer vs unquantized activations: FP8 e4m3 rounding of activations (3 mantissa bits: ~4% worst
# case per element, ~2-3% norm-wise) through two GEMMs.
LAYER_UNQUANTIZED = 6e-2
# FP8 quantize -> dequantize round trip: e4m3 has 3 mantissa bits, relative step 2^-4 = 6%,
# mean-square relative error ~ 2^-4/sqrt(12) = 1.8% ... bounded well under 4% for Gaussian data.
FP8_ROUND_TRIP = 4e-2
