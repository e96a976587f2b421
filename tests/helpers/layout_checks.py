"""Layout test cases and checks shared by the CPU twin tests, the interpreter cases
(kernels/_interpret_cases.py) and the GPU tests: a table of routings, the invariants every layout
must hold (computed here from topk_ids alone, independently of both builders), and field-by-field
equality of two layouts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_backend.dispatch.layouts import ContiguousLayout, MaskedLayout, max_contiguous_rows


@dataclass(frozen=True)
class LayoutCase:
    name: str
    tokens: int
    topk: int
    num_local: int
    expert_start: int
    ids: str  # "distinct": top-k of `global_experts` per token; "random": ints in [low, high), repeats allowed
    global_experts: int = 0
    low: int = 0
    high: int = 0
    dtype: torch.dtype = torch.int32
    alignment: int = 16
    max_m: int | None = None  # masked layout; None = the builders' default (T)
    slots_per_program: int | None = None  # kernel plan override (32: the chunked plan on tiny shapes)


# Tiny shapes (the interpreter is slow); every kind of slot: local, other ranks', -1.
LAYOUT_CASES = [
    LayoutCase("single_token", 1, 4, 8, 0, "distinct", global_experts=8),
    LayoutCase("ep_slice_int64", 13, 3, 5, 4, "random", low=-1, high=14, dtype=torch.int64, alignment=1),
    LayoutCase("ep_slice_chunked", 29, 4, 6, 3, "random", low=-1, high=12, slots_per_program=32, max_m=3),
    LayoutCase(
        "one_expert_align128", 45, 1, 4, 0, "random", low=2, high=3, alignment=128, slots_per_program=32, max_m=7
    ),
    LayoutCase("empty_experts_align128", 9, 2, 6, 0, "random", low=4, high=6, alignment=128),
    LayoutCase("no_local_slot", 19, 2, 4, 8, "random", low=-1, high=8, slots_per_program=32),
    LayoutCase("no_tokens", 0, 8, 4, 0, "random", low=0, high=4),
    LayoutCase("many_experts", 6, 8, 40, 0, "distinct", global_experts=48, alignment=4, slots_per_program=32, max_m=1),
    LayoutCase(
        "repeated_ids_int64", 17, 3, 3, 1, "random", low=0, high=5, dtype=torch.int64, alignment=8, slots_per_program=32
    ),
    # more chunks than one step of the scan takes (138 of 32 slots: a whole step of 128, then 10)
    LayoutCase("scan_steps", 1100, 4, 6, 2, "random", low=-1, high=10, slots_per_program=32),
    # 256 experts: the scan's tile budget takes 16 chunks per step (20 of 32 slots: 16, then 4)
    LayoutCase(
        "scan_steps_256_experts", 80, 8, 256, 0, "distinct", global_experts=256, alignment=4, slots_per_program=32
    ),
]


def make_topk_ids(case: LayoutCase, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if case.ids == "distinct":
        ids = (
            torch.stack([torch.randperm(case.global_experts, generator=gen)[: case.topk] for _ in range(case.tokens)])
            if case.tokens
            else torch.zeros(0, case.topk)
        )
    else:
        ids = torch.randint(case.low, case.high, (case.tokens, case.topk), generator=gen)
    return ids.to(case.dtype).contiguous().to(device)


def _local_slots(topk_ids: torch.Tensor, num_local: int, expert_start: int):
    """(expert of each flat slot or -1, the slot's rank among its expert's slots in flat order)."""
    ids = topk_ids.reshape(-1).long().cpu()
    local = torch.where((ids >= expert_start) & (ids < expert_start + num_local), ids - expert_start, -1)
    rank = torch.zeros_like(local)
    for e in range(num_local):
        where = (local == e).nonzero().flatten()
        rank[where] = torch.arange(where.numel())
    return local, rank


def check_contiguous_layout(
    layout: ContiguousLayout, topk_ids: torch.Tensor, num_local: int, expert_start: int, alignment: int
) -> None:
    """Invariants of a layout on the static row bound, from topk_ids alone."""
    num_tokens, topk = topk_ids.shape
    expert_ids, offsets = layout.expert_ids.cpu(), layout.expert_offsets.cpu().long()
    src_token, row_of_slot = layout.src_token.cpu(), layout.row_of_slot.cpu().reshape(-1)
    num_rows = max_contiguous_rows(num_tokens * topk, num_local, alignment)
    assert expert_ids.dtype == torch.int32 and offsets.numel() == num_local + 1
    assert src_token.dtype == torch.int64 and row_of_slot.dtype == torch.int64
    assert layout.num_rows == num_rows and src_token.shape == (num_rows,)
    assert tuple(layout.row_of_slot.shape) == (num_tokens, topk)
    local, rank = _local_slots(topk_ids, num_local, expert_start)
    counts = torch.bincount(local[local >= 0], minlength=num_local)
    assert layout.tokens_per_expert.cpu().tolist() == counts.tolist(), "tokens_per_expert"
    padded = (counts + alignment - 1) // alignment * alignment
    assert offsets.tolist() == [0] + torch.cumsum(padded, 0).tolist(), "expert_offsets: aligned segments"
    assert int(offsets[-1]) <= num_rows
    # Every local slot is placed once, at its segment's start + its flat-order rank; the others nowhere.
    is_local = local >= 0
    want_row = torch.where(is_local, offsets[local.clamp(min=0)] + rank, -1)
    assert torch.equal(row_of_slot, want_row), "row_of_slot"
    rows = row_of_slot[is_local]
    assert expert_ids[rows].long().tolist() == local[is_local].tolist(), "expert_ids of placed rows"
    tokens = torch.arange(num_tokens * topk) // topk if topk else torch.zeros(0, dtype=torch.long)
    assert src_token[rows].tolist() == tokens[is_local].tolist(), "src_token of placed rows"
    # The rest (segment padding, the unused tail) is padding in both fields.
    pad = torch.ones(num_rows, dtype=torch.bool)
    pad[rows] = False
    assert bool((expert_ids[pad] == -1).all()) and bool((src_token[pad] == -1).all()), "padding rows"


def check_masked_layout(
    layout: MaskedLayout, topk_ids: torch.Tensor, num_local: int, expert_start: int, max_m: int
) -> None:
    """Invariants of a masked layout that drops overflow, from topk_ids alone."""
    num_tokens, topk = topk_ids.shape
    masked_m, src_token = layout.masked_m.cpu(), layout.src_token.cpu()
    row_of_slot = layout.row_of_slot.cpu().reshape(-1)
    assert masked_m.dtype == torch.int32 and src_token.dtype == torch.int64 and row_of_slot.dtype == torch.int64
    assert tuple(src_token.shape) == (num_local, max_m) and tuple(layout.row_of_slot.shape) == (num_tokens, topk)
    local, rank = _local_slots(topk_ids, num_local, expert_start)
    counts = torch.bincount(local[local >= 0], minlength=num_local)
    assert masked_m.tolist() == counts.clamp(max=max_m).tolist(), "masked_m"
    kept = (local >= 0) & (rank < max_m)  # overflow is dropped: an expert keeps its first max_m slots
    assert torch.equal(row_of_slot, torch.where(kept, local * max_m + rank, -1)), "row_of_slot"
    tokens = torch.arange(num_tokens * topk) // topk if topk else torch.zeros(0, dtype=torch.long)
    flat = src_token.reshape(-1)
    assert flat[row_of_slot[kept]].tolist() == tokens[kept].tolist(), "src_token of placed rows"
    past = torch.arange(max_m)[None, :] >= masked_m[:, None].long()
    assert bool((src_token[past] == -1).all()) and bool((src_token[~past] >= 0).all()), "rows past masked_m"


def assert_same_layout(got, want) -> None:
    """Bit-identical: every field's dtype, shape and values."""
    assert type(got) is type(want)
    for field in got.__dataclass_fields__:
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and a.shape == b.shape, (field, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.cpu(), b.cpu()), f"{field} differs:\n{a}\n{b}"
