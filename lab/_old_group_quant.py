"""FROZEN copy of moe_backend/kernels/_group_quant_core.py before the flat-item rewrite (commit 309ea31),
kept only so lab/sweep_quant_gather.py can time the old kernel beside the new one in the same run.
Not imported by the package. Original docstring follows.

Per-token, per-128-column FP8 quantization, optionally fused behind SiLU(gate) * up.

One kernel for both ops (a constexpr switch), so `silu_mul_quant` and `per_token_group_quant`
round exactly alike: `scale = min(max(amax, 1e-10) / 448, 2^119)` (UE8M0: rounded up to a power of two by
bit arithmetic, exact), `q = clamp(x / scale, +-448)` cast to e4m3 with round-to-nearest-even.
`quantize_groups` is that rounding alone; `permute_quant` calls it too.

Rows can carry a validity (the layouts' padding): `ROWS_VALID_IF` "expert_id" reads one int32 per
row (valid iff >= 0, a contiguous layout's expert_ids), "masked_m" one int32 per group of
`rows_per_expert` rows (row r valid iff r % rows_per_expert < masked_m[r // rows_per_expert]).
An invalid row's program returns at once: nothing is read or written. With `used_rows` (int32 [1]
on the device; rows at and past it are padding) a fixed number of programs loop over the rows below
it instead of one program per row, so an all-padding tail costs nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend import constants
from moe_backend.kernels._launch_utils import persistent_row_programs
from moe_backend.kernels._numerics import round_to_e4m3_grid

# The quantizer's numbers (moe_backend.constants), as compile-time constants of the kernels.
FP8_MAX = tl.constexpr(constants.FP8_MAX)
SCALE_FLOOR = tl.constexpr(constants.SCALE_FLOOR)
SCALE_CEIL = tl.constexpr(constants.SCALE_CEIL)
GROUPS_PER_PROGRAM = 8


@triton.jit
def quantize_groups(x, UE8M0: tl.constexpr):
    """x fp32 `[G, GROUP]` (one row per group) -> (q fp32 `[G, GROUP]` on the e4m3 grid, scale f32 `[G]`).

    Every kernel that quantizes activations calls this, so they all round alike.
    """
    amax = tl.max(tl.abs(x), axis=1)
    # Capped, not pre-scaled: a SiLU*up product past fp32 (inf) saturates at +-448 either way, and
    # groups under the cap (every ordinary input) keep bit-identical scales and values.
    scale = tl.minimum(tl.maximum(amax, SCALE_FLOOR) / FP8_MAX, SCALE_CEIL)
    if UE8M0:
        # Round up to a power of two: carry any mantissa bit into the exponent, clear the mantissa.
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    q = round_to_e4m3_grid(tl.clamp(x / scale[:, None], -FP8_MAX, FP8_MAX))
    return q, scale


@triton.jit
def _row_is_valid(row, valid_ptr, rows_per_expert, ROWS_VALID_IF: tl.constexpr):
    if ROWS_VALID_IF == "expert_id":
        return tl.load(valid_ptr + row) >= 0
    else:
        return row % rows_per_expert < tl.load(valid_ptr + row // rows_per_expert)


@triton.jit(do_not_specialize=["num_rows"])
def _group_quant_kernel(
    x_ptr,  # [R, C] (plain) or [R, 2C] (SILU_MUL: gate columns, then up)
    q_ptr,  # fp8 [R, C]
    s_ptr,  # f32 [R, C / GROUP]
    valid_ptr,  # int32: expert_ids [R] or masked_m [R / rows_per_expert] (ROWS_VALID_IF)
    used_rows_ptr,  # USED_ROWS: int32 [1], rows at and past it are padding
    x_row_stride,
    C,
    num_groups,
    rows_per_expert,
    num_rows,
    SILU_MUL: tl.constexpr,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
    ROWS_VALID_IF: tl.constexpr,
    USED_ROWS: tl.constexpr,
):
    if USED_ROWS:
        end = tl.load(used_rows_ptr).to(tl.int64)
        end = tl.where(end < num_rows, end, num_rows)
        for row in range(tl.program_id(0).to(tl.int64), end, tl.num_programs(0)):
            _quantize_row_if_valid(
                x_ptr,
                q_ptr,
                s_ptr,
                valid_ptr,
                row,
                x_row_stride,
                C,
                num_groups,
                rows_per_expert,
                SILU_MUL,
                UE8M0,
                GROUP,
                GROUPS_PER_PROG,
                ROWS_VALID_IF,
            )
    else:
        _quantize_row_if_valid(
            x_ptr,
            q_ptr,
            s_ptr,
            valid_ptr,
            tl.program_id(0).to(tl.int64),
            x_row_stride,
            C,
            num_groups,
            rows_per_expert,
            SILU_MUL,
            UE8M0,
            GROUP,
            GROUPS_PER_PROG,
            ROWS_VALID_IF,
        )


@triton.jit
def _quantize_row_if_valid(
    x_ptr,
    q_ptr,
    s_ptr,
    valid_ptr,
    row,
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
    if ROWS_VALID_IF == "always":
        _quantize_row(x_ptr, q_ptr, s_ptr, row, x_row_stride, C, num_groups, SILU_MUL, UE8M0, GROUP, GROUPS_PER_PROG)
    elif _row_is_valid(row, valid_ptr, rows_per_expert, ROWS_VALID_IF):
        _quantize_row(x_ptr, q_ptr, s_ptr, row, x_row_stride, C, num_groups, SILU_MUL, UE8M0, GROUP, GROUPS_PER_PROG)


@triton.jit
def _quantize_row(
    x_ptr,
    q_ptr,
    s_ptr,
    row,
    x_row_stride,
    C,
    num_groups,
    SILU_MUL: tl.constexpr,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
):
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


def launch(
    x2d,
    q2d,
    s2d,
    *,
    cols: int,
    silu_mul: bool,
    ue8m0: bool,
    group: int,
    expert_ids=None,
    masked_m=None,
    rows_per_expert: int = 1,
    used_rows=None,
) -> None:
    """Quantizes every row of x2d, or only the valid ones given `expert_ids` `[R]` or `masked_m`
    (with `rows_per_expert`), and only those below `used_rows[0]`: see the module docstring."""
    rows = x2d.shape[0]
    num_groups = cols // group
    if rows == 0 or num_groups == 0:
        return
    valid, rows_valid_if = (
        (expert_ids, "expert_id")
        if expert_ids is not None
        else (masked_m, "masked_m")
        if masked_m is not None
        else (x2d, "always")
    )
    group_blocks = triton.cdiv(num_groups, GROUPS_PER_PROGRAM)
    row_programs = rows if used_rows is None else persistent_row_programs(x2d.device, rows, group_blocks)
    _group_quant_kernel[(row_programs, group_blocks)](
        x2d,
        q2d,
        s2d,
        valid,
        used_rows if used_rows is not None else valid,
        x2d.stride(0),
        cols,
        num_groups,
        rows_per_expert,
        rows,
        SILU_MUL=silu_mul,
        UE8M0=ue8m0,
        GROUP=group,
        GROUPS_PER_PROG=GROUPS_PER_PROGRAM,
        ROWS_VALID_IF=rows_valid_if,
        USED_ROWS=used_rows is not None,
        num_warps=4,
    )
