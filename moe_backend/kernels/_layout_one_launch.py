"""The one-launch plan of `build_layout` (decode, up to ONE_LAUNCH_MAX_SLOTS slots).

Every program reads all the slot ids (a few KB at decode sizes) and histograms them, so each knows
every expert's segment without waiting on another program; it then places only the slots of its
own `EXPERTS_PER_PROG` experts and fills their padding. A slot's rank within its expert is a
running count (cumsum) of that expert's earlier slots in flat order: no sort, no atomics, and the
same ranks as the torch twin's stable sort. The unused tail of a contiguous layout is shared by
every program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._dependent_launch import wait_for_producer
from moe_backend.kernels._layout_slot_ops import _fill_tail, _histogram, _slot_keys


@triton.jit
def _pick(values, e, own):
    """values `[E_PAD]` at the experts `own` `[EPP]` (0 where own is past the experts)."""
    return tl.sum(tl.where(e[:, None] == own[None, :], values[:, None], 0), axis=0)


# Sizes that follow the batch are not specialized on: a new T must not compile a new variant.
@triton.jit(do_not_specialize=["num_slots", "max_m", "num_rows"])
def _layout_one_launch_kernel(
    ids_ptr,  # [T*k] int32/int64 global expert ids
    expert_ids_ptr,  # contiguous: int32 [M]
    offsets_ptr,  # contiguous: int32 [E+1]
    counts_ptr,  # contiguous: tokens_per_expert int32 [E]; masked: masked_m int32 [E]
    src_ptr,  # int64 [M] or [E*max_m]
    row_of_slot_ptr,  # int64 [T*k]
    num_slots,
    topk,
    expert_start,
    num_experts,
    alignment,
    max_m,
    num_rows,
    MASKED: tl.constexpr,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
    EXPERTS_PER_PROG: tl.constexpr,
    PAD_BLOCK: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_producer(PDL)
    pid = tl.program_id(0)
    slot = tl.arange(0, CHUNK)
    keys = _slot_keys(ids_ptr, slot, num_slots, expert_start, num_experts)
    counts = _histogram(keys, num_experts, E_PAD)
    e = tl.arange(0, E_PAD)
    is_expert = e < num_experts
    if MASKED:
        kept = tl.where(counts < max_m, counts, max_m)
        start = e * max_m
        pad_len = tl.where(is_expert, max_m - kept, 0)
        pad_cols = max_m
    else:
        padded = (counts + alignment - 1) // alignment * alignment
        seg_end = tl.cumsum(padded, 0)
        start = seg_end - padded
        kept = counts
        pad_len = padded - counts
        pad_cols = alignment - 1

    # The per-expert outputs of this program's experts.
    first = pid * EXPERTS_PER_PROG
    mine = is_expert & (e >= first) & (e < first + EXPERTS_PER_PROG)
    tl.store(counts_ptr + e, kept, mask=mine)
    if not MASKED:
        tl.store(offsets_ptr + e + 1, seg_end, mask=mine)
        tl.store(offsets_ptr + e, start, mask=mine & (e == 0))

    # Its slots: rank = earlier slots of the same expert, row = the expert's first row + rank.
    own = first + tl.arange(0, EXPERTS_PER_PROG)
    hit = (keys[:, None] == own[None, :]) & (own < num_experts)[None, :]  # [CHUNK, EPP]
    rank_by_expert = tl.cumsum(hit.to(tl.int32), axis=0) - 1
    own_start = _pick(start, e, own)
    is_mine = tl.sum(hit.to(tl.int32), axis=1) > 0
    rank = tl.sum(tl.where(hit, rank_by_expert, 0), axis=1)
    row = tl.sum(tl.where(hit, own_start[None, :] + rank_by_expert, 0), axis=1)
    placed = is_mine & (rank < max_m) if MASKED else is_mine
    # Program 0 also marks the slots of no local expert (a vector compare: a scalar mask would not do).
    writes_slot = (slot < num_slots) & (is_mine | ((keys == num_experts) & (slot * 0 + pid == 0)))
    tl.store(row_of_slot_ptr + slot, tl.where(placed, row, -1).to(tl.int64), mask=writes_slot)
    tl.store(src_ptr + row, (slot // topk).to(tl.int64), mask=placed)
    if not MASKED:
        tl.store(expert_ids_ptr + row, keys, mask=placed)

    # Its experts' padding rows.
    own_pad_start = _pick(start + kept, e, own)
    own_pad_len = _pick(pad_len, e, own)
    for j0 in range(0, pad_cols, PAD_BLOCK):
        j = j0 + tl.arange(0, PAD_BLOCK)
        rows = own_pad_start[:, None] + j[None, :]
        is_pad = j[None, :] < own_pad_len[:, None]
        tl.store(src_ptr + rows, tl.full(rows.shape, -1, tl.int64), mask=is_pad)
        if not MASKED:
            tl.store(expert_ids_ptr + rows, tl.full(rows.shape, -1, tl.int32), mask=is_pad)
    if not MASKED:
        num_programs = tl.num_programs(0)
        _fill_tail(
            tl.sum(padded, axis=0) + pid * TAIL_BLOCK,
            num_rows,
            num_programs * TAIL_BLOCK,
            expert_ids_ptr,
            src_ptr,
            TAIL_BLOCK,
        )
