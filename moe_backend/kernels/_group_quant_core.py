"""Per-token, per-128-column FP8 quantization, optionally fused behind SiLU(gate) * up.

One kernel for both ops (a constexpr switch), so `silu_mul_quant` and `per_token_group_quant`
round exactly alike: `scale = max(amax, 1e-10) / 448` (UE8M0: rounded up to a power of two by
bit arithmetic, exact), `q = clamp(x / scale, +-448)` cast to e4m3 with round-to-nearest-even.
`quantize_groups` is that rounding alone; `permute_quant` calls it too.

Rows can carry a validity (the layouts' padding): `ROWS_VALID_IF` "expert_id" reads one int32 per
row (valid iff >= 0, a contiguous layout's expert_ids), "masked_m" one int32 per group of
`rows_per_expert` rows (row r valid iff r % rows_per_expert < masked_m[r // rows_per_expert]).
An invalid row's program returns at once: nothing is read or written.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._numerics import round_to_e4m3_grid

FP8_MAX = 448.0
GROUPS_PER_PROGRAM = 8


@triton.jit
def quantize_groups(x, UE8M0: tl.constexpr):
    """x fp32 `[G, GROUP]` (one row per group) -> (q fp32 `[G, GROUP]` on the e4m3 grid, scale f32 `[G]`).

    Every kernel that quantizes activations calls this, so they all round alike.
    """
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(amax, 1e-10) / 448.0
    if UE8M0:
        # Round up to a power of two: carry any mantissa bit into the exponent, clear the mantissa.
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    q = round_to_e4m3_grid(tl.clamp(x / scale[:, None], -448.0, 448.0))
    return q, scale


@triton.jit
def _row_is_valid(row, valid_ptr, rows_per_expert, ROWS_VALID_IF: tl.constexpr):
    if ROWS_VALID_IF == "expert_id":
        return tl.load(valid_ptr + row) >= 0
    else:
        return row % rows_per_expert < tl.load(valid_ptr + row // rows_per_expert)


@triton.jit
def _group_quant_kernel(
    x_ptr,  # [R, C] (plain) or [R, 2C] (SILU_MUL: gate columns, then up)
    q_ptr,  # fp8 [R, C]
    s_ptr,  # f32 [R, C / GROUP]
    valid_ptr,  # int32: expert_ids [R] or masked_m [R / rows_per_expert] (ROWS_VALID_IF)
    x_row_stride,
    C,
    num_groups,
    rows_per_expert,
    SILU_MUL: tl.constexpr,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
    ROWS_VALID_IF: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if ROWS_VALID_IF == "always":
        _quantize_row(x_ptr, q_ptr, s_ptr, row, x_row_stride, C, num_groups, SILU_MUL, UE8M0, GROUP,
                      GROUPS_PER_PROG)
    elif _row_is_valid(row, valid_ptr, rows_per_expert, ROWS_VALID_IF):
        _quantize_row(x_ptr, q_ptr, s_ptr, row, x_row_stride, C, num_groups, SILU_MUL, UE8M0, GROUP,
                      GROUPS_PER_PROG)


@triton.jit
def _quantize_row(x_ptr, q_ptr, s_ptr, row, x_row_stride, C, num_groups, SILU_MUL: tl.constexpr,
                  UE8M0: tl.constexpr, GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr):
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


def launch(x2d, q2d, s2d, *, cols: int, silu_mul: bool, ue8m0: bool, group: int,
           expert_ids=None, masked_m=None, rows_per_expert: int = 1) -> None:
    """Quantizes every row of x2d, or only the valid ones given `expert_ids` `[R]` or `masked_m`
    (with `rows_per_expert`): see the module docstring."""
    rows = x2d.shape[0]
    num_groups = cols // group
    if rows == 0 or num_groups == 0:
        return
    valid, rows_valid_if = (expert_ids, "expert_id") if expert_ids is not None else \
        (masked_m, "masked_m") if masked_m is not None else (x2d, "always")
    grid = (rows, triton.cdiv(num_groups, GROUPS_PER_PROGRAM))
    _group_quant_kernel[grid](
        x2d, q2d, s2d, valid, x2d.stride(0), cols, num_groups, rows_per_expert,
        SILU_MUL=silu_mul, UE8M0=ue8m0, GROUP=group, GROUPS_PER_PROG=GROUPS_PER_PROGRAM,
        ROWS_VALID_IF=rows_valid_if, num_warps=4,
    )
