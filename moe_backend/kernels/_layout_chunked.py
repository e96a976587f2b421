"""The chunked plan of `build_layout` (prefill), three launches: per-chunk histograms, one scan
over chunks and experts, then per-chunk placement with the padding fill shared by all programs."""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._layout_slot_ops import _fill_padding, _fill_tail, _histogram, _place_slots, _slot_keys


@triton.jit(do_not_specialize=["num_slots"])
def _count_chunks_kernel(
    ids_ptr, chunk_counts_ptr, num_slots, expert_start, num_experts, CHUNK: tl.constexpr, E_PAD: tl.constexpr
):
    chunk = tl.program_id(0)
    keys = _slot_keys(ids_ptr, chunk * CHUNK + tl.arange(0, CHUNK), num_slots, expert_start, num_experts)
    e = tl.arange(0, E_PAD)
    tl.store(chunk_counts_ptr + chunk * num_experts + e, _histogram(keys, num_experts, E_PAD), mask=e < num_experts)


@triton.jit(do_not_specialize=["num_chunks", "max_m"])
def _scan_chunks_kernel(
    chunk_counts_ptr,  # int32 [C, E]: slots per chunk and expert
    chunk_base_ptr,  # int32 [C, E]: out, each chunk's base per expert (_place_slots)
    offsets_ptr,
    counts_ptr,
    num_chunks,
    num_experts,
    alignment,
    max_m,
    MASKED: tl.constexpr,
    E_PAD: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    e = tl.arange(0, E_PAD)
    is_expert = e < num_experts
    c = tl.arange(0, SCAN_BLOCK)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, num_chunks, SCAN_BLOCK):
        ok = ((c0 + c) < num_chunks)[:, None] & is_expert[None, :]
        h = tl.load(chunk_counts_ptr + (c0 + c)[:, None] * num_experts + e[None, :], mask=ok, other=0)
        counts += tl.sum(h, 0)
    if MASKED:
        tl.store(counts_ptr + e, tl.where(counts < max_m, counts, max_m), mask=is_expert)
        before = tl.zeros([E_PAD], dtype=tl.int32)  # ranks taken by earlier chunks
    else:
        padded = (counts + alignment - 1) // alignment * alignment
        seg_end = tl.cumsum(padded, 0)
        tl.store(offsets_ptr + e + 1, seg_end, mask=is_expert)
        tl.store(offsets_ptr + e, seg_end - padded, mask=e == 0)
        tl.store(counts_ptr + e, counts, mask=is_expert)
        before = seg_end - padded  # rows taken by earlier chunks, from the segment's start
    for c0 in range(0, num_chunks, SCAN_BLOCK):
        ok = ((c0 + c) < num_chunks)[:, None] & is_expert[None, :]
        offs = (c0 + c)[:, None] * num_experts + e[None, :]
        h = tl.load(chunk_counts_ptr + offs, mask=ok, other=0)  # [SCAN_BLOCK, E_PAD]
        first_row = tl.cumsum(h, 0) - h + before[None, :]
        first_position = tl.cumsum(h, 1) - h  # in the chunk's sorted order
        tl.store(chunk_base_ptr + offs, first_row - first_position, mask=ok)
        before += tl.sum(h, 0)


@triton.jit(do_not_specialize=["num_slots", "max_m", "num_rows", "max_pad"])
def _place_chunks_kernel(
    ids_ptr,
    chunk_base_ptr,
    expert_ids_ptr,
    offsets_ptr,
    counts_ptr,
    src_ptr,
    row_of_slot_ptr,
    num_slots,
    topk,
    expert_start,
    num_experts,
    max_m,
    num_rows,
    max_pad,
    MASKED: tl.constexpr,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
    PAD_BLOCK: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    num_programs = tl.num_programs(0)
    keys = _slot_keys(ids_ptr, chunk * CHUNK + tl.arange(0, CHUNK), num_slots, expert_start, num_experts)
    _place_slots(
        keys,
        chunk * CHUNK,
        chunk_base_ptr + chunk * num_experts,
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
    e = tl.arange(0, E_PAD)
    is_expert = e < num_experts
    counts = tl.load(counts_ptr + e, mask=is_expert, other=0)
    if MASKED:
        pad_start = e * max_m + counts
        pad_len = tl.where(is_expert, max_m - counts, 0)
    else:
        seg_start = tl.load(offsets_ptr + e, mask=is_expert, other=0)
        pad_start = seg_start + counts
        pad_len = tl.load(offsets_ptr + e + 1, mask=is_expert, other=0) - pad_start
    _fill_padding(
        pad_start,
        pad_len,
        max_pad,
        chunk * PAD_BLOCK,
        num_programs * PAD_BLOCK,
        expert_ids_ptr,
        src_ptr,
        MASKED,
        PAD_BLOCK,
    )
    if not MASKED:
        used_rows = tl.load(offsets_ptr + num_experts)
        _fill_tail(
            used_rows + chunk * TAIL_BLOCK, num_rows, num_programs * TAIL_BLOCK, expert_ids_ptr, src_ptr, TAIL_BLOCK
        )
