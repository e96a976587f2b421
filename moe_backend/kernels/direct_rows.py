"""Each layout row's destination for GEMM2 storing single-slot tokens' rows itself.

Under expert parallelism about 4 tokens in 10 have exactly one local slot; the combine would read
that slot's GEMM2 row and write it, weighted, to the token's output row. Our CUDA GEMM2 can store
such a row there itself (`cuda.launch`'s `direct`), and the combine then skips the token
(`unpermute_combine(..., skip_single=True)`), so those rows cross memory once instead of three
times. This kernel gives the GEMM what it needs per layout row, as an int32 pair: the token the
row is stored into (-1: its token has another local slot, the combine sums them) and its weight's
fp32 bits. Rows of no slot (padding, the static bound's tail) are not written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_backend.kernels._launch_utils import check_kernel_tensor

__all__ = ["direct_rows"]

TOKENS_PER_PROGRAM = 128


@triton.jit
def _direct_rows_kernel(
    rows_ptr,  # int32/int64 [T, TOPK]: row_of_slot, -1 = not local
    w_ptr,  # f32 [T, TOPK]
    pairs_ptr,  # int32 [R, 2]
    num_tokens,
    TOPK: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, TOPK_PAD)
    ok = (t[:, None] < num_tokens) & (j[None, :] < TOPK)
    slot = t[:, None].to(tl.int64) * TOPK + j[None, :]
    row = tl.load(rows_ptr + slot, mask=ok, other=-1).to(tl.int64)
    local = row >= 0
    single = tl.sum(local.to(tl.int32), axis=1) == 1
    dest = tl.where(single[:, None], t[:, None], -1)
    w = tl.load(w_ptr + slot, mask=local, other=0.0)
    tl.store(pairs_ptr + 2 * row, dest.to(tl.int32), mask=local)
    tl.store(pairs_ptr + 2 * row + 1, w.to(tl.int32, bitcast=True), mask=local)


def direct_rows(row_of_slot: torch.Tensor, topk_weights: torch.Tensor, num_rows: int) -> torch.Tensor:
    """row_of_slot int32/int64 `[T, k]` (a layout's: -1 = not local), topk_weights f32 `[T, k]` ->
    int32 `[num_rows, 2]`: for every row some slot names, (t, bits of topk_weights[t, j]) when
    that slot (t, j) is token t's only local one, else (-1, the same bits). Rows no slot names
    are left unwritten."""
    check_kernel_tensor("row_of_slot", row_of_slot, dtypes=(torch.int32, torch.int64), ndim=2)
    num_tokens, topk = row_of_slot.shape
    check_kernel_tensor(
        "topk_weights", topk_weights, row_of_slot.device, dtypes=(torch.float32,), shape=(num_tokens, topk)
    )
    if not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows: expected a non-negative int, got {num_rows!r}")
    pairs = torch.empty(num_rows, 2, dtype=torch.int32, device=row_of_slot.device)
    if num_tokens == 0 or topk == 0:
        return pairs
    _direct_rows_kernel[(triton.cdiv(num_tokens, TOKENS_PER_PROGRAM),)](
        row_of_slot,
        topk_weights,
        pairs,
        num_tokens,
        TOPK=topk,
        TOPK_PAD=triton.next_power_of_2(topk),
        BLOCK_T=TOKENS_PER_PROGRAM,
        num_warps=4,
    )
    return pairs
