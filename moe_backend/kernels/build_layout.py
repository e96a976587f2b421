"""The contiguous and masked layouts built from the router's top-k ids on the device.

No host sync and no data-dependent shape: every output is sized from (T, k, E, alignment | max_m)
alone, so the build can be captured in a CUDA graph. Deterministic, no atomics: a slot is one
(token, j) pair with flat index s = t*k + j, and a local slot's rank within its expert is the
number of earlier slots (flat order) routed to the same expert, exactly as the torch twins'
stable sort (`moe_backend.reference.layouts`) gives. Its row is `expert_offsets[e] + rank`
(contiguous) or `e*max_m + rank` (masked; ranks >= max_m are dropped).

Ranks come from sorting keys `expert * CHUNK + position` over a chunk of slots: a slot's position
in the sorted chunk minus the first sorted position of its expert is its rank among the chunk's
slots of that expert. Two plans, by slot count N = T*k:
- one launch (N <= ONE_LAUNCH_MAX_SLOTS: decode): the experts are split among the programs; each
  histograms every slot and scans the experts (a few KB of ids: cheaper than waiting for another
  program's), then ranks its own experts' slots by a running count, places them and fills their
  padding. No sort.
- chunked (prefill), three launches: 1) each program histograms a chunk of slots into
  `counts[c, e]`; 2) one program scans the counts over chunks and experts, writes the per-expert
  outputs and, per chunk and expert, the row (rank) of the chunk's first slot of that expert minus
  that slot's sorted position; 3) each program sorts its chunk and places its slots, and all
  programs share the padding fill.

Padding: rows of a contiguous segment past its expert's count and the unused tail of the static
row bound get `expert_ids = src_token = -1`; masked rows past `masked_m[e]` get `src_token = -1`.

Code: the one-launch kernel in `_layout_one_launch`, the chunked plan's kernels in
`_layout_chunked`, their shared device helpers in `_layout_slot_ops`; this module plans and launches.
"""

from __future__ import annotations

import torch
import triton

from moe_backend.constants import LAYOUT_ALIGNMENT
from moe_backend.dispatch.layouts import ContiguousLayout, MaskedLayout, max_contiguous_rows
from moe_backend.kernels._dependent_launch import launch_options
from moe_backend.kernels._launch_utils import check_kernel_tensor
from moe_backend.kernels._layout_chunked import _count_chunks_kernel, _place_chunks_kernel, _scan_chunks_kernel
from moe_backend.kernels._layout_one_launch import _layout_one_launch_kernel

# The device helpers stay importable from here (tests and tools name them by this module).
from moe_backend.kernels._layout_slot_ops import (  # noqa: F401
    _fill_padding,
    _fill_tail,
    _histogram,
    _place_slots,
    _slot_keys,
)

__all__ = ["build_contiguous_layout", "build_masked_layout", "ONE_LAUNCH_MAX_SLOTS", "CHUNK_SLOTS"]

ONE_LAUNCH_MAX_SLOTS = 2048  # up to here one launch does everything: decode
# Slots per program of the chunked plan: 512, or 1024 where 512 would give the one-program scan
# more than _SCAN_ELEMENTS [chunk, expert] counts to walk (256 experts from 8192 tokens). 512 built
# the EP8 prefill layouts faster than 1024; at 256 experts 1024 was faster from 8192 tokens and 512
# at 2048 (docs/benchmarks.md, "The layout's chunks and scan").
CHUNK_SLOTS = 512
WIDE_CHUNK_SLOTS = 1024
_SCAN_ELEMENTS = 16384
EXPERTS_PER_PROGRAM = 8  # one-launch plan: at most this many experts per program (256 experts: 32 programs)
# One-launch plan: a program holds [chunk, experts per program] running counts; this many elements
# per program keep them in registers (larger tiles spill), so big chunks take fewer experts each.
_ONE_LAUNCH_TILE = 4096
_PAD_BLOCK = 16  # padding columns per step of the chunked plan's fill ([E_PAD, _PAD_BLOCK] tiles)
_OWN_PAD_BLOCK = 64  # padding columns per step of the one-launch fill ([EXPERTS_PER_PROGRAM, 64] tiles)
_TAIL_BLOCK = 1024  # rows per step of the tail fill
# Chunks per step of the scan (a power of two): its steps run one after another in one program,
# so it takes as many chunks per step as this allows, while its [chunks, E_PAD] tile stays within
# _SCAN_TILE elements (4 warps hold that many in registers; 128 x 256 experts spills).
_SCAN_BLOCK = 128
_SCAN_TILE = 4096


