"""Device helpers shared by both plans of `build_layout` (one launch and chunked): a chunk's
slot keys, its per-expert histogram, placing its slots by rank, and the padding fills."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _slot_keys(ids_ptr, slot, num_slots, expert_start, num_experts):
    """Local expert of each slot; num_experts (sorts last) for -1, other ranks' and past-the-end slots."""
    ids = tl.load(ids_ptr + slot, mask=slot < num_slots, other=-1).to(tl.int64)
    local = ids - expert_start
    is_local = (ids >= 0) & (local >= 0) & (local < num_experts)
    return tl.where(is_local, local, num_experts).to(tl.int32)


@triton.jit
def _histogram(keys, num_experts, E_PAD: tl.constexpr):
    """Slots per local expert, `[E_PAD]` (zero past num_experts)."""
    is_local = keys < num_experts
    # Non-local keys are binned at 0 and taken back off: tl.histogram's bins must cover every value.
    hist = tl.histogram(tl.where(is_local, keys, 0), E_PAD)
    not_local = tl.sum(tl.where(is_local, 0, 1), axis=0)
    return tl.where(tl.arange(0, E_PAD) == 0, hist - not_local, hist)


@triton.jit
def _place_slots(
    keys,
    slot0,
    base_ptr,
    expert_ids_ptr,
    src_ptr,
    row_of_slot_ptr,
    num_slots,
    topk,
    num_experts,
    max_m,
    MASKED: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Writes row_of_slot for the chunk's slots and src_token (+ expert_ids) for their rows.

    base_ptr `[E]`: per expert, the row (contiguous) or rank (masked) of the chunk's first slot of
    that expert minus its position in the chunk's sorted order."""
    position = tl.arange(0, CHUNK)
    order = tl.sort(keys * CHUNK + position)  # keys are unique: the sort is deterministic
    expert = order // CHUNK
    slot = slot0 + order % CHUNK
    is_local = expert < num_experts
    # .cg: base_ptr comes from the scan launch; read it from L2, past L1.
    base = tl.load(base_ptr + expert, mask=is_local, other=0, cache_modifier=".cg")
    if MASKED:
        rank = base + position
        placed = is_local & (rank < max_m)  # overflow past max_m is dropped
        row = expert * max_m + rank
    else:
        placed = is_local
        row = base + position
    tl.store(row_of_slot_ptr + slot, tl.where(placed, row, -1).to(tl.int64), mask=slot < num_slots)
    tl.store(src_ptr + row, (slot // topk).to(tl.int64), mask=placed)
    if not MASKED:
        tl.store(expert_ids_ptr + row, expert, mask=placed)


@triton.jit
def _fill_padding(
    pad_start, pad_len, max_pad, first, step, expert_ids_ptr, src_ptr, MASKED: tl.constexpr, PAD_BLOCK: tl.constexpr
):
    """Rows `pad_start[e] + j` for j < pad_len[e] (`[E_PAD]` vectors) become padding; this program
    takes the column blocks first, first + step, ... below max_pad."""
    for j0 in range(first, max_pad, step):
        j = j0 + tl.arange(0, PAD_BLOCK)
        rows = pad_start[:, None] + j[None, :]
        is_pad = j[None, :] < pad_len[:, None]
        tl.store(src_ptr + rows, tl.full(rows.shape, -1, tl.int64), mask=is_pad)
        if not MASKED:
            tl.store(expert_ids_ptr + rows, tl.full(rows.shape, -1, tl.int32), mask=is_pad)


@triton.jit
def _fill_tail(first_row, num_rows, step, expert_ids_ptr, src_ptr, TAIL_BLOCK: tl.constexpr):
    """Rows first_row, ... < num_rows (the unused tail of a contiguous layout) become padding."""
    for r0 in range(first_row, num_rows, step):
        rows = r0 + tl.arange(0, TAIL_BLOCK)
        in_tail = rows < num_rows
        tl.store(src_ptr + rows, tl.full([TAIL_BLOCK], -1, tl.int64), mask=in_tail)
        tl.store(expert_ids_ptr + rows, tl.full([TAIL_BLOCK], -1, tl.int32), mask=in_tail)
