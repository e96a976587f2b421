"""The one-program plan of `build_layout` (decode, up to SINGLE_PROGRAM_MAX_SLOTS slots): one launch
histograms, scans, sorts and places every slot; extra programs only share the padding fill."""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._layout_slot_ops import _fill_padding, _fill_tail, _histogram, _place_slots, _slot_keys


# Sizes that follow the batch are not specialized on: a new T must not compile a new variant.
@triton.jit(do_not_specialize=["num_slots", "max_m", "num_rows"])
def _layout_one_program_kernel(
    ids_ptr,  # [T*k] int32/int64 global expert ids
    expert_ids_ptr,  # contiguous: int32 [M]
    offsets_ptr,  # contiguous: int32 [E+1]
    counts_ptr,  # contiguous: tokens_per_expert int32 [E]; masked: masked_m int32 [E]
    src_ptr,  # int64 [M] or [E*max_m]
    row_of_slot_ptr,  # int64 [T*k]
    base_ptr,  # int32 [E] workspace
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
    PAD_BLOCK: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    position = tl.arange(0, CHUNK)
    keys = _slot_keys(ids_ptr, position, num_slots, expert_start, num_experts)
    counts = _histogram(keys, num_experts, E_PAD)
    e = tl.arange(0, E_PAD)
    is_expert = e < num_experts
    first_position = tl.cumsum(counts, 0) - counts  # of each expert's first slot in the sorted order
    writes = is_expert & (e * 0 + pid == 0)  # the other programs only share the padding fill (vector mask)
    if MASKED:
        kept = tl.where(counts < max_m, counts, max_m)
        tl.store(counts_ptr + e, kept, mask=writes)
        tl.store(base_ptr + e, -first_position, mask=writes)
        pad_start = e * max_m + kept
        pad_len = tl.where(is_expert, max_m - kept, 0)
        max_pad = max_m
    else:
        padded = (counts + alignment - 1) // alignment * alignment
        seg_end = tl.cumsum(padded, 0)
        seg_start = seg_end - padded
        tl.store(offsets_ptr + e + 1, seg_end, mask=writes)
        tl.store(offsets_ptr + e, seg_start, mask=writes & (e == 0))
        tl.store(counts_ptr + e, counts, mask=writes)
        tl.store(base_ptr + e, seg_start - first_position, mask=writes)
        pad_start = seg_start + counts
        pad_len = padded - counts
        max_pad = alignment - 1
    if pid == 0:
        tl.debug_barrier()  # base_ptr is read back by other threads of this program
        _place_slots(
            keys,
            0,
            base_ptr,
            expert_ids_ptr,
            src_ptr,
            row_of_slot_ptr,
            num_slots,
            topk,
            num_experts,
            max_m,
            MASKED,
            CHUNK,
        )
    _fill_padding(
        pad_start,
        pad_len,
        max_pad,
        pid * PAD_BLOCK,
        num_programs * PAD_BLOCK,
        expert_ids_ptr,
        src_ptr,
        MASKED,
        PAD_BLOCK,
    )
    if not MASKED:
        _fill_tail(
            tl.sum(padded, axis=0) + pid * TAIL_BLOCK,
            num_rows,
            num_programs * TAIL_BLOCK,
            expert_ids_ptr,
            src_ptr,
            TAIL_BLOCK,
        )