def _scan_block(num_chunks: int, e_pad: int) -> int:
    """Chunks per step of the scan: all of them up to _SCAN_BLOCK and the tile's budget (at least
    16: the tile's rows)."""
    return max(16, min(_SCAN_BLOCK, _SCAN_TILE // e_pad, triton.next_power_of_2(num_chunks)))


_INT32_MAX = 2**31 - 1
# A chunk fills at least one warp: no thread holds a copy of another's slot, which tl.histogram
# would otherwise have to divide out.
_MIN_CHUNK = 32
_ONE_LAUNCH_MIN_CHUNK = 128  # fills the one-launch plan's 4 warps


def _num_warps(chunk: int) -> int:
    """Warps that hold a chunk without replication: up to 4."""
    return max(1, min(chunk // 32, 4))


def _one_launch_shape(chunk: int) -> tuple[int, int]:
    """(experts per program, warps) of the one-launch plan for a chunk of slots."""
    experts = max(2, min(EXPERTS_PER_PROGRAM, _ONE_LAUNCH_TILE // chunk))
    return experts, max(4, min(chunk // 32, 8))


def _e_pad(num_experts: int) -> int:
    """Expert lanes of the kernels' tiles: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(num_experts))


def _check_args(topk_ids, num_local_experts, expert_start) -> None:
    check_kernel_tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2)
    if not isinstance(num_local_experts, int) or num_local_experts <= 0:
        raise ValueError(f"num_local_experts: expected a positive int, got {num_local_experts!r}")
    if not isinstance(expert_start, int) or expert_start < 0:
        raise ValueError(f"expert_start: expected a non-negative int, got {expert_start!r}")


def _plan(num_slots: int, num_experts: int, slots_per_program: int | None) -> tuple[bool, int]:
    """(one launch?, slots per program): one launch up to ONE_LAUNCH_MAX_SLOTS, else chunks of
    CHUNK_SLOTS (WIDE_CHUNK_SLOTS where the scan would have too many counts); `slots_per_program`
    (a power of two >= 32) overrides all of them."""
    if slots_per_program is not None:
        if slots_per_program < _MIN_CHUNK or slots_per_program & (slots_per_program - 1):
            raise ValueError(f"slots_per_program: expected a power of two >= {_MIN_CHUNK}, got {slots_per_program}")
        limit, chunk = slots_per_program, slots_per_program
    else:
        limit, chunk = ONE_LAUNCH_MAX_SLOTS, CHUNK_SLOTS
        if triton.cdiv(num_slots, chunk) * _e_pad(num_experts) > _SCAN_ELEMENTS:
            chunk = WIDE_CHUNK_SLOTS
    one_launch = num_slots <= limit
    if one_launch:
        chunk = max(_ONE_LAUNCH_MIN_CHUNK, triton.next_power_of_2(num_slots))
    if (num_experts + 1) * chunk > _INT32_MAX:  # sort keys are expert * chunk + position, int32
        raise ValueError(f"num_local_experts ({num_experts}) too large for int32 sort keys")
    return one_launch, chunk


def _launch(
    topk_ids,
    num_experts,
    expert_start,
    *,
    masked: bool,
    alignment: int,
    max_m: int,
    num_rows: int,
    expert_ids,
    offsets,
    counts,
    src_token,
    row_of_slot,
    slots_per_program,
) -> None:
    num_slots = topk_ids.numel()
    topk = topk_ids.shape[1]
    one_launch, chunk = _plan(num_slots, num_experts, slots_per_program)
    e_pad = _e_pad(num_experts)
    device = topk_ids.device
    # Unused pointers of the masked plan still need a tensor.
    expert_ids = expert_ids if expert_ids is not None else counts
    offsets = offsets if offsets is not None else counts
    consts = dict(MASKED=masked, CHUNK=chunk, E_PAD=e_pad)
    if one_launch:
        experts_per_program, warps = _one_launch_shape(chunk)
        _layout_one_launch_kernel[(triton.cdiv(num_experts, experts_per_program),)](
            topk_ids,
            expert_ids,
            offsets,
            counts,
            src_token,
            row_of_slot,
            num_slots,
            topk,
            expert_start,
            num_experts,
            alignment,
            max_m,
            num_rows,
            EXPERTS_PER_PROG=experts_per_program,
            PAD_BLOCK=_OWN_PAD_BLOCK,
            TAIL_BLOCK=_TAIL_BLOCK,
            num_warps=warps,
            **consts,
            **launch_options(),
        )
        return
    num_chunks = triton.cdiv(num_slots, chunk)
    chunk_counts = torch.empty(num_chunks * num_experts, dtype=torch.int32, device=device)
    chunk_base = torch.empty_like(chunk_counts)
    _count_chunks_kernel[(num_chunks,)](
        topk_ids,
        chunk_counts,
        num_slots,
        expert_start,
        num_experts,
        CHUNK=chunk,
        E_PAD=e_pad,
        num_warps=_num_warps(chunk),
    )
    _scan_chunks_kernel[(1,)](
        chunk_counts,
        chunk_base,
        offsets,
        counts,
        num_chunks,
        num_experts,
        alignment,
        max_m,
        MASKED=masked,
        E_PAD=e_pad,
        SCAN_BLOCK=_scan_block(num_chunks, e_pad),
        num_warps=4,
    )
    _place_chunks_kernel[(num_chunks,)](
        topk_ids,
        chunk_base,
        expert_ids,
        offsets,
        counts,
        src_token,
        row_of_slot,
        num_slots,
        topk,
        expert_start,
        num_experts,
        max_m,
        num_rows,
        max_m if masked else alignment - 1,
        PAD_BLOCK=_PAD_BLOCK,
        TAIL_BLOCK=_TAIL_BLOCK,
        num_warps=_num_warps(chunk),
        **consts,
    )


def build_contiguous_layout(
    topk_ids: torch.Tensor,
    num_local_experts: int,
    *,
    expert_start: int = 0,
    alignment: int = LAYOUT_ALIGNMENT,
    slots_per_program: int | None = None,
) -> ContiguousLayout:
    """topk_ids int32/int64 `[T, k]` (global ids; experts `[expert_start, expert_start + E)` are
    local, others and -1 are dropped) -> `ContiguousLayout` on `M = max_contiguous_rows(T*k, E,
    alignment)` rows, bit-identical to `reference.build_contiguous_layout(...,
    exact_size=False)`: expert_ids int32 `[M]`, expert_offsets int32 `[E+1]`, src_token int64 `[M]`
    (-1 on padding rows and the unused tail), row_of_slot int64 `[T, k]`, tokens_per_expert int32
    `[E]`. No host sync. `slots_per_program` overrides the plan (module docstring)."""
    _check_args(topk_ids, num_local_experts, expert_start)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"alignment: expected a positive int, got {alignment!r}")
    num_tokens, topk = topk_ids.shape
    num_slots = num_tokens * topk
    num_rows = max_contiguous_rows(num_slots, num_local_experts, alignment)
    if num_rows > _INT32_MAX:
        raise ValueError(f"topk_ids: {num_slots} slots need {num_rows} rows, more than int32 row indices hold")
    device = topk_ids.device
    expert_ids = torch.empty(num_rows, dtype=torch.int32, device=device)
    offsets = torch.empty(num_local_experts + 1, dtype=torch.int32, device=device)
    counts = torch.empty(num_local_experts, dtype=torch.int32, device=device)
    src_token = torch.empty(num_rows, dtype=torch.int64, device=device)
    row_of_slot = torch.empty((num_tokens, topk), dtype=torch.int64, device=device)
    if num_slots == 0:  # no slots, no rows
        offsets.zero_()
        counts.zero_()
    else:
        _launch(
            topk_ids,
            num_local_experts,
            expert_start,
            masked=False,
            alignment=alignment,
            max_m=1,
            num_rows=num_rows,
            expert_ids=expert_ids,
            offsets=offsets,
            counts=counts,
            src_token=src_token,
            row_of_slot=row_of_slot,
            slots_per_program=slots_per_program,
        )
    return ContiguousLayout(
        expert_ids=expert_ids,
        expert_offsets=offsets,
        src_token=src_token,
        row_of_slot=row_of_slot,
        tokens_per_expert=counts,
    )


def build_masked_layout(
    topk_ids: torch.Tensor,
    num_local_experts: int,
    *,
    expert_start: int = 0,
    max_m: int | None = None,
    slots_per_program: int | None = None,
) -> MaskedLayout:
    """topk_ids `[T, k]` as in `build_contiguous_layout` -> `MaskedLayout` with `max_m` rows per
    expert (default max(T, 1): never overflows, a token visits an expert once), bit-identical to
    `reference.build_masked_layout(..., drop_overflow=True)`: masked_m int32 `[E]` (clamped
    to max_m), src_token int64 `[E, max_m]` (-1 past masked_m), row_of_slot int64 `[T, k]`.
    Slots ranked >= max_m within their expert are dropped (row_of_slot -1), without a host sync."""
    _check_args(topk_ids, num_local_experts, expert_start)
    num_tokens, topk = topk_ids.shape
    if max_m is None:
        max_m = max(num_tokens, 1)
    elif not isinstance(max_m, int) or max_m <= 0:
        raise ValueError(f"max_m: expected a positive int, got {max_m!r}")
    if num_local_experts * max_m > _INT32_MAX:
        raise ValueError(f"max_m: {num_local_experts} experts x {max_m} rows exceed int32 row indices")
    device = topk_ids.device
    masked_m = torch.empty(num_local_experts, dtype=torch.int32, device=device)
    src_token = torch.empty((num_local_experts, max_m), dtype=torch.int64, device=device)
    row_of_slot = torch.empty((num_tokens, topk), dtype=torch.int64, device=device)
    if topk_ids.numel() == 0:
        masked_m.zero_()
        src_token.fill_(-1)
    else:
        _launch(
            topk_ids,
            num_local_experts,
            expert_start,
            masked=True,
            alignment=1,
            max_m=max_m,
            num_rows=num_local_experts * max_m,
            expert_ids=None,
            offsets=None,
            counts=masked_m,
            src_token=src_token,
            row_of_slot=row_of_slot,
            slots_per_program=slots_per_program,
        )
    return MaskedLayout(masked_m=masked_m, src_token=src_token, row_of_slot=row_of_slot)
