"""A candidate for the shipped un-permute + weighted combine (`moe_backend/kernels/unpermute_combine.py`):
the same sum, cut into programs of several tokens and columns, so more row loads are in flight per
chain of dependent loads (ids, then rows), and optionally in the other program order (a few whole
rows in flight rather than one column block of thousands of rows). The shipped kernel is one token and 1024 columns per
program; at EP8 prefill (one local slot per token on average) it runs at about half the copy
bandwidth. `lab/sweep_combine.py` times the cuts beside the shipped kernel and checks the bytes.

Same numerics as the shipped kernel (the slots in a fixed order, fp32 sum, one bf16 rounding, rows
of -1 never read), so every cut must give its bytes exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._numerics import round_to_bf16_grid


@triton.jit
def _combine_tiles_kernel(
    y_ptr,
    rows_ptr,
    w_ptr,
    out_ptr,
    num_tokens,
    N,
    TOPK: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COLS_FIRST: tl.constexpr,
):
    if COLS_FIRST:  # one flat grid, a token block's column blocks on consecutive programs
        col_blocks = tl.cdiv(N, BLOCK_N)
        token_block = tl.program_id(0) // col_blocks
        col_block = tl.program_id(0) - token_block * col_blocks
    else:  # the shipped order: consecutive programs take consecutive token blocks
        token_block = tl.program_id(0)
        col_block = tl.program_id(1)
    t = token_block.to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    t_ok = t < num_tokens
    offs = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = t_ok[:, None] & (offs < N)[None, :]
    acc = tl.zeros((TOKENS, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        r = tl.load(rows_ptr + t * TOPK + j, mask=t_ok, other=-1).to(tl.int64)
        w = tl.load(w_ptr + t * TOPK + j, mask=t_ok, other=0.0)
        v = tl.load(y_ptr + r[:, None] * N + offs[None, :], mask=ok & (r >= 0)[:, None], other=0.0)
        acc += w[:, None] * v.to(tl.float32)
    out = round_to_bf16_grid(acc).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t[:, None] * N + offs[None, :], out, mask=ok)


def combine_tiles(
    y, row_of_slot, topk_weights, out, tokens_per_program: int, block_n: int, num_warps: int, cols_first: bool = False
):
    """`unpermute_combine(y, row_of_slot, topk_weights, out)` (operands as checked there) with
    `tokens_per_program` x `block_n` outputs per program (powers of two). cols_first: the programs
    in flight at once cover a few whole output rows (written in order) rather than one column block
    of many rows."""
    num_tokens, topk = row_of_slot.shape
    n = y.shape[-1]
    blocks = (triton.cdiv(num_tokens, tokens_per_program), triton.cdiv(n, block_n))
    grid = (blocks[0] * blocks[1],) if cols_first else blocks
    _combine_tiles_kernel[grid](
        y,
        row_of_slot,
        topk_weights,
        out,
        num_tokens,
        n,
        TOPK=topk,
        TOKENS=tokens_per_program,
        BLOCK_N=block_n,
        COLS_FIRST=cols_first,
        num_warps=num_warps,
    )
    return out
