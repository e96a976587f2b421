"""Quantized token rows gathered into a layout's rows: `a_fp8[r], a_scale[r] = x_fp8[s], x_scale[s]`
with `s = src_token[r]`, for every layout row whose `s >= 0`.

A pure copy, so it is written for bandwidth: fp8 rows move as the widest words their length and
alignment allow (int64 for H % 8 == 0), a program copies `rows_per_program` whole rows (data and
scales) per block, and padding rows (src_token -1) are neither read nor written (a torch gather
would copy some token into them). Given `used_rows` (a device-side count, e.g. a contiguous
layout's `expert_offsets[-1:]`: on the static row bound the rows past it are all padding), a
fixed number of programs loop over the row blocks below it, so the unused tail costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe_backend._checks import check_quant_out
from moe_backend.kernels._dependent_launch import launch_options, wait_for_producer
from moe_backend.kernels._launch_utils import check_kernel_tensor, check_per_program, check_used_rows, resident_grid
from moe_backend.quant import FP8_DTYPE

__all__ = ["permute_rows"]

# Words per column chunk of a row copy: the largest power of two dividing the row, at most
# MAX_CHUNK_WORDS; a row with no such divisor of at least MIN_EVEN_CHUNK words is copied in masked chunks.
MAX_CHUNK_WORDS, MIN_EVEN_CHUNK = 128, 16
MAX_ROWS = 2**31 - 2**20  # row indices are int32 until they address memory
_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@triton.jit
def _copy_row_block(
    x_ptr,
    xs_ptr,
    src_ptr,
    q_ptr,
    s_ptr,
    block,
    end,
    ROW_WORDS: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    SCALES_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    EVEN_CHUNKS: tl.constexpr,
):
    """Rows `[block * ROWS, (block + 1) * ROWS)` below `end`, those with a source token only."""
    rows = (block * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # int32 first: num_rows < MAX_ROWS
    src = tl.load(src_ptr + rows, mask=rows < end, other=-1)
    ok = (src >= 0)[:, None]
    cols = tl.arange(0, CHUNK)[None, :]
    src_words, dst_words = src[:, None] * ROW_WORDS, rows[:, None] * ROW_WORDS
    for c in tl.static_range(0, ROW_WORDS, CHUNK):
        if EVEN_CHUNKS:
            words_ok = ok
        else:
            words_ok = ok & (c + cols < ROW_WORDS)
        words = tl.load(x_ptr + src_words + c + cols, mask=words_ok)
        tl.store(q_ptr + dst_words + c + cols, words, mask=words_ok)
    j = tl.arange(0, SCALES_PAD)[None, :]
    scale_ok = ok & (j < NUM_SCALES)
    scales = tl.load(xs_ptr + src[:, None] * NUM_SCALES + j, mask=scale_ok)
    tl.store(s_ptr + rows[:, None] * NUM_SCALES + j, scales, mask=scale_ok)


@triton.jit(do_not_specialize=["num_rows"])
def _permute_rows_kernel(
    x_ptr,  # words [T, ROW_WORDS]: the fp8 token rows, viewed as int64/int32/int16/uint8
    xs_ptr,  # f32 [T, NUM_SCALES]
    src_ptr,  # int64 [R]: the token each layout row copies, -1 = padding (skipped)
    q_ptr,  # words [R, ROW_WORDS]
    s_ptr,  # f32 [R, NUM_SCALES]
    used_rows_ptr,  # USED_ROWS: int32 [1], rows at and past it are padding
    num_rows,
    ROW_WORDS: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    SCALES_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    EVEN_CHUNKS: tl.constexpr,
    USED_ROWS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_producer(PDL)
    if USED_ROWS:
        used = tl.load(used_rows_ptr)
        end = tl.maximum(tl.where(used < num_rows, used, num_rows), 0)
        for block in range(tl.program_id(0), tl.cdiv(end, ROWS), tl.num_programs(0)):
            _copy_row_block(
                x_ptr,
                xs_ptr,
                src_ptr,
                q_ptr,
                s_ptr,
                block,
                end,
                ROW_WORDS,
                CHUNK,
                NUM_SCALES,
                SCALES_PAD,
                ROWS,
                EVEN_CHUNKS,
            )
    else:
        _copy_row_block(
            x_ptr,
            xs_ptr,
            src_ptr,
            q_ptr,
            s_ptr,
            tl.program_id(0),
            num_rows,
            ROW_WORDS,
            CHUNK,
            NUM_SCALES,
            SCALES_PAD,
            ROWS,
            EVEN_CHUNKS,
        )


@dataclass(frozen=True)
class GatherLaunchConfig:
    rows_per_program: int  # whole rows one program copies per block: a power of two
    num_warps: int

    def __post_init__(self):
        check_per_program("rows_per_program", self.rows_per_program, self.num_warps)


# A block of about TARGET_BLOCK_BYTES (4 rows of DeepSeek-V3's 7 KB) gives each thread several
# 16-byte loads in flight: within 4% of the sweep's best at both slices (docs/benchmarks.md,
# "Activation quant and the row gather"); halved while the grid would not cover the SMs a few times.
TARGET_BLOCK_BYTES = 32768
MAX_ROWS_PER_PROGRAM = 16
MIN_PROGRAMS = 4 * 132
DEFAULT_NUM_WARPS = 4


def gather_launch_config(rows: int, row_bytes: int) -> GatherLaunchConfig:
    """Rows per program and warps for gathering `rows` rows of `row_bytes` bytes (data + scales)."""
    per_program = 1
    while per_program < MAX_ROWS_PER_PROGRAM and 2 * per_program * row_bytes <= TARGET_BLOCK_BYTES:
        per_program *= 2
    while per_program > 1 and triton.cdiv(rows, per_program) < MIN_PROGRAMS:
        per_program //= 2
    return GatherLaunchConfig(per_program, DEFAULT_NUM_WARPS)


def _word_bytes(row_bytes: int, *tensors: torch.Tensor) -> int:
    """The widest word (8, 4, 2 or 1 bytes) dividing the row length and every tensor's address."""
    for width in (8, 4, 2):
        if row_bytes % width == 0 and all(t.data_ptr() % width == 0 for t in tensors):
            return width
    return 1


