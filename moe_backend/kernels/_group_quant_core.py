"""Per-token, per-128-column FP8 quantization, optionally fused behind SiLU(gate) * up.

One kernel for both ops (a constexpr switch), so `silu_mul_quant` and `per_token_group_quant`
round exactly alike: `scale = min(max(amax, 1e-10) / 448, 2^119)` (UE8M0: rounded up to a power of two by
bit arithmetic, exact), `q = clamp(x / scale, +-448)` cast to e4m3 with round-to-nearest-even.
`quantize_groups` is that rounding alone; `permute_quant` calls it too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._numerics import round_to_e4m3_grid

FP8_MAX = 448.0
# moe_backend.quant.SCALE_CEIL: the largest power of two with 448 * it finite in fp32.
SCALE_CEIL = tl.constexpr(2.0 ** 119)
GROUPS_PER_PROGRAM = 8


@triton.jit
def quantize_groups(x, UE8M0: tl.constexpr):
    """x fp32 `[G, GROUP]` (one row per group) -> (q fp32 `[G, GROUP]` on the e4m3 grid, scale f32 `[G]`).

    Every kernel that quantizes activations calls this, so they all round alike.
    """
    amax = tl.max(tl.abs(x), axis=1)
    # Capped, not pre-scaled: a SiLU*up product past fp32 (inf) saturates at +-448 either way, and
    # groups under the cap (every ordinary input) keep bit-identical scales and values.
    scale = tl.minimum(tl.maximum(amax, 1e-10) / 448.0, SCALE_CEIL)
    if UE8M0:
        # Round up to a power of two: carry any mantissa bit into the exponent, clear the mantissa.
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    q = round_to_e4m3_grid(tl.clamp(x / scale[:, None], -448.0, 448.0))
    return q, scale


@triton.jit
def _group_quant_kernel(
    x_ptr,  # [R, C] (plain) or [R, 2C] (SILU_MUL: gate columns, then up)
    q_ptr,  # fp8 [R, C]
    s_ptr,  # f32 [R, C / GROUP]
    x_row_stride,
    C,
    num_groups,
    SILU_MUL: tl.constexpr,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    g_ok = g < num_groups
    offs = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GPP, GROUP]
    x_row = x_ptr + row * x_row_stride
    x = tl.load(x_row + offs, mask=g_ok[:, None], other=0.0).to(tl.float32)
    if SILU_MUL:
        up = tl.load(x_row + C + offs, mask=g_ok[:, None], other=0.0).to(tl.float32)
        x = x / (1.0 + tl.exp(-x)) * up
    q, scale = quantize_groups(x, UE8M0)
    tl.store(q_ptr + row * C + offs, q.to(q_ptr.dtype.element_ty), mask=g_ok[:, None])
    tl.store(s_ptr + row * num_groups + g, scale, mask=g_ok)


def launch(x2d, q2d, s2d, *, cols: int, silu_mul: bool, ue8m0: bool, group: int) -> None:
    rows = x2d.shape[0]
    num_groups = cols // group
    if rows == 0 or num_groups == 0:
        return
    grid = (rows, triton.cdiv(num_groups, GROUPS_PER_PROGRAM))
    _group_quant_kernel[grid](
        x2d, q2d, s2d, x2d.stride(0), cols, num_groups,
        SILU_MUL=silu_mul, UE8M0=ue8m0, GROUP=group, GROUPS_PER_PROG=GROUPS_PER_PROGRAM, num_warps=4,
    )
