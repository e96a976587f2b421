"""Per-token, per-128-column FP8 quantization, optionally fused behind SiLU(gate) * up.

One kernel for both ops (a constexpr switch), so `silu_mul_quant` and `per_token_group_quant`
round exactly alike, and as the torch reference does (IEEE divisions):
`scale = min(max(amax, 1e-10) / 448, 2^119)` (UE8M0: rounded up to a power of two by bit
arithmetic, exact), `q = clamp(x / scale, +-448)` cast to e4m3 with round-to-nearest-even.
`quantize_groups` is that rounding alone; `permute_quant` calls it too.

Work is cut into flat items `f = row * num_groups + g` (one group of one row), and a program takes
`items_per_program` consecutive items: a row of 2 groups (SiLU*up of the TP8 slice, I = 256) and a
row of 56 (x of DeepSeek-V3, H = 7168) both fill whole programs, where one program per row would
leave most of its lanes idle on narrow rows. Items and warps per program come from
`quant_launch_config`.

Rows can carry a validity (the layouts' padding), applied per item as a mask: `ROWS_VALID_IF`
"expert_id" reads one int32 per row (valid iff >= 0, a contiguous layout's expert_ids), "masked_m"
one int32 per group of `rows_per_expert` rows (row r valid iff r % rows_per_expert <
masked_m[r // rows_per_expert]). An invalid row's items are neither read nor written. With
`used_rows` (int32 [1] on the device; rows at and past it are padding) a fixed number of programs
loop over the item blocks below `used_rows * num_groups` instead of one program per block, so an
all-padding tail costs nothing.

SiLU*up can read GEMM1's output as `SPLITS` (> 0) fp32 partial sums (a GEMM split over K), slabs
`split_stride` elements apart, of which the first `count_ptr[0]` hold the slices when the GEMM
chose the count on the device: they are added in slab order and rounded to bf16, the value the
unsplit GEMM would have stored, before the SiLU.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from moe_backend import constants
from moe_backend.kernels._dependent_launch import launch_options, wait_for_producer
from moe_backend.kernels._launch_utils import check_per_program, resident_grid
from moe_backend.kernels._numerics import round_to_bf16_grid, to_e4m3

# The quantizer's numbers (moe_backend.constants), as compile-time constants of the kernels.
FP8_MAX = tl.constexpr(constants.FP8_MAX)
SCALE_FLOOR = tl.constexpr(constants.SCALE_FLOOR)
SCALE_CEIL = tl.constexpr(constants.SCALE_CEIL)
# Groups of one row per program in `permute_quant`'s row kernel (this file's kernel takes flat items).
GROUPS_PER_PROGRAM = 8
# Flat item indices are int32 (cheap division by num_groups); launches above this many items refuse.
MAX_LAUNCH_ITEMS = 2**31 - 2**20


@triton.jit
def quantize_groups(x, UE8M0: tl.constexpr):
    """x fp32 `[G, GROUP]` (one row per group) -> (q e4m3 `[G, GROUP]`, scale f32 `[G]`).

    Every kernel that quantizes activations calls this, so they all round alike.
    """
    amax = tl.max(tl.abs(x), axis=1)
    # Capped, not pre-scaled: a SiLU*up product past fp32 (inf) saturates at +-448 either way, and
    # groups under the cap (every ordinary input) keep bit-identical scales and values.
    # Correctly rounded divisions, as torch's: Triton's `/` is approximate (up to 2 ulp), and a
    # quotient one ulp off flips the e4m3 ties that bf16 inputs hit often (x * 448 / amax exactly on
    # a midpoint), a few values per row.
    scale = tl.minimum(tl.div_rn(tl.maximum(amax, SCALE_FLOOR), FP8_MAX), SCALE_CEIL)
    if UE8M0:
        # Round up to a power of two: carry any mantissa bit into the exponent, clear the mantissa.
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    # x / scale per element without div_rn's cost (it made the quant compute-bound): the rounded
    # reciprocal, then one FMA correction (Markstein), which gives the correctly rounded quotient.
    # Past the fp8 range the value saturates anyway, and an infinite x * recip (an fp32-overflowing
    # SiLU*up product) would turn the correction into NaN: those keep the plain product.
    # A power-of-two scale (UE8M0) has an exact reciprocal, so the plain product is the quotient.
    scale_2d = scale[:, None]
    recip = tl.div_rn(tl.full(scale_2d.shape, 1.0, tl.float32), scale_2d)
    quotient = x * recip
    if not UE8M0:
        corrected = tl.fma(tl.fma(-quotient, scale_2d, x), recip, quotient)
        quotient = tl.where(tl.abs(quotient) <= 2 * FP8_MAX, corrected, quotient)
    q = to_e4m3(tl.clamp(quotient, -FP8_MAX, FP8_MAX))
    return q, scale


@triton.jit
def partial_count(count_ptr, SPLITS: tl.constexpr):
    """The partial-sum slabs a split GEMM filled (its int32 count, read on the device), in [1, SPLITS]."""
    return tl.minimum(tl.maximum(tl.load(count_ptr), 1), SPLITS)


@triton.jit
def silu_mul_of(h_ptr, offs, up_offset, slab_stride, count, mask, SPLITS: tl.constexpr):
    """fp32 `silu(gate) * up` at element offsets `offs` (int64) of GEMM1's output h, up columns
    `up_offset` further; masked-off elements give 0. h is bf16 (SPLITS == 0) or `count` of SPLITS
    fp32 partial-sum slabs `slab_stride` apart, added in slab order and rounded to bf16 (what the
    unsplit GEMM stores) first. Every reader of h (SiLU*up quant, GEMM2 computing its own A) calls
    this, so they agree bit for bit."""
    gate = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + up_offset + offs, mask=mask, other=0.0).to(tl.float32)
    if SPLITS > 0:
        slab_offs = offs  # stepped one slab at a time (no int32 product to overflow)
        for _ in range(1, count):
            slab_offs += slab_stride
            gate += tl.load(h_ptr + slab_offs, mask=mask, other=0.0)
            up += tl.load(h_ptr + up_offset + slab_offs, mask=mask, other=0.0)
        gate = round_to_bf16_grid(gate)
        up = round_to_bf16_grid(up)
    return gate / (1.0 + tl.exp(-gate)) * up


@dataclass(frozen=True)
class QuantLaunchConfig:
    items_per_program: int  # (row, group) items one program quantizes per block: a power of two
    num_warps: int

    def __post_init__(self):
        check_per_program("items_per_program", self.items_per_program, self.num_warps)


# 16 (row, group) items per program with 4 warps: the fastest or within 2% of it for x quant
# (T = 2048, 16384) and for SiLU*up quant at both slices' shapes (docs/benchmarks.md, "Activation
# quant and the row gather"). Small launches shrink the block so the grid still spreads over
# every SM (~132 on Hopper).
ITEMS_PER_PROGRAM = 16
MIN_ITEMS_PER_PROGRAM = 8
MIN_PROGRAMS = 4 * 132
DEFAULT_NUM_WARPS = 4


def quant_launch_config(rows: int, num_groups: int) -> QuantLaunchConfig:
    """Items per program and warps for `rows` rows of `num_groups` groups: ITEMS_PER_PROGRAM,
    halved while the launch would have fewer than MIN_PROGRAMS programs."""
    items = ITEMS_PER_PROGRAM
    total = rows * num_groups
    while items > MIN_ITEMS_PER_PROGRAM and triton.cdiv(total, items) < MIN_PROGRAMS:
        items //= 2
    return QuantLaunchConfig(items, DEFAULT_NUM_WARPS)


@triton.jit
def _quantize_items(
    x_ptr,
    q_ptr,
    s_ptr,
    valid_ptr,
    block,
    end,
    x_row_stride,
    split_stride,
    count_ptr,
    rows_per_expert,
    C: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    ITEMS: tl.constexpr,
    ROWS_VALID_IF: tl.constexpr,
    SPLITS: tl.constexpr,
    COUNT_ON_DEVICE: tl.constexpr,
):
    """Items `[block * ITEMS, (block + 1) * ITEMS)` below `end` (all int32), of valid rows only."""
    f = block * ITEMS + tl.arange(0, ITEMS)
    row = f // NUM_GROUPS
    g = f - row * NUM_GROUPS
    ok = f < end
    if ROWS_VALID_IF == "expert_id":
        ok = ok & (tl.load(valid_ptr + row, mask=ok, other=-1) >= 0)
    elif ROWS_VALID_IF == "masked_m":
        ok = ok & (row % rows_per_expert < tl.load(valid_ptr + row // rows_per_expert, mask=ok, other=0))
    cols = tl.arange(0, GROUP)[None, :]
    # x rows may be strided (x_row_stride); q and s are contiguous, so item f sits at f * GROUP and f.
    x_offs = row.to(tl.int64)[:, None] * x_row_stride + (g * GROUP)[:, None] + cols  # [ITEMS, GROUP]
    if SILU_MUL:
        count = SPLITS
        if SPLITS > 0 and COUNT_ON_DEVICE:
            count = partial_count(count_ptr, SPLITS)
        x = silu_mul_of(x_ptr, x_offs, C, split_stride, count, ok[:, None], SPLITS)
    else:
        x = tl.load(x_ptr + x_offs, mask=ok[:, None], other=0.0).to(tl.float32)
    q, scale = quantize_groups(x, UE8M0)
    q_offs = f.to(tl.int64)[:, None] * GROUP + cols
    tl.store(q_ptr + q_offs, q.to(q_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(s_ptr + f, scale, mask=ok)


@triton.jit(do_not_specialize=["num_rows", "rows_per_expert"])
def _group_quant_kernel(
    x_ptr,  # [R, C] (plain) or [R, 2C] (SILU_MUL: gate columns, then up), rows x_row_stride apart
    q_ptr,  # fp8 [R, C], contiguous
    s_ptr,  # f32 [R, C / GROUP], contiguous
    valid_ptr,  # int32: expert_ids [R] or masked_m [R / rows_per_expert] (ROWS_VALID_IF)
    used_rows_ptr,  # USED_ROWS: int32 [1], rows at and past it are padding
    x_row_stride,
    split_stride,  # SPLITS > 0: elements between two partial-sum slabs of x
    count_ptr,  # COUNT_ON_DEVICE: int32 [1], the slabs to add (<= SPLITS)
    rows_per_expert,
    num_rows,
    C: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    ITEMS: tl.constexpr,
    ROWS_VALID_IF: tl.constexpr,
    USED_ROWS: tl.constexpr,
    SPLITS: tl.constexpr,
    COUNT_ON_DEVICE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_producer(PDL)
    if USED_ROWS:
        used = tl.load(used_rows_ptr)
        used = tl.where(used < num_rows, used, num_rows)
        end = tl.maximum(used, 0) * NUM_GROUPS
        for block in range(tl.program_id(0), tl.cdiv(end, ITEMS), tl.num_programs(0)):
            _quantize_items(
                x_ptr,
                q_ptr,
                s_ptr,
                valid_ptr,
                block,
                end,
                x_row_stride,
                split_stride,
                count_ptr,
                rows_per_expert,
                C,
                NUM_GROUPS,
                SILU_MUL,
                UE8M0,
                GROUP,
                ITEMS,
                ROWS_VALID_IF,
                SPLITS,
                COUNT_ON_DEVICE,
            )
    else:
        _quantize_items(
            x_ptr,
            q_ptr,
            s_ptr,
            valid_ptr,
            tl.program_id(0),
            num_rows * NUM_GROUPS,
            x_row_stride,
            split_stride,
            count_ptr,
            rows_per_expert,
            C,
            NUM_GROUPS,
            SILU_MUL,
            UE8M0,
            GROUP,
            ITEMS,
            ROWS_VALID_IF,
            SPLITS,
            COUNT_ON_DEVICE,
        )


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
    config: QuantLaunchConfig | None = None,
    splits: int = 0,
    split_count=None,
) -> None:
    """Quantizes every row of x2d `[R, >= cols]` (`[R, >= 2 * cols]` with silu_mul; any row stride,
    unit column stride) into the contiguous q2d `[R, cols]` and s2d `[R, cols / group]`, or only the
    valid rows given `expert_ids` `[R]` or `masked_m` (with `rows_per_expert`), and only those below
    `used_rows[0]`: see the module docstring. `config`: items and warps per program (default
    `quant_launch_config`). `splits` > 0 (silu_mul only): x2d is the first of `splits` partial-sum
    slabs, each `rows * x2d.stride(0)` elements after the last (module docstring); `split_count`
    (int32 `[1]` on the device, optional): add only that many of them."""
    if splits and not silu_mul:
        raise ValueError("splits: partial sums are read by the SiLU*up quant only")
    rows = x2d.shape[0]
    num_groups = cols // group
    if rows == 0 or num_groups == 0:
        return
    if rows * num_groups > MAX_LAUNCH_ITEMS:
        raise ValueError(f"x: {rows} rows of {num_groups} groups exceed one launch's {MAX_LAUNCH_ITEMS} items")
    if x2d.stride(-1) != 1 or not q2d.is_contiguous() or not s2d.is_contiguous():
        raise ValueError("x2d: expected unit column stride, q2d and s2d contiguous")
    if config is None:
        config = quant_launch_config(rows, num_groups)
    valid, rows_valid_if = (
        (expert_ids, "expert_id")
        if expert_ids is not None
        else (masked_m, "masked_m")
        if masked_m is not None
        else (x2d, "always")
    )
    args = (
        x2d,
        q2d,
        s2d,
        valid,
        used_rows if used_rows is not None else valid,
        x2d.stride(0),
        rows * x2d.stride(0),
        split_count if split_count is not None else valid,
        rows_per_expert,
        rows,
    )
    meta = dict(
        C=cols,
        NUM_GROUPS=num_groups,
        SILU_MUL=silu_mul,
        UE8M0=ue8m0,
        GROUP=group,
        ITEMS=config.items_per_program,
        ROWS_VALID_IF=rows_valid_if,
        USED_ROWS=used_rows is not None,
        SPLITS=splits,
        COUNT_ON_DEVICE=split_count is not None,
        num_warps=config.num_warps,
        **launch_options(),
    )
    blocks = triton.cdiv(rows * num_groups, config.items_per_program)
    programs = blocks if used_rows is None else resident_grid(_group_quant_kernel, args, meta, blocks, x2d.device)
    _group_quant_kernel[(programs,)](*args, **meta)