def permute_rows(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    src_token: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    used_rows: torch.Tensor | None = None,
    config: GatherLaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_fp8 `[T, H]` e4m3, x_scale f32 `[T, S]`, src_token int64 of any shape R (values in `[0, T)`
    or -1 for padding, not checked: no host sync) -> (a_fp8 `[*R, H]`, a_scale `[*R, S]`), allocated
    or the pair `out`: `a_fp8[i], a_scale[i] = x_fp8[src_token[i]], x_scale[src_token[i]]` where
    src_token[i] >= 0; padding rows are not written (their contents are unspecified).
    used_rows: optional int32 `[1]` on the device; flat rows at and past `used_rows[0]` must be
    padding and are not even visited (module docstring). config: rows and warps per program
    (default `gather_launch_config`)."""
    check_kernel_tensor("x_fp8", x_fp8, dtypes=(FP8_DTYPE,), ndim=2)
    num_tokens, hidden = x_fp8.shape
    check_kernel_tensor("x_scale", x_scale, x_fp8.device, dtypes=(torch.float32,), ndim=2)
    if x_scale.shape[0] != num_tokens or x_scale.shape[1] == 0:
        raise ValueError(f"x_scale: expected shape [{num_tokens}, S] with S >= 1, got {list(x_scale.shape)}")
    check_kernel_tensor("src_token", src_token, x_fp8.device, dtypes=(torch.int64,))
    num_scales = x_scale.shape[1]
    q_shape, s_shape = (*src_token.shape, hidden), (*src_token.shape, num_scales)
    if out is None:
        a_fp8 = torch.empty(q_shape, dtype=FP8_DTYPE, device=x_fp8.device)
        a_scale = torch.empty(s_shape, dtype=torch.float32, device=x_fp8.device)
    else:
        check_quant_out(out, q_shape, s_shape, x_fp8.device)
        a_fp8, a_scale = out
        check_kernel_tensor("out[0]", a_fp8, x_fp8.device)
        check_kernel_tensor("out[1]", a_scale, x_fp8.device)
    if used_rows is not None:
        check_used_rows(used_rows, x_fp8.device)
    num_rows = src_token.numel()
    if num_tokens == 0 or num_rows == 0 or hidden == 0:  # no tokens: every row is padding
        return a_fp8, a_scale
    if num_rows > MAX_ROWS:
        raise ValueError(f"src_token: {num_rows} rows exceed one launch's {MAX_ROWS}")
    if config is None:
        config = gather_launch_config(num_rows, hidden + 4 * num_scales)
    width = _word_bytes(hidden, x_fp8, a_fp8)
    row_words = hidden // width
    chunk = min(row_words & -row_words, MAX_CHUNK_WORDS)  # a power of two dividing the row
    even = chunk >= min(MIN_EVEN_CHUNK, row_words)
    if not even:
        chunk = min(triton.next_power_of_2(row_words), MAX_CHUNK_WORDS)
    args = (
        x_fp8.view(_WORD_DTYPES[width]),
        x_scale,
        src_token,
        a_fp8.view(-1, hidden).view(_WORD_DTYPES[width]),
        a_scale,
        used_rows if used_rows is not None else src_token,
        num_rows,
    )
    meta = dict(
        ROW_WORDS=row_words,
        CHUNK=chunk,
        NUM_SCALES=num_scales,
        SCALES_PAD=triton.next_power_of_2(num_scales),
        ROWS=config.rows_per_program,
        EVEN_CHUNKS=even,
        USED_ROWS=used_rows is not None,
        num_warps=config.num_warps,
        **launch_options(),
    )
    blocks = triton.cdiv(num_rows, config.rows_per_program)
    programs = blocks if used_rows is None else resident_grid(_permute_rows_kernel, args, meta, blocks, x_fp8.device)
    _permute_rows_kernel[(programs,)](*args, **meta)
    return a_fp8, a_scale
